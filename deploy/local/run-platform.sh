#!/usr/bin/env bash
# Set up and run the whole platform on this machine with real Kafka and PostgreSQL:
# install the Python workspace, start the infrastructure, migrate, make sure a demo practice and
# an API token exist, then run all four services (Ctrl-C stops them; the data is kept).
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$SCRIPT_DIR/../.."
case "${1:-}" in
  -h|--help) sed -n '2,4p' "$0" | sed 's/^# //'; echo "Environment: CCM_LOCAL_DIR, CCM_DEMO_PRACTICE (default demo)"; exit 0 ;;
esac
export CCM_LOCAL_DIR="${CCM_LOCAL_DIR:-$PWD/.ccm-local}"
practice="${CCM_DEMO_PRACTICE:-demo}"

command -v uv >/dev/null 2>&1 || { echo "uv is needed: python3 -m pip install uv" >&2; exit 2; }
echo "[platform] syncing the Python workspace" >&2
uv sync --frozen --all-packages --quiet
eval "$("$SCRIPT_DIR/up.sh")"
echo "[platform] migrating" >&2
uv run ccm migrate
token_file="$CCM_LOCAL_DIR/$practice.token"
if [ ! -s "$token_file" ]; then
  uv run ccm practice create --id "$practice" --name "Demo Family Practice" \
    --timezone America/New_York 2>&1 | sed 's/^/[platform] /' >&2 || true
  uv run ccm token create --practice "$practice" --label run-platform 2>/dev/null | tail -n 1 > "$token_file"
fi
cat >&2 <<INFO
[platform] practice:  $practice
[platform] API token: $(cat "$token_file")   (also in $token_file)
[platform] ingest       http://127.0.0.1:8081  (FHIR base /fhir, API docs /docs)
[platform] billing      http://127.0.0.1:8082/docs
[platform] careplan     http://127.0.0.1:8083/docs
[platform] notification http://127.0.0.1:8084/docs
[platform] Kafka $CCM_KAFKA_BOOTSTRAP_SERVERS, PostgreSQL ${CCM_DATABASE_URL#*@}
[platform] Ctrl-C stops the services; deploy/local/down.sh stops Kafka and PostgreSQL.
INFO
exec uv run ccm serve all
