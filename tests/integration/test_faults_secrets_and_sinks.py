"""Secrets in jobs, sinks named by jobs and slow endpoints, through real workers and servers.

- A webhook secret and a presigned URL given in a job appear nowhere an operator looks:
  not in the result, the log, the dead-letter store or `dlq list`, nor in Redis at rest
  when WORKER_SECRET_KEY is set; with the key the dead letter is requeued and delivered,
  signed with the job's own secret.
- A slow endpoint does not hold up scoring: the batch finishes while the POST waits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from tests.helpers import wait_until, write_images
from tests.integration.servers import HttpServer, redis_values
from tests.processes import WorkerProcess, cli, run_python
from worker.sealing import generate_key

pytestmark = [pytest.mark.integration, pytest.mark.fault]
JOB_SECRET = "whsec_am9iLW93bi1zaWduaW5nLXNlY3JldC0wMQ=="
SIGNATURE = "c0ffee5ignature"


@pytest.fixture
def receiver() -> Iterator[HttpServer]:
    server = HttpServer("127.0.0.1")
    yield server
    server.close()


def _submit(env: dict[str, str], job: dict[str, object]) -> None:
    proc = run_python(f"from worker.client import submit\nsubmit({job!r})", env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("with_key", [True, False], ids=["sealed", "no-key"])
def test_job_secrets_never_show_and_requeue_needs_the_key(
    tmp_path: Path,
    queue_env: dict[str, str],
    receiver: HttpServer,
    start_worker: Callable[..., WorkerProcess],
    with_key: bool,
) -> None:
    image = write_images(receiver_dir := tmp_path / "imgs", 1)[0]
    receiver.routes["/img.png"] = (200, {"Content-Type": "image/png"}, image.read_bytes())
    receiver.default = (500, {}, b"down")
    env = {
        **queue_env,
        "WORKER_HTTP__ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "WORKER_MAX_ATTEMPTS": "2",
        **({"WORKER_SECRET_KEY": generate_key()} if with_key else {}),
    }
    worker = start_worker(env=env)
    signed_url = receiver.url(f"/img.png?X-Amz-Signature={SIGNATURE}&X-Amz-Expires=60")
    hook = receiver.url("/hook")
    _submit(
        env,
        {
            "job_id": "secret-1",
            "image": {"uri": signed_url},
            "sinks": [{"type": "webhook", "url": hook, "secret": JOB_SECRET}],
        },
    )
    wait_until(lambda: worker.events("sink.failed"), 60, "the delivery to give up")
    assert receiver_dir.exists()

    listed = cli(env, "dlq", "list", "--json")
    shown = cli(env, "result", "secret-1")
    places = {
        "dlq list": listed.stdout + listed.stderr,
        "result": shown.stdout,
        "worker log": worker.log_path.read_text(),
        "redis": redis_values(env["WORKER_BROKER_URL"]),
    }
    for where, text in places.items():
        assert JOB_SECRET not in text, f"the webhook secret shows in the {where}"
        assert JOB_SECRET.removeprefix("whsec_") not in text, where
        assert SIGNATURE not in text, f"the URL signature shows in the {where}"
    [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["stage"] == "deliver"
    assert entry["redacted"] is True
    assert json.loads(shown.stdout)["image"]["uri"].endswith(
        "X-Amz-Signature=REDACTED&X-Amz-Expires=60"
    )

    receiver.default = (200, {}, b"ok")  # the endpoint is fixed
    posts_before = len([r for r in receiver.requests if r.path == "/hook"])
    requeued = cli(env, "dlq", "requeue", "secret-1")
    if not with_key:
        assert requeued.returncode == 1
        assert "WORKER_SECRET_KEY" in requeued.stderr
        assert JOB_SECRET not in requeued.stderr
        assert len(cli(env, "dlq", "list", "--json").stdout.splitlines()) == 1  # kept
        assert worker.stop() == 0
        return
    assert requeued.returncode == 0, requeued.stderr
    wait_until(
        lambda: len([r for r in receiver.requests if r.path == "/hook"]) > posts_before,
        30,
        "the requeued delivery",
    )
    last = [r for r in receiver.requests if r.path == "/hook"][-1]
    body = Webhook(JOB_SECRET).verify(last.body, last.headers)  # signed with the job's secret
    assert body["job_id"] == "secret-1"
    assert cli(env, "dlq", "list", "--json").stdout.strip() == ""
    assert worker.stop() == 0


def test_a_slow_endpoint_does_not_hold_up_the_batch(
    tmp_path: Path,
    queue_env: dict[str, str],
    receiver: HttpServer,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    def slow(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(3)
        handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    receiver.routes["/slow"] = slow
    env = {
        **queue_env,
        "WORKER_HTTP__ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "WORKER_WEBHOOK__SECRET": JOB_SECRET,
        "WORKER_BATCH__MAX_SIZE": "8",
        "WORKER_BATCH__MAX_WAIT_MS": "1000",
    }
    images = write_images(tmp_path / "imgs", 8)
    out = tmp_path / "out"
    jobs = [
        {
            "job_id": f"slow-{i}",
            "image": {"uri": str(p)},
            "sinks": [
                {"type": "webhook", "url": receiver.url("/slow")},
                {"type": "local", "path": str(out)},
            ],
        }
        for i, p in enumerate(images)
    ]
    proc = run_python(
        "from worker.client import submit\n" + "".join(f"submit({j!r})\n" for j in jobs), env
    )
    assert proc.returncode == 0, proc.stderr
    worker = start_worker(env=env)
    wait_until(lambda: len(list(out.glob("*.json"))) == 8, 60, "the fast sink's results")
    batches = worker.events("batch.processed")
    assert sum(e["scored"] for e in batches) == 8
    assert max(e["ms"] for e in batches) < 2500, batches  # not 8 x 3 s, not even one 3 s POST
    wait_until(lambda: len(worker.events("sink.delivered")) == 16, 30, "every slow POST")
    assert worker.stop() == 0
