#!/usr/bin/env bash
# Builds kube-apiserver offline from Debian bookworm's `kubernetes` source package (no
# registry ships the binary) and caches it outside the repo, keyed by version, so only the
# first run on a machine pays the ~5 minutes. Leaves the system's apt sources untouched:
# the deb-src entry lives in a private apt configuration.
set -euo pipefail

VERSION="${KUBE_VERSION:-1.20.2}"
CACHE="${WGM_CACHE_DIR:-/var/cache/wgmanager}"
OUT="$CACHE/kube-apiserver-$VERSION"
log() { printf 'kube-apiserver: %s\n' "$*"; }

if [[ -x "$OUT/kube-apiserver" ]]; then
  log "cached at $OUT/kube-apiserver"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
for p in golang-go dpkg-dev etcd-server rsync; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || NEED="${NEED:-} $p"
done
if [[ -n "${NEED:-}" ]]; then
  log "installing$NEED"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $NEED >/dev/null
  # etcd-server's own service is not ours: tests run private etcd instances.
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi

work="$CACHE/build-$VERSION"
apt_dir="$CACHE/apt-src"
mkdir -p "$work" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
echo "deb-src http://deb.debian.org/debian bookworm main" > "$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives")
log "fetching the kubernetes source package"
apt-get "${apt_opts[@]}" update -qq
( cd "$work" && apt-get "${apt_opts[@]}" source --download-only kubernetes -qq )
tree=$(find "$work" -maxdepth 1 -type d -name "kubernetes-*" | head -n1)
if [[ -z "$tree" ]]; then
  dsc=$(ls "$work"/kubernetes_*.dsc | head -n1)
  ( cd "$work" && dpkg-source -x --no-check "$dsc" >/dev/null )
  tree=$(find "$work" -maxdepth 1 -type d -name "kubernetes-*" | head -n1)
fi
log "building in $tree (takes a few minutes)"
( cd "$tree" && GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0 \
    make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1 ) \
  || { tail -20 "$work/build.log" >&2; log "build failed (log: $work/build.log)"; exit 1; }
bin=$(find "$tree/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
mkdir -p "$OUT"
cp "$bin" "$OUT/kube-apiserver.tmp" && mv "$OUT/kube-apiserver.tmp" "$OUT/kube-apiserver"
rm -rf "$work"   # the 1.8 GB tree; the binary is all we keep
log "built $OUT/kube-apiserver"
