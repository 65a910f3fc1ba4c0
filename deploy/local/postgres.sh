#!/usr/bin/env bash
# Local PostgreSQL (Debian package binaries) with its own data dir, for
# integration tests and local dev. Runs as the 'postgres' system user when
# invoked as root (initdb refuses root), as the current user otherwise.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

LOCAL_DIR="${CCM_LOCAL_DIR:-$REPO_ROOT/.ccm-local}"
STATE="$LOCAL_DIR/postgres"
PORTFILE="$STATE/port"
BASEFILE="$STATE/pgbase"          # where data/, run/ and postgres.log really live
START_TIMEOUT="${CCM_PG_START_TIMEOUT:-60}"
STOP_TIMEOUT="${CCM_PG_STOP_TIMEOUT:-30}"
DB_USER=ccm
DB_PASS=ccm
DB_NAME=ccm

usage() {
  cat <<EOF
Usage: $(basename "$0") {start|stop|status|reset|logs|psql|--help}

Local PostgreSQL on 127.0.0.1 with its own data dir (role/db/password: ccm/ccm/ccm).

  start   initdb on first use, start (reusing the port of an earlier start),
          wait until ready, ensure role and database 'ccm', then print
            CCM_DATABASE_URL=postgresql+asyncpg://ccm:ccm@127.0.0.1:<port>/ccm
          on stdout. Already running: just prints the line.
  stop    fast shutdown (immediate after ${STOP_TIMEOUT}s). OK if not running.
  status  exit 0 if running (prints the line), 3 if not.
  reset   stop and delete all state (data, port).
  logs    print the last 100 lines of the server log.
  psql    open psql as superuser 'postgres' over the unix socket (extra args are passed on).

Environment:
  CCM_LOCAL_DIR         state root (default <repo>/.ccm-local); this uses \$CCM_LOCAL_DIR/postgres
  CCM_PG_FAST=1         fsync=off, synchronous_commit=off, full_page_writes=off
                        (applied on every start; unsafe on crash, fine for tests)
  CCM_PG_SHARED_BUFFERS shared_buffers (default 512MB: a month close writes a few hundred MB;
                        Debian's 128MB makes it checkpoint and evict throughout)
  CCM_PG_MAX_WAL_SIZE   max_wal_size (default 2GB): WAL between checkpoints
  CCM_PG_BINDIR         PostgreSQL bin dir (default: pg_config --bindir, else newest
                        /usr/lib/postgresql/*/bin)
  CCM_PG_START_TIMEOUT  seconds to wait for readiness (default 60)
State: $STATE  (data is moved to /var/tmp/ccm-pg-* if the 'postgres' user
       cannot reach it, e.g. under a home dir that is not world-traversable)
EOF
}

log() { echo "[postgres] $*" >&2; }
die() { echo "[postgres] ERROR: $*" >&2; exit 1; }

# --------------------------------------------------------------- binaries ---
# shellcheck source=deploy/local/apt-install.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh"
find_bindir() {
  local d
  if [[ -n "${CCM_PG_BINDIR:-}" ]]; then
    [[ -x "$CCM_PG_BINDIR/initdb" ]] || die "CCM_PG_BINDIR=$CCM_PG_BINDIR has no initdb"
    echo "$CCM_PG_BINDIR"; return
  fi
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; return; fi
  fi
  # shellcheck disable=SC2012  # version-sort the Debian dirs (15, 16, ...)
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; return; fi
  if [[ -z "${_PG_INSTALL_TRIED:-}" ]] && apt_install postgresql; then
    _PG_INSTALL_TRIED=1 find_bindir; return
  fi
  die "PostgreSQL server binaries not found (no initdb/pg_ctl). Install them with:
    apt-get update && apt-get install -y postgresql
  (or set CCM_PG_BINDIR)"
}

# ------------------------------------------------------------ run-as user ---
if [[ "$(id -u)" == 0 ]]; then
  PG_USER=postgres
  # cd /: the caller's cwd may not be readable by 'postgres'
  as_pg() { (cd / && runuser -u "$PG_USER" -- "$@"); }
else
  PG_USER="$(id -un)"
  as_pg() { "$@"; }
fi
# chown to the server user (only meaningful as root)
own_pg() { if [[ "$(id -u)" == 0 ]]; then chown "$PG_USER": "$@"; fi; }

# Decide (once) where the server's files live and remember it in $BASEFILE.
resolve_base() {
  if [[ -s "$BASEFILE" ]]; then
    PGBASE="$(cat "$BASEFILE")"
  else
    mkdir -p "$STATE"
    PGBASE="$STATE"
    if [[ "$(id -u)" == 0 ]]; then
      id "$PG_USER" >/dev/null 2>&1 || die "system user '$PG_USER' missing (apt-get install -y postgresql creates it)"
      chown "$PG_USER": "$STATE"
      chmod 0700 "$STATE"
      if ! as_pg test -w "$STATE" -a -x "$STATE"; then
        # a parent dir is not traversable by 'postgres' (e.g. /root/...): do not
        # chmod the user's dirs; keep the server files in /var/tmp instead
        chown root: "$STATE"
        PGBASE="/var/tmp/ccm-pg-$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)"
        mkdir -p "$PGBASE"
        chown "$PG_USER": "$PGBASE"
        chmod 0700 "$PGBASE"
        log "'$PG_USER' cannot reach $STATE; server files go to $PGBASE"
      fi
    fi
    echo "$PGBASE" >"$BASEFILE"
  fi
  DATA="$PGBASE/data"
  RUNDIR="$PGBASE/run"
  PGLOG="$PGBASE/postgres.log"
  # unix socket paths are limited to 107 bytes
  if (( ${#RUNDIR} + 20 > 107 )); then
    RUNDIR="/tmp/ccm-pg-$(printf '%s' "$PGBASE" | cksum | cut -d' ' -f1)"
  fi
}

pick_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

print_line() {
  echo "CCM_DATABASE_URL=postgresql+asyncpg://$DB_USER:$DB_PASS@127.0.0.1:$(cat "$PORTFILE")/$DB_NAME"
}

is_running() {
  [[ -s "$BASEFILE" ]] || return 1
  resolve_base
  [[ -f "$DATA/PG_VERSION" ]] || return 1
  as_pg "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

psql_admin() {
  as_pg "$BINDIR/psql" -X -q -h "$RUNDIR" -p "$(cat "$PORTFILE")" -U postgres -d postgres \
    -v ON_ERROR_STOP=1 "$@"
}

write_conf() {
  local port="$1" fast=off
  [[ "${CCM_PG_FAST:-0}" == 1 ]] && fast=on
  {
    echo "# generated by deploy/local/postgres.sh on every start; edits are overwritten"
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $port"
    echo "unix_socket_directories = '$RUNDIR'"
    echo "max_connections = 200"
    echo "shared_buffers = ${CCM_PG_SHARED_BUFFERS:-512MB}"
    echo "max_wal_size = ${CCM_PG_MAX_WAL_SIZE:-2GB}"
    echo "password_encryption = scram-sha-256"
    echo "logging_collector = off"
    echo "log_min_messages = warning"
    echo "log_line_prefix = '%m [%p] %q%u@%d '"
    if [[ "$fast" == on ]]; then
      echo "# CCM_PG_FAST=1"
      echo "fsync = off"
      echo "synchronous_commit = off"
      echo "full_page_writes = off"
    fi
  } >"$DATA/ccm.conf.tmp"
  own_pg "$DATA/ccm.conf.tmp"
  mv "$DATA/ccm.conf.tmp" "$DATA/ccm.conf"
}

do_start() {
  BINDIR="$(find_bindir)"
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w 120 9 || die "could not lock $STATE/.lock"
  resolve_base

  if is_running; then
    print_line
    return 0
  fi

  local port
  if [[ -s "$PORTFILE" ]]; then
    port="$(cat "$PORTFILE")"
  else
    port="$(pick_port)"
    echo "$port" >"$PORTFILE"
    log "picked port $port"
  fi
  if port_open "$port"; then
    die "port 127.0.0.1:$port (from $STATE) is in use by another process;" \
        "stop it, or run '$0 reset' to pick a new port (deletes the data)"
  fi

  mkdir -p "$RUNDIR"
  own_pg "$RUNDIR"
  chmod 0700 "$RUNDIR"

  if [[ ! -f "$DATA/PG_VERSION" ]]; then
    log "initdb $DATA ($("$BINDIR/postgres" --version))"
    rm -rf "$DATA"
    local pwfile
    pwfile="$(mktemp)"
    # superuser 'postgres': trust over the (0700) unix socket; TCP needs a password
    echo "postgres-$RANDOM$RANDOM" >"$pwfile"
    own_pg "$pwfile"
    if ! as_pg "$BINDIR/initdb" -D "$DATA" -U postgres --pwfile="$pwfile" \
        --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >"$PGBASE/initdb.log" 2>&1; then
      rm -f "$pwfile"
      cat "$PGBASE/initdb.log" >&2
      die "initdb failed"
    fi
    rm -f "$pwfile"
    echo "include_if_exists = 'ccm.conf'" >>"$DATA/postgresql.conf"
  fi
  write_conf "$port"

  log "starting PostgreSQL on 127.0.0.1:$port (data $DATA)"
  if [[ ! -e "$PGLOG" ]]; then
    touch "$PGLOG"
    own_pg "$PGLOG"
  fi
  # pg_ctl daemonizes the postmaster (own session); fd 9 (our lock) is closed for it
  if ! as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$PGLOG" -w -t "$START_TIMEOUT" start \
      >/dev/null 2>&1 9>&-; then
    echo "----- last 30 lines of $PGLOG -----" >&2
    tail -n 30 "$PGLOG" >&2 || true
    die "PostgreSQL failed to start (log: $PGLOG)"
  fi
  local deadline=$((SECONDS + START_TIMEOUT))
  until "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" -t 2; do
    (( SECONDS < deadline )) || die "pg_isready failed for ${START_TIMEOUT}s (log: $PGLOG)"
    sleep 0.2
  done

  # role + database (idempotent; cheap on every start)
  psql_admin >&2 <<SQL
SELECT 'CREATE ROLE $DB_USER LOGIN SUPERUSER' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER')
\gexec
ALTER ROLE $DB_USER WITH LOGIN SUPERUSER PASSWORD '$DB_PASS';
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB_NAME')
\gexec
SQL
  log "PostgreSQL is up on 127.0.0.1:$port (socket dir $RUNDIR)"
  print_line
}

do_stop() {
  BINDIR="$(find_bindir)"
  if ! is_running; then
    log "not running"
    return 0
  fi
  log "stopping PostgreSQL ($DATA) ..."
  if ! as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1; then
    log "fast shutdown timed out; immediate shutdown"
    as_pg "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w -t 10 stop >/dev/null 2>&1 || true
  fi
  log "stopped"
}

do_status() {
  BINDIR="$(find_bindir)"
  if is_running; then
    print_line
    return 0
  fi
  log "not running"
  return 3
}

do_reset() {
  do_stop
  if [[ -s "$BASEFILE" ]]; then
    resolve_base
    if [[ "$PGBASE" != "$STATE" ]]; then rm -rf "$PGBASE"; fi
    if [[ "$RUNDIR" != "$PGBASE/run" ]]; then rm -rf "$RUNDIR"; fi
  fi
  rm -rf "$STATE"
  log "removed $STATE"
}

case "${1:-}" in
  start)  do_start ;;
  stop)   do_stop ;;
  status) do_status ;;
  reset)  do_reset ;;
  logs)   [[ -s "$BASEFILE" ]] && resolve_base && tail -n 100 "$PGLOG" ;;
  psql)   shift; BINDIR="$(find_bindir)"; resolve_base; psql_admin "$@" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
