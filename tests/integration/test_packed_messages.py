"""Packed messages (many jobs per queue message) through a real redis-server and real
`worker serve` processes: each job keeps its own id, result, attempts and dead letter."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until, write_images
from tests.integration.hostile import HOSTILE, publish_packed, send_hostile
from tests.integration.queue_helpers import QUEUE, queue_client, queue_drained, result_files
from tests.integration.servers import free_port
from tests.processes import WorkerProcess, cli
from worker.queue.dead_letters import DeadLetters

pytestmark = pytest.mark.integration


def _jobs(images: list[Path], out: Path, prefix: str, count: int) -> list[dict[str, Any]]:
    sink = [{"type": "local", "path": str(out)}]
    return [
        {
            "job_id": f"{prefix}-{i:02d}",
            "image": {"uri": str(images[i % len(images)])},
            "sinks": sink,
        }
        for i in range(count)
    ]


def _scored(worker: WorkerProcess) -> Counter[str]:
    return Counter(str(e["job_id"]) for e in worker.events("job.scored"))


def test_a_message_of_32_jobs_gives_32_results(
    tmp_path: Path,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = write_images(tmp_path / "imgs", 8)
    out = tmp_path / "out"
    client = queue_client(queue_env, monkeypatch)
    ids = client.submit_many(_jobs(images, out, "p", 32), per_message=32)
    assert client.queue_depth() == 1  # one queue message carries all 32
    worker = start_worker(env={"WORKER_BATCH__MAX_SIZE": "32", "WORKER_BATCH__MAX_WAIT_MS": "2000"})
    wait_until(lambda: len(result_files(out)) == 32, 60, "32 results")
    results = result_files(out)
    assert set(results) == set(ids)
    for job_id in ids:
        assert results[job_id]["job_id"] == job_id
        assert results[job_id]["status"] == "ok"
        stored = client.result(job_id)
        assert stored is not None
        assert stored.job_id == job_id
    assert [e["size"] for e in worker.events("batch.processed")] == [32]  # one encoder batch
    assert _scored(worker) == Counter(dict.fromkeys(ids, 1))
    wait_until(lambda: queue_drained(queue_env["WORKER_BROKER_URL"]), 30, "an empty queue")
    assert worker.stop() == 0


def test_a_corrupt_image_is_one_error_result_in_its_message(
    tmp_path: Path,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = write_images(tmp_path / "imgs", 7)
    corrupt = tmp_path / "imgs" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    out = tmp_path / "out"
    jobs = _jobs(images, out, "c", 8)
    jobs[3]["image"] = {"uri": str(corrupt)}
    client = queue_client(queue_env, monkeypatch)
    client.submit_many(jobs, per_message=8)
    worker = start_worker()
    wait_until(lambda: len(result_files(out)) == 8, 60, "8 results")
    results = result_files(out)
    assert results["c-03"]["status"] == "error"
    assert results["c-03"]["error"]["code"] == "image_unreadable"
    assert sorted(k for k, r in results.items() if r["status"] == "ok") == [
        f"c-{i:02d}" for i in range(8) if i != 3
    ]
    assert DeadLetters(client.jobs.redis).count() == 0
    assert worker.stop() == 0


def test_malformed_jobs_are_answered_alone_and_the_rest_scored(
    tmp_path: Path,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = queue_env["WORKER_BROKER_URL"]
    images = write_images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    good = _jobs(images, out, "g", 4)
    items: list[Any] = [
        good[0],
        {"job_id": "bad-doc", "image": {}},  # not a valid job, a usable job id
        good[1],
        7,  # not a job at all
        {  # a sink type that is not installed: an error result of its own
            "job_id": "bad-sink",
            "image": {"uri": str(images[0])},
            "sinks": [{"type": "made-up-sink"}],
        },
        good[2],
        [good[3]],  # a nested list
    ]
    worker = start_worker()
    publish_packed(url, QUEUE, items)
    wait_until(lambda: len(result_files(out)) == 3, 60, "the good jobs' results")
    letters = DeadLetters(queue_client(queue_env, monkeypatch).jobs.redis)
    wait_until(lambda: letters.count() == 3, 30, "three dead letters")
    wait_until(lambda: queue_drained(url), 30, "an empty queue")

    assert set(result_files(out)) == {"g-00", "g-01", "g-02"}
    entries = {e.job_id: e for e in letters.entries()}
    assert entries["bad-doc"].stage == "validate"
    assert "image" in entries["bad-doc"].error
    by_index = {key.rsplit(".", 1)[1]: e for key, e in entries.items() if key != "bad-doc"}
    assert set(by_index) == {"3", "6"}  # keyed by the message id and the item's index
    assert all(key.startswith("invalid-") for key in entries if key != "bad-doc")
    assert by_index["3"].raw == "7"
    refused = queue_client(queue_env, monkeypatch).result("bad-sink")
    assert refused is not None
    assert refused.error is not None
    assert refused.error.code == "sink_not_allowed"
    assert worker.proc.poll() is None
    assert worker.stop() == 0


PACKED_KINDS = [name for name in HOSTILE if name.startswith("packed-")]


def test_hostile_packed_messages_leave_the_worker_up_and_lose_nothing(
    tmp_path: Path,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = queue_env["WORKER_BROKER_URL"]
    images = write_images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    env = {"WORKER_QUEUE__MAX_MESSAGE_BYTES": str(4 * 1024 * 1024)}
    client = queue_client({**queue_env, **env}, monkeypatch)
    worker = start_worker(env=env)
    good: list[str] = []
    for number, name in enumerate(PACKED_KINDS):  # good packed messages between the bad ones
        good += client.submit_many(_jobs(images, out, f"ok{number}", 3), per_message=3)
        send_hostile(name, url, QUEUE, str(images[0]))
    twin = _jobs(images, out, "twin", 1)[0]
    publish_packed(url, QUEUE, [twin, twin, {**twin, "metadata": {"copy": 2}}])  # one job id, 3x
    oversized = [{**j, "image": {"data": "A" * 700_000}} for j in _jobs(images, out, "big", 8)]
    publish_packed(url, QUEUE, oversized)  # 5.6 MB: over the 4 MiB cap set above
    good += client.submit_many(_jobs(images, out, "last", 3), per_message=3)

    wait_until(lambda: set(result_files(out)) >= {*good, "twin-00"}, 120, "every good job scored")
    letters = DeadLetters(client.jobs.redis)
    expected = len(PACKED_KINDS) + 1  # one per hostile kind, one for the oversized message
    wait_until(lambda: letters.count() == expected, 60, "every dead letter")
    wait_until(lambda: queue_drained(url), 30, "an empty queue and no unacked message")

    assert worker.proc.poll() is None, "the worker is still up"
    results = result_files(out)
    assert set(results) == {*good, "twin-00"}
    assert all(r["status"] == "ok" for r in results.values())
    assert _scored(worker)["twin-00"] == 1  # three copies in one message: scored once
    assert {e.stage for e in letters.entries()} == {"validate"}
    reasons = " | ".join(e.error for e in letters.entries())
    for reason in ("list of jobs is empty", "1000000 jobs in one message", "65 jobs", "over the"):
        assert reason in reasons
    log = worker.log()
    assert "Unrecoverable error" not in log
    assert "Traceback" not in log
    assert worker.stop() == 0


def test_a_transient_failure_resubmits_only_that_job(
    tmp_path: Path,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = write_images(tmp_path / "imgs", 3)
    out = tmp_path / "out"
    jobs = _jobs(images, out, "t", 4)
    jobs[1]["image"] = {"uri": f"http://127.0.0.1:{free_port()}/gone.png"}  # nothing listens
    env = {"WORKER_HTTP__ALLOW_NETWORKS": '["127.0.0.0/8"]'}
    client = queue_client({**queue_env, **env}, monkeypatch)
    client.submit_many(jobs, per_message=4)
    worker = start_worker(env=env)
    wait_until(lambda: len(result_files(out)) == 4, 90, "4 results (the flaky one after retries)")
    results = result_files(out)
    assert results["t-01"]["status"] == "error"
    assert results["t-01"]["error"]["code"] in {"source_unavailable", "source_timeout"}
    assert all(results[f"t-{i:02d}"]["status"] == "ok" for i in (0, 2, 3))
    assert _scored(worker) == Counter({"t-00": 1, "t-01": 1, "t-02": 1, "t-03": 1})
    resubmitted = [e["job_id"] for e in worker.events("job.resubmitted")]
    assert resubmitted == ["t-01", "t-01"]  # WORKER_MAX_ATTEMPTS=3: two retries, alone
    sizes = [e["size"] for e in worker.events("batch.processed")]
    assert sizes == [4, 1, 1]  # the retries are one-job messages
    wait_until(lambda: queue_drained(queue_env["WORKER_BROKER_URL"]), 30, "an empty queue")
    assert worker.stop() == 0


def test_kill_9_with_packed_messages_in_hand_loses_nothing(
    tmp_path: Path,
    plugin_path: Path,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = write_images(tmp_path / "imgs", 4)
    record = tmp_path / "record"
    client = queue_client(queue_env, monkeypatch, plugin_path)
    sinks = [{"type": "record", "path": str(record), "delay_ms": 150}]
    jobs = [
        {"job_id": f"k-{i:02d}", "image": {"uri": str(images[i % 4])}, "sinks": sinks}
        for i in range(40)
    ]
    ids = client.submit_many(jobs, per_message=8)

    def delivered() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        log = record / "deliveries.jsonl"
        for line in log.read_text().splitlines() if log.exists() else []:
            entry = json.loads(line)
            found.setdefault(entry["job_id"], []).append(entry["body"])
        return found

    victim = start_worker()
    wait_until(lambda: len(delivered()) >= 3, 60, "the first deliveries")
    victim.signal(signal.SIGKILL)
    victim.proc.wait(10)
    assert len(delivered()) < 40
    survivor = start_worker()
    wait_until(lambda: set(delivered()) == set(ids), 120, "every job delivered")
    for job_id, bodies in delivered().items():
        assert len(set(bodies)) == 1, f"{job_id} was delivered with different content"
    wait_until(lambda: queue_drained(queue_env["WORKER_BROKER_URL"]), 30, "an empty queue")
    assert survivor.stop() == 0


def test_worker_submit_packs_with_per_message(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    images = write_images(tmp_path / "imgs", 5)
    out = tmp_path / "out"
    start_worker()
    done = cli(
        queue_env,
        "submit",
        str(tmp_path / "imgs"),
        "--per-message",
        "4",
        "--sink",
        f"local:{out}",
        "--wait",
        "60",
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(images)
    assert {r["status"] for r in results} == {"ok"}
    assert set(result_files(out)) == {r["job_id"] for r in results}
    too_many = cli(queue_env, "submit", str(images[0]), "--per-message", "65")
    assert too_many.returncode == 2
    assert "WORKER_QUEUE__MAX_JOBS_PER_MESSAGE" in too_many.stderr


def test_bench_without_the_encoder_prints_both_figures(
    tmp_path: Path, worker_env: dict[str, str]
) -> None:
    import os

    env = {**os.environ, **worker_env}
    done = cli(
        env,
        "bench",
        "--encoder",
        "none",
        "--untrained",
        "tiny",
        "--jobs",
        "8",
        "--rounds",
        "1",
        "--jobs-per-message",
        "1",
        "--jobs-per-message",
        "4",
        "--workdir",
        str(tmp_path / "bench"),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    rows = {line.split("│")[1].strip() for line in done.stdout.splitlines() if line.count("│") >= 4}
    assert {"1", "4"} <= rows
    assert "ratio 4 vs 1 jobs/message:" in done.stdout
    assert "1 jobs/message: one worker feeds a GPU at most" in done.stdout
    assert "4 jobs/message: one worker feeds a GPU at most" in done.stdout
