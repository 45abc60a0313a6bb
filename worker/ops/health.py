"""The worker's HTTP endpoint: ``/metrics`` (Prometheus), ``/livez`` and ``/readyz``.

``/readyz`` answers 200 with a JSON body when the model is loaded, Redis answers and at
least one policy is in service; 503 with the same body (saying what failed) otherwise.
A policy edit that was rejected does not make the worker unready (it keeps serving the
last good policies) but shows up in the body.

The endpoint faces whatever can reach the port, so it is built to stay up under idle and
slow clients:

* One thread multiplexes every connection (``selectors``) until a complete request head
  has arrived. An idle or half-sent connection costs a file descriptor, never a thread.
* A connection must send its whole request head within ``timeout_s``
  (``WORKER_METRICS__TIMEOUT_S``), counted from accept, not per byte, so slowloris gains
  nothing; it is then answered 408 and closed. The head is capped at ``MAX_HEAD_BYTES``
  (431, or 414 for a request line alone over the cap). Request bodies are refused (413).
* ``/livez`` is answered by that thread at once; it never waits behind other requests.
* ``/metrics`` and ``/readyz`` run on a pool of at most ``max_connections`` daemon
  threads (``WORKER_METRICS__MAX_CONNECTIONS``), started as needed; at most as many
  requests again wait for a thread, beyond that the answer is 503 at once. Answers are
  written under ``timeout_s`` too, so a client that does not read cannot hold a thread.
* Connections still sending their head are capped (``max_pending``): past the cap, or
  when the process runs out of file descriptors, the oldest are closed first.
* The ``/readyz`` body is capped at ``MAX_READY_BODY`` bytes (long check values are cut).

This module holds the answers; request heads, responses and the connection multiplexer
are in ``worker.ops.http_server``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.errors import ConfigurationError
from worker.log import get_logger
from worker.ops.http_server import ConnectionServer, Request, response
from worker.ops.telemetry import Telemetry

log = get_logger(__name__)

#: Largest /readyz body sent; longer check values are cut to fit.
MAX_READY_BODY = 64 * 1024
_PATHS = ["/metrics", "/livez", "/readyz"]


def ready_body(ready: bool, checks: dict[str, Any], limit: int = MAX_READY_BODY) -> bytes:
    """The /readyz JSON, at most ``limit`` bytes: check values too long are cut."""
    body = json.dumps({"ready": ready, **checks}, default=str).encode() + b"\n"
    if len(body) <= limit:
        return body
    share = max(64, limit // (2 * max(len(checks), 1)))
    short: dict[str, Any] = {"ready": ready, "truncated": True}
    for key, value in checks.items():
        text = json.dumps(value, default=str)
        short[str(key)[:64]] = value if len(text) <= share else text[:share] + "..."
    body = json.dumps(short, default=str).encode() + b"\n"
    if len(body) <= limit:
        return body
    return json.dumps({"ready": ready, "truncated": True}).encode() + b"\n"


class HealthServer(ConnectionServer):
    """Serves metrics and health from a daemon thread and a bounded pool of handlers."""

    def __init__(
        self,
        host: str,
        port: int,
        telemetry: Telemetry,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        *,
        timeout_s: float = 5.0,
        max_connections: int = 16,
        max_pending: int | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.readiness = readiness
        try:
            family = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
            listener = socket.create_server((host, port), family=family, backlog=512)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {host}:{port} for /metrics ({exc.strerror or exc}); set "
                "WORKER_METRICS__PORT to a free port, or 0 to turn the endpoint off"
            ) from None
        super().__init__(
            listener,
            timeout_s=timeout_s,
            max_connections=max_connections,
            max_pending=max_pending,
        )

    def start(self) -> None:
        super().start()
        log.info(
            "metrics.listening",
            port=self.port,
            paths=_PATHS,
            timeout_s=self.timeout_s,
            max_connections=self.max_connections,
        )

    def answer_now(self, request: Request) -> bytes | None:
        """``/livez`` is answered by the loop thread at once; it never waits behind others."""
        if request.path != "/livez":
            return None
        body = b'{"status": "ok"}\n'
        return response(200, body, "application/json", head_only=request.method == "HEAD")

    def answer(self, request: Request) -> bytes:
        head_only = request.method == "HEAD"
        if request.path == "/metrics":
            body = generate_latest(self.telemetry.registry)
            return response(200, body, CONTENT_TYPE_LATEST, head_only=head_only)
        if request.path == "/readyz":
            try:
                ready, checks = self.readiness()
            except Exception as exc:  # a failing check is an unready worker, not a dead socket
                ready, checks = False, {"error": f"readiness check failed: {exc}"}
            body = ready_body(ready, checks)
            status = 200 if ready else 503
            return response(status, body, "application/json", head_only=head_only)
        body = b"not found: try /metrics, /livez, /readyz\n"
        return response(404, body, head_only=head_only)
