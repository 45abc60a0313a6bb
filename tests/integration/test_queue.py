"""The queue end to end: real redis-server, `worker serve` subprocesses, a separate
submitting process."""

from __future__ import annotations

import json
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import wait_until, write_images
from tests.processes import WorkerProcess, cli, read_events, run_python

pytestmark = pytest.mark.integration

SUBMIT = """
import json, sys
from worker.client import submit
paths = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.load(open({paths!r}))
ids = [submit({{"job_id": f"job-{{i:04d}}", "image": {{"uri": p}}, "sinks": {sinks!r}}})
       for i, p in enumerate(paths)]
print(json.dumps(ids))
"""


def submit_jobs(
    env: dict[str, str], paths: list[Path], sinks: Sequence[Mapping[str, object]], tmp: Path
) -> list[str]:
    listing = tmp / "paths.json"
    listing.write_text(json.dumps([str(p) for p in paths]))
    proc = run_python(SUBMIT.format(paths=str(listing), sinks=sinks), env)
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def result_files(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json")}


def deliveries(directory: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    log = directory / "deliveries.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        found[entry["job_id"]].append(entry["body"])
    return found


def test_two_workers_score_200_jobs_exactly_once(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    images = write_images(tmp_path / "imgs", 20)
    out = tmp_path / "out"
    workers = [start_worker(), start_worker()]
    paths = [images[i % len(images)] for i in range(200)]
    ids = submit_jobs(queue_env, paths, [{"type": "local", "path": str(out)}], tmp_path)
    assert len(set(ids)) == 200
    wait_until(lambda: len(list(out.glob("*.json"))) == 200, 180, "200 result files")
    results = result_files(out)
    assert set(results) == set(ids)
    assert all(r["status"] == "ok" for r in results.values())
    scored = [sum(e["scored"] for e in w.events("batch.processed")) for w in workers]
    assert sum(scored) == 200
    assert all(n > 0 for n in scored), f"both workers should take jobs: {scored}"
    sizes = [e["size"] for w in workers for e in w.events("batch.processed")]
    assert max(sizes) > 1  # jobs really were batched
    for w in workers:
        assert w.stop() == 0


def test_kill_9_mid_batch_loses_nothing(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    images = write_images(tmp_path / "imgs", 8)
    out = tmp_path / "out"
    sinks = [{"type": "record", "path": str(out), "delay_ms": 150}]
    ids = submit_jobs(queue_env, [images[i % 8] for i in range(40)], sinks, tmp_path)
    victim = start_worker()
    # Wait until the victim is inside a batch that has delivered some but not all results.
    wait_until(lambda: len(deliveries(out)) >= 3, 60, "the first deliveries")
    victim.signal(signal.SIGKILL)
    victim.proc.wait(10)
    done_before = set(deliveries(out))
    assert 0 < len(done_before) < 40
    survivor = start_worker()
    wait_until(lambda: len(result_files(out)) == 40, 120, "every job to complete")
    delivered = deliveries(out)
    assert set(delivered) == set(ids)
    for job_id, bodies in delivered.items():
        assert len(set(bodies)) == 1, f"{job_id} was delivered with different content"
    # What the killed worker had in hand came back: deliveries it had leased (their
    # result stored, the message acked) and messages it had not acked, delivered identically.
    taken_over = [
        *survivor.events("delivery.claimed"),
        *survivor.events("job.redelivered"),
        *[e for e in survivor.events("batch.processed") if e["scored"]],
    ]
    assert taken_over, "the survivor finished what the killed worker had in hand"
    assert survivor.stop() == 0


def test_corrupt_image_in_a_batch_of_16(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    images = write_images(tmp_path / "imgs", 15)
    corrupt = tmp_path / "imgs" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    paths = [*images[:7], corrupt, *images[7:]]
    out = tmp_path / "out"
    ids = submit_jobs(queue_env, paths, [{"type": "local", "path": str(out)}], tmp_path)
    worker = start_worker(env={"WORKER_BATCH__MAX_SIZE": "16", "WORKER_BATCH__MAX_WAIT_MS": "2000"})
    wait_until(lambda: len(result_files(out)) == 16, 60, "16 results")
    results = result_files(out)
    assert results[ids[7]]["status"] == "error"
    assert results[ids[7]]["error"]["code"] == "image_unreadable"
    assert sum(r["status"] == "ok" for r in results.values()) == 15
    assert [e["size"] for e in worker.events("batch.processed")] == [16]
    assert worker.stop() == 0


def test_failing_sink_dead_letters_then_requeue_completes(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]
    out = tmp_path / "out"
    blocker = tmp_path / "sink-is-down"
    blocker.write_text("while this file exists the sink fails")
    sinks = [{"type": "record", "path": str(out), "fail_while": str(blocker)}]
    [job_id] = submit_jobs(queue_env, [image], sinks, tmp_path)
    worker = start_worker()
    wait_until(lambda: read_events(worker.log_path, "sink.failed"), 60, "the sink to give up")
    retries = worker.events("sink.retry_scheduled")
    assert [e["attempt"] for e in retries] == [1, 2]  # WORKER_MAX_ATTEMPTS=3
    dlq = cli(queue_env, "dlq", "list", "--json")
    entries = [json.loads(line) for line in dlq.stdout.splitlines()]
    assert [(e["job_id"], e["stage"], e["attempts"]) for e in entries] == [(job_id, "deliver", 3)]
    assert not (out / f"{job_id}.json").exists()

    blocker.unlink()  # the sink is fixed
    requeue = cli(queue_env, "dlq", "requeue", job_id)
    assert requeue.returncode == 0, requeue.stderr
    wait_until((out / f"{job_id}.json").exists, 30, "the requeued delivery")
    dlq = cli(queue_env, "dlq", "list", "--json")
    assert dlq.stdout.strip() == ""
    assert worker.stop() == 0


POLICY_V1 = """\
name: live
kind: moderation
templates: none
background: [a blank page]
categories:
  - id: red
    prompts: [a red shape]
"""


def test_policy_edit_applies_without_restart(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    policy_dir = tmp_path / "live-policies"
    policy_dir.mkdir()
    policy = policy_dir / "live.yaml"
    policy.write_text(POLICY_V1)
    env = {"WORKER_POLICY_DIR": str(policy_dir)}
    image = write_images(tmp_path / "imgs", 1)[0]
    out = tmp_path / "out"
    worker = start_worker(env=env)
    client_env = {**queue_env, **env}

    def score(job_id: str) -> dict[str, Any]:
        code = (
            "from worker.client import submit, wait\n"
            f"submit({{'job_id': {job_id!r}, 'image': {{'uri': {str(image)!r}}},"
            f" 'sinks': [{{'type': 'local', 'path': {str(out)!r}}}]}})\n"
            f"print(wait({job_id!r}, timeout=60).to_json())"
        )
        proc = run_python(code, client_env)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    first = score("before-edit")["policies"]["live"]
    assert set(first["scores"]) == {"red"}

    policy.write_text(POLICY_V1 + "  - id: blue\n    prompts: [a blue shape]\n")
    edited_at = time.monotonic()
    wait_until(lambda: worker.events("policy.reloaded"), 5, "the reload (within 5 s)")
    assert time.monotonic() - edited_at <= 5
    second = score("after-edit")["policies"]["live"]
    assert set(second["scores"]) == {"red", "blue"}
    assert second["version"] != first["version"]
    assert second["scores"]["red"] == pytest.approx(first["scores"]["red"], abs=1e-6)

    policy.write_text(POLICY_V1.replace("prompts: [a red shape]", "prompts: []"))
    rejected = wait_until(lambda: worker.events("policy.rejected"), 5, "the rejection")
    assert any(f"{policy}:7:" in p and "has no prompts" in p for p in rejected[0]["problems"])
    third = score("after-broken-edit")["policies"]["live"]
    assert third["version"] == second["version"]
    assert set(third["scores"]) == {"red", "blue"}
    assert worker.stop() == 0


def test_pickle_message_is_refused_not_executed(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    marker = tmp_path / "pwned"
    code = f"""
import os, uuid
from kombu import Connection, Exchange, Producer

class Exploit:
    def __reduce__(self):
        return (os.system, ({f"touch {marker}"!r},))

with Connection({queue_env["WORKER_BROKER_URL"]!r}) as conn:
    producer = Producer(conn)
    task_id = str(uuid.uuid4())
    producer.publish(
        ((Exploit(),), {{}}, {{}}),
        serializer="pickle",
        exchange="",
        routing_key="moderation",
        headers={{"lang": "py", "task": "moderation.score", "id": task_id, "root_id": task_id,
                  "parent_id": None, "group": None, "argsrepr": "", "kwargsrepr": ""}},
    )
print("published")
"""
    published = run_python(code, queue_env)
    assert published.returncode == 0, published.stderr
    worker = start_worker()
    image = write_images(tmp_path / "imgs", 1)[0]
    out = tmp_path / "out"
    [job_id] = submit_jobs(queue_env, [image], [{"type": "local", "path": str(out)}], tmp_path)
    wait_until((out / f"{job_id}.json").exists, 60, "the next job to complete")
    assert not marker.exists()
    [refused] = worker.events("message.refused")
    assert "content type 'application/x-python-serialize' refused" in refused["reason"]
    dlq = cli(queue_env, "dlq", "list", "--json")
    [entry] = [json.loads(line) for line in dlq.stdout.splitlines()]
    assert entry["stage"] == "validate"
    assert entry["raw"]  # the raw body, kept for the operator
    assert worker.stop() == 0


def test_sigterm_drains_the_batch_in_hand(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    images = write_images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    sinks = [{"type": "record", "path": str(out), "delay_ms": 150}]
    ids = submit_jobs(queue_env, [images[i % 4] for i in range(24)], sinks, tmp_path)
    first = start_worker()
    wait_until(lambda: len(deliveries(out)) >= 1, 60, "the first delivery")
    first.signal(signal.SIGTERM)
    assert first.proc.wait(60) == 0
    batch = first.events("batch.processed")
    assert batch, "the batch in hand finished before exit"
    # Whole batches only: every job scored before exit was delivered, or its delivery is
    # waiting in Redis (attempts not started at shutdown are due again at once, for the
    # next worker); nothing else was taken.
    delivered = set(deliveries(out))
    store = redis.Redis.from_url(queue_env["WORKER_BROKER_URL"], decode_responses=True)
    waiting = {
        str(key).removeprefix("mw:delivery:").split(":")[0] for key in store.keys("mw:delivery:*")
    }
    assert not delivered & waiting
    assert len(delivered) + len(waiting) == sum(e["scored"] for e in batch)
    second = start_worker()
    wait_until(lambda: len(result_files(out)) == 24, 60, "the rest after restart")
    assert set(deliveries(out)) == set(ids)
    assert all(len(v) == 1 for v in deliveries(out).values())  # acked jobs never re-ran
    assert second.stop() == 0


def test_duplicate_job_id_is_idempotent(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]
    out = tmp_path / "out"
    worker = start_worker()
    sinks = [{"type": "record", "path": str(out)}]
    submit_jobs(queue_env, [image], sinks, tmp_path)
    wait_until(lambda: len(deliveries(out)) == 1, 60, "the first result")
    submit_jobs(queue_env, [image], sinks, tmp_path)  # same job id: job-0000
    wait_until(lambda: len(deliveries(out).get("job-0000", [])) == 2, 60, "the second delivery")
    first, second = deliveries(out)["job-0000"]
    assert first == second  # the same document, not a re-score
    assert len(result_files(out)) == 1
    assert worker.events("job.redelivered")
    shown = cli(queue_env, "result", "job-0000")
    assert shown.returncode == 0
    assert json.loads(shown.stdout) == json.loads(first)
    assert worker.stop() == 0


def test_serve_refuses_to_start_with_a_bad_model(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    env = {"WORKER_MODEL__NAME": f"local-dir:{tmp_path / 'missing'}"}
    worker = start_worker(env=env, wait=False)
    assert worker.proc.wait(60) == 2
    assert "WORKER_MODEL__NAME=local-dir:" in worker.log_path.read_text()


def test_prefork_scores_with_both_children_and_stops_on_sigterm(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    """Regression: the parent loaded the model before forking, so libgomp's OpenMP pool was
    live at fork and each child hung in its first parallel region, jobs held unacked."""
    images = write_images(tmp_path / "imgs", 8)
    out = tmp_path / "out"
    worker = start_worker(
        "--pool", "prefork", "--concurrency", "2", env={"WORKER_BATCH__MAX_SIZE": "4"}
    )
    wait_until(lambda: len(worker.events("worker.ready")) == 2, 120, "two prefork children")
    children = {e["pid"] for e in worker.events("worker.ready")}
    assert len(children) == 2
    assert worker.proc.pid not in children
    paths = [images[i % len(images)] for i in range(40)]
    sinks = [{"type": "record", "path": str(out), "delay_ms": 20}]
    ids = submit_jobs(queue_env, paths, sinks, tmp_path)
    wait_until(lambda: len(result_files(out)) == 40, 120, "40 result files")
    assert set(result_files(out)) == set(ids)
    batches = worker.events("batch.processed")
    assert sum(e["scored"] for e in batches) == 40
    assert {e["pid"] for e in batches} == children, "both children should score"
    started = time.monotonic()
    assert worker.stop(timeout=20) == 0
    assert time.monotonic() - started < 15


def test_prefork_refuses_to_start_with_a_bad_model(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    env = {"WORKER_MODEL__NAME": f"local-dir:{tmp_path / 'missing'}"}
    worker = start_worker("--pool", "prefork", "--concurrency", "2", env=env, wait=False)
    assert worker.proc.wait(60) == 2
    assert "WORKER_MODEL__NAME=local-dir:" in worker.log_path.read_text()
