"""Where messages enter a worker: nothing a sender puts on the queue can stop it.

Two layers see a message before the batch task does, and each answers a bad one with a
dead-letter entry (stage ``validate``, the raw body capped and redacted, the reason)
and removes it from the queue, instead of raising into Celery's consumer loop (which
ends the worker, and the message comes back to end the next one):

- :class:`GuardedRedisTransport` (kombu): an item on the Redis list that is not JSON, or
  JSON that is not a kombu envelope (``LPUSH moderation garbage``);
- :class:`GuardedConsumer` (Celery): an envelope whose headers or body are not a
  ``moderation.score`` call with one job object (wrong task name, ``null`` / ``123`` /
  ``[1]`` bodies, wrong arity, other content types, bodies nested or sized past the
  limits). Anything the task handler still raises is caught here too.

The checks themselves are :func:`job_of_message`, a pure function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from queue import Empty
from typing import Any

from celery.worker.consumer import Consumer
from kombu.transport.redis import Channel, Transport
from kombu.utils.encoding import bytes_to_str

from worker.documents import json_depth
from worker.errors import MessageRefusedError
from worker.log import get_logger
from worker.queue.dead_letters import DeadLetter, DeadLetters, refused_id

log = get_logger(__name__)
#: Deepest JSON nesting accepted in a message body (the job's metadata is limited further).
MAX_DEPTH = 48
_UNSUPPORTED_HEADERS = ("eta", "expires", "countdown")
_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def job_of_message(
    headers: Any, content_type: Any, body: Any, *, task_name: str, max_bytes: int
) -> dict[str, Any]:
    """The job object a Celery protocol-2 message carries; MessageRefusedError otherwise."""
    if not isinstance(headers, Mapping) or "task" not in headers:
        raise MessageRefusedError("no task header: not a Celery protocol 2 task message")
    task = headers.get("task")
    if task != task_name:
        raise MessageRefusedError(
            f"unknown task {str(task)[:100]!r} (this worker runs {task_name})"
        )
    if content_type != "application/json":
        raise MessageRefusedError(
            f"content type {str(content_type)[:60]!r} refused: only application/json is accepted"
        )
    for name in _UNSUPPORTED_HEADERS:
        if headers.get(name) is not None:
            raise MessageRefusedError(f"header {name!r} is not supported (jobs run when received)")
    size = len(body) if isinstance(body, bytes | str) else 0
    if size > max_bytes:
        raise MessageRefusedError(f"body is {size} bytes, over the {max_bytes}-byte message cap")
    try:
        decoded = json.loads(body)
    except RecursionError:
        raise MessageRefusedError(f"body is nested deeper than {MAX_DEPTH} levels") from None
    except (TypeError, ValueError) as exc:
        raise MessageRefusedError(f"body is not JSON: {str(exc)[:200]}") from None
    if json_depth(decoded) > MAX_DEPTH:
        raise MessageRefusedError(f"body is nested deeper than {MAX_DEPTH} levels")
    if not (isinstance(decoded, list) and len(decoded) == 3):
        raise MessageRefusedError(
            f"body must be [args, kwargs, embed] (Celery protocol 2), got {_kind(decoded)}"
            + (f" of length {len(decoded)}" if isinstance(decoded, list) else "")
        )
    args, kwargs, embed = decoded
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise MessageRefusedError(
            f"args must be a list and kwargs an object, got {_kind(args)} and {_kind(kwargs)}"
        )
    if embed is not None and not isinstance(embed, dict):
        raise MessageRefusedError(f"embed must be an object, got {_kind(embed)}")
    if any((embed or {}).get(key) for key in _EMBED_KEYS):
        raise MessageRefusedError("callbacks, errbacks, chains and chords are not supported")
    if len(args) + len(kwargs) != 1 or (kwargs and "job" not in kwargs):
        raise MessageRefusedError(
            f"{task_name} takes exactly one argument, the job (got {len(args)} positional, "
            f"keywords {sorted(kwargs)[:5]})"
        )
    job = args[0] if args else kwargs["job"]
    if not isinstance(job, dict):
        raise MessageRefusedError(f"the job must be a JSON object, got {_kind(job)}")
    return job


def quarantine(letters: DeadLetters, message_id: Any, raw: Any, reason: str) -> DeadLetter:
    """Dead-letter a refused message with its (capped, redacted) raw body."""
    if isinstance(raw, bytes):
        text = raw[: 64 * 1024].decode("utf-8", "replace")
    else:
        text = raw if isinstance(raw, str) else repr(raw)
    entry = letters.add(DeadLetter.of(refused_id(message_id), {}, 0, reason, "validate", raw=text))
    log.error("message.refused", job_id=entry.job_id, reason=reason[:300])
    return entry


# ---------------------------------------------------------------------------- Celery side


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, with every task message vetted by :func:`job_of_message`."""

    def _refuse(self, message: Any, reason: str) -> None:
        try:
            quarantine(self._dead_letters(), message.headers.get("id"), message.body, reason)
        except Exception:  # Redis down: the message stays unacknowledged and comes back
            log.exception("message.quarantine_failed")
            return
        try:
            message.ack()
        except Exception:
            log.exception("message.ack_failed")

    def _dead_letters(self) -> DeadLetters:
        from worker.queue.service import current_service

        service = current_service()
        if service is not None:
            return service.dead_letters
        letters: DeadLetters | None = getattr(self, "_mw_dead_letters", None)
        if letters is None:
            letters = DeadLetters.from_settings(self.app.conf.moderation_settings)
            self._mw_dead_letters = letters
        return letters

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        settings = self.app.conf.moderation_settings
        from worker.queue.app import SCORE_TASK

        max_bytes = settings.image.max_bytes * 4 // 3 + 256 * 1024  # inline base64 + job

        def on_task_received(message: Any) -> Any:
            try:
                job_of_message(
                    getattr(message, "headers", None),
                    getattr(message, "content_type", None),
                    getattr(message, "body", None),
                    task_name=SCORE_TASK,
                    max_bytes=max_bytes,
                )
            except MessageRefusedError as exc:
                return self._refuse(message, str(exc))
            try:
                return handle(message)
            except Exception as exc:
                log.exception("message.crashed")
                return self._refuse(message, f"the worker could not take it: {exc!r}"[:500])

        return on_task_received


