#!/usr/bin/env bash
# Builds the kernel lane's VM image and prints its directory:
#
#   $CACHE/vm-<digest>/vmlinux        Debian's kernel (the one whose headers `make setup`
#                                     installs), uncompressed: qemu boots it by its PVH entry
#   $CACHE/vm-<digest>/initramfs.gz   busybox + the virtio/9p/overlay modules; its /init
#                                     mounts the shares and hands over to the guest script
#   $CACHE/vm-<digest>/rootfs/        `mmdebstrap bookworm` + that kernel's modules and
#                                     headers (bcc compiles against them in the VM), shared
#                                     read-only over 9p under a tmpfs overlay
#
# Why a VM: this machine's kernel has no WireGuard, and kernel WireGuard is what most
# nodes run. Debian's 6.1 kernel has it as a module. KVM is unusable here (PVM), so
# tests/kernel/vm.py boots this image under software emulation (TCG).
#
# <digest> covers this script, the kernel and busybox versions and the wireguard-go .deb:
# a run where nothing changed costs a few dpkg queries. Concurrent runs wait on a lock.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${WGM_CACHE_DIR:-/var/cache/wgmanager}"
log() { printf 'vm: %s\n' "$*" >&2; }
source scripts/apt-ensure.sh
apt_ensure qemu-system-x86 mmdebstrap busybox-static kmod linux-headers-amd64

