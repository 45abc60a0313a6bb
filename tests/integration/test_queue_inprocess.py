"""The queue's parts in-process, on a real redis-server: no Celery, no `worker serve`.

A real engine (the tiny model), a JobStore and DeadLetters on Redis, and a Deliverer with
the real ``local`` sink are wired as ``worker/queue/service.py`` wires them, and driven
through their public methods: QueueProcessor.process, Deliverer.deliver_all / run_due /
close, JobStore's results, attempts and leased delivery schedule, RedisPluginState and
the PolicyWatcher's swap. Failures come from real causes: a file where the local sink
needs a directory (retryable), options the sink refuses (permanent), a FIFO nobody reads
(an attempt that blocks), a closed loopback port (a transient source error).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from structlog.testing import capture_logs

from tests.helpers import SHAPES_POLICY, write_images, write_policy
from tests.integration.conftest import free_port, wait_until
from worker.documents import ImageInfo, Job, ModelInfo, Result
from worker.engine import Engine
from worker.errors import RETRYABLE_CODES
from worker.model import LoadedModel
from worker.plugins import PluginContext
from worker.policy import LoadedPolicy
from worker.policy.policyset import PolicySet
from worker.queue.dead_letters import DeadLetter, DeadLetters, requeue
from worker.queue.delivery import Deliverer, DeliveryLoop, SinkCache, delivery_id_of
from worker.queue.jobs import Delivery, JobStore, RedisPluginState
from worker.queue.processor import QueueProcessor
from worker.queue.reload import PolicyWatcher
from worker.runtime import build_engine, compile_configured
from worker.sealing import Sealer, generate_key
from worker.settings import Settings

pytestmark = [pytest.mark.integration]

MAX_ATTEMPTS = 3
FAST_DELIVERY: dict[str, Any] = {
    "backoff_base_s": 0.05,
    "backoff_max_s": 0.2,
    "poll_interval_s": 0.05,
    "lease_s": 5.0,
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def sink_root(tmp_path: Path) -> Path:
    root = tmp_path / "sinks"
    root.mkdir()
    return root


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], redis_url: str, tmp_path: Path, sink_root: Path
) -> Settings:
    return make_settings(
        broker_url=redis_url,
        file_roots=[tmp_path / "imgs"],
        sink_roots=[sink_root],
        max_attempts=MAX_ATTEMPTS,
        delivery=FAST_DELIVERY,
        http={"allow_networks": ["127.0.0.1/32"], "connect_timeout_s": 2.0},
        queue={"result_ttl_s": 3600},
    )


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "imgs", 4)


@pytest.fixture
def engine(settings: Settings, tiny_model: LoadedModel) -> Iterator[Engine]:
    eng = build_engine(settings, service=True, model=tiny_model)
    yield eng
    eng.close()


@pytest.fixture
def jobs(settings: Settings) -> JobStore:
    return JobStore.from_settings(settings)


@pytest.fixture
def letters(jobs: JobStore) -> DeadLetters:
    return DeadLetters(jobs.redis, jobs.sealer)


@pytest.fixture
def make_deliverer(
    settings: Settings, jobs: JobStore, letters: DeadLetters
) -> Iterator[Callable[..., Deliverer]]:
    """Deliverers built as Service.start builds them; closed after the test."""
    made: list[Deliverer] = []

    def make(default_sinks: Sequence[dict[str, Any]] = (), **overrides: Any) -> Deliverer:
        context = PluginContext(settings=settings, service=True, state=RedisPluginState(jobs.redis))
        options: dict[str, Any] = {
            "max_attempts": settings.max_attempts,
            "backoff_base_s": settings.delivery.backoff_base_s,
            "backoff_max_s": settings.delivery.backoff_max_s,
            "lease_s": settings.delivery.lease_s,
            "concurrency": 2,
            "job_sink_types": settings.job_sink_types,
            **overrides,
        }
        deliverer = Deliverer(jobs, letters, SinkCache(context), default_sinks, **options)
        made.append(deliverer)
        return deliverer

    yield make
    for deliverer in made:
        deliverer.close()
        deliverer.sinks.close()


@pytest.fixture
def deliverer(make_deliverer: Callable[..., Deliverer]) -> Deliverer:
    return make_deliverer()


@pytest.fixture
def processor(
    engine: Engine, jobs: JobStore, letters: DeadLetters, deliverer: Deliverer
) -> QueueProcessor:
    return QueueProcessor(engine, jobs, letters, deliverer, MAX_ATTEMPTS)


@pytest.fixture
def encoded(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the image batches the encoder was called with."""
    calls: list[int] = []
    original = engine.model.encode_images

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(int(pixels.shape[0]))
        return original(pixels)

    monkeypatch.setattr(engine.model, "encode_images", counting)
    return calls


