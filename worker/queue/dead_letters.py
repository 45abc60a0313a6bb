"""The dead-letter store: what could not be completed, why, how often, and retrying it.

``mw:dlq`` is a hash, job id -> :class:`DeadLetter` as JSON. An entry keeps the job (and
sink) redacted, sealed beside it when ``WORKER_SECRET_KEY`` is set; a job that fails again
keeps its earlier failures. :func:`requeue` checks an entry before it removes it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, cast

import redis
from pydantic import ValidationError

from worker.documents import Job
from worker.errors import ConfigurationError, RequeueRefusedError
from worker.queue.jobs import Delivery, JobStore, new_delivery_id, redis_client
from worker.redact import redact_config, redact_job, redact_text
from worker.sealing import Sealer

KEY = "mw:dlq"
HISTORY_KEPT = 10  # earlier failures kept per dead-letter entry
RAW_KEPT = 16 * 1024  # characters of an undecodable message body kept for the operator

# Delete hash field ARGV[1] of KEYS[1] only if it still holds ARGV[2].
_REMOVE_IF = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True)
class DeadLetter:
    """A job that could not be completed, with what is needed to retry it.

    ``job`` and ``sink`` are redacted (no secrets, no URL signatures); when anything was
    taken out, ``sealed`` holds the full ``{"job", "sink"}`` under WORKER_SECRET_KEY, or
    None when no key is set (such an entry cannot be requeued). ``raw`` is the capped body
    of a message that was not a job at all (stage ``validate``). A job that fails again
    keeps its earlier failures in ``history`` and counts them in ``count``.
    """

    job_id: str
    job: dict[str, Any]
    attempts: int
    error: str
    stage: str  # "validate" | "score" | "deliver"
    sink: dict[str, Any] | None = None
    failed_at: float = 0.0
    raw: str | None = None
    sealed: str | None = None
    redacted: bool = False
    count: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        job_id: str,
        job: dict[str, Any],
        attempts: int,
        error: str,
        stage: str,
        *,
        sink: dict[str, Any] | None = None,
        raw: str | None = None,
        sealer: Sealer | None = None,
    ) -> DeadLetter:
        """An entry with secrets taken out of ``job``, ``sink``, ``error`` and ``raw``
        (sealed beside them when ``sealer`` has a key)."""
        clean_job, job_lost = redact_job(job)
        clean_sink = redact_config(sink) if sink is not None else None
        lost = job_lost or clean_sink != sink
        sealed = sealer.seal({"job": job, "sink": sink}) if lost and sealer is not None else None
        return cls(
            job_id,
            clean_job,
            attempts,
            redact_text(error)[:2000],
            stage,
            clean_sink,
            raw=redact_text(raw[:RAW_KEPT]) if raw is not None else None,
            sealed=sealed,
            redacted=lost,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def after(self, earlier: DeadLetter) -> DeadLetter:
        """This failure, remembering ``earlier`` (the entry it replaces)."""
        previous = {
            "stage": earlier.stage,
            "error": earlier.error,
            "attempts": earlier.attempts,
            "failed_at": earlier.failed_at,
            "sink": (earlier.sink or {}).get("type"),
        }
        history = [*earlier.history, previous][-HISTORY_KEPT:]
        return replace(self, count=earlier.count + self.count, history=history)


class DeadLetters:
    """The dead-letter hash, with every write merged into what is there."""

    def __init__(self, client: redis.Redis, sealer: Sealer | None = None) -> None:
        self.redis = client
        self.sealer = sealer
        self._remove_if = client.register_script(_REMOVE_IF)

    @classmethod
    def from_settings(cls, settings: Any) -> DeadLetters:
        return cls(redis_client(settings), Sealer.from_settings(settings))

    def add(self, entry: DeadLetter) -> DeadLetter:
        """Write ``entry``; a job already in the store keeps its earlier failures."""
        key = KEY
        stamped = replace(entry, failed_at=entry.failed_at or time.time())
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    old = pipe.hget(key, entry.job_id)
                    merged = stamped.after(DeadLetter.from_json(old)) if old else stamped
                    pipe.multi()
                    pipe.hset(key, entry.job_id, merged.to_json())
                    pipe.execute()
                    return merged
                except redis.WatchError:
                    continue

    def entries(self) -> list[DeadLetter]:
        raw = cast(dict[str, str], self.redis.hgetall(KEY))
        entries = [DeadLetter.from_json(v) for v in raw.values()]
        return sorted(entries, key=lambda e: e.failed_at)

    def count(self) -> int:
        return int(self.redis.hlen(KEY))

    def get(self, job_id: str) -> tuple[DeadLetter, str] | None:
        """One entry and its stored JSON (to remove it only if it did not change)."""
        raw = self.redis.hget(KEY, job_id)
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return DeadLetter.from_json(text), text

    def remove(self, job_id: str, expected: str | None = None) -> bool:
        """Delete one entry; with ``expected``, only if it still holds exactly that JSON
        (a failure written meanwhile is kept)."""
        if expected is None:
            return bool(self.redis.hdel(KEY, job_id))
        return bool(self._remove_if(keys=[KEY], args=[job_id, expected]))

    def purge(self, job_ids: list[str] | None = None) -> int:
        if job_ids:
            return int(self.redis.hdel(KEY, *job_ids))
        count = int(self.redis.hlen(KEY))
        self.redis.delete(KEY)
        return count


_ID_CHARS = re.compile(r"[^A-Za-z0-9._:\-]")


def refused_id(message_id: Any, prefix: str = "refused") -> str:
    """The dead-letter key of a message that was not a valid job: its queue message id when
    it has a usable one (a redelivered message then updates one entry), else a new id."""
    text = _ID_CHARS.sub("", message_id)[:80] if isinstance(message_id, str) else ""
    return f"{prefix}-{text or uuid.uuid4().hex}"


def _original(
    entry: DeadLetter, sealer: Sealer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The job and sink as they were sent, opening the sealed copy when secrets were
    taken out."""
    if not entry.redacted:
        return entry.job, entry.sink
    if entry.sealed is None:
        raise RequeueRefusedError(
            "its secrets (a sink secret or a signed URL) were redacted because "
            "WORKER_SECRET_KEY was not set when it failed; submit the job again from its source"
        )
    if sealer is None or not sealer.enabled:
        raise RequeueRefusedError("it is sealed: set WORKER_SECRET_KEY to requeue it")
    try:
        opened = sealer.open(entry.sealed)
    except ConfigurationError as exc:
        raise RequeueRefusedError(str(exc)) from None
    return opened["job"], opened.get("sink")


