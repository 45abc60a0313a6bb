"""Celery task events per job from a real `worker serve`, read with Celery's own event
receiver (what `celery events` and Flower use) on a real redis-server."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.helpers import wait_until, write_images
from tests.processes import WorkerProcess, run_python

pytestmark = pytest.mark.integration

TERMINAL = {"task-succeeded", "task-failed", "task-retried", "task-rejected"}


class Monitor:
    """A Celery event receiver capturing every event in a thread, like `celery events`."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("monitor", broker=broker_url)
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._connection = self.app.connection_for_read()
        self.receiver = self.app.events.Receiver(self._connection, handlers={"*": self._add})
        self._thread = threading.Thread(
            target=self.receiver.capture,
            kwargs={"limit": None, "timeout": None, "wakeup": False},
            daemon=True,
        )
        self._thread.start()

    def _add(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(dict(event))

    def of(self, prefix: str = "task-") -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if str(e.get("type", "")).startswith(prefix)]

    def by_job(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for event in self.of("task-"):
            found.setdefault(event["uuid"], []).append(event)
        return found

    def wait_for_worker(self, worker: WorkerProcess, timeout: float = 30) -> str:
        """The node name of ``worker`` once one of its worker events (online, heartbeat)
        arrived: the receiver is subscribed and the worker sends events."""
        prefix = f"moderation-{worker.proc.pid}@"

        def seen() -> str:
            names = [str(e.get("hostname", "")) for e in self.of("worker-")]
            return next((n for n in names if n.startswith(prefix)), "")

        return wait_until(seen, timeout, "a worker event from the worker")

    def close(self) -> None:
        self.receiver.should_stop = True
        self._thread.join(10)
        self._connection.release()


@pytest.fixture
def monitor(redis_url: str) -> Iterator[Monitor]:
    watching = Monitor(redis_url)
    yield watching
    watching.close()


SUBMIT = """
import json, sys
from worker.client import submit
for job in json.loads(sys.argv[1] if len(sys.argv) > 1 else {jobs!r}):
    submit(job)
"""


def submit(env: dict[str, str], jobs: list[dict[str, Any]]) -> None:
    proc = run_python(SUBMIT.format(jobs=json.dumps(jobs)), env)
    assert proc.returncode == 0, proc.stderr


def test_each_job_is_received_started_and_finished(
    tmp_path: Path,
    queue_env: dict[str, str],
    monitor: Monitor,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    images = write_images(tmp_path / "imgs", 4)
    corrupt = tmp_path / "imgs" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    out = tmp_path / "out"
    sinks = [{"type": "local", "path": str(out)}]
    env = {"WORKER_BATCH__MAX_SIZE": "16", "WORKER_BATCH__MAX_WAIT_MS": "500"}
    worker = start_worker(env=env)
    hostname = monitor.wait_for_worker(worker)

    good = [f"ev-{i}" for i in range(3)]
    jobs = [
        {"job_id": j, "image": {"uri": str(p)}, "sinks": sinks}
        for j, p in zip(good, images[:3], strict=True)
    ]
    jobs.append({"job_id": "ev-bad", "image": {"uri": str(corrupt)}, "sinks": sinks})
    submit({**queue_env, **env}, jobs)
    # One packed message carrying two jobs; one message the intake refuses.
    packed = ["ev-packed-0", "ev-packed-1"]
    code = (
        "from worker.queue.app import create_app, send_jobs\n"
        "from worker.settings import load_settings\n"
        "app = create_app(load_settings())\n"
        f"send_jobs(app, {[{'job_id': j, 'image': {'uri': str(images[3])}} for j in packed]!r})\n"
        "app.send_task('moderation.score', args=[{'job_id': 'ev-refused'}, 2],"
        " queue='moderation')\n"
    )
    assert run_python(code, {**queue_env, **env}).returncode == 0
    everyone = [*good, "ev-bad", *packed, "ev-refused"]

    def finished() -> bool:
        seen = monitor.by_job()
        return all(any(e["type"] in TERMINAL for e in seen.get(j, [])) for j in everyone)

    wait_until(finished, 60, "a final task event for every job")
    seen = monitor.by_job()
    for job_id in [*good, *packed]:
        types = [e["type"] for e in seen[job_id]]
        assert types == ["task-received", "task-started", "task-succeeded"], (job_id, types)
        received, _, succeeded = seen[job_id]
        assert job_id in received["args"]
        assert isinstance(succeeded["runtime"], float)
        assert "'status': 'ok'" in succeeded["result"]
    assert [e["type"] for e in seen["ev-bad"]] == ["task-received", "task-started", "task-failed"]
    assert seen["ev-bad"][-1]["exception"].startswith("image_unreadable: ")
    [refused] = seen["ev-refused"]
    assert refused["type"] == "task-failed"
    assert "refused at intake" in refused["exception"]
    assert {e["name"] for e in seen["ev-0"]} == {"moderation.score"}
    assert {e["name"] for e in seen["ev-packed-0"]} == {"moderation.score_jobs"}
    # Every task event is about a job, from this worker: none under a message id.
    assert set(seen) == set(everyone)
    assert {e["hostname"] for e in monitor.of("task-")} == {hostname}
    wait_until(lambda: len(list(out.glob("*.json"))) == 4, 30, "the four results")
    assert worker.stop() == 0


def test_task_events_can_be_turned_off(
    tmp_path: Path,
    queue_env: dict[str, str],
    monitor: Monitor,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]
    out = tmp_path / "out"
    env = {"WORKER_TASK_EVENTS": "false"}
    worker = start_worker(env=env)
    monitor.wait_for_worker(worker)  # heartbeats still flow
    job = {"job_id": "quiet-1", "image": {"uri": str(image)}}
    submit({**queue_env, **env}, [{**job, "sinks": [{"type": "local", "path": str(out)}]}])
    wait_until((out / "quiet-1.json").exists, 60, "the result")
    wait_until(lambda: len(monitor.of("worker-heartbeat")) >= 2, 10, "another heartbeat")
    assert monitor.of("task-") == []
    assert worker.stop() == 0
