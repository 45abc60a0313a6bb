"""Where messages enter a worker: nothing a sender puts on the queue can stop it.

Two layers see a message before the batch task does, and each answers a bad one with a
dead-letter entry (stage ``validate``, the raw body capped and redacted, the reason)
and removes it from the queue, instead of raising into Celery's consumer loop (which
ends the worker, and the message comes back to end the next one):

- :class:`GuardedRedisTransport` (kombu): an item on the Redis list that is not JSON, or
  JSON that is not a kombu envelope (``LPUSH moderation garbage``);
- :class:`GuardedConsumer` (Celery): an envelope whose headers or body are not a
  ``moderation.score`` call with one job object, a ``moderation.score_jobs`` call with
  a list of 1 to ``WORKER_QUEUE__MAX_JOBS_PER_MESSAGE`` items, or a
  ``moderation.rescore_shard`` call with one valid shard document (wrong task name,
  ``null`` / ``123`` / ``[1]`` bodies, wrong arity, empty or overlong lists, other content
  types, bodies nested or sized past the limits, a shard document that does not validate
  or names a sink or ``out`` file a job could not). Anything the task handler still raises
  is caught here too. The items of a packed list are judged one by one by the batch: one
  that is not a valid job is dead-lettered alone.

The checks themselves are :func:`vet_message` (:func:`job_of_message`,
:func:`jobs_of_message`), pure functions. The body they decode is handed to Celery
(:func:`keep_decoded`), so it is decoded once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Empty
from typing import Any

from celery.worker.consumer import Consumer
from kombu.transport.redis import Channel, Transport
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str

from worker.documents import json_depth
from worker.errors import MessageRefusedError
from worker.log import get_logger
from worker.queue.dead_letters import DeadLetter, DeadLetters, refused_id
from worker.queue.rescore_shards import (
    DELIVERY_TAG_HEADER,
    MAX_SHARD_MESSAGE_BYTES,
    ShardSpec,
    shard_problem,
)

log = get_logger(__name__)
#: Deepest JSON nesting accepted in a message body (the job's metadata is limited further).
MAX_DEPTH = 48
_UNSUPPORTED_HEADERS = ("eta", "expires", "countdown")
_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _call_of_message(
    headers: Any, content_type: Any, body: Any, *, task_name: str, max_bytes: int
) -> list[Any]:
    """The decoded body ``[args, kwargs, embed]`` of a Celery protocol-2 call of
    ``task_name``; MessageRefusedError when the message is not one."""
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
    decoded = decode_body(body)
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
    return decoded


def decode_body(body: Any) -> Any:
    """A message body decoded the way Celery decodes it (kombu's JSON); MessageRefusedError
    when it is not JSON or nested past what the decoder can hold."""
    try:
        return kombu_json.loads(body)
    except RecursionError:
        raise MessageRefusedError(f"body is nested deeper than {MAX_DEPTH} levels") from None
    except (TypeError, ValueError) as exc:
        raise MessageRefusedError(f"body is not JSON: {str(exc)[:200]}") from None


def _one_argument(
    args: list[Any], kwargs: dict[str, Any], task_name: str, name: str, what: str
) -> Any:
    if len(args) + len(kwargs) != 1 or (kwargs and name not in kwargs):
        raise MessageRefusedError(
            f"{task_name} takes exactly one argument, {what} (got {len(args)} positional, "
            f"keywords {sorted(kwargs)[:5]})"
        )
    return args[0] if args else kwargs[name]


def job_of_message(
    headers: Any, content_type: Any, body: Any, *, task_name: str, max_bytes: int
) -> dict[str, Any]:
    """The job object a Celery protocol-2 message carries; MessageRefusedError otherwise."""
    decoded = _call_of_message(
        headers, content_type, body, task_name=task_name, max_bytes=max_bytes
    )
    return _job_of(decoded, task_name)


def _job_of(decoded: list[Any], task_name: str) -> dict[str, Any]:
    job = _one_argument(decoded[0], decoded[1], task_name, "job", "the job")
    if not isinstance(job, dict):
        raise MessageRefusedError(f"the job must be a JSON object, got {_kind(job)}")
    return job


def jobs_of_message(
    headers: Any, content_type: Any, body: Any, *, task_name: str, max_bytes: int, max_jobs: int
) -> list[Any]:
    """The list of jobs a packed message (``moderation.score_jobs``) carries.

    The message as a whole is refused (MessageRefusedError) when it is not such a call, or
    its list is empty or longer than ``max_jobs``. Its items are not judged here: an item
    that is not a valid job is dead-lettered on its own by the batch, and the other jobs of
    the message are scored."""
    decoded = _call_of_message(
        headers, content_type, body, task_name=task_name, max_bytes=max_bytes
    )
    return _jobs_of(decoded, task_name, max_jobs)


def _jobs_of(decoded: list[Any], task_name: str, max_jobs: int) -> list[Any]:
    jobs = _one_argument(decoded[0], decoded[1], task_name, "jobs", "the list of jobs")
    if not isinstance(jobs, list):
        raise MessageRefusedError(f"the jobs must be a JSON list, got {_kind(jobs)}")
    if not jobs:
        raise MessageRefusedError("the list of jobs is empty")
    if len(jobs) > max_jobs:
        raise MessageRefusedError(
            f"{len(jobs)} jobs in one message, over the limit of {max_jobs} "
            "(WORKER_QUEUE__MAX_JOBS_PER_MESSAGE)"
        )
    return jobs


def _shard_of(decoded: list[Any], task_name: str) -> ShardSpec:
    from pydantic import ValidationError

    shard = _one_argument(decoded[0], decoded[1], task_name, "shard", "the shard document")
    if not isinstance(shard, dict):
        raise MessageRefusedError(f"the shard must be a JSON object, got {_kind(shard)}")
    try:
        return ShardSpec.model_validate(shard)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'shard'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise MessageRefusedError(f"invalid shard: {problems}") from None


@dataclass(frozen=True)
class Limits:
    """What a worker takes: the one-job task, the packed task, the shard task (none when
    empty), their caps."""

    score_task: str
    packed_task: str
    max_bytes: int  # a one-job message: one inline image and the job around it
    packed_max_bytes: int
    max_jobs: int
    rescore_task: str = ""
    rescore_max_bytes: int = MAX_SHARD_MESSAGE_BYTES

    @classmethod
    def from_settings(
        cls, settings: Any, score_task: str, packed_task: str, rescore_task: str = ""
    ) -> Limits:
        return cls(
            score_task,
            packed_task,
            settings.image.max_bytes * 4 // 3 + 256 * 1024,
            settings.queue.max_message_bytes,
            settings.queue.max_jobs_per_message,
            rescore_task,
        )

    def tasks(self) -> str:
        """The task names taken, for messages: ``a, b and c``."""
        names = [n for n in (self.score_task, self.packed_task, self.rescore_task) if n]
        return ", ".join(names[:-1]) + f" and {names[-1]}"


def vet_message(
    headers: Any, content_type: Any, body: Any, limits: Limits
) -> tuple[list[Any], list[Any]]:
    """The jobs a message carries (one for ``score_task``, a list for ``packed_task``; for
    ``rescore_task``, its validated :class:`ShardSpec`) and its decoded body;
    MessageRefusedError when the message is not one of those calls."""
    task = headers.get("task") if isinstance(headers, Mapping) else None
    if limits.rescore_task and task == limits.rescore_task:
        decoded = _call_of_message(
            headers,
            content_type,
            body,
            task_name=limits.rescore_task,
            max_bytes=limits.rescore_max_bytes,
        )
        return [_shard_of(decoded, limits.rescore_task)], decoded
    if task == limits.packed_task:
        decoded = _call_of_message(
            headers,
            content_type,
            body,
            task_name=limits.packed_task,
            max_bytes=limits.packed_max_bytes,
        )
        return _jobs_of(decoded, limits.packed_task, limits.max_jobs), decoded
    if isinstance(headers, Mapping) and "task" in headers and task != limits.score_task:
        raise MessageRefusedError(
            f"unknown task {str(task)[:100]!r} (this worker runs {limits.tasks()})"
        )
    decoded = _call_of_message(
        headers, content_type, body, task_name=limits.score_task, max_bytes=limits.max_bytes
    )
    return [_job_of(decoded, limits.score_task)], decoded


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
    """Celery's consumer, with every task message vetted by :func:`vet_message`."""

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
        from worker.queue.app import SCORE_JOBS_TASK, SCORE_TASK
        from worker.queue.rescore_shards import RESCORE_TASK

        settings = self.app.conf.moderation_settings
        limits = Limits.from_settings(settings, SCORE_TASK, SCORE_JOBS_TASK, RESCORE_TASK)

        def on_task_received(message: Any) -> Any:
            headers = getattr(message, "headers", None)
            try:
                found, decoded = vet_message(
                    headers,
                    getattr(message, "content_type", None),
                    getattr(message, "body", None),
                    limits,
                )
                if isinstance(headers, dict) and headers.get("task") == RESCORE_TASK:
                    problem = shard_problem(found[0], settings)
                    if problem is not None:
                        raise MessageRefusedError(f"shard refused: {problem}")
                    # The heartbeat keeps this message invisible by its tag, whatever a
                    # sender put in the header.
                    headers[DELIVERY_TAG_HEADER] = getattr(message, "delivery_tag", None)
            except MessageRefusedError as exc:
                return self._refuse(message, str(exc))
            keep_decoded(message, decoded)
            try:
                return handle(message)
            except Exception as exc:
                log.exception("message.crashed")
                return self._refuse(message, f"the worker could not take it: {exc!r}"[:500])

        return on_task_received


def keep_decoded(message: Any, decoded: Any) -> None:
    """Hand the body the intake decoded to Celery (kombu's ``Message.payload`` reads this
    cache), so a message body is decoded once, not twice. Same decoder, same result."""
    try:
        if message._decoded_cache is None:
            message._decoded_cache = decoded
    except AttributeError:  # not a kombu Message: Celery decodes it itself
        pass


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
    """kombu's Redis channel; an undecodable list item is dead-lettered, not raised.

    It also reuses one synchronous Redis client: kombu builds a new ``redis.Redis`` (about
    80 µs, mostly its response-callback table) for every ack, every delivery's unacked
    entry and every event it publishes, several per message. A client on a connection
    pool is thread-safe and holds no state of its own, so one per channel (and pool)
    serves them all."""

    _mw_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        cached = self._mw_client
        if cached is None or cached.connection_pool is not self.pool:  # a new pool: reconnected
            cached = self._mw_client = self._create_client()
        yield cached

    def _decode_item(self, item: bytes, client: Any = None) -> dict[str, Any] | None:
        """The envelope in ``item``, or None after dead-lettering it (with ``client``, or a
        Redis client made for it: kombu builds a new one per call, so not for every item)."""
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
        with self.conn_or_acquire(client) as redis_client:
            quarantine(DeadLetters(redis_client), None, item, problem)
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
            message = self._decode_item(item)
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
