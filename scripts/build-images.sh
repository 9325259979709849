#!/usr/bin/env bash
# Builds the container images a real lab cluster needs, with no registry and no Docker
# engine (buildah + mmdebstrap from Debian), and caches each as an OCI archive outside the
# repo, keyed by a digest of its inputs, so a run where nothing changed costs ~0.1 s:
#
#   $CACHE/images/pause-<digest>.oci.tar                 localhost/pause:<pause.c version>
#       FROM scratch + the static pause binary built by scripts/build-kubernetes.sh
#   $CACHE/images/debian-bookworm-slim-<digest>.oci.tar  docker.io/library/debian:bookworm-slim
#       `mmdebstrap --variant=minbase bookworm`, slimmed like Debian's own image, trusting
#       the host's extra CA certificates (this machine's HTTPS passes a TLS proxy)
#   $CACHE/images/wgmanager-<digest>.oci.tar             localhost/wgmanager:<digest>
#       deploy/Dockerfile, built unmodified from the repo root with
#       `buildah bud --pull=never --network=host --layers`
#   $CACHE/images/busybox-<digest>.oci.tar              localhost/busybox:<digest>
#       FROM scratch + Debian's busybox-static and a link per applet: the lab's test pods
#   $CACHE/images/wgmanager.current    the agent image reference last built or found
#   $CACHE/images/images.json          {"pause"|"base"|"wgmanager"|"busybox": {"ref", "archive"}}
#   build/agent-image.json (in the checkout)  {"ref", "archive"} of this checkout's agent image
#
# The agent's <digest> covers deploy/Dockerfile, .dockerignore, pyproject.toml, README.md,
# bpf/ and wgmanager/ (without __pycache__ and *.pyc) and the base image's digest. The
# two newest agent archives (and their buildah tags) are kept, older ones deleted.
# stdout carries exactly one line, the agent image reference; progress goes to stderr.
# The images stay in buildah's local storage too (`buildah images`).
#
# Usage: build-images.sh [NAME...]   NAMEs (pause, base, wgmanager, busybox) build and index
# only those (wgmanager needs base), and stdout then carries their references, one a line.
set -euo pipefail
cd "$(dirname "$0")/.."

ONLY=("$@")
for n in "${ONLY[@]}"; do
  [[ " pause base wgmanager busybox " == *" $n "* ]] \
    || { echo "images: unknown image $n (pause, base, wgmanager, busybox)" >&2; exit 2; }
