"""Queue messages an outsider could send: every shape a worker must answer without dying.

Each entry of :data:`HOSTILE` puts one message on the queue the way a careless client, a
client in another language or an attacker would: through kombu with any body, or straight
onto the Redis list. :func:`send_hostile` sends one by name.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import Any

import redis
from kombu.connection import Connection

SCORE_TASK = "moderation.score"
SCORE_JOBS_TASK = "moderation.score_jobs"  # a packed message: a list of jobs


def _headers(task: str = SCORE_TASK, **extra: Any) -> dict[str, Any]:
    task_id = str(uuid.uuid4())
    return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, **extra}


def _publish(url: str, queue: str, body: Any, *, serializer: str = "json", **headers: Any) -> None:
    with Connection(url) as conn:
        conn.Producer().publish(
            body,
            routing_key=queue,
            exchange="",
            serializer=serializer,
            headers=_headers(**headers),
        )


def _push_raw(url: str, queue: str, item: bytes) -> None:
    redis.Redis.from_url(url).lpush(queue, item)


def _envelope(body: bytes, headers: dict[str, Any], content_type: str) -> bytes:
    """A kombu envelope as kombu itself writes it to Redis."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": "moderation"},
                "priority": 0,
            },
        }
    ).encode()


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"x": value}
    return value


def _job(image: str, **extra: Any) -> dict[str, Any]:
    return {"image": {"uri": image}, **extra}


Sender = Callable[[str, str, str], None]  # (redis url, queue, a good image path)

HOSTILE: dict[str, Sender] = {
    "null-body": lambda u, q, i: _publish(u, q, None),
    "int-body": lambda u, q, i: _publish(u, q, 123),
    "object-body": lambda u, q, i: _publish(u, q, {"a": 1}),
    "short-list-body": lambda u, q, i: _publish(u, q, [1]),
    "string-body": lambda u, q, i: _publish(u, q, "score this"),
    "unknown-task": lambda u, q, i: _publish(u, q, [[_job(i)], {}, {}], task="other.task"),
    "no-task-header": lambda u, q, i: _push_raw(
        u, q, _envelope(b"[[], {}, {}]", {"id": str(uuid.uuid4())}, "application/json")
    ),
    "two-args": lambda u, q, i: _publish(u, q, [[_job(i), 2], {}, {}]),
    "no-args": lambda u, q, i: _publish(u, q, [[], {}, {}]),
    "wrong-kwarg": lambda u, q, i: _publish(u, q, [[], {"jobs": _job(i)}, {}]),
    "job-is-a-list": lambda u, q, i: _publish(u, q, [[[1, 2]], {}, {}]),
    "job-is-null": lambda u, q, i: _publish(u, q, [[None], {}, {}]),
    "callbacks": lambda u, q, i: _publish(u, q, [[_job(i)], {}, {"callbacks": [{"task": "x"}]}]),
    "eta-header": lambda u, q, i: _publish(
        u, q, [[_job(i)], {}, {}], eta="2999-01-01T00:00:00+00:00"
    ),
    "invalid-job": lambda u, q, i: _publish(u, q, [[{"image": {}}], {}, {}]),
    "extra-job-field": lambda u, q, i: _publish(u, q, [[_job(i, evil=True)], {}, {}]),
    "bad-job-id": lambda u, q, i: _publish(u, q, [[_job(i, job_id="../../etc/passwd")], {}, {}]),
    "metadata-20-deep": lambda u, q, i: _publish(u, q, [[_job(i, metadata=_nested(20))], {}, {}]),
    "metadata-600-deep": lambda u, q, i: _push_raw(
        u,
        q,
        _envelope(
            b'[[{"image": {"uri": "x"}, "metadata": '
            + b'{"x": ' * 600
            + b"1"
            + b"}" * 601
            + b"], {}, {}]",
            _headers(),
            "application/json",
        ),
    ),
    "body-5000-deep": lambda u, q, i: _push_raw(
        u, q, _envelope(b"[" * 5000 + b"]" * 5000, _headers(), "application/json")
    ),
    "not-json-body": lambda u, q, i: _push_raw(
        u, q, _envelope(b"\x00\xff{not json", _headers(), "application/json")
    ),
    "pickle-body": lambda u, q, i: _push_raw(
        u, q, _envelope(b"\x80\x04K\x01.", _headers(), "application/x-python-serialize")
    ),
    "yaml-body": lambda u, q, i: _push_raw(
        u, q, _envelope(b"- [1]\n", _headers(), "application/x-yaml")
    ),
    "raw-garbage": lambda u, q, i: _push_raw(u, q, b"\x00garbage{"),
    "raw-json-scalar": lambda u, q, i: _push_raw(u, q, b"42"),
    "raw-json-not-envelope": lambda u, q, i: _push_raw(u, q, b'{"body": 5}'),
    "envelope-bad-base64": lambda u, q, i: _push_raw(
        u,
        q,
        json.dumps(
            {
                "body": "%%%not base64%%%",
                "content-type": "application/json",
                "headers": _headers(),
                "properties": {"body_encoding": "base64", "delivery_tag": "t1"},
            }
        ).encode(),
    ),
    "oversized-body": lambda u, q, i: _publish(
        u, q, [[_job(i, metadata={"pad": "x" * 48_000_000})], {}, {}]
    ),
    "unknown-sink-type": lambda u, q, i: _publish(
        u, q, [[_job(i, sinks=[{"type": f"made-up-{uuid.uuid4().hex[:6]}"}])], {}, {}]
    ),
    "local-sink-outside-roots": lambda u, q, i: _publish(
        u, q, [[_job(i, sinks=[{"type": "local", "path": "/etc/mw-should-not-exist"}])], {}, {}]
    ),
    # Packed messages (moderation.score_jobs): each kind is answered by one dead letter.
    "packed-empty-list": lambda u, q, i: _publish(u, q, [[[]], {}, {}], task=SCORE_JOBS_TASK),
    "packed-million-items": lambda u, q, i: _publish(
        u, q, [[[0] * 1_000_000], {}, {}], task=SCORE_JOBS_TASK
    ),
    "packed-65-jobs": lambda u, q, i: _publish(
        u, q, [[[_job(i) for _ in range(65)]], {}, {}], task=SCORE_JOBS_TASK
    ),
    "packed-jobs-not-a-list": lambda u, q, i: _publish(
        u, q, [[_job(i)], {}, {}], task=SCORE_JOBS_TASK
    ),
    "packed-wrong-kwarg": lambda u, q, i: _publish(
        u, q, [[], {"job": [_job(i)]}, {}], task=SCORE_JOBS_TASK
    ),
    "packed-non-dict-item": lambda u, q, i: _publish(u, q, [[[7]], {}, {}], task=SCORE_JOBS_TASK),
    "packed-nested-list-item": lambda u, q, i: _publish(
        u, q, [[[[[_job(i)]]]], {}, {}], task=SCORE_JOBS_TASK
    ),
    "packed-invalid-job-beside-a-good-one": lambda u, q, i: _publish(
        u, q, [[[_job(i), {"image": {}}]], {}, {}], task=SCORE_JOBS_TASK
    ),
}


def send_hostile(name: str, url: str, queue: str, image: str) -> None:
    HOSTILE[name](url, queue, image)


def publish_packed(url: str, queue: str, items: list[Any]) -> None:
    """One ``moderation.score_jobs`` message carrying ``items`` as they are (any JSON)."""
    _publish(url, queue, [[items], {}, {}], task=SCORE_JOBS_TASK)
