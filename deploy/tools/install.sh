#!/usr/bin/env bash
# Install the tools that validate the deployment (tests/deploy), from the package registries
# only: kustomize and the checkers in deploy/tools/checkers (Go module proxy), the Kubernetes
# JSON schemas (PyPI: kubernetes-validate) and the KEDA CRD schemas (npm:
# @kubernetes-models/keda, checked with its generated validator). Idempotent: what is already in the cache is kept.
#
#   deploy/tools/install.sh            # install (or check) everything
#   deploy/tools/install.sh --print    # print the tools directory and exit
#
# Cache: ${CCM_CACHE_DIR:-$HOME/.cache/ccm-platform}/deploy-tools/<pinned versions>/
set -euo pipefail

KUSTOMIZE_VERSION=v5.7.1
K8S_SCHEMA_PACKAGE_VERSION=1.37.0   # kubernetes-validate on PyPI
K8S_VERSION=1.33.0                  # the Kubernetes version the manifests are checked against
KEDA_MODELS_VERSION=2.0.0           # @kubernetes-models/keda on npm

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${CCM_CACHE_DIR:-$HOME/.cache/ccm-platform}"
STAMP="$(cat "$HERE/install.sh" "$HERE/checkers/go.mod" "$HERE/checkers/go.sum" \
         "$HERE"/checkers/cmd/*/*.go "$HERE/keda-validate.mjs" | sha256sum | cut -c1-12)"
TOOLS="$CACHE/deploy-tools/$STAMP"

if [[ "${1:-}" == "--print" ]]; then echo "$TOOLS"; exit 0; fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,10p' "$0"; exit 0; fi

log() { echo "deploy/tools/install.sh: $*" >&2; }
mkdir -p "$TOOLS/bin"

if [[ ! -x "$TOOLS/bin/kustomize" ]]; then
  log "kustomize $KUSTOMIZE_VERSION (go install; about 2 minutes on 2 cores the first time)"
  GOFLAGS=-mod=mod GOBIN="$TOOLS/bin" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
fi

if [[ ! -x "$TOOLS/bin/ccm-compose-check" || ! -x "$TOOLS/bin/ccm-dockerfile-lint" ]]; then
  log "ccm-compose-check and ccm-dockerfile-lint (compose-go, BuildKit; go build)"
  (cd "$HERE/checkers" && go build -o "$TOOLS/bin/" ./cmd/...)
fi

SCHEMAS="$TOOLS/schemas/kubernetes/v$K8S_VERSION-local-strict"
if [[ ! -f "$SCHEMAS/_definitions.json" ]]; then
  log "Kubernetes $K8S_VERSION JSON schemas (kubernetes-validate $K8S_SCHEMA_PACKAGE_VERSION from PyPI)"
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" \
    "kubernetes-validate==$K8S_SCHEMA_PACKAGE_VERSION"
  python3 - "$tmp"/kubernetes_validate-*.whl "$SCHEMAS" "v$K8S_VERSION-local-strict" <<'PY'
import sys, zipfile, pathlib
wheel, dest, folder = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
prefix = f"kubernetes_validate/kubernetes-json-schema/{folder}/"
dest.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".json")]
    if not names:
        sys.exit(f"{folder} is not in {wheel}")
    for n in names:
        (dest / n[len(prefix):]).write_bytes(z.read(n))
PY
fi

KEDA="$TOOLS/keda"
if [[ ! -f "$KEDA/node_modules/@kubernetes-models/keda/package.json" ]]; then
  log "KEDA CRD schemas (@kubernetes-models/keda $KEDA_MODELS_VERSION from npm)"
  mkdir -p "$KEDA"
  (cd "$KEDA" && echo '{"private": true}' > package.json \
     && npm install --silent --no-audit --no-fund --ignore-scripts \
          "@kubernetes-models/keda@$KEDA_MODELS_VERSION" > /dev/null)
fi
cp "$HERE/keda-validate.mjs" "$KEDA/keda-validate.mjs"

log "ready: $TOOLS"
echo "$TOOLS"
