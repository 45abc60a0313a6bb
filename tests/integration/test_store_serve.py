"""The embedding store behind real `worker serve` processes, on a real redis-server and
moto's S3 server on 127.0.0.1 (an ``s3://`` store reached through ``AWS_ENDPOINT_URL``):

- two workers writing one store keep exactly one row per scored job id, with the
  contract's columns (ARCHITECTURE.md, "Embedding store"), job ids both scored included;
- a job answered again, from its stored result or scored again once that result is gone
  (by the worker that wrote its row or by another), adds no row;
- a store that goes away loses no job: every job is answered, and the rows that could not
  be written are logged (``store.write_failed``) and counted
  (``moderation_store_rows_total{outcome="failed"}``).
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_until, write_images
from tests.integration.conftest import AWS_ENV
from tests.integration.queue_helpers import queue_client, queue_drained
from tests.integration.servers import free_port, moto_server
from tests.processes import WorkerProcess
from worker.client import Client
from worker.store import EmbeddingStore

pytestmark = pytest.mark.integration
BUCKET = "fleet"
STORE = f"s3://{BUCKET}/store"
#: The contract's columns and their Arrow types (``embedding``: checked apart).
COLUMN_TYPES = {
    "job_id": pa.string(),
    "image_sha256": pa.string(),
    "fingerprint": pa.string(),
    "uri": pa.string(),
    "created_at": pa.timestamp("us", tz="UTC"),
    "metadata": pa.string(),
    "result": pa.string(),
}


def serve_env(queue_env: dict[str, str], endpoint: str, delivered: Path) -> dict[str, str]:
    """A worker on the ``s3://`` store at ``endpoint``, with /metrics on a port of its own
    and every result appended to ``delivered`` (a JSON-lines sink several workers share)."""
    return {
        **queue_env,
        **AWS_ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "WORKER_STORE__URI": STORE,
        "WORKER_METRICS__HOST": "127.0.0.1",
        "WORKER_METRICS__PORT": str(free_port()),
        "WORKER_SINKS": json.dumps([f"local:{delivered}"]),
    }


def start_fleet(
    start_worker: Callable[..., WorkerProcess], *envs: dict[str, str]
) -> list[WorkerProcess]:
    """Workers started side by side (their models load at once), ready to take jobs."""
    workers = [start_worker(env=env, wait=False) for env in envs]
    for worker in workers:
        worker.wait_ready()
    return workers


def store_rows(env: dict[str, str]) -> dict[str, float]:
    """``moderation_store_rows_total`` on the worker's /metrics, by outcome."""
    url = f"http://127.0.0.1:{env['WORKER_METRICS__PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "moderation_store_rows_total"
    }


def read_table(endpoint: str) -> pa.Table:
    """The whole ``embeddings`` table, read afresh as a user would."""
    options = {"aws_endpoint": endpoint, "allow_http": "true", "aws_region": "us-east-1"}
    table = EmbeddingStore(STORE, options).table()
    assert table is not None, f"no embeddings table at {STORE}"
    result: pa.Table = table.to_arrow()
    return result