# --------------------------------------------------------------------------- helpers


def job_doc(job_id: str, uri: str, *sinks: dict[str, Any]) -> dict[str, Any]:
    return {"job_id": job_id, "image": {"uri": uri}, "sinks": list(sinks)}


def local(path: Path) -> dict[str, Any]:
    return {"type": "local", "path": str(path)}


def bare_result(job_id: str) -> Result:
    """A result document as a sink receives it (no scoring needed to deliver one)."""
    return Result(
        job_id=job_id,
        status="ok",
        image=ImageInfo(),
        model=ModelInfo(name="tiny", pretrained="", fingerprint="0" * 16),
    )


def stored_result(jobs: JobStore, job_id: str) -> Result:
    text = jobs.get_result(job_id)
    assert text is not None, f"no result stored for {job_id}"
    return Result.model_validate_json(text)


def dead_letter(letters: DeadLetters, job_id: str) -> DeadLetter:
    found = letters.get(job_id)
    assert found is not None, f"{job_id} is not in the dead-letter store"
    return found[0]


def claim_all(jobs: JobStore, at: float, lease_s: float = 5.0) -> dict[str, Delivery]:
    return {d.delivery_id: d for d in jobs.claim_deliveries(at, lease_s, limit=100)}


def blocker(root: Path) -> Path:
    """A local sink directory that cannot be made: its parent is a regular file."""
    (root / "blocker").write_text("a file where the sink needs a directory")
    return root / "blocker" / "out"


# --------------------------------------------------------------------------- QueueProcessor


def test_a_batch_of_good_jobs_is_scored_stored_and_delivered(
    make_deliverer: Callable[..., Deliverer],
    engine: Engine,
    jobs: JobStore,
    letters: DeadLetters,
    images: list[Path],
    sink_root: Path,
    encoded: list[int],
) -> None:
    default_file = sink_root / "default" / "results.jsonl"
    deliverer = make_deliverer([local(default_file)])  # trusted: WORKER_SINKS
    processor = QueueProcessor(engine, jobs, letters, deliverer, MAX_ATTEMPTS)
    out = sink_root / "out"
    payloads = [job_doc(f"good-{i}", str(p), local(out)) for i, p in enumerate(images[:3])]
    payloads.append(job_doc("good-default", str(images[3])))  # no sinks: the default ones

    assert processor.process(payloads, [f"m-{i}" for i in range(4)]) == [True] * 4
    assert encoded == [4]  # one encoder batch for the whole batch

    assert deliverer.wait_idle(10)
    for i in range(3):
        result = stored_result(jobs, f"good-{i}")
        assert result.status == "ok", result.error
        assert set(result.policies) == {"shapes", "shape-tags"}
        assert (out / f"good-{i}.json").read_text() == jobs.get_result(f"good-{i}")
        assert jobs.attempts(f"good-{i}") == 0  # reset once finished
    lines = default_file.read_text().splitlines()
    assert lines == [jobs.get_result("good-default")]
    assert jobs.pending_deliveries() == 0
    assert letters.count() == 0


