"""The queue side of a worker: a batch of job messages in, per-job outcomes out.

No Celery here: :class:`QueueProcessor` takes raw message payloads and says, per message,
whether it is finished (acknowledge) or should be put back (requeue). The Celery task in
``worker/queue/app.py`` is a thin adapter around it.

Per job: count the attempt (a job taken more than ``max_attempts`` times goes to the
dead-letter store instead of looping), reuse a stored result for a job id that was
already scored (idempotent redelivery), otherwise score it in one batch with the others,
store the result, then deliver it. Redis is asked once per batch before scoring and once
per encoder chunk after it, not several times per job. A packed message's jobs are judged
one by one (:meth:`QueueProcessor.process_messages`).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Message:
    """One queue message as the batch task hands it over: its queue id and its jobs (one
    for ``moderation.score``, up to ``max_jobs_per_message`` for a packed message)."""

    message_id: str | None
    payloads: list[Any]
    packed: bool = False

    def job_keys(self) -> list[str | None]:
        """The dead-letter key of each job that is not valid (and names no usable job id):
        the message id, with the job's index in a packed message."""
        if not self.packed:
            return [self.message_id] * len(self.payloads)
        if self.message_id is None:
            return [None] * len(self.payloads)
        return [f"{self.message_id}.{i}" for i in range(len(self.payloads))]


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job of a batch (for per-job task events)."""

    message: int  # index of its message in the batch
    job_id: str  # the job id, or the dead-letter key of an invalid job
    finished: bool  # False: it goes back to the queue
    #: The result this batch stored for it (None: refused, dead-lettered, retried, or
    #: answered from an earlier result), so its events need not read it back from Redis.
    result: Result | None = None


@dataclass
class BatchOutcome:
    acks: list[bool]  # per message: True = acknowledge, False = requeue it whole
    jobs: list[JobOutcome] = field(default_factory=list)


#: What sends a list of job payloads back to the queue (the unfinished part of a message).
Resend = Callable[[list[Any]], None]


@dataclass
class QueueProcessor:
    """Scores batches of job payloads; never raises for a bad job."""

    engine: Engine
    jobs: JobStore
    dead_letters: DeadLetters
    deliverer: Deliverer
    max_attempts: int
    telemetry: Telemetry | None = None
    #: Most images per encoder call (0: no limit); a batch of packed messages may hold a
    #: few more jobs than the batch size, and is then encoded in more chunks.
    max_batch: int = 0

    def process_messages(self, messages: Sequence[Message], resend: Resend) -> BatchOutcome:
        """Score every job of ``messages`` in one batch; one acknowledgement per message.

        A message whose jobs all finished is acknowledged; one whose jobs all failed to
        finish is put back whole (each job's attempt counter stops it from looping). A
        packed message with some of each is acknowledged once ``resend`` has put its
        unfinished jobs back on the queue; if that fails, it is put back whole (jobs that
        finished are then answered from their stored results)."""
        payloads: list[Any] = []
        keys: list[str | None] = []
        owner: list[int] = []
        for index, message in enumerate(messages):
            payloads.extend(message.payloads)
            keys.extend(message.job_keys())
            owner.extend([index] * len(message.payloads))
        job_ids: list[str] = [""] * len(payloads)
        stored: dict[str, Result] = {}
        done = self._process(payloads, keys, job_ids, stored)
        acks: list[bool] = []
        start = 0
        for message in messages:
            end = start + len(message.payloads)
            finished = done[start:end]
            if all(finished):
                acks.append(True)
            elif not any(finished):
                acks.append(False)
            else:
                acks.append(self._resend_unfinished(message, finished, resend))
            start = end
        outcomes = [
            JobOutcome(owner[i], job_ids[i], done[i], stored.get(job_ids[i]))
            for i in range(len(payloads))
        ]
        return BatchOutcome(acks, outcomes)

    def _resend_unfinished(self, message: Message, finished: list[bool], resend: Resend) -> bool:
        left = [p for p, ok in zip(message.payloads, finished, strict=True) if not ok]
        try:
            resend(left)
        except Exception:
            log.exception("message.resend_failed", message_id=message.message_id)
            return False
        log.warning(
            "message.partly_requeued",
            message_id=message.message_id,
            jobs=len(message.payloads),
            requeued=len(left),
        )
        return True

    def process(
        self, payloads: Sequence[Any], message_ids: Sequence[str | None] | None = None
    ) -> list[bool]:
        """One outcome per payload: True = finished (ack), False = put back (requeue).

        ``message_ids`` (the queue's ids of the messages) name the dead letters of invalid
        jobs, so a message delivered twice is answered by one entry."""
        keys = list(message_ids or [None] * len(payloads))
        return self._process(list(payloads), keys, [""] * len(payloads))

    def _process(
        self,
        payloads: list[Any],
        keys: list[str | None],
        job_ids: list[str],
        stored: dict[str, Result] | None = None,
    ) -> list[bool]:
        """:meth:`process`, filling ``job_ids`` (the job id, or the dead-letter key of an
        invalid job, per payload) and ``stored`` (job id -> the result stored for it)."""
        batch_id = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        log.info("batch.started", batch_id=batch_id, size=len(payloads))
        if self.telemetry is not None:
            self.telemetry.observe_batch(len(payloads))
        done = [False] * len(payloads)
        admitted: dict[str, Job] = {}
        waiting: dict[str, list[int]] = {}  # job id -> indexes of payloads it answers
        for index, (payload, key) in enumerate(zip(payloads, keys, strict=True)):
            copy_of = payload.get("job_id") if isinstance(payload, dict) else None
            if isinstance(copy_of, str) and copy_of in admitted:  # one more copy in this batch:
                waiting[copy_of].append(index)  # answered with the first, not another attempt
                job_ids[index] = copy_of
                continue
            try:
                job = self._validate(payload, batch_id, key)
            except Exception:
                log.exception("job.admit_failed", batch_id=batch_id)
                continue
            if isinstance(job, str):  # dead-lettered or refused: finished
                job_ids[index] = job
                done[index] = True
                continue
            job_ids[index] = job.job_id
            waiting[job.job_id] = [index]
            admitted[job.job_id] = job
        to_score: list[tuple[Job, int]] = []
        if admitted:
            try:
                to_score = self._admit(list(admitted.values()), batch_id, waiting, done)
            except Exception:  # Redis down: nothing admitted, every job goes back
                log.exception("batch.admit_failed", batch_id=batch_id)
        if to_score:
            finished = self._score(to_score, batch_id, {} if stored is None else stored)
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

    def _validate(self, payload: Any, batch_id: str, key: str | None) -> Job | str:
        """The job, or the id it was answered under (a dead letter, a refusal)."""
        try:
            job = Job.model_validate(payload)
        except ValidationError as exc:
            return self._dead_letter_invalid(payload, exc, batch_id, key)
        problem = self.deliverer.job_sink_problem(job)
        if problem is not None:
            self._refuse(job, JobError(problem, code="sink_not_allowed"), batch_id)
            return job.job_id
        return job

    def _admit(
        self,
        jobs: list[Job],
        batch_id: str,
        waiting: dict[str, list[int]],
        done: list[bool],
    ) -> list[tuple[Job, int]]:
        """Count one attempt at each job and look up stored results, in one round trip.
        Returns the jobs to score with their attempt numbers; the others (dead-lettered,
        redelivered) are marked done."""
        taken = self.jobs.take_attempts([job.job_id for job in jobs])
        to_score: list[tuple[Job, int]] = []
        for job, (attempt, stored) in zip(jobs, taken, strict=True):
            if attempt <= self.max_attempts and stored is None:
                to_score.append((job, attempt))
                continue
            with structlog.contextvars.bound_contextvars(
                job_id=job.job_id, batch_id=batch_id, attempt=attempt
            ):
                try:
                    self._answer_without_scoring(job, attempt, stored)
                except Exception:
                    log.exception("job.failed")
                    continue
            for index in waiting[job.job_id]:
                done[index] = True
        return to_score

    def _answer_without_scoring(self, job: Job, attempt: int, stored: str | None) -> None:
        """Dead-letter a job taken too often, or deliver its stored result again."""
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
        elif stored is not None:  # scored before: deliver the same document again
            self.deliverer.deliver_all(job, Result.model_validate_json(stored))
            self.jobs.reset_attempts(job.job_id)
            log.info("job.redelivered")

    def _dead_letter_invalid(
        self, payload: Any, exc: ValidationError, batch_id: str, key: str | None
    ) -> str:
        """A payload that is not a valid job: dead-lettered at once; returns the entry's
        key."""
        hint = payload.get("job_id") if isinstance(payload, dict) else None
        valid_id = isinstance(hint, str) and JOB_ID.fullmatch(hint) is not None
        job_id = str(hint) if valid_id else refused_id(key, "invalid")
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
        return job_id

    def _refuse(self, job: Job, error: JobError, batch_id: str) -> None:
        """Answer a job without scoring it: an error result, stored for `wait`."""
        item = WorkItem(job.job_id, job.image, job.policies, job.metadata)
        result = self.engine.refuse(item, error)
        self.jobs.put_result(result.job_id, result.to_json())
        self._count(result)
        log.error(
            "job.refused",
            job_id=job.job_id,
            batch_id=batch_id,
            code=error.code,
            error=result.error.message[:300] if result.error else "",
        )

    def _count(self, result: Result) -> None:
        if self.telemetry is not None:
            self.telemetry.observe_result(result)

    def _score(
        self, jobs: list[tuple[Job, int]], batch_id: str, stored: dict[str, Result]
    ) -> dict[str, bool]:
        """Score ``jobs`` in encoder chunks; each chunk's results are stored and delivered
        while the next chunk's images are still being decoded."""
        items = [WorkItem(j.job_id, j.image, j.policies, j.metadata) for j, _ in jobs]
        # Two encoder batches: the second half decodes while the first encodes; more when
        # packed messages brought more jobs than one encoder batch should hold.
        chunks = 2 if len(items) >= PIPELINE_MIN else 1
        if self.max_batch > 0:
            chunks = max(chunks, math.ceil(len(items) / self.max_batch))
        size = math.ceil(len(items) / chunks)
        finished: dict[str, bool] = {}
        chunk: list[tuple[Job, int, Result]] = []
        try:
            results = self.engine.stream(items, size)
            for (job, attempt), result in zip(jobs, results, strict=True):
                chunk.append((job, attempt, result))
                if len(chunk) == size:
                    finished.update(self._complete(chunk, batch_id, stored))
                    chunk = []
            if chunk:
                finished.update(self._complete(chunk, batch_id, stored))
        except Exception:
            log.exception("batch.failed", batch_id=batch_id)
            return {job.job_id: finished.get(job.job_id, False) for job, _ in jobs}
        return finished

    def _complete(
        self, scored: list[tuple[Job, int, Result]], batch_id: str, stored: dict[str, Result]
    ) -> dict[str, bool]:
        """Retry, or store (one round trip for the chunk), log and deliver scored jobs;
        ``stored`` gains the results stored."""
        finished: dict[str, bool] = {}
        final: list[tuple[Job, int, Result]] = []
        for job, attempt, result in scored:
            code = result.error.code if result.error else None
            if code in RETRYABLE_CODES and attempt < self.max_attempts:
                finished[job.job_id] = self._retry(job, attempt, result, batch_id)
            else:
                final.append((job, attempt, result))
        if not final:
            return finished
        try:  # every final result stored, and attempts reset, in one round trip
            self.jobs.finish_jobs([(job.job_id, result.to_json()) for job, _, result in final])
        except Exception:
            log.exception("batch.store_failed", batch_id=batch_id)
            return {**finished, **{job.job_id: False for job, _, _ in final}}
        for job, attempt, result in final:
            stored[job.job_id] = result
            finished[job.job_id] = self._deliver(job, attempt, result, batch_id)
        return finished

    def _retry(self, job: Job, attempt: int, result: Result, batch_id: str) -> bool:
        """A transient failure before the last attempt: submit this job alone again later."""
        with structlog.contextvars.bound_contextvars(
            job_id=job.job_id, batch_id=batch_id, attempt=attempt
        ):
            try:
                delay = self.deliverer.schedule_resubmit(
                    job, attempt, result.error.message if result.error else ""
                )
            except Exception:
                log.exception("job.failed")
                return False
            log.warning(
                "job.retry_scheduled",
                code=result.error.code if result.error else None,
                delay_s=round(delay, 2),
            )
            return True

    def _deliver(self, job: Job, attempt: int, result: Result, batch_id: str) -> bool:
        """Count, log and hand a stored result to the job's sinks."""
        self._count(result)
        log.info(
            "job.scored",
            job_id=job.job_id,
            batch_id=batch_id,
            attempt=attempt,
            status=result.status,
            code=result.error.code if result.error else None,
            flags=[f"{f.policy}/{f.category}" for f in result.flags],
        )
        if not self.deliverer.sink_configs(job):
            return True  # no sink and no default sink: the stored result is the answer
        with structlog.contextvars.bound_contextvars(
            job_id=job.job_id, batch_id=batch_id, attempt=attempt
        ):
            try:
                self.deliverer.deliver_all(job, result)
            except Exception:
                log.exception("job.failed")
                return False
        return True