done
[[ " ${ONLY[*]} " != *" wgmanager "* ]] || ONLY+=(base)
want() { ((${#ONLY[@]} == 0)) || [[ " ${ONLY[*]} " == *" $1 "* ]]; }

CACHE="${WGM_CACHE_DIR:-/var/cache/wgmanager}"
KUBE_VERSION="${KUBE_VERSION:-1.20.2}"
IMAGES="$CACHE/images"
KEEP_AGENT_ARCHIVES=4  # several checkouts on one machine each keep theirs
log() { printf 'images: %s\n' "$*" >&2; }
short_digest() { sha256sum | cut -c1-12; }
export LC_ALL=C

# ---- inputs and keys (cheap: this is all a no-op run does) --------------------------------
pause_bin="$CACHE/kubernetes-$KUBE_VERSION/pause"
if [[ ! -x "$pause_bin" ]]; then
  log "no pause binary at $pause_bin: building it"
  bash scripts/build-kubernetes.sh pause >&2
fi
pause_version=$(cat "$CACHE/kubernetes-$KUBE_VERSION/pause.version" 2>/dev/null || echo 0)
pause_ref="localhost/pause:$pause_version"
pause_key=$( { echo "pause-image v1 $pause_ref"; sha256sum < "$pause_bin"; } | short_digest)
pause_archive="$IMAGES/pause-$pause_key.oci.tar"

base_ref="docker.io/library/debian:bookworm-slim"   # what deploy/Dockerfile's FROM resolves to
base_suites=("deb http://deb.debian.org/debian bookworm main"
             "deb http://deb.debian.org/debian bookworm-updates main"
             "deb http://deb.debian.org/debian-security bookworm-security main")
# Debian's bookworm-slim drops these (debuerreotype --slimify); later apt installs do too.
slim_excludes=('/usr/share/doc/*' '/usr/share/groff/*' '/usr/share/info/*' '/usr/share/linda/*'
               '/usr/share/lintian/overrides/*' '/usr/share/locale/*' '/usr/share/man/*')
shopt -s nullglob
host_cas=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
base_key=$( { echo "base-image v3 minbase bookworm merged-usr +ca-certificates, no recommends";
              printf '%s\n' "${base_suites[@]}" "${slim_excludes[@]}";
              if ((${#host_cas[@]})); then cat "${host_cas[@]}"; fi; } | short_digest)
base_archive="$IMAGES/debian-bookworm-slim-$base_key.oci.tar"

agent_key=$( { echo "agent-image v1 base=$base_key";
               find deploy/Dockerfile .dockerignore pyproject.toml README.md bpf wgmanager \
                 -name __pycache__ -prune -o -type f ! -name '*.pyc' -print0 \
                 | sort -z | xargs -0 sha256sum;
               find bpf wgmanager -type l -printf '%p -> %l\n' | sort; } | short_digest)
agent_ref="localhost/wgmanager:$agent_key"
agent_archive="$IMAGES/wgmanager-$agent_key.oci.tar"

busybox_bin=$(readlink -f "$(command -v busybox 2>/dev/null || echo /bin/busybox)")
busybox_key=$( { echo "busybox-image v1"; sha256sum < "$busybox_bin"; } | short_digest)
busybox_ref="localhost/busybox:$busybox_key"
busybox_archive="$IMAGES/busybox-$busybox_key.oci.tar"

declare -A REF=([pause]=$pause_ref [base]=$base_ref [wgmanager]=$agent_ref [busybox]=$busybox_ref)
declare -A ARCHIVE=([pause]=$pause_archive [base]=$base_archive [wgmanager]=$agent_archive
                    [busybox]=$busybox_archive)
NAMES=(pause base wgmanager busybox)
wanted=()
for n in "${NAMES[@]}"; do if want "$n"; then wanted+=("$n"); fi; done

write_index() {   # merges the wanted entries; only rewrites what changed, so a no-op run
  local args=() n current   # leaves the files alone
  for n in "${wanted[@]}"; do args+=("$n" "${REF[$n]}" "${ARCHIVE[$n]}"); done
  python3 - "$IMAGES/images.json" "${args[@]}" <<'PY'
import json, os, sys
path, args = sys.argv[1], sys.argv[2:]
try:
    with open(path) as f:
        old = json.load(f)
except (OSError, ValueError):
    old = {}
new = dict(old)
for i in range(0, len(args), 3):
    new[args[i]] = {"ref": args[i + 1], "archive": args[i + 2]}
if new != old:
    lines = [f'  {json.dumps(k)}: {json.dumps(v)}' for k, v in new.items()]
    with open(path + ".tmp", "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    os.replace(path + ".tmp", path)
PY
  want wgmanager || return 0
  # This checkout's own agent image: the index says what was built last on the machine,
  # which may be another checkout's (wgmanager.lab.kubelets prefers this file).
  mkdir -p build
  printf '{"ref": "%s", "archive": "%s"}\n' "$agent_ref" "$agent_archive" > build/agent-image.json
  current=$(cat "$IMAGES/wgmanager.current" 2>/dev/null || true)
  [[ "$current" == "$agent_ref" ]] \
    || { echo "$agent_ref" > "$IMAGES/wgmanager.current.tmp"; mv "$IMAGES/wgmanager.current.tmp" "$IMAGES/wgmanager.current"; }
}

print_refs() {    # the stdout contract: the agent's reference, or each named image's
  local n
  if ((${#ONLY[@]} == 0)); then echo "$agent_ref"; return; fi
  for n in "${wanted[@]}"; do echo "${REF[$n]}"; done
}

all_cached=1
for n in "${wanted[@]}"; do [[ -s "${ARCHIVE[$n]}" ]] || all_cached=0; done
if ((all_cached)); then
  mkdir -p "$IMAGES"
  write_index
  log "cached in $IMAGES: $(for n in "${wanted[@]}"; do printf '%s ' "${REF[$n]}"; done)"
  print_refs
  exit 0
fi

# ---- slow path: build what is missing -------------------------------------------------------
mkdir -p "$IMAGES"
exec 9>"$IMAGES/.lock"
flock 9   # a concurrent run waits, then finds the archives

source scripts/apt-ensure.sh
apt_ensure buildah mmdebstrap

tmp=$(mktemp -d "$IMAGES/.work.XXXXXX")
containers=()
cleanup() {
  local c
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

export_archive() {   # export_archive REF ARCHIVE: the image, named REF inside the archive
  buildah push --quiet "$1" "oci-archive:$tmp/out.oci.tar:$1" >/dev/null
  mv "$tmp/out.oci.tar" "$2"
}

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

prune() {   # prune NAME KEEP REPO: keep the KEEP newest $IMAGES/NAME-*.oci.tar (this script's)
  local a k old                  # and drop older ones, with their REPO:<digest> tags if any
  mapfile -t old < <(ls -1t "$IMAGES/$1"-[0-9a-f]*.oci.tar 2>/dev/null | tail -n +$(($2 + 1)))
  for a in "${old[@]}"; do
    k=${a##*/"$1"-}; k=${k%.oci.tar}
    rm -f "$a"
    [[ -z "$3" ]] || buildah rmi "$3:$k" >/dev/null 2>&1 || true
    log "pruned $a"
  done
}

if want pause && [[ ! -s "$pause_archive" ]]; then
  start=$SECONDS
  c=$(buildah from scratch); containers+=("$c")
  buildah copy --quiet --chmod 0755 "$c" "$pause_bin" /pause >/dev/null
  # As upstream's build/pause/Dockerfile: USER 65535:65535, ENTRYPOINT ["/pause"].
  buildah config --os linux --arch amd64 --user 65535:65535 --entrypoint '["/pause"]' \
    --label "io.wgmanager.inputs=$pause_key" "$c"
  buildah commit --quiet --rm "$c" "$pause_ref" >/dev/null; containers=()
  export_archive "$pause_ref" "$pause_archive"
  log "built $pause_ref -> $pause_archive ($((SECONDS - start)) s)"
  prune pause 1 ""
fi

if ! want base; then
  :
elif [[ ! -s "$base_archive" ]]; then
  start=$SECONDS
  log "building $base_ref with mmdebstrap (about a minute)"
  # merged-usr hook: /usr merged through usr-is-merged, as in Debian's images (without it
  # apt satisfies init-system-helpers with usrmerge, which drags in perl: +50 MB).
  # --skip=output/dev: no device nodes in the layer (the runtime provides /dev).
  mm_opts=(--variant=minbase --include=ca-certificates --format=tar --quiet
           --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --skip=output/dev)
  for e in "${slim_excludes[@]}"; do mm_opts+=("--dpkgopt=path-exclude=$e"); done
  mm_opts+=("--dpkgopt=path-include=/usr/share/doc/*/copyright")
  # No recommends while building; the hook drops the option, so the image's apt keeps
  # Debian's defaults.
  mm_opts+=(--aptopt='APT::Install-Recommends "false"'
            --customize-hook='rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"')
  # The host's extra CAs (a TLS proxy's among them): trusted now, and again whenever a
  # later `apt-get install ca-certificates` or update-ca-certificates regenerates the bundle.
  mm_opts+=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"')
  for f in "${host_cas[@]}"; do mm_opts+=("--customize-hook=cp '$f' \"\$1/usr/local/share/ca-certificates/\""); done
  mm_opts+=(--customize-hook='chroot "$1" update-ca-certificates >/dev/null')
  mmdebstrap "${mm_opts[@]}" bookworm "$tmp/rootfs.tar" "${base_suites[@]}" \
    >"$tmp/mmdebstrap.log" 2>&1 \
    || { tail -20 "$tmp/mmdebstrap.log" >&2; cp "$tmp/mmdebstrap.log" "$IMAGES/mmdebstrap-failed.log";
         log "mmdebstrap failed (log: $IMAGES/mmdebstrap-failed.log)"; exit 1; }
  c=$(buildah from scratch); containers+=("$c")
  buildah add --quiet "$c" "$tmp/rootfs.tar" / >/dev/null
  buildah config --os linux --arch amd64 --cmd '["bash"]' \
    --label "io.wgmanager.inputs=$base_key" "$c"
  buildah commit --quiet --rm "$c" "$base_ref" >/dev/null; containers=()
  rm -f "$tmp/rootfs.tar"
  export_archive "$base_ref" "$base_archive"
  log "built $base_ref -> $base_archive ($((SECONDS - start)) s)"
  prune debian-bookworm-slim 1 ""
elif ! have_image "$base_ref" \
     || [[ "$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "io.wgmanager.inputs"}}' "$base_ref")" != "$base_key" ]]; then
  # The archive is the cache; buildah's storage may have lost the image (or hold another).
  id=$(buildah pull --quiet "oci-archive:$base_archive")
  buildah tag "$id" "$base_ref"
  log "loaded $base_ref from $base_archive"
fi

if want busybox && [[ ! -s "$busybox_archive" ]]; then
  start=$SECONDS
  # Static busybox and a relative link per applet (sh, sleep, ping, nc, ip, ...).
  mkdir -p "$tmp/busybox/bin"
  cp "$busybox_bin" "$tmp/busybox/bin/busybox"
  for applet in $("$busybox_bin" --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$tmp/busybox/bin/$applet"
  done
  tar -C "$tmp/busybox" --owner=0 --group=0 --numeric-owner -cf "$tmp/busybox.tar" bin
  c=$(buildah from scratch); containers+=("$c")
  buildah add --quiet "$c" "$tmp/busybox.tar" / >/dev/null
  buildah config --os linux --arch amd64 --cmd '["sh"]' --env PATH=/bin \
    --label "io.wgmanager.inputs=$busybox_key" "$c"
  buildah commit --quiet --rm "$c" "$busybox_ref" >/dev/null; containers=()
  export_archive "$busybox_ref" "$busybox_archive"
  rm -rf "$tmp/busybox" "$tmp/busybox.tar"
  log "built $busybox_ref -> $busybox_archive ($((SECONDS - start)) s)"
  prune busybox 1 localhost/busybox
fi

if want wgmanager && [[ ! -s "$agent_archive" ]]; then
  start=$SECONDS
  log "building $agent_ref from deploy/Dockerfile (1-2 minutes the first time)"
  buildah bud --pull=never --network=host --layers --quiet -f deploy/Dockerfile \
    --label "io.wgmanager.inputs=$agent_key" -t "$agent_ref" . >"$tmp/bud.log" 2>&1 \
    || { tail -30 "$tmp/bud.log" >&2; cp "$tmp/bud.log" "$IMAGES/bud-failed.log";
         log "buildah bud failed (log: $IMAGES/bud-failed.log)"; exit 1; }
  export_archive "$agent_ref" "$agent_archive"
  log "built $agent_ref -> $agent_archive ($((SECONDS - start)) s)"
  prune wgmanager "$KEEP_AGENT_ARCHIVES" localhost/wgmanager
fi

write_index
print_refs