def test_a_mixed_batch_scores_the_good_and_answers_the_rest(
    processor: QueueProcessor,
    jobs: JobStore,
    letters: DeadLetters,
    images: list[Path],
    sink_root: Path,
    tmp_path: Path,
    encoded: list[int],
) -> None:
    outside = tmp_path / "elsewhere"
    payloads: list[Any] = [
        job_doc("ok-1", str(images[0]), local(sink_root / "out")),
        {"image": {"uri": str(images[1]), "data": "aGk="}},  # invalid, no job id
        job_doc("escape-1", str(images[2]), local(outside)),
        {"job_id": "named-bad", "image": {"uri": 5}},  # invalid, a usable job id
        job_doc("ok-2", str(images[3]), local(sink_root / "out")),
    ]

    outcomes = processor.process(payloads, ["m-0", "m-1", "m-2", "m-3", "m-4"])

    assert outcomes == [True] * 5  # every message is answered: none is requeued
    assert encoded == [2]  # only the two good jobs reach the encoder
    assert processor.deliverer.wait_idle(10)
    for job_id in ("ok-1", "ok-2"):
        assert stored_result(jobs, job_id).status == "ok"
        assert (sink_root / "out" / f"{job_id}.json").exists()

    invalid = dead_letter(letters, "invalid-m-1")
    assert invalid.stage == "validate"
    assert invalid.attempts == 0
    assert invalid.job == payloads[1]  # a small body is kept as it came
    assert "give exactly one of image.uri and image.data" in invalid.error
    named = dead_letter(letters, "named-bad")  # a valid job id names the entry
    assert named.stage == "validate"
    assert "image.uri" in named.error

    refused = stored_result(jobs, "escape-1")
    assert refused.status == "error"
    assert refused.error is not None
    assert refused.error.code == "sink_not_allowed"
    assert "outside WORKER_SINK_ROOTS" in refused.error.message
    assert not outside.exists()  # nothing written where the job may not write
    assert jobs.attempts("escape-1") == 0  # refused before it was counted
    assert sorted(e.job_id for e in letters.entries()) == ["invalid-m-1", "named-bad"]
    assert jobs.pending_deliveries() == 0


def test_the_same_invalid_message_twice_is_one_entry_counted_twice(
    processor: QueueProcessor, letters: DeadLetters
) -> None:
    body = {"job_id": "../etc", "image": {}}
    assert processor.process([body], ["msg-7"]) == [True]
    assert processor.process([body], ["msg-7"]) == [True]
    entry = dead_letter(letters, "invalid-msg-7")
    assert entry.count == 2
    assert len(entry.history) == 1
    assert letters.count() == 1


def test_a_job_id_seen_again_is_answered_from_the_stored_result(
    processor: QueueProcessor,
    jobs: JobStore,
    images: list[Path],
    sink_root: Path,
    encoded: list[int],
) -> None:
    out = sink_root / "out"
    payload = job_doc("twice", str(images[0]), local(out))
    assert processor.process([payload], ["m-1"]) == [True]
    assert processor.deliverer.wait_idle(10)
    first = jobs.get_result("twice")
    assert first is not None
    (out / "twice.json").unlink()  # the sink lost it: the redelivery writes it again

    with capture_logs() as logs:
        assert processor.process([payload], ["m-1"]) == [True]
    assert processor.deliverer.wait_idle(10)

    assert encoded == [1]  # not scored again
    assert jobs.get_result("twice") == first  # the same document, byte for byte
    assert (out / "twice.json").read_text() == first
    assert [e["event"] for e in logs if e["event"].startswith("job.")] == ["job.redelivered"]
    assert jobs.attempts("twice") == 0
    assert jobs.pending_deliveries() == 0


def test_one_job_twice_in_a_batch_is_scored_once(
    processor: QueueProcessor, jobs: JobStore, images: list[Path], encoded: list[int]
) -> None:
    payload = job_doc("dup", str(images[0]))
    assert processor.process([payload, payload], ["m-1", "m-2"]) == [True, True]
    assert encoded == [1]
    assert stored_result(jobs, "dup").status == "ok"


def test_copies_of_one_job_in_a_batch_are_not_failed_attempts(
    processor: QueueProcessor,
    jobs: JobStore,
    letters: DeadLetters,
    images: list[Path],
    encoded: list[int],
) -> None:
    payload = job_doc("dup-many", str(images[0]))
    copies = MAX_ATTEMPTS + 1  # e.g. an upload service that retried its submit
    outcomes = processor.process([payload] * copies, [f"m-{i}" for i in range(copies)])
    assert outcomes == [True] * copies
    assert encoded == [1]
    assert stored_result(jobs, "dup-many").status == "ok"
    assert letters.get("dup-many") is None  # fails today: a false "taken 3 times" entry


