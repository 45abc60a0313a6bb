"""Client API for upload services: enqueue jobs and wait for their results.

    from worker.client import submit, wait

    job_id = submit({"image": {"uri": "s3://uploads/cat.jpg"}, "policies": ["moderation"]})
    result = wait(job_id, timeout=30)          # a worker.documents.Result
    if result.flags: ...

The module-level functions use a :class:`Client` built from the ``WORKER_*`` settings
on first use; make your own ``Client(settings)`` to choose explicitly.
"""

from __future__ import annotations

import time
from typing import Any

from worker.documents import Job, Result
from worker.errors import JobTimeoutError
from worker.plugins import validate_sink_config
from worker.queue.app import create_app, send_job
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
        parsed = job if isinstance(job, Job) else Job.model_validate(job)
        for sink in parsed.sinks:
            validate_sink_config({"type": sink.type, **sink.options()})
        send_job(self.app, parsed.model_dump(mode="json"))
        return parsed.job_id

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


_default: Client | None = None


def default_client() -> Client:
    global _default  # noqa: PLW0603 - lazily built module default
    if _default is None:
        _default = Client(load_settings())
    return _default


def submit(job: Job | dict[str, Any]) -> str:
    """Enqueue ``job`` with the default client; returns its ``job_id``."""
    return default_client().submit(job)


def wait(job_id: str, timeout: float = 60.0) -> Result:
    """Wait for ``job_id``'s result with the default client."""
    return default_client().wait(job_id, timeout)