def delivered_docs(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Every result document the shared JSON-lines sink received, by job id."""
    docs: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        docs.setdefault(doc["job_id"], []).append(doc)
    return docs


def scored(workers: list[WorkerProcess]) -> Counter[str]:
    """How often each job id was scored, by all ``workers`` together."""
    return Counter(str(e["job_id"]) for w in workers for e in w.events("job.scored"))


def resubmit_scored(client: Client, url: str, jobs: list[dict[str, Any]]) -> None:
    """Forget the stored results of ``jobs`` and submit them again, so they are scored
    again; returns once their new results are stored."""
    redis.Redis.from_url(url).delete(*[f"mw:result:{job['job_id']}" for job in jobs])
    for job in jobs:
        client.submit(job)
    for job in jobs:
        client.wait(job["job_id"], timeout=60)


def check_row(row: dict[str, Any], docs: list[dict[str, Any]], dim: int) -> dict[str, Any]:
    """``row`` has the contract's values; returns the delivered document it keeps (one of
    ``docs``, the documents delivered for its job id)."""
    kept = json.loads(row["result"])
    assert kept in docs, f"{row['job_id']}: the row's result was never delivered"
    assert kept["status"] == "ok"
    assert row["image_sha256"] == kept["image"]["sha256"]
    assert row["fingerprint"] == kept["model"]["fingerprint"]
    assert row["uri"] == kept["image"]["uri"]
    assert json.loads(row["metadata"]) == kept["metadata"]
    assert row["created_at"].utcoffset() == timedelta(0)
    assert row["created_at"] == datetime.fromisoformat(kept["created_at"])
    vector = row["embedding"]
    assert len(vector) == dim
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, abs_tol=1e-4)
    return dict(kept)


def test_two_workers_share_one_s3_store_with_one_row_per_job(
    tmp_path: Path,
    s3: Any,
    s3_endpoint: str,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    s3.create_bucket(Bucket=BUCKET)
    images = write_images(tmp_path / "imgs", 20)
    corrupt = tmp_path / "imgs" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    delivered = tmp_path / "delivered.jsonl"
    envs = [serve_env(queue_env, s3_endpoint, delivered) for _ in range(2)]
    workers = start_fleet(start_worker, *envs)
    client = queue_client(envs[0], monkeypatch)

    good: list[dict[str, Any]] = [
        {"job_id": f"job-{i:03d}", "image": {"uri": str(images[i % 20])}, "metadata": {"n": i}}
        for i in range(80)
    ]
    bad = [{"job_id": f"bad-{i}", "image": {"uri": str(corrupt)}} for i in range(2)]
    # Every fourth job goes again 9 messages later: by then the other worker is likely
    # taking the queue's next batch (8 jobs), and both score the same job id at once.
    order: list[dict[str, Any]] = []
    for i, job in enumerate([*good, *bad]):
        order.append(job)
        if i >= 9 and (i - 9) % 4 == 0 and i - 9 < len(good):
            order.append(good[i - 9])
    for job in order:
        client.submit(job)
    results = {job["job_id"]: client.wait(job["job_id"], timeout=90) for job in [*good, *bad]}
    url = queue_env["WORKER_BROKER_URL"]
    wait_until(lambda: queue_drained(url), 60, "an empty queue")
    assert redis.Redis.from_url(url).zcard("mw:retries") == 0
    assert all(results[job["job_id"]].status == "ok" for job in good)
    assert all(results[job["job_id"]].status == "error" for job in bad)
    counters = [store_rows(env) for env in envs]  # before the writers' last flush
    times = scored(workers)
    per_worker = [len(w.events("job.scored")) for w in workers]
    assert all(per_worker), f"both workers should score jobs: {per_worker}"
    for worker in workers:
        assert worker.stop() == 0  # the writer commits what it holds before exiting

    table = read_table(s3_endpoint)
    for name, kind in COLUMN_TYPES.items():
        assert table.schema.field(name).type == kind, name
    vector = table.schema.field("embedding").type
    assert isinstance(vector, pa.FixedSizeListType)
    assert vector.value_type == pa.float32()
    rows = table.to_pylist()
    ids = Counter(row["job_id"] for row in rows)
    assert [i for i, n in ids.items() if n > 1] == [], "a job id has two rows"
    assert set(ids) == {job["job_id"] for job in good}  # ok results only, none missing
    docs = delivered_docs(delivered)
    writers: Counter[str] = Counter()
    for row in rows:
        kept = check_row(row, docs[row["job_id"]], vector.list_size)
        writers[kept["worker"]] += 1
        if times[row["job_id"]] == 1:  # scored once: the document stored and delivered
            assert kept == results[row["job_id"]].model_dump(mode="json")
    names = {doc["worker"] for docs_of in docs.values() for doc in docs_of}
    assert len(names) == 2, f"result documents name {names}"
    assert set(writers) == names, f"rows per worker: {writers}"
    for worker in workers:
        assert not worker.events("store.write_failed")
        assert "Traceback" not in worker.log()
    twice = sorted(i for i, n in times.items() if n > 1)
    print(
        f"\nsubmitted {len(order)} messages ({len(good)} ok job ids, {len(order) - 82} sent "
        f"twice, {len(bad)} corrupt); scored twice: {len(twice)} {twice}; rows {len(rows)} "
        f"({dict(writers)}); scored per worker {per_worker}; counters at drain {counters}; "
        f"took {time.monotonic() - started:.1f} s"
    )


def test_a_job_answered_again_adds_no_row(
    tmp_path: Path,
    s3: Any,
    s3_endpoint: str,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker A and worker B take different queues, so each step chooses who scores."""
    started = time.monotonic()
    s3.create_bucket(Bucket=BUCKET)
    images = write_images(tmp_path / "imgs", 6)
    delivered = tmp_path / "delivered.jsonl"
    quick = {"WORKER_STORE__FLUSH_INTERVAL_S": "0.2"}
    env_a = {**serve_env(queue_env, s3_endpoint, delivered), **quick}
    env_b = {**serve_env(queue_env, s3_endpoint, delivered), **quick, "WORKER_QUEUE__NAME": "other"}
    a, b = start_fleet(start_worker, env_a, env_b)
    to_a, to_b = queue_client(env_a, monkeypatch), queue_client(env_b, monkeypatch)
    url = queue_env["WORKER_BROKER_URL"]

    # B opens the table first, so its handle is older than A's rows below.
    to_b.submit({"job_id": "b-first", "image": {"uri": str(images[0])}})
    to_b.wait("b-first", timeout=60)
    wait_until(lambda: store_rows(env_b).get("written") == 1, 30, "B's first row")
    jobs: list[dict[str, Any]] = [
        {"job_id": f"r-{i}", "image": {"uri": str(p)}} for i, p in enumerate(images)
    ]
    for job in jobs:
        to_a.submit(job)
    first = {job["job_id"]: to_a.wait(job["job_id"], timeout=60) for job in jobs}
    wait_until(lambda: store_rows(env_a).get("written") == len(jobs), 30, "A's rows")

    for job in jobs:  # answered from the stored result: not scored again
        to_b.submit(job)
    wait_until(lambda: len(b.events("job.redelivered")) == len(jobs), 60, "redeliveries")
    assert scored([b]) == {"b-first": 1}

    resubmit_scored(to_b, url, jobs)  # scored again by the worker that did not write them
    wait_until(lambda: scored([b]).total() == 1 + len(jobs), 30, "B scoring them")
    wait_until(lambda: store_rows(env_b).get("skipped") == len(jobs), 30, "B's skipped rows")
    resubmit_scored(to_a, url, jobs[:3])  # and by the one that did
    wait_until(lambda: scored([a]).total() == len(jobs) + 3, 30, "A scoring three again")
    wait_until(lambda: store_rows(env_a).get("skipped") == 3, 30, "A's skipped rows")
    wait_until(lambda: queue_drained(url), 30, "an empty queue")
    counters = {"A": store_rows(env_a), "B": store_rows(env_b)}
    assert counters["A"].get("failed", 0) == counters["B"].get("failed", 0) == 0
    for worker in (a, b):
        assert worker.stop() == 0

    rows = read_table(s3_endpoint).to_pylist()
    assert sorted(row["job_id"] for row in rows) == ["b-first", *sorted(first)]
    for row in rows:  # the row keeps the first scoring's document
        if row["job_id"] in first:
            assert json.loads(row["result"]) == first[row["job_id"]].model_dump(mode="json")
    deliveries = Counter({job_id: len(d) for job_id, d in delivered_docs(delivered).items()})
    print(
        f"\nrows {len(rows)}; deliveries per job {dict(sorted(deliveries.items()))}; "
        f"counters {counters}; took {time.monotonic() - started:.1f} s"
    )


