#!/usr/bin/env bash
# Set up from scratch if needed, then score images against the shipped policies.
#   bash scripts/classify.sh PATH... [worker classify options]
# The default model (ViT-B-32 / laion2b_s34b_b79k) is downloaded on first use; offline,
# point WORKER_MODEL__NAME at a local checkpoint: WORKER_MODEL__NAME=local-dir:/path.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
[ $# -gt 0 ] || set -- examples/images
exec "$VENV/bin/worker" classify "$@"
