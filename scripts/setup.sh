#!/usr/bin/env bash
# Set up everything moderation-worker needs on a fresh machine, idempotently:
# redis-server (for the queue and its tests), a virtual environment in .venv, PyTorch,
# and the project itself with its test extras.
#
#   VENV=.venv          where the virtual environment goes
#   SKIP_APT=1          do not try to install redis-server with apt-get
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if ! command -v redis-server >/dev/null 2>&1 && [ -z "${SKIP_APT:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing redis-server"
        apt-get install -y -q redis-server >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }
    else
        log "redis-server is missing: install it (the queue and its tests need it)"
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >/dev/null

torch_works() { "$VENV/bin/python" -c 'import torch, torchvision, torchvision.transforms' >/dev/null 2>&1; }

if ! torch_works; then
    # A CPU build of torch lying on this disk is ~1 GB instead of ~6 GB for the CUDA
    # build; prefer it when a torchvision that loads beside it can be had.
    cpu_wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$cpu_wheel" ]; then
        version=$(basename "$cpu_wheel" | cut -d- -f2)
        log "trying the CPU build torch==$version from $(dirname "$cpu_wheel")"
        "${PIP[@]}" "torch==$version" torchvision || true
    fi
    if ! torch_works; then
        # PyPI's torchvision wheels link libtorch_cuda, so they do not import beside a CPU
        # torch; take the matching CUDA pair (it runs on the CPU as well).
        log "installing torch + torchvision from the package index"
        "${PIP[@]}" --upgrade "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
    fi
fi
torch_works || { log "torch/torchvision still do not import"; exit 1; }
log "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"

log "installing moderation-worker (editable) with test extras"
"${PIP[@]}" -e '.[test]'
log "ready: $VENV/bin/worker"
