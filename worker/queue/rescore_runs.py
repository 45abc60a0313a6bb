"""The records of a `worker rescore --shards N` run in Redis, and the lease a worker holds
on a shard while it runs it (``worker/queue/rescore_shards.py`` runs the shards).

Keys (``mw:rescore:{run_id}…``, each kept ``WORKER_QUEUE__RESULT_TTL_S`` after its last
write):

| key | type | holds |
|---|---|---|
| ``mw:rescore:{run}`` | hash | shard -> summary JSON of a finished shard |
| ``mw:rescore:{run}:run`` | string | the run as first sent: window, shards, policy |
| ``mw:rescore:{run}:sent`` | hash | shard -> id of the last message sent for it |
| ``mw:rescore:{run}:failed`` | hash | shard -> why it was given up (also a dead letter) |
| ``mw:rescore:{run}:attempts`` | hash | shard -> how often a worker took it |
| ``mw:rescore:{run}:running`` | hash | shard -> worker, start, rows so far, while it runs |
| ``mw:rescore:{run}:lease:{k}`` | string, PX | the token of the worker running shard k |

The lease: a worker running a shard holds ``lease:{k}``, renewed by a :class:`Heartbeat`
thread that also keeps the shard's message invisible (it moves the message's score in
kombu's ``unacked_index``, so Redis does not hand it to another worker after
``WORKER_QUEUE__VISIBILITY_TIMEOUT_S`` while the shard is still being worked on, however
long it takes). A worker that dies stops both: its message comes back after the
visibility timeout (at once for a prefork child's, ``task_reject_on_worker_lost``), its
lease has lapsed by then (:class:`LeaseTiming`), and the shard is simply done again. A
copy of the message that finds the lease held (the command run again while the shard
runs) waits until the lease is renewed, and then leaves the shard to its holder, or
until it lapses, and then takes over (:func:`take_lease`).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from worker.log import get_logger

if TYPE_CHECKING:
    import redis

log = get_logger(__name__)
PREFIX = "mw:rescore:"


def split_window(start: datetime, end: datetime, shards: int) -> list[tuple[datetime, datetime]]:
    """``[start, end)`` cut into ``shards`` equal spans (to the microsecond, the store's
    resolution); together they cover it exactly, without overlap."""
    span = (end - start) // timedelta(microseconds=1)
    bounds = [start + timedelta(microseconds=span * i // shards) for i in range(shards)]
    bounds.append(end)
    return list(itertools.pairwise(bounds))


class RescoreRecords:
    """The Redis records of one run (the keys in the module docstring)."""

    def __init__(self, client: redis.Redis, run_id: str, ttl_s: int) -> None:
        self.redis = client
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.done_key = f"{PREFIX}{run_id}"

    def key(self, part: str) -> str:
        return f"{self.done_key}:{part}"

    def lease_key(self, shard: int) -> str:
        return self.key(f"lease:{shard}")

    # ------------------------------------------------------------------ the run (command)

    def run(self) -> dict[str, Any] | None:
        text = cast(str | None, self.redis.get(self.key("run")))
        return None if text is None else cast(dict[str, Any], json.loads(text))

    def start_run(self, document: dict[str, Any]) -> dict[str, Any]:
        """Record the run unless it is recorded already; returns the recorded one."""
        self.redis.set(self.key("run"), json.dumps(document), nx=True, ex=self.ttl_s)
        found = self.run()
        return document if found is None else found

    def reset(self) -> None:
        """Forget the run (``--restart``). The leases stay: a shard still running keeps
        its lease, so a copy sent now leaves it to its worker."""
        parts = ["run", "sent", "failed", "attempts", "running"]
        self.redis.delete(self.done_key, *[self.key(p) for p in parts])

    def sending(self, shard: int, message_id: str) -> None:
        """A message is about to be sent for ``shard``: an earlier failure and its attempts
        are forgotten."""
        pipe = self.redis.pipeline()
        pipe.hdel(self.key("failed"), str(shard))
        pipe.hdel(self.key("attempts"), str(shard))
        pipe.hset(self.key("sent"), str(shard), message_id)
        for part in ("run", "sent"):
            pipe.expire(self.key(part), self.ttl_s)
        pipe.execute()

    def sent(self) -> dict[int, str]:
        raw = cast(dict[str, str], self.redis.hgetall(self.key("sent")))
        return {int(k): v for k, v in raw.items()}

    # ------------------------------------------------------------------ outcomes

    def done(self) -> dict[int, dict[str, Any]]:
        raw = cast(dict[str, str], self.redis.hgetall(self.done_key))
        return {int(k): json.loads(v) for k, v in raw.items()}

    def is_done(self, shard: int) -> bool:
        return bool(self.redis.hexists(self.done_key, str(shard)))

    def failed(self) -> dict[int, str]:
        raw = cast(dict[str, str], self.redis.hgetall(self.key("failed")))
        return {int(k): v for k, v in raw.items()}

    def running(self) -> dict[int, dict[str, Any]]:
        raw = cast(dict[str, str], self.redis.hgetall(self.key("running")))
        return {int(k): json.loads(v) for k, v in raw.items()}

    def finish(self, shard: int, summary: dict[str, Any]) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self.done_key, str(shard), json.dumps(summary, sort_keys=True))
        pipe.expire(self.done_key, self.ttl_s)
        pipe.hdel(self.key("failed"), str(shard))
        pipe.execute()

    def fail(self, shard: int, error: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self.key("failed"), str(shard), error[:2000])
        pipe.expire(self.key("failed"), self.ttl_s)
        pipe.execute()

    def take_attempt(self, shard: int) -> int:
        pipe = self.redis.pipeline()
        pipe.hincrby(self.key("attempts"), str(shard), 1)
        pipe.expire(self.key("attempts"), self.ttl_s)
        count, _ = pipe.execute()
        return int(count)

    def show_running(self, shard: int, state: dict[str, Any]) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self.key("running"), str(shard), json.dumps(state, sort_keys=True))
        pipe.expire(self.key("running"), self.ttl_s)
        pipe.execute()

    def clear_running(self, shard: int) -> None:
        self.redis.hdel(self.key("running"), str(shard))

    # ------------------------------------------------------------------ the lease

    def take_lease(self, shard: int, token: str, ttl_s: float) -> bool:
        return bool(self.redis.set(self.lease_key(shard), token, nx=True, px=int(ttl_s * 1000)))

    def renew_lease(self, shard: int, token: str, ttl_s: float) -> bool:
        renewed = self.redis.eval(_RENEW, 1, self.lease_key(shard), token, int(ttl_s * 1000))
        return bool(renewed)

    def release_lease(self, shard: int, token: str) -> None:
        self.redis.eval(_RELEASE, 1, self.lease_key(shard), token)

    def lease_left_ms(self, shard: int) -> int:
        """Milliseconds before the lease lapses (negative: no lease)."""
        return int(self.redis.pttl(self.lease_key(shard)))

    def leased(self, shards: list[int]) -> set[int]:
        """Those of ``shards`` a worker holds now (running, or its worker died less than a
        lease ago)."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in shards:
            pipe.exists(self.lease_key(shard))
        return {shard for shard, held in zip(shards, pipe.execute(), strict=True) if held}


