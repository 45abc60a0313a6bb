"""Celery task events per *job*, so `celery events`, Flower and other monitors see each job.

celery-batches runs one batch task per batch and sends no task events, so a monitor saw
nothing. This module sends the events Celery's worker sends for a task
(``celery/worker/strategy.py``, ``celery/worker/request.py``), once per job, with the job id
as the event's ``uuid`` (a packed message reports each of its jobs):

- ``task-received`` when the message reaches the consumer: ``name``, ``args`` (the job,
  redacted and cut short), ``kwargs``, ``retries``, ``message_id``;
- ``task-started`` when the batch that holds the job starts;
- ``task-succeeded`` once its result is stored with status ``ok``: ``result`` (status,
  decision, flags), ``runtime`` (seconds, the batch's);
- ``task-failed`` for a result with status ``error``, a dead letter, or a message refused
  at intake: ``exception`` (``code: message``), ``runtime``, ``dead_letter`` (its key);
- ``task-retried`` when it finished for now without a result and is back on the queue (a
  transient source failure, the unfinished part of a packed message);
- ``task-rejected`` (``requeue: true``) when its message goes back to the queue whole.

A job that is not valid (no usable ``job_id``) is reported under the key its dead letter
gets: its message id, with its index for a packed message.

Events are sent only when the worker sends task events (``-E``,
``worker_send_task_events``; `worker serve` does unless ``WORKER_TASK_EVENTS=false``),
through the consumer's own event dispatcher where the batch runs in the consumer's thread
(solo pool), or else (a prefork child, a threads-pool thread) a dispatcher of this
module's own (as ``Task.send_event`` does). Sending an event never fails a job.
Celery's per-*message* events of the batch tasks (``task-rejected`` under a message id)
are turned off: a message is not a job.

:class:`TaskEventsConsumer` is the worker's consumer (``worker_consumer``): the guarded
consumer of ``worker/queue/intake.py`` that also reports the messages it refuses.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from celery import signals
from celery_batches import Batches

from worker.documents import JOB_ID
from worker.log import get_logger
from worker.queue.dead_letters import KEY as DEAD_LETTERS_KEY
from worker.queue.dead_letters import refused_id
from worker.queue.intake import GuardedConsumer
from worker.queue.jobs import PREFIX
from worker.redact import redact_text, redact_uri

log = get_logger(__name__)
#: Longest ``args`` / ``result`` / ``exception`` text in an event.
FIELD_CHARS = 500
#: A refused message body larger than this is not read for job ids (its message id is used).
PEEK_BYTES = 1024 * 1024
#: A dead letter written this long before its batch started is an older failure.
CLOCK_SLACK_S = 1.0


@dataclass(frozen=True)
class JobRef:
    """One job of a message: the id it is reported under and its payload."""

    uuid: str
    payload: Any
    valid_id: bool  # uuid is the job's own job_id (else the dead-letter key of the job)


def jobs_of_call(message_id: Any, args: Any, kwargs: Any) -> list[JobRef]:
    """The jobs a ``moderation.score`` (one job) or ``moderation.score_jobs`` (a list of
    jobs) call carries, each with the id its events carry."""
    if isinstance(args, list | tuple) and args:
        value = args[0]
    elif isinstance(kwargs, dict):
        value = kwargs.get("jobs", kwargs.get("job"))
    else:
        value = None
    packed = isinstance(value, list)
    payloads: list[Any] = list(value) if packed else [value]
    refs: list[JobRef] = []
    for index, payload in enumerate(payloads):
        hint = payload.get("job_id") if isinstance(payload, dict) else None
        if isinstance(hint, str) and JOB_ID.fullmatch(hint):
            refs.append(JobRef(hint, payload, True))
        else:  # the processor's key for a job that is not valid (Message.job_keys)
            key = f"{message_id}.{index}" if packed else str(message_id)
            refs.append(JobRef(key, payload, False))
    return refs


def _cut(text: str, limit: int = FIELD_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def job_summary(job: Any) -> str:
    """What the event's ``args`` shows of a job: never inline image bytes or a secret."""
    if not isinstance(job, dict):
        return _cut(repr(job)[:FIELD_CHARS])
    shown: dict[str, Any] = {"job_id": job.get("job_id")}
    image = job.get("image")
    if isinstance(image, dict) and isinstance(image.get("uri"), str):
        shown["image"] = redact_uri(image["uri"][:FIELD_CHARS])
    elif isinstance(image, dict) and isinstance(image.get("data"), str):
        shown["image"] = f"<{len(image['data'])} base64 characters>"
    if isinstance(job.get("policies"), list):
        shown["policies"] = job["policies"][:20]
    if isinstance(job.get("sinks"), list):
        shown["sinks"] = [s.get("type") for s in job["sinks"][:20] if isinstance(s, dict)]
    return _cut(redact_text(repr([shown])))


