"""Handing results to sinks: first try inline, retries scheduled in Redis, then dead letters.

A retryable failure is scheduled in the ``mw:retries`` sorted set with exponential backoff
(equal jitter, at least any ``Retry-After``), so the schedule survives worker restarts.
Every worker runs a :class:`DeliveryLoop` that claims due deliveries under a lease. A
permanent failure, or the last allowed attempt, writes a dead letter. Nothing is dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from worker.documents import Job, Result
from worker.errors import PermanentSinkError, PluginError, SinkError
from worker.log import get_logger
from worker.ops.telemetry import Telemetry
from worker.plugins import (
    PluginContext,
    Sink,
    available_sinks,
    job_sink_problem,
    make_sink,
    routes_to,
)
from worker.queue.dead_letters import DeadLetter, DeadLetters
from worker.queue.jobs import Delivery, JobStore, new_delivery_id
from worker.redact import redact_text

log = get_logger(__name__)
MAX_RETRY_AFTER_S = 24 * 3600


def delivery_id_of(job_id: str, config: dict[str, Any]) -> str:
    """One id per (job, sink): a job answered again (a redelivered message) replaces its
    pending delivery instead of adding a second one."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"{job_id}:{digest}"


@functools.cache
def _installed_sinks() -> frozenset[str]:
    return frozenset(available_sinks())


def sink_label(name: object) -> str:
    """A sink type as a metrics/log label: installed names as they are, anything else one
    bounded value (a job cannot create a new time series per made-up name)."""
    text = str(name)
    return text if text in _installed_sinks() else "unknown"


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Delay before try ``attempt + 1``: ``base * 2**(attempt-1)`` capped, half of it jittered,
    and never sooner than the server's ``Retry-After``."""
    ceiling = min(cap, base * 2 ** (attempt - 1))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER_S))
    return float(delay)


def failure_of(exc: Exception) -> tuple[bool, str, float | None]:
    """(retryable, message, retry_after) for an exception a sink raised."""
    if isinstance(exc, PermanentSinkError | PluginError):
        return False, f"permanent: {exc}", None
    if isinstance(exc, SinkError):
        return True, str(exc), exc.retry_after
    return True, f"{type(exc).__name__}: {exc}", None  # a sink bug: it may be transient


def deliver_inline(
    sinks: SinkCache,
    configs: Sequence[dict[str, Any]],
    result: Result,
    *,
    max_attempts: int,
    backoff_base_s: float,
    backoff_max_s: float,
) -> list[str]:
    """Deliver ``result`` now, retrying in this process (no Redis: `worker classify`).

    Returns one message per sink that still failed after ``max_attempts``.
    """
    failures = []
    for config in configs:
        if not routes_to(config, result):
            continue
        for attempt in range(1, max_attempts + 1):
            try:
                sinks.get(config).deliver(result)
                break
            except Exception as exc:
                retryable, message, retry_after = failure_of(exc)
                if not retryable or attempt == max_attempts:
                    failures.append(f"{sink_label(config.get('type'))}: {redact_text(message)}")
                    log.error(
                        "sink.failed",
                        job_id=result.job_id,
                        sink=sink_label(config.get("type")),
                        error=redact_text(message),
                    )
                    break
                time.sleep(backoff_delay(attempt, backoff_base_s, backoff_max_s, retry_after))
    return failures


class SinkCache:
    """One sink instance per distinct config, per process (clients and files are reused)."""

    def __init__(self, context: PluginContext) -> None:
        self.context = context
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()

    def get(self, config: dict[str, Any]) -> Sink:
        key = json.dumps(config, sort_keys=True)
        with self._lock:
            sink = self._sinks.get(key)
            if sink is None:
                options = {k: v for k, v in config.items() if k != "type"}
                sink = make_sink(str(config.get("type", "")), options, self.context)
                self._sinks[key] = sink
            return sink

    def close(self) -> None:
        with self._lock:
            for sink in self._sinks.values():
                sink.close()
            self._sinks.clear()


