"""Webhook sink through the queue, against a real HTTP receiver that verifies signatures
with the `standardwebhooks` package."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from tests.helpers import wait_until, write_images
from tests.integration.servers import HttpServer
from tests.processes import WorkerProcess, cli, run_python

pytestmark = pytest.mark.integration
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def receiver() -> Iterator[HttpServer]:
    server = HttpServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def hook_env(queue_env: dict[str, str]) -> dict[str, str]:
    return {
        **queue_env,
        "WORKER_WEBHOOK__SECRET": SECRET,
        "WORKER_HTTP__ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "WORKER_MAX_ATTEMPTS": "4",
    }


def submit(env: dict[str, str], job_id: str, image: Path, url: str) -> None:
    job = {
        "job_id": job_id,
        "image": {"uri": str(image)},
        "sinks": [{"type": "webhook", "url": url}],
    }
    proc = run_python(f"from worker.client import submit\nsubmit({job!r})", env)
    assert proc.returncode == 0, proc.stderr


def verified(server: HttpServer) -> list[dict[str, object]]:
    """Every POST, verified with standardwebhooks (raises if a signature is wrong)."""
    return [Webhook(SECRET).verify(r.body, r.headers) for r in server.requests]


def test_500_500_200_is_three_posts_one_delivery(
    tmp_path: Path,
    hook_env: dict[str, str],
    receiver: HttpServer,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.answers = [(500, {}, b"down"), (500, {}, b"down"), (200, {}, b"ok")]
    image = write_images(tmp_path / "imgs", 1)[0]
    worker = start_worker(env=hook_env)
    submit(hook_env, "hook-1", image, receiver.url("/hook"))
    wait_until(lambda: worker.events("sink.delivered"), 60, "the accepted delivery")
    bodies = verified(receiver)
    assert len(receiver.requests) == 3
    assert {r.headers["webhook-id"] for r in receiver.requests} == {"hook-1"}
    assert all(b == bodies[0] for b in bodies)  # the same document every time
    assert bodies[0]["job_id"] == "hook-1"
    assert [e["attempt"] for e in worker.events("sink.retry_scheduled")] == [1, 2]
    assert len(worker.events("sink.delivered")) == 1
    assert cli(hook_env, "dlq", "list", "--json").stdout.strip() == ""
    assert worker.stop() == 0


def test_retry_after_is_honoured(
    tmp_path: Path,
    hook_env: dict[str, str],
    receiver: HttpServer,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.answers = [(503, {"Retry-After": "2"}, b"busy"), (200, {}, b"ok")]
    image = write_images(tmp_path / "imgs", 1)[0]
    worker = start_worker(env=hook_env)
    submit(hook_env, "hook-ra", image, receiver.url("/hook"))
    wait_until(lambda: worker.events("sink.delivered"), 60, "the delivery")
    first, second = receiver.requests
    assert second.at - first.at >= 2.0  # backoff alone would be <= 0.2 s here
    assert worker.stop() == 0


def test_410_disables_the_endpoint(
    tmp_path: Path,
    hook_env: dict[str, str],
    receiver: HttpServer,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.default = (410, {}, b"gone")
    image = write_images(tmp_path / "imgs", 1)[0]
    worker = start_worker(env=hook_env)
    submit(hook_env, "gone-1", image, receiver.url("/hook"))
    wait_until(lambda: worker.events("sink.endpoint_disabled"), 60, "the endpoint to be disabled")
    submit(hook_env, "gone-2", image, receiver.url("/hook"))
    wait_until(lambda: len(worker.events("sink.failed")) == 2, 60, "the second job to fail")
    assert len(receiver.requests) == 1  # nothing more was sent to a disabled endpoint
    entries = [json.loads(x) for x in cli(hook_env, "dlq", "list", "--json").stdout.splitlines()]
    assert sorted(e["job_id"] for e in entries) == ["gone-1", "gone-2"]
    assert all(e["attempts"] == 1 for e in entries)
    assert "disabled" in entries[[e["job_id"] for e in entries].index("gone-2")]["error"]

    receiver.default = (200, {}, b"ok")  # the receiver is back
    assert cli(hook_env, "webhooks", "enable", receiver.url("/hook")).returncode == 0
    assert cli(hook_env, "dlq", "requeue", "--all").returncode == 0
    wait_until(lambda: len(worker.events("sink.delivered")) == 2, 60, "both redeliveries")
    assert {r.headers["webhook-id"] for r in receiver.requests[1:]} == {"gone-1", "gone-2"}
    assert worker.stop() == 0


def test_receiver_that_never_succeeds_ends_in_dlq(
    tmp_path: Path,
    hook_env: dict[str, str],
    receiver: HttpServer,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.default = (500, {}, b"always down")
    image = write_images(tmp_path / "imgs", 1)[0]
    worker = start_worker(env=hook_env)
    submit(hook_env, "never", image, receiver.url("/hook"))
    wait_until(lambda: worker.events("sink.failed"), 60, "the dead letter")
    assert len(receiver.requests) == 4  # WORKER_MAX_ATTEMPTS
    verified(receiver)
    [entry] = [json.loads(x) for x in cli(hook_env, "dlq", "list", "--json").stdout.splitlines()]
    assert (entry["job_id"], entry["stage"], entry["attempts"]) == ("never", "deliver", 4)
    assert "HTTP 500" in entry["error"]
    assert worker.stop() == 0


def test_retries_survive_a_worker_restart(
    tmp_path: Path,
    hook_env: dict[str, str],
    receiver: HttpServer,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.answers = [(503, {"Retry-After": "4"}, b"busy")]
    receiver.default = (200, {}, b"ok")
    image = write_images(tmp_path / "imgs", 1)[0]
    first = start_worker(env=hook_env)
    submit(hook_env, "restart-1", image, receiver.url("/hook"))
    wait_until(lambda: first.events("sink.retry_scheduled"), 60, "the scheduled retry")
    first.signal(signal.SIGKILL)  # the retry lives in Redis, not in this process
    first.proc.wait(10)
    second = start_worker(env=hook_env)
    wait_until(lambda: second.events("sink.delivered"), 60, "the retry from the new worker")
    assert len(receiver.requests) == 2
    assert receiver.requests[1].headers["webhook-id"] == "restart-1"
    assert receiver.requests[1].at - receiver.requests[0].at >= 4.0
    assert second.stop() == 0
