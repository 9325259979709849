#!/usr/bin/env bash
# Installs wireguard-go from Debian bookworm-backports, pinned to one version, and keeps
# Debian 12's own build beside it for the compatibility tests.
#
# Why: bookworm's 0.0.20220316 has no TUN offloads and a 208 KiB receive buffer (13-48
# thousand receive-buffer drops per 3 s of iperf3, 2-3% of plaintext throughput); the
# backports build 0.0.20231211 opens its TUN with vnet_hdr (TSO, UDP GSO/GRO) and sizes
# its own sockets to 14 MiB: about 3x the throughput, no drops (docs/benchmarks.md).
#
# The system's apt sources stay untouched: backports is read through a private apt
# configuration under the cache directory, and only this one package is taken from it.
set -euo pipefail

VERSION="${WG_GO_VERSION:-0.0.20231211-1~bpo12+1}"
OLD_VERSION="${WG_GO_OLD_VERSION:-0.0.20220316-1+b4}"   # Debian 12's own build
CACHE="${WGM_CACHE_DIR:-/var/cache/wgmanager}"
log() { printf 'wireguard-go: %s\n' "$*"; }

installed=$(dpkg-query -W -f='${Version}' wireguard-go 2>/dev/null || true)
old_dir="$CACHE/wireguard-go-${OLD_VERSION%%-*}"
if [[ "$installed" == "$VERSION" && -x "$old_dir/usr/bin/wireguard-go" ]]; then
  log "$VERSION installed; Debian 12's ${OLD_VERSION} kept at $old_dir"
  exit 0
fi

apt_dir="$CACHE/apt-backports"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/debs"
echo "deb http://deb.debian.org/debian bookworm-backports main" > "$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
          -o "APT::Sandbox::User=root")
export DEBIAN_FRONTEND=noninteractive

if [[ "$installed" != "$VERSION" ]]; then
  log "fetching $VERSION from bookworm-backports (private apt configuration)"
  apt-get "${apt_opts[@]}" update -qq
  # apt-get download checks the file against the signed Release of that suite.
  ( cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" download -qq "wireguard-go=$VERSION" )
  deb=$(ls "$apt_dir"/debs/wireguard-go_*bpo*_amd64.deb | head -n1)
  dpkg -i "$deb" >/dev/null
  log "installed $VERSION ($(command -v wireguard-go))"
fi

if [[ ! -x "$old_dir/usr/bin/wireguard-go" ]]; then
  # The tests prove a node with the old binary (no offloads) still works.
  log "keeping Debian 12's $OLD_VERSION at $old_dir for the compatibility tests"
  tmp=$(mktemp -d)
  ( cd "$tmp" && apt-get -o APT::Sandbox::User=root download -qq "wireguard-go=$OLD_VERSION" \
      2>/dev/null ) || {
    apt-get update -qq
    ( cd "$tmp" && apt-get -o APT::Sandbox::User=root download -qq "wireguard-go=$OLD_VERSION" )
  }
  rm -rf "$old_dir.tmp" && mkdir -p "$old_dir.tmp"
  dpkg-deb -x "$tmp"/wireguard-go_*.deb "$old_dir.tmp"
  rm -rf "$tmp" "$old_dir" && mv "$old_dir.tmp" "$old_dir"
fi
