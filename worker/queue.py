"""The queue side of a worker: a batch of job messages in, per-job outcomes out.

No Celery here: :class:`QueueProcessor` takes raw message payloads and says, per message,
whether it is finished (acknowledge) or should be put back (requeue). The Celery task in
``worker/celery_app.py`` is a thin adapter around it.

Per job: count the attempt (a job taken more than ``max_attempts`` times goes to the
dead-letter store instead of looping), reuse a stored result for a job id that was
already scored (idempotent redelivery), otherwise score it in one batch with the others,
store the result, then deliver it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from pydantic import ValidationError

from worker.delivery import Deliverer
from worker.documents import Job, Result
from worker.engine import Engine, WorkItem
from worker.log import get_logger
from worker.store import DeadLetter, Store
from worker.telemetry import Telemetry

log = get_logger(__name__)
RETRYABLE_CODES = frozenset({"source_unavailable", "source_timeout"})
PIPELINE_MIN = 16  # batches this large are encoded in two overlapped halves


class QueueProcessor:
    """Scores batches of job payloads; never raises for a bad job."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        deliverer: Deliverer,
        max_attempts: int,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.engine = engine
        self.store = store
        self.deliverer = deliverer
        self.max_attempts = max_attempts

    def process(self, payloads: Sequence[Any]) -> list[bool]:
        """One outcome per payload: True = finished (ack), False = put back (requeue)."""
        batch_id = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        log.info("batch.started", batch_id=batch_id, size=len(payloads))
        if self.telemetry is not None:
            self.telemetry.observe_batch(len(payloads))
        done = [False] * len(payloads)
        to_score: dict[str, tuple[Job, int]] = {}
        waiting: dict[str, list[int]] = {}  # job id -> indexes of messages it answers
        for index, payload in enumerate(payloads):
            try:
                job = self._admit(payload, batch_id)
            except Exception:
                log.exception("job.admit_failed", batch_id=batch_id)
                continue
            if job is None:
                done[index] = True
                continue
            waiting.setdefault(job[0].job_id, []).append(index)
            if job[0].job_id not in to_score:
                to_score[job[0].job_id] = job
        if to_score:
            finished = self._score(list(to_score.values()), batch_id)
            for job_id, ok in finished.items():
                for index in waiting[job_id]:
                    done[index] = ok
        log.info(
            "batch.processed",
            batch_id=batch_id,
            size=len(payloads),
            scored=len(to_score),
            requeued=done.count(False),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return done

    def _admit(self, payload: Any, batch_id: str) -> tuple[Job, int] | None:
        """Validate and count one message. None = finished already (dead letter, redelivery)."""
        try:
            job = Job.model_validate(payload)
        except ValidationError as exc:
            job_id = payload.get("job_id") if isinstance(payload, dict) else None
            job_id = str(job_id or f"invalid-{uuid.uuid4().hex[:12]}")
            doc = payload if isinstance(payload, dict) else {"payload": repr(payload)[:2000]}
            self.store.dead_letter(DeadLetter(job_id, doc, 0, f"invalid job: {exc}", "validate"))
            log.error("job.invalid", job_id=job_id, batch_id=batch_id, error=str(exc)[:300])
            return None
        attempt = self.store.take_attempt(job.job_id)
        with structlog.contextvars.bound_contextvars(
            job_id=job.job_id, batch_id=batch_id, attempt=attempt
        ):
            if attempt > self.max_attempts:
                self.store.dead_letter(
                    DeadLetter(
                        job.job_id,
                        job.model_dump(mode="json"),
                        attempt - 1,
                        f"taken {attempt - 1} times without finishing (the worker crashed or "
                        "the job kept failing)",
                        "score",
                    )
                )
                log.error("job.dead_lettered")
                return None
            stored = self.store.get_result(job.job_id)
            if stored is not None:  # scored before: deliver the same document again
                self.deliverer.deliver_all(job, Result.model_validate_json(stored))
                self.store.reset_attempts(job.job_id)
                log.info("job.redelivered")
                return None
        return job, attempt

    def _score(self, jobs: list[tuple[Job, int]], batch_id: str) -> dict[str, bool]:
        items = [WorkItem(j.job_id, j.image, j.policies, j.metadata) for j, _ in jobs]
        try:
            # Two encoder batches: the second half decodes while the first encodes.
            results = self.engine.process(items, chunks=2 if len(items) >= PIPELINE_MIN else 1)
        except Exception:
            log.exception("batch.failed", batch_id=batch_id)
            return {j.job_id: False for j, _ in jobs}
        finished: dict[str, bool] = {}
        for (job, attempt), result in zip(jobs, results, strict=True):
            with structlog.contextvars.bound_contextvars(
                job_id=job.job_id, batch_id=batch_id, attempt=attempt
            ):
                finished[job.job_id] = self._complete(job, attempt, result)
        return finished

    def _complete(self, job: Job, attempt: int, result: Result) -> bool:
        code = result.error.code if result.error else None
        try:
            if code in RETRYABLE_CODES and attempt < self.max_attempts:
                delay = self.deliverer.schedule_resubmit(
                    job, attempt, result.error.message if result.error else ""
                )
                log.warning("job.retry_scheduled", code=code, delay_s=round(delay, 2))
                return True
            self.store.put_result(job.job_id, result.to_json())
            self.store.reset_attempts(job.job_id)
            if self.telemetry is not None:
                self.telemetry.observe_result(result)
            log.info(
                "job.scored",
                status=result.status,
                code=code,
                flags=[f"{f.policy}/{f.category}" for f in result.flags],
            )
            self.deliverer.deliver_all(job, result)
            return True
        except Exception:
            log.exception("job.failed")
            return False