def answer(client: Client, images: list[Path], prefix: str, count: int) -> None:
    """Submit ``count`` jobs (ids ``prefix-N``) and wait for each one's ok result."""
    jobs: list[dict[str, Any]] = [
        {"job_id": f"{prefix}-{i}", "image": {"uri": str(images[i % len(images)])}}
        for i in range(count)
    ]
    for job in jobs:
        client.submit(job)
    for job in jobs:
        assert client.wait(job["job_id"], timeout=60).status == "ok"


def wait_failed(env: dict[str, str], rows: int) -> None:
    """Until the worker's /metrics count ``rows`` rows the store did not take."""
    what = f"{rows} rows counted as failed"
    wait_until(lambda: store_rows(env).get("failed") == rows, 30, what)


def test_a_store_outage_loses_no_job(
    tmp_path: Path,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker ``gone`` loses its store midway (its moto server stops); worker ``down``
    starts while nothing listens at its store's endpoint. Lance's own HTTP retries (about
    10 s per commit attempt by default) are turned off, so the writer's three attempts at
    a batch take 1.5 s (a store it cannot connect to is given up after one)."""
    import boto3

    started = time.monotonic()
    images = write_images(tmp_path / "imgs", 8)
    delivered = tmp_path / "delivered.jsonl"
    quick = {"OBJECT_STORE_CLIENT_MAX_RETRIES": "0", "WORKER_STORE__FLUSH_INTERVAL_S": "0.2"}
    nowhere = f"http://127.0.0.1:{free_port()}"
    down_env = {**serve_env(queue_env, nowhere, delivered), **quick, "WORKER_QUEUE__NAME": "down"}
    with contextmanager(moto_server)() as endpoint:  # this test's own, to stop it midway
        credentials = {
            "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        }
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials)
        s3.create_bucket(Bucket=BUCKET)
        gone_env = {**serve_env(queue_env, endpoint, delivered), **quick}
        gone, down = start_fleet(start_worker, gone_env, down_env)
        to_gone = queue_client(gone_env, monkeypatch)
        to_down = queue_client(down_env, monkeypatch)
        answer(to_gone, images, "before", 4)
        wait_until(lambda: store_rows(gone_env).get("written") == 4, 30, "rows written")
    answer(to_gone, images, "during", 12)  # the store is gone
    answer(to_down, images, "down", 12)
    failures: dict[str, list[dict[str, Any]]] = {}
    for name, env, worker in (("gone", gone_env, gone), ("down", down_env, down)):
        wait_failed(env, 12)
        failures[name] = events = worker.events("store.write_failed")
        assert sum(e["rows"] for e in events) == 12
        assert all(e["store"] == STORE for e in events)
    answer(to_gone, images, "after", 3)  # both still serve
    answer(to_down, images, "down-after", 3)
    wait_failed(gone_env, 15)
    wait_failed(down_env, 15)
    counters = {"gone": store_rows(gone_env), "down": store_rows(down_env)}
    assert counters["down"].get("written", 0) == 0
    for worker in (gone, down):
        assert worker.proc.poll() is None
        assert worker.stop() == 0
    for name, events in failures.items():
        print(
            f"\n{name}: store.write_failed {[(e['rows'], e['attempts']) for e in events]}, "
            f"first error {events[0]['error'][:100]!r}"
        )
    print(f"counters {counters}; took {time.monotonic() - started:.1f} s")