def result_summary(result: dict[str, Any]) -> str:
    """The ``result`` of a ``task-succeeded`` event: status, decision and flags."""
    shown: dict[str, Any] = {"status": result.get("status")}
    decision = result.get("decision")
    if isinstance(decision, dict):
        shown["decision"] = decision.get("action")
    flags = result.get("flags")
    if isinstance(flags, list):
        shown["flags"] = [
            f"{f.get('policy')}/{f.get('category')}" for f in flags if isinstance(f, dict)
        ]
    return _cut(repr(shown))


def failure_text(result: dict[str, Any]) -> str:
    error = result.get("error")
    if not isinstance(error, dict):
        error = {}
    return _cut(f"{error.get('code', 'error')}: {error.get('message', '')}")


# ------------------------------------------------------------------ where events are sent


class _Senders:
    """The consumer of this worker (its dispatcher is the one to use in its own process)
    and, in a prefork child, a dispatcher of the child's own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()  # one batch at a time on the own dispatcher
        self.consumer: Any = None
        self.consumer_pid = 0
        self.consumer_thread = 0
        self.task_events = False  # what the worker was started with (-E)
        self.own: Any = None
        self.own_pid = 0
        self.failed = False  # a send failed: logged once

    def remember(self, consumer: Any, task_events: bool | None = None) -> None:
        self.consumer, self.consumer_pid = consumer, os.getpid()
        self.consumer_thread = threading.get_ident()
        if task_events is not None:
            self.task_events = task_events

    def dispatcher(self, app: Any, hostname: str | None) -> Any:
        """The dispatcher to send with in this thread, or None (events off). The consumer's
        buffers events for its event loop, so only its own thread may use it."""
        here = (os.getpid(), threading.get_ident())
        if self.consumer is not None and (self.consumer_pid, self.consumer_thread) == here:
            return getattr(self.consumer, "event_dispatcher", None)
        if not self.task_events:
            return None
        with self.lock:
            if self.own is None or self.own_pid != os.getpid():  # a prefork child, a pool thread
                self.own = app.events.Dispatcher(
                    app.connection_for_write(),
                    hostname=hostname,
                    enabled=True,
                    buffer_group=["task"],  # sent as one message per flush
                    buffer_limit=256,
                )
                self.own_pid = os.getpid()
            return self.own


_senders = _Senders()


def _send(dispatcher: Any, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Send ``events`` (type, fields); a broken connection is logged once, never raised."""
    if dispatcher is None or not events:
        return
    try:
        if dispatcher is _senders.own:
            with _senders.send_lock:
                for kind, fields in events:
                    dispatcher.send(kind, **fields)
                dispatcher.flush()
        else:
            for kind, fields in events:
                dispatcher.send(kind, **fields)
    except Exception as exc:
        if not _senders.failed:
            _senders.failed = True
            log.warning("task_event.failed", error=_cut(str(exc), 300))


def _ours(task: Any) -> bool:
    app = getattr(task, "app", None)
    return isinstance(task, Batches) and app is not None and "moderation_settings" in app.conf


# ------------------------------------------------------------------ received (the consumer)


