"""What the queue keeps in Redis besides Celery's own messages.

| key | type | holds |
|---|---|---|
| ``mw:result:{job_id}`` | string, TTL | the result (``wait``, ``worker result``, idempotency) |
| ``mw:attempts:{job_id}`` | int, TTL | how often the job was taken for scoring |
| ``mw:dlq`` | hash | job id -> dead-letter entry (redacted job, error, stage, history) |
| ``mw:retries`` | sorted set | delivery id -> when it is due (epoch seconds) |
| ``mw:delivery:{id}`` | string | a pending delivery: job id, sink, attempt, result |
| ``mw:disabled:{key}`` | string | an endpoint that answered 410 Gone |
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, cast

import redis

from worker.redact import redact_config, redact_job, redact_text
from worker.sealing import Sealer

PREFIX = "mw:"
ATTEMPTS_TTL_S = 30 * 24 * 3600

# Claim up to ARGV[2] deliveries due by ARGV[1], leasing each until ARGV[3]: a claimed
# delivery whose worker dies becomes due again when its lease runs out.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return due
"""

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


@dataclass(frozen=True)
class Delivery:
    """One result to deliver to one sink, possibly again; with ``sink`` None, a job to
    submit again later (a transient source failure)."""

    delivery_id: str
    job: dict[str, Any]
    sink: dict[str, Any] | None
    attempt: int
    result: str  # the result document's JSON ("" for a job resubmission)
    last_error: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def stored(self, sealer: Sealer | None) -> str:
        """The JSON kept in Redis: the job and sink sealed when a key is configured."""
        sealed = sealer.seal({"job": self.job, "sink": self.sink}) if sealer else None
        if sealed is None:
            return self.to_json()
        public = replace(self, job=redact_job(self.job)[0], sink=None)
        return json.dumps({**asdict(public), "sealed": sealed}, sort_keys=True)

    @classmethod
    def from_stored(cls, text: str, sealer: Sealer | None) -> Delivery:
        data = json.loads(text)
        sealed = data.pop("sealed", None)
        if sealed is not None:
            if sealer is None:
                raise ValueError("a sealed delivery needs WORKER_SECRET_KEY")
            data.update(sealer.open(sealed))
        return cls(**data)