def test_a_job_taken_more_than_max_attempts_is_dead_lettered_at_score(
    processor: QueueProcessor,
    jobs: JobStore,
    letters: DeadLetters,
    images: list[Path],
    encoded: list[int],
) -> None:
    for _ in range(MAX_ATTEMPTS):  # three earlier takes that never finished (crashes)
        jobs.take_attempt("crashy")

    assert processor.process([job_doc("crashy", str(images[0]))], ["m-1"]) == [True]

    entry = dead_letter(letters, "crashy")
    assert entry.stage == "score"
    assert entry.attempts == MAX_ATTEMPTS
    assert f"taken {MAX_ATTEMPTS} times" in entry.error
    assert entry.job["image"] == {"uri": str(images[0]), "data": None, "filename": None}
    assert encoded == []
    assert jobs.get_result("crashy") is None


def test_a_transient_source_error_schedules_a_resubmission(
    make_deliverer: Callable[..., Deliverer],
    engine: Engine,
    jobs: JobStore,
    letters: DeadLetters,
) -> None:
    resubmitted: list[dict[str, Any]] = []
    deliverer = make_deliverer(resubmit=resubmitted.append)
    processor = QueueProcessor(engine, jobs, letters, deliverer, MAX_ATTEMPTS)
    url = f"http://127.0.0.1:{free_port()}/cat.png"  # nothing listens there

    with capture_logs() as logs:
        assert processor.process([job_doc("flaky", url)], ["m-1"]) == [True]

    assert jobs.pending_deliveries() == 1
    assert jobs.get_result("flaky") is None  # no error result: it is tried again
    assert jobs.attempts("flaky") == 1
    scheduled = [e for e in logs if e["event"] == "job.retry_scheduled"]
    # Connection refused: source_unavailable, or source_timeout while adapters/safehttp.py
    # reads urllib3 2's NewConnectionError (a ConnectTimeoutError) as a timeout.
    assert len(scheduled) == 1
    assert scheduled[0]["code"] in RETRYABLE_CODES
    assert letters.count() == 0

    # The delivery loop's run_due hands it back to the queue once the backoff has passed.
    wait_until(deliverer.run_due, 5, "the resubmission to be due")
    assert [j["job_id"] for j in resubmitted] == ["flaky"]
    assert resubmitted[0]["image"]["uri"] == url
    assert jobs.pending_deliveries() == 0


def test_a_transient_source_error_on_the_last_attempt_is_the_result(
    processor: QueueProcessor, jobs: JobStore, letters: DeadLetters
) -> None:
    for _ in range(MAX_ATTEMPTS - 1):
        jobs.take_attempt("flaky-last")
    url = f"http://127.0.0.1:{free_port()}/cat.png"

    assert processor.process([job_doc("flaky-last", url)], ["m-1"]) == [True]

    result = stored_result(jobs, "flaky-last")
    assert result.status == "error"
    assert result.error is not None
    assert result.error.code in RETRYABLE_CODES
    assert jobs.pending_deliveries() == 0
    assert jobs.attempts("flaky-last") == 0
    assert letters.count() == 0


# --------------------------------------------------------------------------- Deliverer


def test_a_retryable_sink_failure_schedules_attempt_2_after_a_backoff(
    make_deliverer: Callable[..., Deliverer], jobs: JobStore, sink_root: Path
) -> None:
    deliverer = make_deliverer(backoff_base_s=8.0, backoff_max_s=60.0)
    config = local(blocker(sink_root))
    job = Job.model_validate(job_doc("r-1", "/img.png", config))

    before = time.time()
    deliverer.deliver_all(job, bare_result("r-1"))
    assert deliverer.wait_idle(10)
    after = time.time()

    assert jobs.pending_deliveries() == 1
    # The first retry waits base/2 .. base (equal jitter): 4 to 8 seconds here.
    assert claim_all(jobs, before + 3.9) == {}
    due = claim_all(jobs, after + 8.1)
    retry = due[delivery_id_of("r-1", config)]
    assert retry.attempt == 2
    assert retry.sink == config
    assert "cannot write" in retry.last_error
    assert Result.model_validate_json(retry.result).job_id == "r-1"


