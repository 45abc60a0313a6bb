"""Packed messages without a broker: what the intake takes, how the client packs, how a
batch counts jobs, and how a packed message is acknowledged job by job."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.client import ENVELOPE_BYTES, Client
from worker.errors import MessageRefusedError
from worker.queue.app import SCORE_JOBS_TASK, SCORE_TASK, OutcomeBatches, create_app, jobs_in
from worker.queue.intake import Limits, jobs_of_message, vet_message
from worker.queue.processor import Message, QueueProcessor
from worker.settings import Settings

pytestmark = pytest.mark.fault
HEADERS = {"task": SCORE_JOBS_TASK, "id": "m-1"}
JOB = {"image": {"uri": "/data/x.png"}}
LIMITS = Limits(SCORE_TASK, SCORE_JOBS_TASK, 1 << 20, 1 << 20, 64)


def take(body: Any, headers: Any = HEADERS, max_jobs: int = 64) -> list[Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return jobs_of_message(
        headers,
        "application/json",
        raw,
        task_name=SCORE_JOBS_TASK,
        max_bytes=8 << 20,
        max_jobs=max_jobs,
    )


# --------------------------------------------------------------------------- intake


def test_a_packed_call_gives_its_items_positional_or_by_keyword() -> None:
    assert take([[[JOB, JOB]], {}, {}]) == [JOB, JOB]
    assert take([[], {"jobs": [JOB]}, None]) == [JOB]


def test_items_are_not_judged_at_the_intake() -> None:
    """A malformed item is dead-lettered alone by the batch; the message is taken."""
    items = [JOB, 7, None, [JOB], {"image": {}}, "x"]
    assert take([[items], {}, {}]) == items


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([[[]], {}, {}], "the list of jobs is empty"),
        ([[[JOB] * 65], {}, {}], "65 jobs in one message, over the limit of 64"),
        ([[[0] * 1_000_000], {}, {}], "1000000 jobs in one message"),
        ([[JOB], {}, {}], "the jobs must be a JSON list, got dict"),
        ([[None], {}, {}], "the jobs must be a JSON list, got null"),
        ([[], {"job": [JOB]}, {}], "exactly one argument"),
        ([[[JOB], [JOB]], {}, {}], "exactly one argument"),
        ([[[JOB]], {"jobs": [JOB]}, {}], "exactly one argument"),
        ([[[JOB]], {}, {"callbacks": [{"task": "x"}]}], "not supported"),
        ([[[JOB]], {}], "of length 2"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper"),
        (b"\xff{", "not JSON"),
    ],
)
def test_a_packed_message_is_refused_whole_for_its_shape(body: Any, reason: str) -> None:
    with pytest.raises(MessageRefusedError, match=reason):
        take(body)


def test_the_per_message_job_limit_is_a_setting() -> None:
    assert len(take([[[JOB] * 3], {}, {}], max_jobs=3)) == 3
    with pytest.raises(MessageRefusedError, match="WORKER_QUEUE__MAX_JOBS_PER_MESSAGE"):
        take([[[JOB] * 4], {}, {}], max_jobs=3)
    assert Settings().queue.max_jobs_per_message == 64


def test_the_packed_size_cap_applies_before_decoding() -> None:
    limits = Limits(SCORE_TASK, SCORE_JOBS_TASK, 1 << 20, 100, 64)
    with pytest.raises(MessageRefusedError, match="over the 100-byte"):
        vet_message(HEADERS, "application/json", b"x" * 101, limits)


def test_vet_message_takes_both_tasks_and_names_them_for_others() -> None:
    one, decoded = vet_message(
        {"task": SCORE_TASK}, "application/json", json.dumps([[JOB], {}, {}]), LIMITS
    )
    assert one == [JOB]
    assert decoded == [[JOB], {}, {}]
    packed, _ = vet_message(HEADERS, "application/json", json.dumps([[[JOB]], {}, {}]), LIMITS)
    assert packed == [JOB]
    with pytest.raises(MessageRefusedError, match=r"'x\.y' \(this worker runs .*score_jobs"):
        vet_message({"task": "x.y"}, "application/json", b"[]", LIMITS)
    with pytest.raises(MessageRefusedError, match="got list"):  # one-job task, a list: refused
        vet_message({"task": SCORE_TASK}, "application/json", b"[[[{}]], {}, {}]", LIMITS)


def test_jobs_in_counts_what_a_batch_holds() -> None:
    assert jobs_in([[JOB], {}, {}]) == 1
    assert jobs_in([[[JOB] * 5], {}, {}]) == 5
    assert jobs_in([[], {"jobs": [JOB] * 3}, {}]) == 3
    assert jobs_in([[], {"job": JOB}, {}]) == 1
    assert jobs_in(None) == 1
    assert jobs_in([[[]], {}, {}]) == 1


# --------------------------------------------------------------------------- batching


class _Message:
    def __init__(self, jobs: int) -> None:
        self.payload = [[[JOB] * jobs], {}, {}] if jobs > 1 else [[JOB], {}, {}]


def _counting_task(monkeypatch: pytest.MonkeyPatch, flush_every: int) -> tuple[Any, list[int]]:
    """The packed task's message handler, with celery-batches' own handler and flush
    replaced by recorders: returns (handler, sizes of the flushed batches in messages)."""
    import celery_batches

    buffered: list[int] = []
    flushed: list[int] = []

    def fake_strategy(self: Any, task: Any, app: Any, consumer: Any) -> Any:
        def handler(message: Any, *args: Any, **kwargs: Any) -> None:
            buffered.append(1)
            if not next(self._count) % self.flush_every:  # celery-batches' own rule
                self._do_flush()

        return handler

    def fake_flush(self: Any) -> None:
        if buffered:
            flushed.append(len(buffered))
            buffered.clear()

    monkeypatch.setattr(celery_batches.Batches, "Strategy", fake_strategy)
    monkeypatch.setattr(celery_batches.Batches, "_do_flush", fake_flush)
    task = create_app(Settings()).tasks[SCORE_JOBS_TASK]
    assert isinstance(task, OutcomeBatches)
    task.flush_every = flush_every
    return task.Strategy(task, None, None), flushed


def test_a_batch_is_flushed_by_jobs_not_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    handle, flushed = _counting_task(monkeypatch, flush_every=32)
    for _ in range(9):
        handle(_Message(10))
    assert flushed == [4, 4]  # 40 jobs >= 32: every fourth message; one waits for the timer
    handle, flushed = _counting_task(monkeypatch, flush_every=32)
    for _ in range(64):
        handle(_Message(1))
    assert flushed == [32, 32]  # one-job messages batch as before
    handle, flushed = _counting_task(monkeypatch, flush_every=32)
    handle(_Message(32))
    handle(_Message(64))
    assert flushed == [1, 1]  # a full message is a batch of its own
    handle, flushed = _counting_task(monkeypatch, flush_every=1)
    handle(_Message(1))
    handle(_Message(5))
    assert flushed == [1, 1]


# --------------------------------------------------------------------------- acknowledging


def _processor(done: list[bool], monkeypatch: pytest.MonkeyPatch) -> QueueProcessor:
    """A processor whose jobs end as ``done`` says, in order (no engine, no Redis)."""
    processor = QueueProcessor(None, None, None, None, 3)  # type: ignore[arg-type]

    def fake(
        payloads: list[Any],
        keys: list[str | None],
        job_ids: list[str],
        stored: dict[str, Any] | None = None,
    ) -> list[bool]:
        assert len(payloads) == len(done)
        for index, payload in enumerate(payloads):
            job_ids[index] = str(payload.get("job_id") or keys[index])
        return list(done)

    monkeypatch.setattr(processor, "_process", fake)
    return processor


def _jobs(*ids: str) -> list[Any]:
    return [{"job_id": i, "image": {"uri": f"/x/{i}.png"}} for i in ids]


def test_a_packed_message_is_acked_requeued_or_split_by_its_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    messages = [
        Message("m-1", _jobs("a", "b"), packed=True),  # both finished: ack
        Message("m-2", _jobs("c", "d", "e"), packed=True),  # d unfinished: resend d, ack
        Message("m-3", _jobs("f", "g"), packed=True),  # none finished: requeue whole
        Message("m-4", _jobs("h")),  # one-job message, unfinished: requeue
    ]
    done = [True, True, True, False, True, False, False, False]
    resent: list[list[Any]] = []
    outcome = _processor(done, monkeypatch).process_messages(messages, resent.append)
    assert outcome.acks == [True, True, False, False]
    assert resent == [_jobs("d")]  # only the unfinished job goes back
    assert [(j.message, j.job_id, j.finished) for j in outcome.jobs] == [
        (0, "a", True),
        (0, "b", True),
        (1, "c", True),
        (1, "d", False),
        (1, "e", True),
        (2, "f", False),
        (2, "g", False),
        (3, "h", False),
    ]


def test_a_failed_resend_puts_the_whole_message_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(jobs: list[Any]) -> None:
        raise ConnectionError("redis is down")

    processor = _processor([True, False], monkeypatch)
    outcome = processor.process_messages([Message("m-1", _jobs("a", "b"), packed=True)], broken)
    assert outcome.acks == [False]


def test_dead_letter_keys_of_packed_jobs_carry_their_index() -> None:
    assert Message("m-1", [1, 2], packed=True).job_keys() == ["m-1.0", "m-1.1"]
    assert Message("m-1", [1]).job_keys() == ["m-1"]
    assert Message(None, [1, 2], packed=True).job_keys() == [None, None]


# --------------------------------------------------------------------------- the client


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, Any]]]:
    """Messages the client would send (nothing reaches a broker)."""
    captured: list[list[dict[str, Any]]] = []
    monkeypatch.setattr("worker.client.send_jobs", lambda app, jobs: captured.append(list(jobs)))
    monkeypatch.setattr(
        "worker.client.send_job", lambda app, job: captured.append([job])
    )  # one-job messages
    return captured


def _client(**queue: Any) -> Client:
    return Client(Settings(broker_url="redis://127.0.0.1:1/0", queue=queue))


def test_submit_many_packs_and_keeps_order_and_ids(sent: list[list[dict[str, Any]]]) -> None:
    jobs = [{"job_id": f"j-{i}", "image": {"uri": f"/x/{i}.png"}} for i in range(70)]
    ids = _client().submit_many(jobs, per_message=32)
    assert ids == [f"j-{i}" for i in range(70)]
    assert [len(m) for m in sent] == [32, 32, 6]
    assert [j["job_id"] for m in sent for j in m] == ids


def test_submit_many_gives_generated_ids_too(sent: list[list[dict[str, Any]]]) -> None:
    ids = _client().submit_many([{"image": {"uri": "/x/a.png"}}] * 3, per_message=8)
    assert len(set(ids)) == 3
    assert [j["job_id"] for j in sent[0]] == ids


def test_one_per_message_sends_plain_messages(sent: list[list[dict[str, Any]]]) -> None:
    _client().submit_many(_jobs("a", "b", "c"), per_message=1)
    assert [len(m) for m in sent] == [1, 1, 1]


def test_packs_stay_under_the_byte_cap(sent: list[list[dict[str, Any]]]) -> None:
    cap = 64 * 1024
    big = "A" * 20_000  # ~20 KB of base64 per job
    jobs = [{"job_id": f"b-{i}", "image": {"data": big}} for i in range(7)]
    jobs.append({"job_id": "huge", "image": {"data": "A" * (cap + 4)}})
    _client(max_message_bytes=cap).submit_many(jobs, per_message=32)
    sizes = [len(json.dumps(m)) for m in sent]
    assert all(
        size <= cap - ENVELOPE_BYTES for size, m in zip(sizes, sent, strict=True) if len(m) > 1
    )
    assert [len(m) for m in sent] == [3, 3, 1, 1]  # the huge one alone, a plain message
    assert sent[-1][0]["job_id"] == "huge"


def test_nothing_is_sent_unless_every_job_is_valid(sent: list[list[dict[str, Any]]]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _client().submit_many([*_jobs("a", "b"), {"image": {}}], per_message=8)
    with pytest.raises(ValueError, match="'a' is given twice"):
        _client().submit_many(_jobs("a", "b", "a"), per_message=8)
    with pytest.raises(ValueError, match="per_message must be 1 to 64"):
        _client().submit_many(_jobs("a"), per_message=65)
    with pytest.raises(ValueError, match="per_message must be 1 to 64"):
        _client().submit_many(_jobs("a"), per_message=0)
    assert sent == []


def test_the_client_stays_light() -> None:
    """worker.client is imported by upload services: no torch, open_clip or numpy."""
    import subprocess
    import sys

    code = (
        "import sys, worker.client\n"
        "heavy = [m for m in ('torch', 'open_clip', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
