"""``worker serve``: check what can be checked, start this process's service, consume.

Everything that can fail on a setting (default sinks, policies, the model) is checked
before the first job is taken, so a worker that cannot score never starts consuming.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

from celery import signals

from worker.errors import ConfigurationError, WorkerError
from worker.gpu_claim import CLAIMS_DIR, fork_safe_cuda_device_count, resolve_auto_device
from worker.log import get_logger, json_logging
from worker.policy import select_policies
from worker.queue.app import create_app, start
from worker.queue.service import default_sink_configs
from worker.settings import Settings

log = get_logger(__name__)


def run_worker(settings: Settings, *, pool: str, concurrency: int, name: str | None) -> None:
    """Run a Celery worker on ``settings``' queue until it is told to stop."""
    if pool == "prefork":  # auto + several GPUs: one claim here, shared by the children
        claims = settings.cache_dir / CLAIMS_DIR
        device = resolve_auto_device(settings.device, claims, fork_safe_cuda_device_count)
        settings = settings.model_copy(update={"device": device})
    app = create_app(settings, worker=True)
    default_sink_configs(settings)
    select_policies([], settings.policy_dir)
    try:
        _load_model(app, settings, pool)
    except WorkerError as exc:
        if not json_logging():
            raise  # the command line's one `error ...` line
        # Log lines came first (the model loading): the failure is one more, not plain text.
        log.error("worker.start_failed", error=str(exc))
        raise SystemExit(2) from None
    # Celery installs no log handler or format of its own: worker.log's set-up stays.
    signals.setup_logging.connect(_keep_our_logging, weak=False, dispatch_uid=__name__)
    app.worker_main(
        [
            *(["--quiet"] if json_logging() else []),  # no banner on stdout among JSON lines
            "worker",
            *(["--task-events"] if settings.task_events else []),
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--queues={settings.queue.name}",
            f"--hostname={name or f'moderation-{os.getpid()}@%h'}",
            f"--loglevel={settings.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _keep_our_logging(**_: Any) -> None:
    """Celery's ``setup_logging`` signal: with a receiver, Celery leaves logging alone (no
    handler of its own on the root, ``celery.task`` or multiprocessing loggers), so its
    records and ours come out in one format (``worker.log.configure_logging``)."""


def _load_model(app: Any, settings: Settings, pool: str) -> None:
    if pool == "prefork":  # children load their own model; check it loads at all
        _check_model_in_subprocess(settings)
        return
    try:
        start(app)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise ConfigurationError(
            f"cannot listen on {settings.metrics.host}:{settings.metrics.port} for "
            "/metrics and /readyz: the address is in use (set WORKER_METRICS__PORT to a "
            "free port, or 0 to turn the endpoint off)"
        ) from None


_CHECK_MODEL = """
import json, pickle, sys
from worker.errors import WorkerError
from worker.log import configure_logging
from worker.runtime import load_configured_model
settings = pickle.load(sys.stdin.buffer)
configure_logging(settings.log_level, settings.log_format)
try:
    load_configured_model(settings)
except WorkerError as exc:
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        json.dump({"type": type(exc).__name__, "message": str(exc)}, out)
    sys.exit(2)
"""


def _check_model_in_subprocess(settings: Settings) -> None:
    """Load the model once in a fresh interpreter and drop it, so a bad model setting stops
    ``serve --pool prefork`` before any child starts (each child loads its own copy).

    Never in this process: building the model runs torch ops (open_clip's causal mask),
    which start libgomp's OpenMP thread pool, and libgomp is not fork-safe: a prefork child
    forked after that hangs for ever in its first parallel region (model load or encode),
    holding its jobs unacknowledged and keeping a warm shutdown from ever finishing. No
    torch op, CUDA call or service thread may run in the parent before the pool forks.
    """
    import pickle
    import subprocess
    import tempfile

    from worker import errors

    with tempfile.TemporaryDirectory(prefix="mw-model-check-") as tmp:
        report = os.path.join(tmp, "error.json")
        done = subprocess.run(
            [sys.executable, "-c", _CHECK_MODEL, report],
            input=pickle.dumps(settings),
            check=False,
        )
        if done.returncode == 0:
            return
        found: dict[str, str] = {}
        if os.path.exists(report):
            with open(report, encoding="utf-8") as handle:
                found = json.load(handle)
    kind = getattr(errors, found.get("type", ""), None)
    if not (isinstance(kind, type) and issubclass(kind, errors.WorkerError)):
        kind = errors.ModelLoadError
    raise kind(
        found.get("message")
        or f"the model check process failed (exit code {done.returncode}); see its output above"
    )
