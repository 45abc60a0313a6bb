#!/usr/bin/env bash
# The wheel, as users install it: build it from this tree, then
#  1. install it alone (the light client, no extras) into a fresh venv: torch must not be
#     importable there, and `worker submit` + the client API must enqueue jobs on a real
#     redis-server;
#  2. install it with the `serve` extra (not editable) into another fresh venv and run
#     `worker classify` on an image outside the repository with no policy directory set:
#     the packaged policies must score it.
# So a sub-package or a data file left out of the wheel can never ship.
#
#   VENV=.venv     the project's venv (builds the wheel and a tiny local-dir model)
#   DIST_DIR=...   where the venvs go [default: a temporary directory, removed at the end]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
VENV_ABS=$(cd "$VENV" && pwd)
WORK=${DIST_DIR:-$(mktemp -d)}
mkdir -p "$WORK"
log() { printf '\033[1m[dist]\033[0m %s\n' "$*" >&2; }
cleanup() {
    [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
    [ -z "${DIST_DIR:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT

log "building the wheel"
# setuptools reuses build/: a module deleted from the tree would still ship from there.
rm -rf "$WORK/dist" build
"$VENV_ABS/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" . >/dev/null
WHEEL=$(ls "$WORK"/dist/moderation_worker-*.whl)
log "$(basename "$WHEEL")"

# Everything below runs outside the repository, so nothing resolves to the source tree.
OUTSIDE="$WORK/outside"
mkdir -p "$OUTSIDE"
cd "$OUTSIDE"

# -- 1. the light client ------------------------------------------------------------
log "client: a fresh venv with the wheel alone"
rm -rf "$WORK/client"
python3 -m venv "$WORK/client"
"$WORK/client/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL" 2>/dev/null
if "$WORK/client/bin/python" -c 'import torch' 2>/dev/null; then
    log "FAIL: torch is importable in the client venv"
    exit 1
fi
log "client: torch is not importable ($(du -sh "$WORK/client" | cut -f1) installed)"

PORT=$("$WORK/client/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
export WORKER_BROKER_URL="redis://127.0.0.1:$PORT/0"
for _ in $(seq 50); do
    "$WORK/client/bin/python" -c "import redis,sys; redis.Redis.from_url('$WORKER_BROKER_URL').ping()" \
        2>/dev/null && break
    sleep 0.1
done

"$WORK/client/bin/worker" --version
printf 'GIF89a' >"$OUTSIDE/upload.gif"
"$WORK/client/bin/worker" submit "$OUTSIDE/upload.gif" --job-id dist-cli-1 >/dev/null
"$WORK/client/bin/python" - <<'EOF'
import base64, json, os, sys

import redis

from worker.client import Client
from worker.settings import load_settings

client = Client(load_settings())
job_id = client.submit({"job_id": "dist-api-1", "image": {"uri": "s3://uploads/cat.jpg"}})
assert job_id == "dist-api-1", job_id
assert "torch" not in sys.modules and "numpy" not in sys.modules, "the client imported the model stack"
queued = redis.Redis.from_url(os.environ["WORKER_BROKER_URL"]).lrange("moderation", 0, -1)
bodies = [base64.b64decode(json.loads(m)["body"]) for m in queued]  # kombu's Redis envelope
found = sorted(j for j in ("dist-cli-1", "dist-api-1") if any(j.encode() in b for b in bodies))
print(f"[dist] client: {len(queued)} message(s) queued on a real Redis, jobs {found}", file=sys.stderr)
assert found == ["dist-api-1", "dist-cli-1"], bodies
EOF
set +e
"$WORK/client/bin/worker" classify "$OUTSIDE/upload.gif" 2>"$WORK/classify.err"
code=$?
set -e
if [ "$code" != 2 ] || ! grep -q "moderation-worker\[serve\]" "$WORK/classify.err"; then
    log "FAIL: classify without the serve extra should exit 2 naming the extra (got $code)"
    cat "$WORK/classify.err" >&2
    exit 1
fi
log "client: classify without the model stack exits 2 with: $(head -n 1 "$WORK/classify.err")"

# -- 2. the served wheel, packaged policies ------------------------------------------
log "serve: a fresh venv with the wheel and its serve extra (not editable)"
rm -rf "$WORK/serve"
python3 -m venv "$WORK/serve"
"$WORK/serve/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL[serve]" 2>/dev/null
"$VENV_ABS/bin/python" -c "
from pathlib import Path
from worker.checkpoint import TINY_MODEL_CFG, build_untrained, save_checkpoint
save_checkpoint(build_untrained(TINY_MODEL_CFG, seed=0), TINY_MODEL_CFG, Path('$WORK/tiny-model'))
"
"$WORK/serve/bin/python" -c "
from PIL import Image
Image.new('RGB', (96, 64), (200, 40, 40)).save('$OUTSIDE/photo.png')
"
unset WORKER_POLICY_DIR
WORKER_MODEL__NAME="local-dir:$WORK/tiny-model" WORKER_CACHE_DIR="$WORK/cache" \
    "$WORK/serve/bin/worker" classify "$OUTSIDE/photo.png" >"$WORK/result.jsonl"
"$WORK/serve/bin/python" - "$WORK/result.jsonl" <<'EOF'
import json, sys
from pathlib import Path

import worker

[line] = Path(sys.argv[1]).read_text().splitlines()
result = json.loads(line)
assert result["status"] == "ok", result
assert set(result["policies"]) == {"moderation", "tags"}, result["policies"]
assert "site-packages" in worker.__file__, worker.__file__
print(f"[dist] serve: scored by the packaged policies {sorted(result['policies'])} "
      f"from {Path(worker.__file__).parent}", file=sys.stderr)
EOF
log "ok"
