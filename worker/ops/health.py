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
"""

from __future__ import annotations

import contextlib
import errno
import json
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.errors import ConfigurationError
from worker.log import get_logger
from worker.ops.telemetry import Telemetry

log = get_logger(__name__)

#: Largest request head (request line and headers) accepted.
MAX_HEAD_BYTES = 8192
#: Largest /readyz body sent; longer check values are cut to fit.
MAX_READY_BODY = 64 * 1024
_PATHS = ["/metrics", "/livez", "/readyz"]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_SHED_LOG_INTERVAL_S = 60.0


def _response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    extra: str = "",
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\nConnection: close\r\n{extra}\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def _text(status: int, message: str) -> bytes:
    return _response(status, message.encode() + b"\n")


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


@dataclass
class _Pending:
    """A connection still sending its request head."""

    sock: socket.socket
    deadline: float
    data: bytes = b""


@dataclass(frozen=True)
class _Request:
    method: str
    path: str


def _parse_head(data: bytes) -> _Request | bytes:
    """The request in a complete head, or the error response to send instead."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    line, _, rest = data[: min(ends)].partition(b"\n")
    parts = line.rstrip(b"\r").split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _text(400, "bad request line")
    method = parts[0].decode("latin-1")
    target = parts[1].decode("latin-1")
    path = urlsplit(target).path if "://" in target else target.split("?", 1)[0]
    for header in rest.split(b"\n"):
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return _text(413, "request bodies are not accepted")
    if method not in ("GET", "HEAD"):
        return _response(405, b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
    return _Request(method, path)


def _head_complete(data: bytes) -> bool:  # CRLF CRLF, or bare LFs as http.server accepts
    return b"\r\n\r\n" in data or b"\n\n" in data


class HealthServer:
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
        self.timeout_s = float(timeout_s)
        self.max_connections = max(1, int(max_connections))
        self.max_pending = max_pending or _default_max_pending(self.max_connections)
        try:
            family = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
            self.listener = socket.create_server((host, port), family=family, backlog=512)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {host}:{port} for /metrics ({exc.strerror or exc}); set "
                "WORKER_METRICS__PORT to a free port, or 0 to turn the endpoint off"
            ) from None
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self.stats = {"timed_out": 0, "shed": 0, "busy": 0, "too_large": 0, "served": 0}
        self._pending: dict[socket.socket, _Pending] = {}  # insertion order = accept order
        self._work: queue.SimpleQueue[tuple[socket.socket, _Request] | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._queued = 0  # requests handed to the workers and not finished
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._last_shed_log = 0.0
        self.thread = threading.Thread(target=self._serve, name="health", daemon=True)

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    @property
    def waiting(self) -> int:
        """Connections accepted and still sending their request head."""
        return len(self._pending)

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        log.info(
            "metrics.listening",
            port=self.port,
            paths=_PATHS,
            timeout_s=self.timeout_s,
            max_connections=self.max_connections,
        )

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self.thread.is_alive():
            self.thread.join(5)
        with self._lock:
            workers = len(self._workers)
        for _ in range(workers):
            self._work.put(None)
        for pending in list(self._pending.values()):
            _close(pending.sock)
        self._pending.clear()
        self._selector.close()
        for sock in (self.listener, self._wake_r, self._wake_w):
            sock.close()

    # --- the event loop -------------------------------------------------------------

    def _serve(self) -> None:
        selector = self._selector
        try:
            while not self._stopping.is_set():
                timeout = None
                if self._pending:
                    first = next(iter(self._pending.values()))
                    timeout = max(0.0, first.deadline - time.monotonic())
                for key, _ in selector.select(timeout):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        self._read(key.data)
                self._expire()
        except Exception:  # never reached in tests; the endpoint must not die silently
            log.exception("metrics.loop_failed")
        finally:
            selector.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._shed_oldest("out of file descriptors"):
                        time.sleep(0.01)  # nothing of ours to free: do not spin
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            sock.setblocking(False)
            pending = _Pending(sock, time.monotonic() + self.timeout_s)
            self._pending[sock] = pending
            self._selector.register(sock, selectors.EVENT_READ, pending)
            while len(self._pending) > self.max_pending:
                self._shed_oldest("too many connections still sending a request")

    def _read(self, pending: _Pending) -> None:
        if pending.sock not in self._pending:  # closed earlier in this round of events
            return
        try:
            chunk = pending.sock.recv(MAX_HEAD_BYTES + 1 - len(pending.data))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(pending)
            return
        pending.data += chunk
        if _head_complete(pending.data):
            self._forget(pending)
            self._dispatch(pending)
        elif len(pending.data) > MAX_HEAD_BYTES:
            self._count("too_large")
            status = 431 if b"\n" in pending.data else 414
            self._reply_now(pending, _text(status, f"request head over {MAX_HEAD_BYTES} bytes"))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            first = next(iter(self._pending.values()))
            if first.deadline > now:
                return
            self._count("timed_out")
            message = f"no complete request within {self.timeout_s:g} s (WORKER_METRICS__TIMEOUT_S)"
            self._reply_now(first, _text(408, message))

    def _shed_oldest(self, why: str) -> bool:
        if not self._pending:
            return False
        self._count("shed")
        now = time.monotonic()
        if now - self._last_shed_log > _SHED_LOG_INTERVAL_S:
            self._last_shed_log = now
            log.warning(
                "metrics.connections_shed",
                reason=why,
                pending=len(self._pending),
                max_pending=self.max_pending,
                shed_total=self.stats["shed"],
            )
        self._drop(next(iter(self._pending.values())))
        return True

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(pending.sock)

    def _drop(self, pending: _Pending) -> None:
        self._forget(pending)
        _close(pending.sock)

    def _reply_now(self, pending: _Pending, data: bytes) -> None:
        """Answer from the loop thread: one non-blocking send (short answers only), close."""
        self._forget(pending)
        with contextlib.suppress(OSError):
            pending.sock.send(data)
        _close(pending.sock)

    # --- requests -------------------------------------------------------------------

    def _dispatch(self, pending: _Pending) -> None:
        request = _parse_head(pending.data)
        if isinstance(request, bytes):
            self._reply_now(pending, request)
            return
        head_only = request.method == "HEAD"
        if request.path == "/livez":
            self._count("served")
            body = b'{"status": "ok"}\n'
            self._reply_now(pending, _response(200, body, "application/json", head_only=head_only))
            return
        with self._lock:
            if self._queued >= 2 * self.max_connections:
                busy = True
            else:
                busy = False
                self._queued += 1
        if busy:
            self._count("busy")
            self._reply_now(pending, _text(503, "busy: too many requests in progress"))
            return
        pending.sock.settimeout(self.timeout_s)  # blocking again, each send under the timeout
        self._work.put((pending.sock, request))
        with self._lock:  # queued counts running and waiting requests: start one if none idles
            if len(self._workers) < min(self.max_connections, self._queued):
                worker = threading.Thread(
                    target=self._worker, name=f"health-{len(self._workers)}", daemon=True
                )
                self._workers.append(worker)
                worker.start()

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            sock, request = item
            try:
                data = self._answer(request)
                with contextlib.suppress(OSError):
                    sock.sendall(data)
            except Exception:
                log.exception("metrics.request_failed", path=request.path)
            finally:
                with self._lock:
                    self._queued -= 1
                self._count("served")
                _close(sock)

    def _answer(self, request: _Request) -> bytes:
        head_only = request.method == "HEAD"
        if request.path == "/metrics":
            body = generate_latest(self.telemetry.registry)
            return _response(200, body, CONTENT_TYPE_LATEST, head_only=head_only)
        if request.path == "/readyz":
            try:
                ready, checks = self.readiness()
            except Exception as exc:  # a failing check is an unready worker, not a dead socket
                ready, checks = False, {"error": f"readiness check failed: {exc}"}
            body = ready_body(ready, checks)
            status = 200 if ready else 503
            return _response(status, body, "application/json", head_only=head_only)
        body = b"not found: try /metrics, /livez, /readyz\n"
        return _response(404, body, head_only=head_only)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _default_max_pending(max_connections: int) -> int:
    """Connections allowed to sit sending their head: generous, but within the fd limit."""
    wanted = max(1024, 64 * max_connections)
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft // 2))