# ---------------------------------------------------------------------------- kombu side

_ENVELOPE_TYPES = {"body": (str, type(None)), "headers": (dict, type(None))}


def envelope_problem(item: Any) -> str | None:
    """Why a decoded Redis list item is not a kombu message envelope, or None."""
    if not isinstance(item, dict):
        return f"not a kombu message envelope (a JSON {_kind(item)})"
    properties = item.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        return "kombu envelope without properties.delivery_tag"
    if properties.get("body_encoding") not in (None, "base64"):
        return f"unknown body encoding {str(properties.get('body_encoding'))[:40]!r}"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "kombu envelope with a malformed delivery_info"
    for key, types in _ENVELOPE_TYPES.items():
        if not isinstance(item.get(key), types):
            return f"kombu envelope whose {key} is a {_kind(item.get(key))}"
    return None


class GuardedChannel(Channel):
    """kombu's Redis channel; an undecodable list item is dead-lettered, not raised."""

    def _decode_item(self, item: bytes, client: Any) -> dict[str, Any] | None:
        """The envelope in ``item``, or None after dead-lettering it."""
        try:
            message = json.loads(bytes_to_str(item))
        except (ValueError, RecursionError, UnicodeDecodeError) as exc:
            problem: str | None = f"queue item is not JSON: {str(exc)[:200]}"
        else:
            problem = envelope_problem(message)
            if problem is None and message.get("body"):
                try:
                    self.decode_body(message["body"], message["properties"].get("body_encoding"))
                except Exception as exc:
                    problem = f"message body is not valid base64: {str(exc)[:200]}"
        if problem is None:
            return dict(message)
        quarantine(DeadLetters(client), None, item, problem)
        return None

    # The two methods below are kombu 5.x's own (kombu/transport/redis.py), with its
    # ``loads(bytes_to_str(item))`` replaced by :meth:`_decode_item`.
    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            with self.conn_or_acquire() as client:
                message = self._decode_item(item, client)
            if message is not None:
                self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    message = self._decode_item(item, client)
                    if message is None:
                        raise Empty()
                    return message
            self._maybe_update_queues_expire(client, queue)
            raise Empty()


class GuardedRedisTransport(Transport):
    """The ``redis://`` transport with :class:`GuardedChannel`."""

    Channel = GuardedChannel