@signals.task_received.connect  # type: ignore[untyped-decorator]
def _on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is None or not _ours(getattr(request, "task", None)):
        return
    if sender is not None and _senders.consumer is None:
        _senders.remember(sender)
    try:
        refs = jobs_of_call(request.id, request.args, request.kwargs)
        retries = (getattr(request, "request_dict", None) or {}).get("retries", 0)
    except Exception:  # a body the intake let through but Celery cannot show
        return
    dispatcher = getattr(sender, "event_dispatcher", None)
    _send(
        dispatcher,
        [
            (
                "task-received",
                {
                    "uuid": ref.uuid,
                    "name": request.name,
                    "args": job_summary(ref.payload),
                    "kwargs": "{}",
                    "retries": retries,
                    "message_id": request.id,
                    "root_id": ref.uuid,
                    "parent_id": None,
                },
            )
            for ref in refs
        ],
    )


# ------------------------------------------------------------------ started / finished (the batch)


class _Batches:
    """When each running batch started (a threads pool runs several at once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: dict[str, tuple[float, float]] = {}  # task id -> (monotonic, wall)

    def start(self, task_id: str) -> None:
        with self.lock:
            self.started[task_id] = (time.monotonic(), time.time())

    def finish(self, task_id: str) -> tuple[float, float]:
        with self.lock:
            return self.started.pop(task_id, (time.monotonic(), time.time()))


_batches = _Batches()


def _requests_of(args: Any) -> list[Any]:
    if isinstance(args, list | tuple) and args and isinstance(args[0], list | tuple):
        return list(args[0])
    return []


def _refs_of(requests: Sequence[Any]) -> Iterator[tuple[int, Any, JobRef]]:
    for index, request in enumerate(requests):
        try:
            refs = jobs_of_call(request.id, request.args, request.kwargs)
        except Exception:
            continue
        for ref in refs:
            yield index, request, ref


@signals.task_prerun.connect  # type: ignore[untyped-decorator]
def _on_prerun(sender: Any = None, task_id: str | None = None, args: Any = None, **_: Any) -> None:
    if not _ours(sender) or task_id is None:
        return
    _batches.start(task_id)
    requests = _requests_of(args)
    if not requests:
        return
    dispatcher = _senders.dispatcher(sender.app, requests[0].hostname)
    _send(
        dispatcher,
        [("task-started", {"uuid": ref.uuid, "name": r.name}) for _, r, ref in _refs_of(requests)],
    )


@signals.task_postrun.connect  # type: ignore[untyped-decorator]
def _on_postrun(
    sender: Any = None,
    task_id: str | None = None,
    args: Any = None,
    retval: Any = None,
    **_: Any,
) -> None:
    if not _ours(sender) or task_id is None:
        return
    began, began_wall = _batches.finish(task_id)
    requests = _requests_of(args)
    if not requests:
        return
    dispatcher = _senders.dispatcher(sender.app, requests[0].hostname)
    if dispatcher is None:
        return
    runtime = time.monotonic() - began
    acks = retval if isinstance(retval, list) and len(retval) == len(requests) else None
    refs = list(_refs_of(requests))
    # The results the batch stored are handed over on the requests (score_batch); only
    # the rest (refused, dead-lettered, answered before) are read back from Redis.
    known: dict[str, Any] = {}
    for request in requests:
        known.update(getattr(request, "job_results", None) or {})
    unknown = [
        ref for index, _, ref in refs if acks is not None and acks[index] and ref.uuid not in known
    ]
    try:
        stored = _lookup(unknown)
    except Exception as exc:  # Redis down: the events could not be sent either
        log.warning("task_event.lookup_failed", error=_cut(str(exc), 300))
        return
    stored.update({f"result:{job_id}": result.summary() for job_id, result in known.items()})
    events = [
        _finished_event(ref, request, bool(acks and acks[index]), stored, runtime, began_wall)
        for index, request, ref in refs
    ]
    _send(dispatcher, events)


def _lookup(refs: Sequence[JobRef]) -> dict[str, Any]:
    """Stored results (by job id) and dead letters (by dead-letter key) of ``refs``."""
    from worker.queue.service import current_service

    service = current_service()
    if service is None or not refs:
        return {}
    keys = {ref.uuid: ref.uuid if ref.valid_id else refused_id(ref.uuid, "invalid") for ref in refs}
    pipe = service.jobs.redis.pipeline(transaction=False)
    valid = [ref.uuid for ref in refs if ref.valid_id]
    for job_id in valid:
        pipe.get(f"{PREFIX}result:{job_id}")
    pipe.hmget(DEAD_LETTERS_KEY, list(keys.values()))
    replies = pipe.execute()
    found: dict[str, Any] = {}
    for job_id, text in zip(valid, replies[: len(valid)], strict=True):
        if text:
            found[f"result:{job_id}"] = text
    for uuid, text in zip(keys, replies[-1], strict=True):
        if text:
            found[f"dlq:{uuid}"] = text
    return found


def _finished_event(
    ref: JobRef, request: Any, acked: bool, stored: dict[str, Any], runtime: float, began: float
) -> tuple[str, dict[str, Any]]:
    base: dict[str, Any] = {"uuid": ref.uuid, "name": request.name}
    if not acked:
        return "task-rejected", {**base, "requeue": True}
    timed = {**base, "runtime": runtime}
    found = stored.get(f"result:{ref.uuid}")  # a summary from the batch, or JSON from Redis
    if found is not None:
        result = found if isinstance(found, dict) else _json_object(found)
        if result.get("status") == "ok":
            return "task-succeeded", {**timed, "result": result_summary(result)}
        return "task-failed", {**timed, "exception": failure_text(result)}
    letter = _json_object(stored.get(f"dlq:{ref.uuid}") or "{}")
    if float(letter.get("failed_at") or 0) >= began - CLOCK_SLACK_S:
        error = f"dead-lettered ({letter.get('stage')}): {letter.get('error', '')}"
        key = ref.uuid if ref.valid_id else refused_id(ref.uuid, "invalid")
        return "task-failed", {**timed, "exception": _cut(error), "dead_letter": key}
    if not ref.valid_id:  # a job without a job_id: the worker gave it one
        return "task-succeeded", {**timed, "result": "finished (job id assigned by the worker)"}
    retry = "not finished in this batch: back on the queue to be taken again"
    return "task-retried", {**base, "exception": retry}


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------ the consumer


class TaskEventsConsumer(GuardedConsumer):
    """The guarded consumer, sending ``task-failed`` for each message it refuses, and the
    one that says whether this worker sends task events (prefork children ask it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        controller = getattr(self, "controller", None)
        _senders.remember(self, bool(getattr(controller, "task_events", False)))
        for task in self.app.tasks.values():
            if _ours(task):  # Celery's own events of a batch task are per message
                task.send_events = False

    def _refuse(self, message: Any, reason: str) -> Any:
        outcome = super()._refuse(message, reason)
        try:
            events = refused_events(message, reason)
        except Exception:
            return outcome
        _send(getattr(self, "event_dispatcher", None), events)
        return outcome


def refused_events(message: Any, reason: str) -> list[tuple[str, dict[str, Any]]]:
    """``task-failed`` for each job a refused message names (its job ids when the body can
    be read), else one under the message's dead-letter key."""
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    message_id = headers.get("id")
    letter = refused_id(message_id)
    task = headers.get("task")
    name = task[:100] if isinstance(task, str) else "unknown"
    exception = _cut(f"refused at intake: {redact_text(reason)}")
    job_ids: list[str] = []
    body = getattr(message, "body", None)
    if isinstance(body, bytes | str) and len(body) <= PEEK_BYTES:
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError, UnicodeDecodeError):
            decoded = None
        if isinstance(decoded, list) and len(decoded) == 3:
            refs = jobs_of_call(message_id, decoded[0], decoded[1])
            job_ids = [ref.uuid for ref in refs if ref.valid_id]
    fields = {"name": name, "exception": exception, "dead_letter": letter}
    return [("task-failed", {"uuid": uuid, **fields}) for uuid in job_ids or [letter]]
