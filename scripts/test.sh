#!/usr/bin/env bash
# Set up from scratch if needed, then run every check: ruff, mypy, the schema sync, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
echo "[test] ruff" >&2
ruff check .
ruff format --check .
echo "[test] mypy" >&2
mypy
echo "[test] pytest" >&2
python -m pytest -n 2 --dist loadfile "$@"
