# Sourced by the set-up scripts: `apt_ensure PKG...` installs those of PKG that are not
# installed (no recommends), and prints what it installs through the caller's `log`.
# Returns 0 with nothing to do; sets APT_INSTALLED to what it installed.
apt_ensure() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$p")
  done
  APT_INSTALLED="${missing[*]}"
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