# Renew (PEXPIRE ARGV[2]) or release the lease KEYS[1] only while ARGV[1] holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class LeaseTiming:
    """How often the heartbeat runs, and how long a lease lasts without it: a third of
    the lease, and well inside the visibility timeout, so the lease of a dead worker has
    lapsed before Redis hands its message to another."""

    interval_s: float
    ttl_s: float

    @classmethod
    def for_visibility(cls, visibility_timeout_s: float) -> LeaseTiming:
        interval = min(max(visibility_timeout_s / 6, 0.5), 30.0)
        return cls(interval, 3 * interval)


class Heartbeat(threading.Thread):
    """While a shard runs: renew its lease, keep its message out of kombu's visibility
    sweep, and show how far it got."""

    def __init__(
        self,
        records: RescoreRecords,
        shard: int,
        token: str,
        timing: LeaseTiming,
        unacked: tuple[str, str] | None,  # (unacked_index key, delivery tag)
        state: dict[str, Any],
    ) -> None:
        super().__init__(name=f"rescore-heartbeat-{shard}", daemon=True)
        self.records, self.shard, self.token, self.timing = records, shard, token, timing
        self.unacked, self.state = unacked, state
        self._stop_event = threading.Event()

    def beat(self) -> None:
        self.records.renew_lease(self.shard, self.token, self.timing.ttl_s)
        if self.unacked is not None:
            index, tag = self.unacked
            self.records.redis.zadd(index, {tag: time.time()}, xx=True)
        self.records.show_running(self.shard, self.state)

    def run(self) -> None:
        while not self._stop_event.wait(self.timing.interval_s):
            try:
                self.beat()
            except Exception as exc:  # Redis hiccup: the next beat tries again
                log.warning(
                    "rescore.heartbeat_failed",
                    run_id=self.records.run_id,
                    shard=self.shard,
                    error=str(exc),
                )

    def stop(self) -> None:
        self._stop_event.set()
        if self.ident is not None:  # started
            self.join(10)


def take_lease(records: RescoreRecords, shard: int, token: str, timing: LeaseTiming) -> str:
    """``taken``; ``done`` when the shard finished meanwhile; ``held`` when another worker
    holds the lease and renews it (this copy is then a duplicate: the holder's own message
    is still unacknowledged, and comes back if the holder dies). A lease left by a worker
    that died is no longer renewed: it lapses within its TTL and is taken over."""
    deadline = time.monotonic() + timing.ttl_s + timing.interval_s
    last: int | None = None
    while True:
        if records.take_lease(shard, token, timing.ttl_s):
            if records.is_done(shard):  # finished between the first check and the lease
                records.release_lease(shard, token)
                return "done"
            return "taken"
        if records.is_done(shard):
            return "done"
        left = records.lease_left_ms(shard)
        if (last is not None and left > last) or time.monotonic() >= deadline:
            return "held"  # renewed since the last look: its holder is alive
        last = left
        time.sleep(min(0.5, timing.interval_s / 2))
