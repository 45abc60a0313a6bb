"""What the queue keeps in Redis besides Celery's own messages.

| key | type | holds |
|---|---|---|
| ``mw:result:{job_id}`` | string, TTL | the result (``wait``, ``worker result``, idempotency) |
| ``mw:attempts:{job_id}`` | int, TTL | how often the job was taken for scoring |
| ``mw:dlq`` | hash | job id -> dead-letter entry (job, attempts, error, stage) |
| ``mw:retries`` | sorted set | delivery id -> when it is due (epoch seconds) |
| ``mw:delivery:{id}`` | string | a pending delivery: job id, sink, attempt, result |
| ``mw:disabled:{key}`` | string | an endpoint that answered 410 Gone |
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis

PREFIX = "mw:"
ATTEMPTS_TTL_S = 30 * 24 * 3600

# Claim up to ARGV[2] deliveries due by ARGV[1], leasing each until ARGV[3]: a claimed
# delivery whose worker dies becomes due again when its lease runs out.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return due
"""


@dataclass(frozen=True)
class DeadLetter:
    """A job that could not be completed, with what is needed to retry it."""

    job_id: str
    job: dict[str, Any]
    attempts: int
    error: str
    stage: str  # "score" | "deliver"
    sink: dict[str, Any] | None = None
    failed_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


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


class Store:
    """Typed access to the project's Redis keys."""

    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self._claim = client.register_script(_CLAIM)

    @classmethod
    def from_url(cls, url: str, result_ttl_s: int) -> Store:
        return cls(redis.Redis.from_url(url, decode_responses=True), result_ttl_s)

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

    def dead_letter(self, entry: DeadLetter) -> None:
        stamped = DeadLetter(**{**asdict(entry), "failed_at": entry.failed_at or time.time()})
        self.redis.hset(f"{PREFIX}dlq", entry.job_id, stamped.to_json())

    def dead_letters(self) -> list[DeadLetter]:
        raw = cast(dict[str, str], self.redis.hgetall(f"{PREFIX}dlq"))
        entries = [DeadLetter(**json.loads(v)) for v in raw.values()]
        return sorted(entries, key=lambda e: e.failed_at)

    def take_dead_letter(self, job_id: str) -> DeadLetter | None:
        """Remove and return one entry (for requeueing)."""
        pipe = self.redis.pipeline()
        pipe.hget(f"{PREFIX}dlq", job_id)
        pipe.hdel(f"{PREFIX}dlq", job_id)
        raw, _ = pipe.execute()
        return DeadLetter(**json.loads(raw)) if raw else None

    def purge_dead_letters(self) -> int:
        count = int(self.redis.hlen(f"{PREFIX}dlq"))
        self.redis.delete(f"{PREFIX}dlq")
        return count

    # ------------------------------------------------------------------ delivery retries

    def schedule_delivery(self, delivery: Delivery, due: float) -> None:
        pipe = self.redis.pipeline()
        pipe.set(f"{PREFIX}delivery:{delivery.delivery_id}", delivery.to_json())
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
            found.append(Delivery(**json.loads(cast(str, raw))))
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


def new_delivery_id() -> str:
    return uuid.uuid4().hex