class Deliverer:
    """Delivers results to the sinks a job names (or the default sinks).

    Every delivery is written to the Redis schedule *before* it is attempted, leased to
    this worker for ``lease_s``, and removed when it succeeds or is dead-lettered. The
    attempts run in a pool of ``concurrency`` threads, so one slow endpoint never holds
    up scoring; a worker that dies mid-attempt leaves the delivery to be claimed again by
    any worker when the lease runs out. Deliveries beyond what the pool has room for stay
    in Redis, due now, for :meth:`run_due`.
    """

    def __init__(
        self,
        jobs: JobStore,
        dead_letters: DeadLetters,
        sinks: SinkCache,
        default_sinks: Sequence[dict[str, Any]],
        *,
        max_attempts: int,
        backoff_base_s: float,
        backoff_max_s: float,
        lease_s: float,
        concurrency: int = 8,
        job_sink_types: Sequence[str] | None = None,
        resubmit: Callable[[dict[str, Any]], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.jobs, self.dead_letters, self.sinks = jobs, dead_letters, sinks
        self.default_sinks = list(default_sinks)
        self.max_attempts, self.lease_s, self.concurrency = max_attempts, lease_s, concurrency
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.job_sink_types, self.resubmit, self.telemetry = job_sink_types, resubmit, telemetry
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="deliver")
        self._in_flight: dict[Future[bool], Delivery] = {}
        self._lock = threading.Lock()

    def job_sink_problem(self, job: Job) -> str | None:
        """Why the sinks a job names may not be used (settings' limits), or None."""
        for sink in job.sinks:
            config = {"type": sink.type, **sink.options()}
            problem = job_sink_problem(config, self.sinks.context, self.job_sink_types)
            if problem is not None:
                return problem
        return None

    def sink_configs(self, job: Job) -> list[dict[str, Any]]:
        if job.sinks:
            return [{"type": s.type, **s.options()} for s in job.sinks]
        return self.default_sinks

    def deliver_all(self, job: Job, result: Result) -> None:
        """Schedule ``result`` for each of the job's sinks and start the first attempts.

        When this returns, every delivery is in Redis: the job's message can be acked.
        """
        body = result.to_json()
        job_doc = job.model_dump(mode="json")
        deliveries = [
            Delivery(delivery_id_of(job.job_id, config), job_doc, config, 1, body)
            for config in self.sink_configs(job)
            if routes_to(config, result)
        ]
        leased_until = time.time() + self.lease_s
        self.jobs.schedule_deliveries([(d, leased_until) for d in deliveries])
        for delivery in deliveries:
            self._start(delivery)

    def room(self) -> int:
        """How many more attempts the pool takes now (the rest wait in Redis)."""
        with self._lock:
            return max(0, 2 * self.concurrency - len(self._in_flight))

    def _start(self, delivery: Delivery) -> None:
        if self.room() == 0:  # leave it to run_due, due now
            self.jobs.schedule_delivery(delivery, time.time())
            return
        future = self._pool.submit(self.attempt, delivery)
        with self._lock:
            self._in_flight[future] = delivery
        future.add_done_callback(self._done)

    def _done(self, future: Future[bool]) -> None:
        with self._lock:
            self._in_flight.pop(future, None)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no attempt is running (tests, shutdown); True if idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._in_flight:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Finish the attempts in hand; those not started are due again at once."""
        with self._lock:
            in_flight = list(self._in_flight.items())
        # cancel() runs the done-callbacks, which take the lock: call it outside.
        waiting = [delivery for future, delivery in in_flight if future.cancel()]
        self._pool.shutdown(wait=True, cancel_futures=True)
        for delivery in waiting:
            self.jobs.schedule_delivery(delivery, time.time())

    def attempt(self, delivery: Delivery) -> bool:
        """Try one delivery; schedule a retry or dead-letter it on failure. True if delivered."""
        job_id = str(delivery.job.get("job_id"))
        config = delivery.sink or {}
        sink_type = sink_label(config.get("type"))
        started = time.perf_counter()
        try:
            sink = self.sinks.get(config)
            sink.deliver(Result.model_validate_json(delivery.result))
        except Exception as exc:
            retryable, message, retry_after = failure_of(exc)
            if not isinstance(exc, SinkError | PluginError):
                log.exception("sink.crashed", job_id=job_id, sink=sink_type)
            if retryable:
                self._retry_or_give_up(delivery, message, retry_after)
            else:
                self._dead_letter(delivery, message)
            return False
        self.jobs.finish_delivery(delivery.delivery_id)
        seconds = time.perf_counter() - started
        self._count(sink_type, "delivered", seconds)
        log.info(
            "sink.delivered",
            job_id=job_id,
            sink=sink_type,
            attempt=delivery.attempt,
            ms=round(seconds * 1000, 1),
        )
        return True

    def _count(self, sink: str, outcome: str, seconds: float | None = None) -> None:
        if self.telemetry is not None:
            self.telemetry.observe_delivery(sink, outcome, seconds)

    def _retry_or_give_up(self, delivery: Delivery, error: str, retry_after: float | None) -> None:
        job_id = str(delivery.job.get("job_id"))
        if delivery.attempt >= self.max_attempts:
            self._dead_letter(delivery, f"gave up after {delivery.attempt} attempts: {error}")
            return
        delay = backoff_delay(
            delivery.attempt, self.backoff_base_s, self.backoff_max_s, retry_after
        )
        retry = replace(delivery, attempt=delivery.attempt + 1, last_error=error)
        self.jobs.schedule_delivery(retry, time.time() + delay)
        sink = sink_label((delivery.sink or {}).get("type"))
        self._count(sink, "retry_scheduled")
        log.warning(
            "sink.retry_scheduled",
            job_id=job_id,
            sink=sink,
            attempt=delivery.attempt,
            delay_s=round(delay, 2),
            error=redact_text(error[:300]),
        )

    def _dead_letter(self, delivery: Delivery, error: str) -> None:
        job_id = str(delivery.job.get("job_id"))
        self.dead_letters.add(
            DeadLetter.of(
                job_id,
                delivery.job,
                delivery.attempt,
                error,
                "deliver",
                sink=delivery.sink,
                sealer=self.dead_letters.sealer,
            )
        )
        self.jobs.finish_delivery(delivery.delivery_id)
        sink = sink_label((delivery.sink or {}).get("type"))
        self._count(sink, "dead_lettered")
        log.error("sink.failed", job_id=job_id, sink=sink, error=redact_text(error[:300]))

    def schedule_resubmit(self, job: Job, attempt: int, error: str) -> float:
        """Submit ``job`` again after a backoff (transient source failures); returns the delay."""
        delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s)
        entry = Delivery(new_delivery_id(), job.model_dump(mode="json"), None, attempt, "", error)
        self.jobs.schedule_delivery(entry, time.time() + delay)
        return delay

    def run_due(self) -> int:
        """Start every delivery that is due now (as far as the pool has room); returns how
        many were claimed."""
        room = self.room()
        if room == 0:
            return 0
        due = self.jobs.claim_deliveries(time.time(), self.lease_s, limit=room)
        for delivery in due:
            if delivery.sink is None:
                if self.resubmit is None:  # only workers resubmit; leave it for one
                    continue
                self.resubmit(delivery.job)
                self.jobs.finish_delivery(delivery.delivery_id)
                log.info("job.resubmitted", job_id=delivery.job.get("job_id"))
            else:
                log.info(
                    "delivery.claimed",
                    job_id=delivery.job.get("job_id"),
                    sink=sink_label((delivery.sink or {}).get("type")),
                    attempt=delivery.attempt,
                )
                self._start(delivery)
        return len(due)


class DeliveryLoop(threading.Thread):
    """Background thread running :meth:`Deliverer.run_due` until stopped."""

    def __init__(self, deliverer: Deliverer, poll_interval_s: float) -> None:
        super().__init__(name="delivery-loop", daemon=True)
        self.deliverer = deliverer
        self.poll_interval_s = poll_interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                busy = self.deliverer.run_due()
            except Exception:  # Redis hiccup: keep the loop alive, try again
                log.exception("delivery.loop_failed")
                busy = 0
            if not busy:
                self._stop_event.wait(self.poll_interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_event.set()
        self.join(timeout)
