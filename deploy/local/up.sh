#!/usr/bin/env bash
# Start local Kafka + PostgreSQL for integration tests / dev, write
# $CCM_LOCAL_DIR/env and print its export lines on stdout:
#   eval "$(deploy/local/up.sh)"     or     deploy/local/up.sh && . .ccm-local/env
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
LOCAL_DIR="${CCM_LOCAL_DIR:-$REPO_ROOT/.ccm-local}"
ENVFILE="$LOCAL_DIR/env"

usage() {
  cat <<EOF
Usage: $(basename "$0") [--help]

Starts (or finds running) Kafka (kafka.sh start, installing jars on first use)
and PostgreSQL (postgres.sh start) in parallel, writes $ENVFILE with
  export CCM_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:<port>
  export CCM_DATABASE_URL=postgresql+asyncpg://ccm:ccm@127.0.0.1:<port>/ccm
and prints those lines on stdout (progress goes to stderr).
Environment: CCM_LOCAL_DIR, CCM_CACHE_DIR, CCM_PG_FAST, ... (see kafka.sh/postgres.sh --help)
Stop with: down.sh
EOF
}
case "${1:-}" in
  "") ;;
  -h|--help|help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

mkdir -p "$LOCAL_DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# PostgreSQL in the background while Kafka (the slow one) starts
"$SCRIPT_DIR/postgres.sh" start >"$tmp/pg.out" &
pg_pid=$!
kafka_rc=0
"$SCRIPT_DIR/kafka.sh" start >"$tmp/kafka.out" || kafka_rc=$?
pg_rc=0
wait "$pg_pid" || pg_rc=$?
if (( kafka_rc != 0 )); then echo "[up] ERROR: kafka.sh start failed (rc=$kafka_rc)" >&2; exit 1; fi
if (( pg_rc != 0 )); then echo "[up] ERROR: postgres.sh start failed (rc=$pg_rc)" >&2; exit 1; fi

kafka_line="$(grep -m1 '^CCM_KAFKA_BOOTSTRAP_SERVERS=' "$tmp/kafka.out")" \
  || { echo "[up] ERROR: no bootstrap line from kafka.sh" >&2; exit 1; }
pg_line="$(grep -m1 '^CCM_DATABASE_URL=' "$tmp/pg.out")" \
  || { echo "[up] ERROR: no URL line from postgres.sh" >&2; exit 1; }

{
  echo "# written by deploy/local/up.sh at $(date -Is)"
  echo "export $kafka_line"
  echo "export $pg_line"
} >"$ENVFILE.tmp"
mv "$ENVFILE.tmp" "$ENVFILE"

echo "[up] Kafka      listening on ${kafka_line#*=}" >&2
echo "[up] PostgreSQL listening on ${pg_line#*@} (user/password ccm/ccm)" >&2
echo "[up] wrote $ENVFILE" >&2
grep '^export ' "$ENVFILE"