def test_a_sink_that_keeps_failing_is_dead_lettered_and_requeue_delivers_it(
    deliverer: Deliverer, jobs: JobStore, letters: DeadLetters, sink_root: Path
) -> None:
    target = blocker(sink_root)
    config = local(target)
    job = Job.model_validate(job_doc("r-2", "/img.png", config))
    result = bare_result("r-2")
    jobs.put_result("r-2", result.to_json())  # as the processor stores it before delivering
    loop = DeliveryLoop(deliverer, 0.02)
    loop.start()
    try:
        deliverer.deliver_all(job, result)
        wait_until(lambda: letters.get("r-2"), 10, "the dead letter")
        entry = dead_letter(letters, "r-2")
        assert entry.stage == "deliver"
        assert entry.attempts == MAX_ATTEMPTS
        assert entry.count == 1
        assert entry.sink == config
        assert entry.error.startswith(f"gave up after {MAX_ATTEMPTS} attempts: ")
        assert jobs.pending_deliveries() == 0

        # The operator fixes the disk and requeues: the stored result is delivered.
        (sink_root / "blocker").unlink()
        how = requeue(letters, jobs, lambda job: pytest.fail("not resubmitted"), "r-2")
        assert how == "delivery to local scheduled"
        wait_until((target / "r-2.json").exists, 10, "the requeued delivery")
        assert (target / "r-2.json").read_text() == result.to_json()
        assert letters.count() == 0
        wait_until(lambda: jobs.pending_deliveries() == 0, 5, "the delivery to finish")
    finally:
        loop.stop()


def test_a_second_failed_delivery_of_the_same_job_is_counted(
    deliverer: Deliverer, letters: DeadLetters, sink_root: Path
) -> None:
    bad = {"type": "local", "path": str(sink_root / "x"), "colour": "red"}
    job = Job.model_validate(job_doc("r-3", "/img.png", bad))
    deliverer.deliver_all(job, bare_result("r-3"))
    assert deliverer.wait_idle(10)
    deliverer.deliver_all(job, bare_result("r-3"))
    assert deliverer.wait_idle(10)
    entry = dead_letter(letters, "r-3")
    assert entry.count == 2
    assert [h["stage"] for h in entry.history] == ["deliver"]


def test_a_permanent_sink_failure_is_dead_lettered_at_once(
    deliverer: Deliverer, jobs: JobStore, letters: DeadLetters, sink_root: Path
) -> None:
    good = local(sink_root / "good")
    bad = {"type": "local", "path": str(sink_root / "bad"), "colour": "red"}  # refused option
    job = Job.model_validate(job_doc("p-1", "/img.png", good, bad))

    deliverer.deliver_all(job, bare_result("p-1"))
    assert deliverer.wait_idle(10)

    entry = dead_letter(letters, "p-1")
    assert entry.stage == "deliver"
    assert entry.attempts == 1  # no retries for a permanent failure
    assert entry.sink == bad
    assert entry.error.startswith("permanent: ")
    assert "colour" in entry.error
    assert (sink_root / "good" / "p-1.json").exists()  # the other sink still got it
    assert not (sink_root / "bad").exists()
    assert jobs.pending_deliveries() == 0


def test_run_due_claims_what_is_due_under_a_lease(
    make_deliverer: Callable[..., Deliverer], jobs: JobStore, sink_root: Path
) -> None:
    config = local(sink_root / "due")
    entries = [
        Delivery(
            delivery_id_of(f"d-{i}", config),
            job_doc(f"d-{i}", "/img.png", config),
            config,
            1,
            bare_result(f"d-{i}").to_json(),
        )
        for i in range(5)
    ]
    now = time.time()
    jobs.schedule_deliveries([(e, now) for e in entries[:4]])
    jobs.schedule_delivery(entries[4], now + 60)  # not due yet

    # A worker that claimed two and died: they are leased to it until its lease runs out.
    claimed_at = time.time()
    dead = jobs.claim_deliveries(claimed_at, 1.5, limit=2)
    assert len(dead) == 2
    worker = make_deliverer(concurrency=1, lease_s=5.0)  # room for 2 attempts at once
    assert worker.run_due() == 2  # the other two due ones, not the leased ones
    assert worker.wait_idle(10)
    assert worker.run_due() == 0  # the leased ones are not claimed before the lease ends
    time.sleep(max(0.0, claimed_at + 1.55 - time.time()))
    assert worker.run_due() == 2  # ... and are after it
    assert worker.wait_idle(10)

    delivered = sorted(p.name for p in (sink_root / "due").iterdir())
    assert delivered == [f"d-{i}.json" for i in range(4)]
    assert jobs.pending_deliveries() == 1  # d-4, not due for a minute
    assert worker.run_due() == 0


