#!/usr/bin/env bash
# Stop local Kafka + PostgreSQL started by up.sh. Data and ports are kept
# (the next up.sh reuses them) unless --reset is given.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<EOF
Usage: $(basename "$0") [--reset] [--help]

Stops Kafka (kafka.sh stop) and PostgreSQL (postgres.sh stop); fine if they
are not running. --reset also deletes their state (data, config, ports).
EOF
}
action=stop
case "${1:-}" in
  "") ;;
  --reset) action=reset ;;
  -h|--help|help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

rc=0
"$SCRIPT_DIR/kafka.sh" "$action" || rc=1
"$SCRIPT_DIR/postgres.sh" "$action" || rc=1
if (( rc == 0 )); then echo "[down] Kafka and PostgreSQL stopped" >&2; fi
exit "$rc"