def requeue(
    letters: DeadLetters, jobs: JobStore, submit: Callable[[Job], object], job_id: str
) -> str | None:
    """Retry one dead-lettered job; returns what was done, or None if it was not there.

    Raises RequeueRefusedError (the entry stays) when it cannot be retried.
    """
    found = letters.get(job_id)
    if found is None:
        return None
    entry, stored_json = found
    if entry.stage == "validate" and entry.raw is not None:
        raise RequeueRefusedError(
            f"the message was refused before it was a job ({entry.error}); fix the sender "
            f"and submit again, or remove it with `worker dlq purge {job_id}`"
        )
    job_doc, sink = _original(entry, letters.sealer)
    try:
        job = Job.model_validate(job_doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise RequeueRefusedError(f"it is not a valid job: {problems}") from None
    result = jobs.get_result(job_id)
    if entry.stage == "deliver" and sink is not None and result is not None:
        delivery = Delivery(new_delivery_id(), job.model_dump(mode="json"), sink, 1, result)
        jobs.schedule_delivery(delivery, time.time())
        how = f"delivery to {sink.get('type')} scheduled"
    else:
        jobs.reset_attempts(job_id)
        submit(job)
        how = "submitted again"
    if not letters.remove(job_id, expected=stored_json):
        how += " (the entry changed meanwhile and was kept)"
    return how