def test_close_returns_promptly_and_leaves_unstarted_deliveries_due(
    make_deliverer: Callable[..., Deliverer], jobs: JobStore, sink_root: Path
) -> None:
    fifo = sink_root / "pipe.jsonl"
    os.mkfifo(fifo)  # the local sink's open() blocks until someone reads the FIFO
    config = local(fifo)
    deliverer = make_deliverer(concurrency=1, backoff_base_s=30.0, backoff_max_s=60.0)
    ids = [delivery_id_of(f"c-{i}", config) for i in range(4)]
    reader: int | None = None
    try:
        for i in range(4):  # one runs (blocked), one waits in the pool, two wait in Redis
            job = Job.model_validate(job_doc(f"c-{i}", "/img.png", config))
            deliverer.deliver_all(job, bare_result(f"c-{i}"))
        assert deliverer.room() == 0
        assert jobs.pending_deliveries() == 4

        def unblock() -> None:
            nonlocal reader
            reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)

        timer = threading.Timer(0.3, unblock)
        timer.start()
        started = time.monotonic()
        deliverer.close()  # waits for the attempt in hand only
        elapsed = time.monotonic() - started
        timer.join()
        assert elapsed < 3.0, f"close() took {elapsed:.1f} s"

        assert reader is not None
        written = os.read(reader, 1 << 20).decode().splitlines()
        assert [json.loads(line)["job_id"] for line in written] == ["c-0"]  # only one ran
        due = claim_all(jobs, time.time())
        assert sorted(due) == sorted(ids[1:])  # the rest are due again at once, untried
        assert all(d.attempt == 1 for d in due.values())
        assert jobs.pending_deliveries() == 4  # c-0: its retry (a FIFO cannot be fsync'd)
    finally:
        if reader is None:  # never leave a pool thread blocked on the FIFO
            reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        deliverer.close()
        os.close(reader)


# --------------------------------------------------------------------------- JobStore


def test_results_are_kept_for_their_ttl(redis_url: str) -> None:
    store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), result_ttl_s=1)
    store.put_result("t-1", '{"a": 1}')
    assert store.get_result("t-1") == '{"a": 1}'
    assert 0 < store.redis.ttl("mw:result:t-1") <= 1
    assert store.get_result("missing") is None
    wait_until(lambda: store.get_result("t-1") is None, 5, "the result to expire")


def test_attempts_are_counted_per_job_and_reset(jobs: JobStore) -> None:
    assert jobs.attempts("a-1") == 0
    assert [jobs.take_attempt("a-1") for _ in range(3)] == [1, 2, 3]
    assert jobs.take_attempt("a-2") == 1
    assert jobs.attempts("a-1") == 3
    jobs.reset_attempts("a-1")
    assert jobs.attempts("a-1") == 0
    assert jobs.take_attempt("a-1") == 1
    assert jobs.attempts("a-2") == 1


def test_deliveries_are_claimed_under_a_lease_until_finished(jobs: JobStore) -> None:
    first = Delivery("del-1", {"job_id": "j-1"}, {"type": "local", "path": "/x"}, 1, "{}")
    later = Delivery("del-2", {"job_id": "j-2"}, None, 2, "", "boom")
    now = time.time()
    jobs.schedule_deliveries([(first, now - 1), (later, now + 30)])
    assert jobs.pending_deliveries() == 2

    claimed_at = time.time()
    assert jobs.claim_deliveries(claimed_at, 1.0) == [first]
    assert jobs.claim_deliveries(time.time(), 1.0) == []  # leased: nobody else gets it
    time.sleep(max(0.0, claimed_at + 1.05 - time.time()))
    assert jobs.claim_deliveries(time.time(), 1.0) == [first]  # the lease ran out

    jobs.finish_delivery("del-1")
    assert jobs.pending_deliveries() == 1
    assert jobs.claim_deliveries(now + 29, 5) == []  # del-1 is gone for good; del-2 not due
    assert jobs.claim_deliveries(now + 31, 5) == [later]  # claimed once it is due
    jobs.finish_delivery("del-2")
    assert jobs.pending_deliveries() == 0
    assert jobs.claim_deliveries(time.time() + 3600, 5) == []


