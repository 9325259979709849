#!/usr/bin/env bash
# Builds the Kubernetes binaries a real lab cluster needs offline, from Debian bookworm's
# `kubernetes` source package (1.20.2, vendored; no registry ships these binaries), and the
# static `pause` binary from the same tree. Everything is cached outside the repo, keyed by
# version, so only the first run on a machine pays (~10 minutes on 2 cores):
#
#   $WGM_CACHE_DIR/kubernetes-VERSION/{kube-apiserver,kubelet,kube-controller-manager,
#                                      kube-scheduler,kubectl,pause}
#   $WGM_CACHE_DIR/kube-apiserver-VERSION/kube-apiserver   (the path older code reads:
#                                      kept, as the original file or a symlink to the above)
#
# Only missing binaries are built, all from ONE extraction of the source tree (~1.8 GB),
# which is deleted afterwards. Leaves the system's apt sources untouched: the deb-src entry
# lives in a private apt configuration. Usage: build-kubernetes.sh [BINARY...]
set -euo pipefail

VERSION="${KUBE_VERSION:-1.20.2}"
CACHE="${WGM_CACHE_DIR:-/var/cache/wgmanager}"
OUT="$CACHE/kubernetes-$VERSION"
LEGACY="$CACHE/kube-apiserver-$VERSION/kube-apiserver"
if (($#)); then WANT=("$@"); else
  WANT=(kube-apiserver kubelet kube-controller-manager kube-scheduler kubectl pause)
fi
log() { printf 'kubernetes: %s\n' "$*"; }

missing_binaries() {
  local b
  for b in "${WANT[@]}"; do [[ -x "$OUT/$b" ]] || printf '%s\n' "$b"; done
}

# Pre-existing kube-apiserver at the old path (built by the former build-kube-apiserver.sh):
# adopt it (hard link, same file system) instead of building it again. Keep the old path
# valid in the other direction too: a symlink into $OUT.
link_legacy() {
  if [[ ! -e "$OUT/kube-apiserver" && -f "$LEGACY" && -x "$LEGACY" && ! -L "$LEGACY" ]]; then
    mkdir -p "$OUT"
    ln "$LEGACY" "$OUT/kube-apiserver" 2>/dev/null || cp "$LEGACY" "$OUT/kube-apiserver"
    log "adopted $LEGACY"
  fi
  if [[ -x "$OUT/kube-apiserver" && ! -e "$LEGACY" ]]; then
    mkdir -p "$(dirname "$LEGACY")"
    ln -sfn "../kubernetes-$VERSION/kube-apiserver" "$LEGACY"
  fi
}

if [[ -z "$(missing_binaries)" && ( ! " ${WANT[*]} " =~ " kube-apiserver " || -x "$LEGACY" ) ]]; then
  log "cached in $OUT: ${WANT[*]}"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.kubernetes-$VERSION.lock"
flock 9   # a concurrent `make setup` waits here instead of building the same tree twice
link_legacy
mapfile -t NEED_BIN < <(missing_binaries)
if ((${#NEED_BIN[@]} == 0)); then
  log "cached in $OUT: ${WANT[*]}"
  exit 0
fi

pkgs=(golang-go dpkg-dev rsync)
[[ " ${NEED_BIN[*]} " =~ " pause " ]] && pkgs+=(gcc libc6-dev)
[[ " ${NEED_BIN[*]} " =~ " kube-apiserver " ]] && pkgs+=(etcd-server)
source "$(dirname "$0")/apt-ensure.sh"
apt_ensure "${pkgs[@]}"
if [[ " $APT_INSTALLED " == *" etcd-server "* ]]; then
  # etcd-server's own service is not ours: tests run private etcd instances.
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi

work="$CACHE/build-kubernetes-$VERSION"
apt_dir="$CACHE/apt-src"
rm -rf "$work" "$CACHE/build-$VERSION"   # half-built trees (this script's, the former one's)
mkdir -p "$work" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
trap 'rm -rf "$work"' EXIT
echo "deb-src http://deb.debian.org/debian bookworm main" > "$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives" -o APT::Sandbox::User=root)
log "fetching the kubernetes source package"
apt-get "${apt_opts[@]}" update -qq
( cd "$work" && apt-get "${apt_opts[@]}" source --download-only -qq kubernetes >/dev/null )
dsc=$(ls "$work"/kubernetes_*.dsc | head -n1)
[[ "$(basename "$dsc")" == kubernetes_*"$VERSION"-*.dsc ]] \
  || { log "bookworm's source is $(basename "$dsc"), not $VERSION"; exit 1; }
( cd "$work" && dpkg-source -x --no-check "$dsc" src >/dev/null )
tree="$work/src"

mkdir -p "$OUT"
install_bin() {   # install_bin SRC NAME: atomically into $OUT
  cp "$1" "$OUT/$2.tmp" && chmod 0755 "$OUT/$2.tmp" && mv "$OUT/$2.tmp" "$OUT/$2"
}

go_targets=()
for b in "${NEED_BIN[@]}"; do [[ "$b" == pause ]] || go_targets+=("cmd/$b"); done

if [[ " ${NEED_BIN[*]} " =~ " pause " ]]; then
  pause_c=$(find "$tree/build/pause" -name pause.c | head -n1)
  [[ -n "$pause_c" ]] || { log "no pause.c under $tree/build/pause"; exit 1; }
  tag=$(sed -n 's/^TAG[ ?:]*=[ ]*//p' "$tree/build/pause/Makefile" | head -n1)
  gcc -Os -Wall -Werror -static -DVERSION="v${tag:-0}-wgmanager" -o "$work/pause" "$pause_c"
  strip "$work/pause"
  install_bin "$work/pause" pause
  printf '%s\n' "${tag:-0}" > "$OUT/pause.version"
  log "built $OUT/pause (pause.c ${tag:-?}, static)"
fi

if ((${#go_targets[@]})); then
  log "building ${go_targets[*]} in $tree (takes several minutes)"
  start=$SECONDS
  ( cd "$tree" && GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0 GOCACHE="$work/gocache" \
      make WHAT="${go_targets[*]}" >"$work/build.log" 2>&1 ) \
    || { tail -20 "$work/build.log" >&2; cp "$work/build.log" "$CACHE/build-kubernetes.log";
         log "build failed (log: $CACHE/build-kubernetes.log)"; exit 1; }
  for t in "${go_targets[@]}"; do
    b=${t#cmd/}
    bin="$tree/_output/local/bin/linux/amd64/$b"
    [[ -x "$bin" ]] || bin=$(find "$tree/_output" -type f -name "$b" -perm -u+x | head -n1)
    [[ -n "$bin" ]] || { log "make did not produce $b"; exit 1; }
    install_bin "$bin" "$b"
  done
  log "built ${go_targets[*]#cmd/} in $((SECONDS - start)) s"
fi
link_legacy
log "cached in $OUT: ${WANT[*]}"
