# Sourced by kafka.sh and postgres.sh: install Debian packages when they are missing, if we may.
# apt_install PACKAGE… — runs apt-get as root (non-interactive); returns 1 when not root or no apt.
apt_install() {
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    return 1
  fi
  echo "[deploy/local] installing $* from Debian's packages" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}