def test_claims_respect_the_limit_and_the_order_due(jobs: JobStore) -> None:
    now = time.time()
    entries = [Delivery(f"o-{i}", {"job_id": f"o-{i}"}, None, 1, "") for i in range(5)]
    jobs.schedule_deliveries([(e, now - 10 + i) for i, e in enumerate(reversed(entries))])
    claimed = jobs.claim_deliveries(now, 5, limit=2)
    assert [d.delivery_id for d in claimed] == ["o-4", "o-3"]  # the longest due first
    assert [d.delivery_id for d in jobs.claim_deliveries(now, 5, limit=10)] == [
        "o-2",
        "o-1",
        "o-0",
    ]


def test_a_sealed_delivery_is_opened_only_with_the_key(redis_url: str) -> None:
    key = generate_key()
    sealed = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), 60, Sealer(key))
    secret_sink = {"type": "webhook", "url": "https://h.example/x", "secret": "whsec_abc"}
    entry = Delivery("s-1", {"job_id": "s-1", "image": {"uri": "/a.png"}}, secret_sink, 1, "{}")
    sealed.schedule_delivery(entry, time.time() - 1)
    assert "whsec_abc" not in str(sealed.redis.get("mw:delivery:s-1"))
    assert sealed.claim_deliveries(time.time(), 0.01) == [entry]

    # A worker without the key cannot open it: it says so and skips it, and a readable
    # delivery claimed in the same call is not held back.
    plain = Delivery("p-1", {"job_id": "p-1", "image": {"uri": "/b.png"}}, None, 1, "")
    keyless = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), 60)
    keyless.schedule_delivery(plain, time.time() - 1)
    time.sleep(0.02)
    with capture_logs() as logs:
        assert keyless.claim_deliveries(time.time(), 5) == [plain]
    [unreadable] = [e for e in logs if e["event"] == "delivery.unreadable"]
    assert unreadable["delivery_id"] == "s-1"
    assert "WORKER_SECRET_KEY" in unreadable["error"]


def test_plugin_state_is_shared_through_redis(redis_url: str) -> None:
    one = RedisPluginState(redis.Redis.from_url(redis_url, decode_responses=True))
    two = RedisPluginState(redis.Redis.from_url(redis_url, decode_responses=True))
    assert one.get("token") is None
    one.set("token", "v1")
    assert two.get("token") == "v1"
    two.set("token", "v2")
    assert one.get("token") == "v2"
    one.delete("token")
    assert two.get("token") is None
    two.delete("never-set")  # deleting what is not there is fine


# --------------------------------------------------------------------------- PolicyWatcher


def test_the_watcher_swaps_a_valid_edit_and_keeps_the_set_on_a_bad_one(
    engine: Engine, settings: Settings
) -> None:
    """test_policy_reload_hostile.py covers hostile files; this is the wiring of
    service.py: the callback sees each new set, and a rejection keeps the old one."""
    reloaded: list[dict[str, str]] = []

    def recompile(loaded: list[LoadedPolicy]) -> PolicySet:
        return compile_configured(settings, engine.model, loaded)

    watcher = PolicyWatcher(
        engine,
        settings.policy_dir,
        recompile,
        on_reload=lambda policies: reloaded.append(policies.versions()),
    )
    old = engine.policies.versions()
    assert watcher.check() is False  # nothing changed

    edited = SHAPES_POLICY.replace("a red shape", "a red shape, crimson")
    write_policy(settings.policy_dir, edited)
    assert watcher.check() is True
    new = engine.policies.versions()
    assert new["shapes"] != old["shapes"]
    assert new["shape-tags"] == old["shape-tags"]
    assert reloaded == [new]

    write_policy(settings.policy_dir, edited.replace("threshold: 0.5", "threshold: 7", 1))
    assert watcher.check() is False
    assert engine.policies.versions() == new
    assert any("shapes.yaml" in line for line in watcher.rejected)
    assert reloaded == [new]

    write_policy(settings.policy_dir, SHAPES_POLICY)
    assert watcher.check() is True
    assert engine.policies.versions() == old
    assert watcher.rejected == []
    assert reloaded == [new, old]
