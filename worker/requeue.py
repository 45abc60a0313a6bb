"""Taking jobs out of the dead-letter store and trying them again.

An entry is checked and its retry is scheduled *before* it is removed, and it is removed
only if nobody wrote to it meanwhile: an entry that cannot be retried stays, with the
reason, and nothing is lost between reading and deleting.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from worker.documents import Job
from worker.errors import ConfigurationError, WorkerError
from worker.store import DeadLetter, Delivery, Store, new_delivery_id

if TYPE_CHECKING:
    from worker.client import Client


class RequeueRefusedError(WorkerError):
    """A dead-letter entry that cannot be retried as it is; the entry is kept."""


def _original(entry: DeadLetter, store: Store) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The job and sink as they were sent, opening the sealed copy when secrets were
    taken out."""
    if not entry.redacted:
        return entry.job, entry.sink
    if entry.sealed is None:
        raise RequeueRefusedError(
            "its secrets (a sink secret or a signed URL) were redacted because "
            "WORKER_SECRET_KEY was not set when it failed; submit the job again from its source"
        )
    if store.sealer is None or not store.sealer.enabled:
        raise RequeueRefusedError("it is sealed: set WORKER_SECRET_KEY to requeue it")
    try:
        opened = store.sealer.open(entry.sealed)
    except ConfigurationError as exc:
        raise RequeueRefusedError(str(exc)) from None
    return opened["job"], opened.get("sink")


def requeue(store: Store, client: Client, job_id: str) -> str | None:
    """Retry one dead-lettered job; returns what was done, or None if it was not there.

    Raises RequeueRefusedError (the entry stays) when it cannot be retried.
    """
    found = store.get_dead_letter(job_id)
    if found is None:
        return None
    entry, stored_json = found
    if entry.stage == "validate" and entry.raw is not None:
        raise RequeueRefusedError(
            f"the message was refused before it was a job ({entry.error}); fix the sender "
            f"and submit again, or remove it with `worker dlq purge {job_id}`"
        )
    job_doc, sink = _original(entry, store)
    try:
        job = Job.model_validate(job_doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise RequeueRefusedError(f"it is not a valid job: {problems}") from None
    result = store.get_result(job_id)
    if entry.stage == "deliver" and sink is not None and result is not None:
        delivery = Delivery(new_delivery_id(), job.model_dump(mode="json"), sink, 1, result)
        store.schedule_delivery(delivery, time.time())
        how = f"delivery to {sink.get('type')} scheduled"
    else:
        store.reset_attempts(job_id)
        client.submit(job)
        how = "submitted again"
    if not store.remove_dead_letter(job_id, expected=stored_json):
        how += " (the entry changed meanwhile and was kept)"
    return how