class Store:
    """Typed access to the project's Redis keys."""

    def __init__(
        self, client: redis.Redis, result_ttl_s: int, sealer: Sealer | None = None
    ) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.sealer = sealer
        self._claim = client.register_script(_CLAIM)
        self._remove_if = client.register_script(_REMOVE_IF)

    @classmethod
    def from_url(cls, url: str, result_ttl_s: int, sealer: Sealer | None = None) -> Store:
        return cls(redis.Redis.from_url(url, decode_responses=True), result_ttl_s, sealer)

    @classmethod
    def from_settings(cls, settings: Any) -> Store:
        """The store of ``settings.broker_url``, sealing with ``WORKER_SECRET_KEY``."""
        return cls.from_url(
            settings.broker_url, settings.queue.result_ttl_s, Sealer.from_settings(settings)
        )

    # ------------------------------------------------------------------ results

    def put_result(self, job_id: str, result_json: str) -> None:
        self.redis.set(f"{PREFIX}result:{job_id}", result_json, ex=self.result_ttl_s)

    def get_result(self, job_id: str) -> str | None:
        return cast(str | None, self.redis.get(f"{PREFIX}result:{job_id}"))

    # ------------------------------------------------------------------ attempts

    def take_attempt(self, job_id: str) -> int:
        """Count one more attempt at ``job_id``; returns the new count."""
        key = f"{PREFIX}attempts:{job_id}"
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, ATTEMPTS_TTL_S)
        count, _ = pipe.execute()
        return int(count)

    def attempts(self, job_id: str) -> int:
        return int(self.redis.get(f"{PREFIX}attempts:{job_id}") or 0)

    def reset_attempts(self, job_id: str) -> None:
        self.redis.delete(f"{PREFIX}attempts:{job_id}")

    # ------------------------------------------------------------------ dead letters

    def dead_letter(self, entry: DeadLetter) -> DeadLetter:
        """Write ``entry``; a job already in the store keeps its earlier failures."""
        key = f"{PREFIX}dlq"
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

    def dead_letters(self) -> list[DeadLetter]:
        raw = cast(dict[str, str], self.redis.hgetall(f"{PREFIX}dlq"))
        entries = [DeadLetter.from_json(v) for v in raw.values()]
        return sorted(entries, key=lambda e: e.failed_at)

    def dead_letter_count(self) -> int:
        return int(self.redis.hlen(f"{PREFIX}dlq"))

    def get_dead_letter(self, job_id: str) -> tuple[DeadLetter, str] | None:
        """One entry and its stored JSON (to remove it only if it did not change)."""
        raw = self.redis.hget(f"{PREFIX}dlq", job_id)
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return DeadLetter.from_json(text), text

    def remove_dead_letter(self, job_id: str, expected: str | None = None) -> bool:
        """Delete one entry; with ``expected``, only if it still holds exactly that JSON
        (a failure written meanwhile is kept)."""
        if expected is None:
            return bool(self.redis.hdel(f"{PREFIX}dlq", job_id))
        return bool(self._remove_if(keys=[f"{PREFIX}dlq"], args=[job_id, expected]))

    def purge_dead_letters(self, job_ids: list[str] | None = None) -> int:
        if job_ids:
            return int(self.redis.hdel(f"{PREFIX}dlq", *job_ids))
        count = int(self.redis.hlen(f"{PREFIX}dlq"))
        self.redis.delete(f"{PREFIX}dlq")
        return count

    # ------------------------------------------------------------------ delivery retries

    def schedule_delivery(self, delivery: Delivery, due: float) -> None:
        self.schedule_deliveries([(delivery, due)])

    def schedule_deliveries(self, deliveries: list[tuple[Delivery, float]]) -> None:
        """Write deliveries and when each is due, in one round trip."""
        if not deliveries:
            return
        pipe = self.redis.pipeline()
        for delivery, due in deliveries:
            pipe.set(f"{PREFIX}delivery:{delivery.delivery_id}", delivery.stored(self.sealer))
            pipe.zadd(f"{PREFIX}retries", {delivery.delivery_id: due})
        pipe.execute()

    def claim_deliveries(self, now: float, lease_s: float, limit: int = 16) -> list[Delivery]:
        ids = cast(
            list[str], self._claim(keys=[f"{PREFIX}retries"], args=[now, limit, now + lease_s])
        )
        found = []
        for delivery_id in ids:
            raw = self.redis.get(f"{PREFIX}delivery:{delivery_id}")
            if raw is None:  # finished by someone else meanwhile
                self.redis.zrem(f"{PREFIX}retries", delivery_id)
                continue
            found.append(Delivery.from_stored(cast(str, raw), self.sealer))
        return found

    def finish_delivery(self, delivery_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(f"{PREFIX}retries", delivery_id)
        pipe.delete(f"{PREFIX}delivery:{delivery_id}")
        pipe.execute()

    def pending_deliveries(self) -> int:
        return int(self.redis.zcard(f"{PREFIX}retries"))

    # ------------------------------------------------------------------ disabled endpoints

    def disable_endpoint(self, key: str, reason: str) -> None:
        self.redis.set(f"{PREFIX}disabled:{key}", reason)

    def endpoint_disabled(self, key: str) -> str | None:
        return cast(str | None, self.redis.get(f"{PREFIX}disabled:{key}"))

    def enable_endpoint(self, key: str) -> None:
        self.redis.delete(f"{PREFIX}disabled:{key}")


_ID_CHARS = re.compile(r"[^A-Za-z0-9._:\-]")


def refused_id(message_id: Any, prefix: str = "refused") -> str:
    """The dead-letter key of a message that was not a valid job: its queue message id when
    it has a usable one (a redelivered message then updates one entry), else a new id."""
    text = _ID_CHARS.sub("", message_id)[:80] if isinstance(message_id, str) else ""
    return f"{prefix}-{text or uuid.uuid4().hex}"


def new_delivery_id() -> str:
    return uuid.uuid4().hex
