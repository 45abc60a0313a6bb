"""Taking jobs out of the dead-letter store and trying them again."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from worker.documents import Job
from worker.store import Delivery, Store, new_delivery_id

if TYPE_CHECKING:
    from worker.client import Client


def requeue(store: Store, client: Client, job_id: str) -> str | None:
    """Retry one dead-lettered job; returns what was done, or None if it was not there."""
    entry = store.take_dead_letter(job_id)
    if entry is None:
        return None
    store.reset_attempts(job_id)
    stored = store.get_result(job_id)
    if entry.stage == "deliver" and entry.sink is not None and stored is not None:
        delivery = Delivery(new_delivery_id(), entry.job, entry.sink, 1, stored)
        store.schedule_delivery(delivery, time.time())
        return f"delivery to {entry.sink.get('type')} scheduled"
    client.submit(Job.model_validate(entry.job))
    return "submitted again"
