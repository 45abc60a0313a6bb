"""`worker submit --wait` exit codes against a real Redis and a real worker: 0 when every
job is ok, 1 when one ended in error (the result is still printed) or did not finish in
time (named on stderr)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import write_images
from tests.processes import WorkerProcess, cli

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def problem_lines(stderr: str) -> list[str]:
    """stderr without blank lines and without structlog JSON lines (settings load logging)."""
    return [x for x in stderr.splitlines() if x.strip() and not x.startswith("{")]


def test_submit_wait_exits_1_when_a_job_ends_in_error(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]
    missing = tmp_path / "imgs" / "missing.png"  # inside WORKER_FILE_ROOTS: source_not_found
    worker = start_worker()

    ok = cli(queue_env, "submit", "--wait", "60", "--job-id", "exit-ok", str(image))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "ok"
    assert problem_lines(ok.stderr) == []

    mixed = cli(queue_env, "submit", "--wait", "60", str(image), str(missing))
    assert mixed.returncode == 1, mixed.stderr
    docs = [json.loads(line) for line in mixed.stdout.splitlines()]
    assert [d["status"] for d in docs] == ["ok", "error"]  # the results are still printed
    assert docs[1]["error"]["code"] == "source_not_found"
    [line] = problem_lines(mixed.stderr)
    assert line.startswith(f"error job {docs[1]['job_id']} ended in error source_not_found")
    assert "Traceback" not in mixed.stderr
    assert worker.stop() == 0


def test_submit_wait_exits_1_when_waiting_times_out(
    tmp_path: Path, queue_env: dict[str, str], redis_url: str
) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]  # no worker: nothing will score it
    proc = cli(queue_env, "submit", "--wait", "1", "--job-id", "never-scored", str(image))
    assert proc.returncode == 1
    assert proc.stdout == ""
    [line] = problem_lines(proc.stderr)
    assert line.startswith("timeout no result for job never-scored within 1 s")
    assert "Traceback" not in proc.stderr
    # Without --wait the same submission succeeds: it only enqueues.
    again = cli(queue_env, "submit", "--job-id", "never-scored-2", str(image))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "never-scored-2"


def test_redis_down_fails_fast_for_queue_commands(
    tmp_path: Path, queue_env: dict[str, str]
) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]
    env = {**queue_env, "WORKER_BROKER_URL": "redis://127.0.0.1:1/0"}
    for args in (["submit", "--wait", "5", str(image)], ["serve"], ["dlq", "list"]):
        proc = cli(env, *args, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        [line] = problem_lines(proc.stderr)
        assert line.startswith("error cannot reach Redis at redis://127.0.0.1:1/0: ")
        assert line.endswith("(set WORKER_BROKER_URL)")
