"""Job state the queue keeps in Redis besides Celery's own messages.

| key | type | holds |
|---|---|---|
| ``mw:result:{job_id}`` | string, TTL | the result (``wait``, ``worker result``, idempotency) |
| ``mw:attempts:{job_id}`` | int, TTL | how often the job was taken for scoring |
| ``mw:retries`` | sorted set | delivery id -> when it is due (epoch seconds) |
| ``mw:delivery:{id}`` | string | a pending delivery: job id, sink, attempt, result |
| ``mw:plugin:{key}`` | string | state a sink keeps across workers (:class:`RedisPluginState`) |

Dead letters (``mw:dlq``) are :class:`worker.queue.dead_letters.DeadLetters`'.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import redis

from worker.errors import ConfigurationError
from worker.log import get_logger
from worker.redact import redact_job
from worker.sealing import Sealer

log = get_logger(__name__)
PREFIX = "mw:"
ATTEMPTS_TTL_S = 30 * 24 * 3600

# Claim up to ARGV[2] deliveries due by ARGV[1], leasing each until ARGV[3]: a claimed
# delivery whose worker dies becomes due again when its lease runs out.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return due
"""

# A batch's admission in one command: KEYS = attempts and result key of each job, in pairs;
# INCR + EXPIRE (ARGV[1] seconds) each counter, and return [count, stored result] pairs.
_TAKE_ATTEMPTS = """
local out = {}
for i = 1, #KEYS, 2 do
  out[#out + 1] = redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[1])
  out[#out + 1] = redis.call('GET', KEYS[i + 1])
end
return out
"""

# A batch's results in one command: KEYS = result and attempts key of each job, in pairs;
# ARGV[1] = the result TTL, ARGV[2..] = the results in the same order.
_FINISH_JOBS = """
for i = 1, #KEYS, 2 do
  redis.call('SET', KEYS[i], ARGV[(i + 1) / 2 + 1], 'EX', ARGV[1])
  redis.call('DEL', KEYS[i + 1])
end
return #KEYS / 2
"""


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


def redis_client(settings: Any) -> redis.Redis:
    """A client of the queue's Redis (``WORKER_BROKER_URL``) that returns text."""
    return redis.Redis.from_url(settings.broker_url, decode_responses=True)


class JobStore:
    """Results, attempts and the delivery schedule: the job state a queue keeps in Redis."""

    def __init__(
        self, client: redis.Redis, result_ttl_s: int, sealer: Sealer | None = None
    ) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.sealer = sealer
        self._claim = client.register_script(_CLAIM)
        self._take = client.register_script(_TAKE_ATTEMPTS)
        self._finish = client.register_script(_FINISH_JOBS)

    @classmethod
    def from_settings(cls, settings: Any) -> JobStore:
        """The job state on ``settings.broker_url``, sealing with ``WORKER_SECRET_KEY``."""
        sealer = Sealer.from_settings(settings)
        return cls(redis_client(settings), settings.queue.result_ttl_s, sealer)

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

    def take_attempts(self, job_ids: list[str]) -> list[tuple[int, str | None]]:
        """For a whole batch in one command: count one more attempt at each job and read
        its stored result. Returns ``(attempt, result JSON or None)`` per job id."""
        if not job_ids:
            return []
        keys = []
        for job_id in job_ids:
            keys += [f"{PREFIX}attempts:{job_id}", f"{PREFIX}result:{job_id}"]
        replies = cast(list[Any], self._take(keys=keys, args=[ATTEMPTS_TTL_S]))
        return [(int(replies[i]), replies[i + 1]) for i in range(0, len(replies), 2)]

    def finish_jobs(self, results: list[tuple[str, str]]) -> None:
        """Store the final result of each ``(job_id, result JSON)`` and reset its attempt
        counter, for a whole batch in one command."""
        if not results:
            return
        keys = []
        for job_id, _ in results:
            keys += [f"{PREFIX}result:{job_id}", f"{PREFIX}attempts:{job_id}"]
        self._finish(keys=keys, args=[self.result_ttl_s, *(text for _, text in results)])

    def attempts(self, job_id: str) -> int:
        return int(self.redis.get(f"{PREFIX}attempts:{job_id}") or 0)

    def reset_attempts(self, job_id: str) -> None:
        self.redis.delete(f"{PREFIX}attempts:{job_id}")

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
            try:
                found.append(Delivery.from_stored(cast(str, raw), self.sealer))
            except (ValueError, TypeError, ConfigurationError) as exc:  # sealed with another key
                log.error("delivery.unreadable", delivery_id=delivery_id, error=str(exc)[:300])
        return found

    def finish_delivery(self, delivery_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(f"{PREFIX}retries", delivery_id)
        pipe.delete(f"{PREFIX}delivery:{delivery_id}")
        pipe.execute()

    def pending_deliveries(self) -> int:
        return int(self.redis.zcard(f"{PREFIX}retries"))


def new_delivery_id() -> str:
    return uuid.uuid4().hex


class RedisPluginState:
    """:class:`worker.plugins.PluginState` in Redis, shared by every worker (``mw:plugin:*``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, key: str) -> str | None:
        return cast(str | None, self.redis.get(f"{PREFIX}plugin:{key}"))

    def set(self, key: str, value: str) -> None:
        self.redis.set(f"{PREFIX}plugin:{key}", value)

    def delete(self, key: str) -> None:
        self.redis.delete(f"{PREFIX}plugin:{key}")
