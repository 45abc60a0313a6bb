#!/usr/bin/env bash
# Set up from scratch if needed, then run every check: ruff, mypy, the wheel, pytest.
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
echo "[test] the wheel: light client and packaged policies, each in a fresh venv" >&2
bash scripts/check_dist.sh
echo "[test] pytest" >&2
python -m pytest -n 2 --dist loadfile "$@"
