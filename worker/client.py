"""Client API for upload services: enqueue jobs and wait for their results.

    from worker.client import submit, wait

    job_id = submit({"image": {"uri": "s3://uploads/cat.jpg"}, "policies": ["moderation"]})
    result = wait(job_id, timeout=30)          # a worker.documents.Result
    if result.flags: ...

    ids = submit_many(jobs, per_message=32)    # many jobs per queue message (GPU workers)

The module-level functions use a :class:`Client` built from the ``WORKER_*`` settings
on first use; make your own ``Client(settings)`` to choose explicitly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from worker.documents import Job, Result
from worker.errors import JobTimeoutError
from worker.plugins import validate_sink_config
from worker.queue.app import create_app, send_job, send_jobs
from worker.queue.jobs import JobStore
from worker.settings import Settings, load_settings


class Client:
    """Submits jobs to the queue and reads results from Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.jobs = JobStore.from_settings(settings)

    def submit(self, job: Job | dict[str, Any]) -> str:
        """Validate ``job`` and enqueue it; returns its ``job_id``.

        Raises pydantic's ValidationError for a malformed job and PluginError for a sink
        type that is not installed or has bad options.
        """
        parsed = self._checked(job)
        send_job(self.app, parsed.model_dump(mode="json"))
        return parsed.job_id

    def submit_many(self, jobs: Iterable[Job | dict[str, Any]], per_message: int = 32) -> list[str]:
        """Validate every job, then enqueue them packed ``per_message`` to a queue message
        (task ``moderation.score_jobs``); returns the job ids in order.

        Each job keeps its own id, result, attempts and dead-letter entry. A message also
        stays within ``WORKER_QUEUE__MAX_MESSAGE_BYTES``; a job too large for that goes
        alone as a plain message, and ``per_message=1`` sends only plain messages (what
        :meth:`submit` does). Nothing is sent unless every job validates. Raises
        ValueError for two jobs with one job id (the second would only be answered with
        the first one's result) or ``per_message`` outside 1 to
        ``WORKER_QUEUE__MAX_JOBS_PER_MESSAGE``, pydantic's ValidationError and PluginError
        as :meth:`submit` does.
        """
        limit = self.settings.queue.max_jobs_per_message
        if not 1 <= per_message <= limit:
            raise ValueError(
                f"per_message must be 1 to {limit} (WORKER_QUEUE__MAX_JOBS_PER_MESSAGE), "
                f"not {per_message}"
            )
        parsed = [self._checked(job) for job in jobs]
        seen: set[str] = set()
        for job in parsed:
            if job.job_id in seen:
                raise ValueError(f"job id {job.job_id!r} is given twice")
            seen.add(job.job_id)
        documents = [job.model_dump(mode="json") for job in parsed]
        for pack in self._packs(documents, per_message):
            send_jobs(self.app, pack)
        return [job.job_id for job in parsed]

    def _packs(
        self, documents: list[dict[str, Any]], per_message: int
    ) -> Iterable[list[dict[str, Any]]]:
        """Consecutive runs of at most ``per_message`` jobs whose message body stays under
        the packed-message cap (a job too large for it is a run of its own)."""
        budget = self.settings.queue.max_message_bytes - ENVELOPE_BYTES
        pack: list[dict[str, Any]] = []
        size = 0
        for document in documents:
            length = len(json.dumps(document)) + 2 if per_message > 1 else 0
            if pack and (len(pack) == per_message or size + length > budget):
                yield pack
                pack, size = [], 0
            pack.append(document)
            size += length
        if pack:
            yield pack

    @staticmethod
    def _checked(job: Job | dict[str, Any]) -> Job:
        parsed = job if isinstance(job, Job) else Job.model_validate(job)
        for sink in parsed.sinks:
            validate_sink_config({"type": sink.type, **sink.options()})
        return parsed

    def result(self, job_id: str) -> Result | None:
        """The stored result of ``job_id``, or None if it has not finished (or expired)."""
        raw = self.jobs.get_result(job_id)
        return Result.model_validate_json(raw) if raw is not None else None

    def wait(self, job_id: str, timeout: float = 60.0, poll_s: float = 0.05) -> Result:
        """Block until ``job_id`` has a result; JobTimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        delay = poll_s
        while True:
            found = self.result(job_id)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise JobTimeoutError(f"no result for job {job_id} within {timeout:g} s")
            time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 1.5, 0.5)

    def queue_depth(self) -> int:
        return int(self.jobs.redis.llen(self.settings.queue.name))


#: Room left in a packed message's body for ``[[...], {}, {...}]`` around the jobs.
ENVELOPE_BYTES = 1024

_default: Client | None = None


def default_client() -> Client:
    global _default  # noqa: PLW0603 - lazily built module default
    if _default is None:
        _default = Client(load_settings())
    return _default


def submit(job: Job | dict[str, Any]) -> str:
    """Enqueue ``job`` with the default client; returns its ``job_id``."""
    return default_client().submit(job)


def submit_many(jobs: Iterable[Job | dict[str, Any]], per_message: int = 32) -> list[str]:
    """Enqueue ``jobs`` packed ``per_message`` to a queue message with the default client;
    returns their job ids in order (see :meth:`Client.submit_many`)."""
    return default_client().submit_many(jobs, per_message)


def wait(job_id: str, timeout: float = 60.0) -> Result:
    """Wait for ``job_id``'s result with the default client."""
    return default_client().wait(job_id, timeout)
