"""The dead-letter store and requeue, in-process against a real redis-server."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis

from tests.integration.servers import redis_values
from worker.client import Client
from worker.errors import RequeueRefusedError
from worker.queue.dead_letters import DeadLetter, DeadLetters, requeue
from worker.queue.jobs import Delivery, JobStore
from worker.redact import REDACTED
from worker.sealing import Sealer, generate_key
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.fault]

SECRET = "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LTEyMzQ1Ng=="
SIGNED = "https://img.example/cat.png?X-Amz-Signature=deadbeef99&X-Amz-Credential=AKIAXYZ%2F1"
JOB: dict[str, Any] = {
    "job_id": "job-1",
    "image": {"uri": SIGNED},
    "policies": None,
    "sinks": [{"type": "webhook", "url": "https://hooks.example/x", "secret": SECRET}],
    "metadata": {},
}


def _client(url: str) -> Client:
    return Client(Settings(broker_url=url))


def _queued_jobs(url: str) -> list[dict[str, Any]]:
    """The jobs waiting on the queue, decoded from kombu's envelopes."""
    items = redis.Redis.from_url(url).lrange("moderation", 0, -1)
    bodies = [base64.b64decode(json.loads(item)["body"]) for item in items]
    return [json.loads(body)[0][0] for body in bodies]


def _store(url: str, key: str | None = None) -> DeadLetters:
    return DeadLetters(redis.Redis.from_url(url, decode_responses=True), Sealer(key))


def _jobs(url: str, key: str | None = None) -> JobStore:
    return JobStore(redis.Redis.from_url(url, decode_responses=True), 3600, Sealer(key))


def test_a_job_that_fails_twice_keeps_both_failures(redis_url: str) -> None:
    store = _store(redis_url)
    store.add(DeadLetter.of("job-1", JOB, 3, "HTTP 500", "deliver", sink=JOB["sinks"][0]))
    store.add(DeadLetter.of("job-1", JOB, 2, "taken 2 times", "score"))
    [entry] = store.entries()
    assert entry.count == 2
    assert entry.stage == "score"
    assert [h["error"] for h in entry.history] == ["HTTP 500"]
    assert entry.history[0]["stage"] == "deliver"


def test_history_is_capped(redis_url: str) -> None:
    store = _store(redis_url)
    for i in range(25):
        store.add(DeadLetter.of("job-1", {}, i, f"failure {i}", "score"))
    [entry] = store.entries()
    assert entry.count == 25
    assert len(entry.history) == 10
    assert entry.history[-1]["error"] == "failure 23"


def test_secrets_never_reach_the_dead_letter_store(redis_url: str) -> None:
    store = _store(redis_url)
    store.add(
        DeadLetter.of(
            "job-1", JOB, 3, f"webhook failed with {SECRET}", "deliver", sink=JOB["sinks"][0]
        )
    )
    dumped = redis_values(redis_url)
    for secret in (SECRET, "deadbeef99", "AKIAXYZ"):
        assert secret not in dumped
    [entry] = store.entries()
    assert entry.redacted
    assert entry.sealed is None  # no key: nothing kept that could be opened
    assert entry.sink is not None
    assert entry.sink["secret"] == REDACTED


def test_without_a_key_a_redacted_entry_is_refused_and_kept(redis_url: str) -> None:
    store = _store(redis_url)
    store.add(DeadLetter.of("job-1", JOB, 2, "taken 2 times", "score"))
    with pytest.raises(RequeueRefusedError, match="WORKER_SECRET_KEY"):
        requeue(store, _jobs(redis_url), _client(redis_url).submit, "job-1")
    assert store.count() == 1


def test_with_a_key_the_sealed_job_is_requeued_whole(redis_url: str) -> None:
    key = generate_key()
    store = _store(redis_url, key)
    store.add(DeadLetter.of("job-1", JOB, 2, "taken 2 times", "score", sealer=store.sealer))
    dumped = redis_values(redis_url)
    assert SECRET not in dumped
    assert "deadbeef99" not in dumped
    assert requeue(store, _jobs(redis_url), _client(redis_url).submit, "job-1") == "submitted again"
    [job] = _queued_jobs(redis_url)
    assert job["image"]["uri"] == SIGNED
    assert job["sinks"][0]["secret"] == SECRET
    assert store.count() == 0
    # Another worker with another key cannot open it, and says so.
    store.add(DeadLetter.of("job-1", JOB, 2, "again", "score", sealer=store.sealer))
    with pytest.raises(RequeueRefusedError, match="another WORKER_SECRET_KEY"):
        requeue(
            _store(redis_url, generate_key()), _jobs(redis_url), _client(redis_url).submit, "job-1"
        )


def test_requeue_validates_before_it_removes(redis_url: str) -> None:
    store = _store(redis_url)
    store.add(DeadLetter.of("job-2", {"image": {}}, 0, "invalid job: image", "validate"))
    store.add(DeadLetter.of("refused-x", {}, 0, "got null", "validate", raw="null"))
    with pytest.raises(RequeueRefusedError, match="not a valid job"):
        requeue(store, _jobs(redis_url), _client(redis_url).submit, "job-2")
    with pytest.raises(RequeueRefusedError, match="refused before it was a job"):
        requeue(store, _jobs(redis_url), _client(redis_url).submit, "refused-x")
    assert store.count() == 2
    assert requeue(store, _jobs(redis_url), _client(redis_url).submit, "not-there") is None


def test_a_failure_written_during_requeue_is_kept(redis_url: str) -> None:
    store = _store(redis_url)
    plain = {**JOB, "image": {"uri": "/data/cat.png"}, "sinks": []}
    store.add(DeadLetter.of("job-3", plain, 2, "first", "score"))
    found = store.get("job-3")
    assert found is not None
    _, seen = found
    store.add(DeadLetter.of("job-3", plain, 2, "second", "score"))  # meanwhile
    assert not store.remove("job-3", expected=seen)
    [entry] = store.entries()
    assert entry.count == 2


def test_a_sealed_delivery_keeps_no_secret_at_rest(redis_url: str) -> None:
    store = _jobs(redis_url, generate_key())
    delivery = Delivery("d1", JOB, JOB["sinks"][0], 1, json.dumps({"job_id": "job-1"}))
    store.schedule_delivery(delivery, 0)
    dumped = redis_values(redis_url)
    assert SECRET not in dumped
    assert "deadbeef99" not in dumped
    [claimed] = store.claim_deliveries(now=1, lease_s=60)
    assert claimed == delivery