# The kernel is the one linux-headers-amd64 points at: the VM's bcc gets headers that match.
kpkg=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | grep -o 'linux-headers-[^ ,]*-amd64' | head -n1)
KVER=${kpkg#linux-headers-}
KPKGVER=$(dpkg-query -W -f='${Version}' "$kpkg")
[[ -n "$KVER" && -n "$KPKGVER" ]] || { log "cannot tell the kernel version from linux-headers-amd64; run \`apt-get install linux-headers-amd64\`"; exit 1; }
wg_go_deb=$(ls "$CACHE"/apt-backports/debs/wireguard-go_*_amd64.deb 2>/dev/null | sort -V | tail -n1 || true)
[[ -n "$wg_go_deb" ]] || { log "no wireguard-go .deb under $CACHE/apt-backports/debs; run scripts/install-wireguard-go.sh first"; exit 1; }

ROOTFS_PACKAGES=(
  kmod iproute2 wireguard-tools iputils-ping procps util-linux mount tcpdump iperf3
  python3 python3-bpfcc   # the project's .venv (shared) runs on this python3 and sees this bcc
  nftables ca-certificates
)
SUITES=("deb http://deb.debian.org/debian bookworm main"
        "deb http://deb.debian.org/debian bookworm-updates main"
        "deb http://deb.debian.org/debian-security bookworm-security main")
key=$( { cat "$0"; echo "$KVER $KPKGVER"; dpkg-query -W -f='${Version}' busybox-static;
         basename "$wg_go_deb"; printf '%s\n' "${ROOTFS_PACKAGES[@]}" "${SUITES[@]}"; } \
       | sha256sum | cut -c1-12)
out="$CACHE/vm-$key"

mkdir -p "$CACHE"
exec 9>"$CACHE/.vm.lock"
flock 9
if [[ -e "$out/ready" ]]; then
  log "cached: $out (kernel $KVER)"
  echo "$out"
  exit 0
fi

start=$SECONDS
log "building the VM image (kernel $KVER; about two minutes)"
work="$out.tmp"
rm -rf "$work" && mkdir -p "$work/debs"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

( cd "$work/debs" && apt-get -o APT::Sandbox::User=root download -qq \
    "linux-image-$KVER=$KPKGVER" "linux-headers-$KVER=$KPKGVER" \
    "linux-headers-${KVER%-amd64}-common=$KPKGVER" ) \
  || { apt-get update -qq && ( cd "$work/debs" && apt-get -o APT::Sandbox::User=root download -qq \
    "linux-image-$KVER=$KPKGVER" "linux-headers-$KVER=$KPKGVER" \
    "linux-headers-${KVER%-amd64}-common=$KPKGVER" ); }

# Root filesystem. The kernel packages are unpacked, not installed: installing them would
# pull in an initramfs generator and a compiler the VM does not need.
rootfs="$work/rootfs"
mmdebstrap --variant=essential --quiet --include="$(IFS=,; echo "${ROOTFS_PACKAGES[*]}")" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  bookworm "$rootfs" "${SUITES[@]}" >"$work/mmdebstrap.log" 2>&1 \
  || { tail -20 "$work/mmdebstrap.log" >&2; log "mmdebstrap failed"; exit 1; }
# --keep-directory-symlink: /lib is a symlink to usr/lib here (merged /usr); plain
# `dpkg-deb -x` would replace it with a directory holding only the modules.
for deb in "$work"/debs/*.deb "$wg_go_deb"; do
  dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$rootfs"
done
depmod -b "$rootfs" "$KVER"     # the .deb ships no modules.dep
ln -sfn "/usr/src/linux-headers-$KVER" "$rootfs/lib/modules/$KVER/build"
ln -sfn "/usr/src/linux-headers-${KVER%-amd64}-common" "$rootfs/lib/modules/$KVER/source"
echo wgm-vm > "$rootfs/etc/hostname"

# The kernel, uncompressed (PVH boot skips the decompressor: ~10 s less under TCG).
python3 - "$rootfs/boot/vmlinuz-$KVER" "$work/vmlinux" <<'EOF'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("vm: no XZ payload in " + sys.argv[1])
d = lzma.LZMADecompressor()
open(sys.argv[2], "wb").write(d.decompress(data[start:]))
EOF

# Initramfs: busybox, the modules to reach the shares (in dependency order), and /init.
ird="$work/initramfs"
mkdir -p "$ird/bin" "$ird/m" "$ird/proc" "$ird/sys" "$ird/dev" "$ird/lower" "$ird/up" "$ird/newroot"
cp /bin/busybox "$ird/bin/busybox"
for applet in sh mount mkdir insmod switch_root cat echo sleep; do ln -s busybox "$ird/bin/$applet"; done
: > "$ird/m/order"
while read -r _ path _; do
  name=$(basename "$path")
  grep -qx "$name" "$ird/m/order" && continue
  cp "$path" "$ird/m/$name"
  echo "$name" >> "$ird/m/order"
done < <(for mod in virtio_pci 9pnet_virtio 9p overlay; do
           modprobe -d "$rootfs" -S "$KVER" --show-depends "$mod" | grep '^insmod'; done)
cat > "$ird/init" <<'EOF'
#!/bin/sh
# PID 1 of the initramfs: the 9p root under a tmpfs overlay, the project (same path as on
# the host, also under an overlay so tests may write) and the writable out share, then the
# guest script from the project (tests/kernel/guest.sh).
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $(cat /m/order); do insmod "/m/$m"; done
project=; for a in $(cat /proc/cmdline); do case "$a" in wgm.project=*) project=${a#wgm.project=};; esac; done
ninep="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$ninep,ro,cache=loose" rootfs /lower
mount -t tmpfs -o mode=0755 tmpfs /up
mkdir -p /up/root /up/rootw /up/proj /up/projw /up/projlower
mount -t overlay overlay -o lowerdir=/lower,upperdir=/up/root,workdir=/up/rootw /newroot
mount -t 9p -o "$ninep,ro,cache=loose" project /up/projlower
mkdir -p "/newroot$project" /newroot/run/wgm-out
mount -t overlay overlay -o "lowerdir=/up/projlower,upperdir=/up/proj,workdir=/up/projw" "/newroot$project"
mount -t 9p -o "$ninep" out /newroot/run/wgm-out
for d in proc sys dev; do mount --move "/$d" "/newroot/$d"; done
exec switch_root /newroot /bin/sh "$project/tests/kernel/guest.sh" "$project"
EOF
chmod +x "$ird/init"
( cd "$ird" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initramfs.gz" )

echo "$KVER" > "$work/kernel-version"
rm -rf "$work/debs" "$ird" "$work/mmdebstrap.log"
touch "$work/ready"
rm -rf "$out" && mv "$work" "$out"
# Older images (other inputs) are not needed any more.
for old in "$CACHE"/vm-*; do
  [[ "$old" == "$out" || "$old" == "$out.tmp" ]] || rm -rf "$old"
done
log "built $out in $((SECONDS - start)) s"
echo "$out"
