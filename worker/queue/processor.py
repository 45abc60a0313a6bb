"""The queue side of a worker: a batch of job messages in, per-job outcomes out.

No Celery here: :class:`QueueProcessor` takes raw message payloads and says, per message,
whether it is finished (acknowledge) or should be put back (requeue). The Celery task in
``worker/queue/app.py`` is a thin adapter around it.

Per job: count the attempt (a job taken more than ``max_attempts`` times goes to the
dead-letter store instead of looping), reuse a stored result for a job id that was
already scored (idempotent redelivery), otherwise score it in one batch with the others,
store the result, then deliver it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from worker.documents import JOB_ID, Job, Result
from worker.engine import Engine, WorkItem
from worker.errors import RETRYABLE_CODES, JobError
from worker.log import get_logger
from worker.ops.telemetry import Telemetry
from worker.queue.dead_letters import RAW_KEPT, DeadLetter, DeadLetters, refused_id
from worker.queue.delivery import Deliverer
from worker.queue.jobs import JobStore

log = get_logger(__name__)
PIPELINE_MIN = 16  # batches this large are encoded in two overlapped halves


@dataclass
class QueueProcessor:
    """Scores batches of job payloads; never raises for a bad job."""

    engine: Engine
    jobs: JobStore
    dead_letters: DeadLetters
    deliverer: Deliverer
    max_attempts: int
    telemetry: Telemetry | None = None

    def process(
        self, payloads: Sequence[Any], message_ids: Sequence[str | None] | None = None
    ) -> list[bool]:
        """One outcome per payload: True = finished (ack), False = put back (requeue).

        ``message_ids`` (the queue's ids of the messages) name the dead letters of invalid
        jobs, so a message delivered twice is answered by one entry."""
        ids = list(message_ids or [None] * len(payloads))
        batch_id = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        log.info("batch.started", batch_id=batch_id, size=len(payloads))
        if self.telemetry is not None:
            self.telemetry.observe_batch(len(payloads))
        done = [False] * len(payloads)
        to_score: dict[str, tuple[Job, int]] = {}
        waiting: dict[str, list[int]] = {}  # job id -> indexes of messages it answers
        for index, (payload, message_id) in enumerate(zip(payloads, ids, strict=True)):
            copy_of = payload.get("job_id") if isinstance(payload, dict) else None
            if isinstance(copy_of, str) and copy_of in to_score:  # one more copy in this batch:
                waiting[copy_of].append(index)  # answered with the first, not another attempt
                continue
            try:
                job = self._admit(payload, batch_id, message_id)
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
            pid=os.getpid(),  # tells prefork children apart
            size=len(payloads),
            scored=len(to_score),
            requeued=done.count(False),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return done

    def _admit(
        self, payload: Any, batch_id: str, message_id: str | None = None
    ) -> tuple[Job, int] | None:
        """Validate and count one message. None = finished already (dead letter, refusal,
        redelivery)."""
        try:
            job = Job.model_validate(payload)
        except ValidationError as exc:
            self._dead_letter_invalid(payload, exc, batch_id, message_id)
            return None
        problem = self.deliverer.job_sink_problem(job)
        if problem is not None:
            self._refuse(job, JobError(problem, code="sink_not_allowed"), batch_id)
            return None
        attempt = self.jobs.take_attempt(job.job_id)
        with structlog.contextvars.bound_contextvars(
            job_id=job.job_id, batch_id=batch_id, attempt=attempt
        ):
            if attempt > self.max_attempts:
                self.dead_letters.add(
                    DeadLetter.of(
                        job.job_id,
                        job.model_dump(mode="json"),
                        attempt - 1,
                        f"taken {attempt - 1} times without finishing (the worker crashed or "
                        "the job kept failing)",
                        "score",
                        sealer=self.dead_letters.sealer,
                    )
                )
                log.error("job.dead_lettered")
                return None
            stored = self.jobs.get_result(job.job_id)
            if stored is not None:  # scored before: deliver the same document again
                self.deliverer.deliver_all(job, Result.model_validate_json(stored))
                self.jobs.reset_attempts(job.job_id)
                log.info("job.redelivered")
                return None
        return job, attempt

    def _dead_letter_invalid(
        self, payload: Any, exc: ValidationError, batch_id: str, message_id: str | None
    ) -> None:
        """A message that is a JSON object but not a valid job: dead-lettered at once."""
        hint = payload.get("job_id") if isinstance(payload, dict) else None
        valid_id = isinstance(hint, str) and JOB_ID.fullmatch(hint) is not None
        job_id = str(hint) if valid_id else refused_id(message_id, "invalid")
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raw = json.dumps(payload, default=repr)
        small = isinstance(payload, dict) and len(raw) <= RAW_KEPT
        entry = DeadLetter.of(
            job_id,
            payload if small else {},
            0,
            f"invalid job: {problems}",
            "validate",
            raw=None if small else raw,
            sealer=self.dead_letters.sealer,
        )
        self.dead_letters.add(entry)
        log.error("job.invalid", job_id=job_id, batch_id=batch_id, error=entry.error[:300])

    def _refuse(self, job: Job, error: JobError, batch_id: str) -> None:
        """Answer a job without scoring it: an error result, stored for `wait`."""
        item = WorkItem(job.job_id, job.image, job.policies, job.metadata)
        result = self.engine.refuse(item, error)
        self._keep(result)
        log.error(
            "job.refused",
            job_id=job.job_id,
            batch_id=batch_id,
            code=error.code,
            error=result.error.message[:300] if result.error else "",
        )

    def _keep(self, result: Result) -> None:
        """Store a job's final result (for `wait` and idempotency) and count it."""
        self.jobs.put_result(result.job_id, result.to_json())
        if self.telemetry is not None:
            self.telemetry.observe_result(result)

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
            self._keep(result)
            self.jobs.reset_attempts(job.job_id)
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
