#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine, as root. Safe to repeat:
# every step checks before it acts, so a second run takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  wireguard-tools                    # `wg` for humans (wireguard-go: see below)
  python3-bpfcc bpfcc-tools          # the real bcc bindings (PyPI "bcc" is unrelated)
  python3-venv python3-dev           # venv that sees Debian's bcc module
  linux-headers-amd64                # headers bcc compiles against
  iproute2 tcpdump iperf3 iputils-ping procps kmod
  linux-perf                         # `make bench BENCH_ARGS=--profile`: where the CPU goes
  nftables iptables                  # benchmarks compare against route/rule based tools
  netcat-openbsd socat ethtool
  # A real multi-node lab cluster, with no registry and no Docker engine: one containerd
  # per node (runc, CNI plugins in /usr/lib/cni), images built by buildah from an
  # mmdebstrap base, busybox for the lab's tiny pods.
  containerd runc containernetworking-plugins buildah mmdebstrap busybox-static
)

log() { printf 'setup: %s\n' "$*"; }

source scripts/apt-ensure.sh
apt_ensure "${APT_PACKAGES[@]}"
if [[ -z "$APT_INSTALLED" ]]; then
  log "Debian packages present"
elif [[ " $APT_INSTALLED " == *" containerd "* ]]; then
  # The lab runs its own containerd per node; the package's service is not ours.
  systemctl disable containerd.service >/dev/null 2>&1 || true
  systemctl stop containerd.service >/dev/null 2>&1 || true
fi

# wireguard-go from bookworm-backports (TUN offloads, 14 MiB sockets), pinned, through a
# private apt configuration; Debian 12's own build is kept beside it for the tests.
bash scripts/install-wireguard-go.sh

# bcc looks for headers under /lib/modules/$(uname -r)/{build,source}. This kernel
# ships none, so point both halves at Debian's closest headers (see docs/install.md).
kdir="/lib/modules/$(uname -r)"
if [[ ! -e "$kdir/build/include" ]]; then
  arch_hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common_hdr=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [[ -n "$arch_hdr" && -n "$common_hdr" ]] || { echo "setup: no kernel headers under /usr/src; install linux-headers-amd64" >&2; exit 1; }
  mkdir -p "$kdir"
  ln -sfn "$arch_hdr" "$kdir/build"
  ln -sfn "$common_hdr" "$kdir/source"
  log "kernel headers linked: $kdir/build -> $arch_hdr"
fi

# bpffs for pinned maps.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf && log "mounted bpffs at /sys/fs/bpf"
fi

# Python virtual environment at .venv; --system-site-packages exposes Debian's bcc.
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
  log "created .venv"
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -e "$stamp" ]]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*; touch "$stamp"
  log "installed wgmanager and test extras into .venv"
else
  log ".venv up to date"
fi
# Real Kubernetes binaries for the end-to-end tests and the lab (kube-apiserver, kubelet,
# kube-controller-manager, kube-scheduler, kubectl, pause): built once from Debian's
# source package (no registry ships them), cached by version outside the repo.
bash scripts/build-kubernetes.sh
# The lab's images (pause, debian:bookworm-slim, the agent from deploy/Dockerfile) as OCI
# archives in /var/cache/wgmanager/images, keyed by input digest; prints the agent's tag.
agent_image=$(bash scripts/build-images.sh)
log "agent image: $agent_image"
# The kernel lane's VM image (Debian's kernel with WireGuard, a Debian root filesystem with
# bcc and that kernel's headers) in /var/cache/wgmanager/vm-<digest>: tests/kernel.
vm_image=$(bash scripts/build-vm.sh)
log "kernel lane VM image: $vm_image"
log "done"
