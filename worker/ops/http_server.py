"""The low-level HTTP side of the health endpoint: request heads, responses, connections.

Holds what does not depend on the paths served: parsing a request head (``parse_head``),
building a ``Connection: close`` response (``response``, ``text``), and
``ConnectionServer``, the multiplexer. ``worker.ops.health`` subclasses it with the
answers to ``/metrics``, ``/livez`` and ``/readyz``.

``ConnectionServer`` runs one thread that multiplexes every connection (``selectors``)
until its request head is complete, answers what is cheap on that thread (``answer_now``)
and hands the rest to a bounded pool of daemon threads (``answer``). Heads must arrive
within ``timeout_s`` (408), are capped at ``MAX_HEAD_BYTES`` (431 / 414) and may carry no
body (413); connections still sending a head are capped at ``max_pending``, oldest shed
first; requests beyond twice ``max_connections`` are answered 503 at once.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from worker.log import get_logger

log = get_logger("worker.ops.health")  # the events keep the name they had before the split

#: Largest request head (request line and headers) accepted.
MAX_HEAD_BYTES = 8192
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


def response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    extra: str = "",
) -> bytes:
    """A whole HTTP/1.1 response that closes the connection (the head alone for HEAD)."""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\nConnection: close\r\n{extra}\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def text(status: int, message: str) -> bytes:
    """A plain-text response of one line."""
    return response(status, message.encode() + b"\n")


@dataclass
class _Pending:
    """A connection still sending its request head."""

    sock: socket.socket
    deadline: float
    data: bytes = b""


@dataclass(frozen=True)
class Request:
    method: str
    path: str


def parse_head(data: bytes) -> Request | bytes:
    """The request in a complete head, or the error response to send instead."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    line, _, rest = data[: min(ends)].partition(b"\n")
    parts = line.rstrip(b"\r").split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return text(400, "bad request line")
    method = parts[0].decode("latin-1")
    target = parts[1].decode("latin-1")
    path = urlsplit(target).path if "://" in target else target.split("?", 1)[0]
    for header in rest.split(b"\n"):
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return text(413, "request bodies are not accepted")
    if method not in ("GET", "HEAD"):
        return response(405, b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
    return Request(method, path)


def _head_complete(data: bytes) -> bool:  # CRLF CRLF, or bare LFs as http.server accepts
    return b"\r\n\r\n" in data or b"\n\n" in data


class ConnectionServer:
    """Reads request heads on one thread and answers them there or on a bounded pool.

    Subclasses give ``answer`` (run on a pool thread) and may give ``answer_now`` (run on
    the loop thread, so it must be quick). ``start`` and ``stop`` run the loop thread.
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        timeout_s: float,
        max_connections: int,
        max_pending: int | None,
    ) -> None:
        self.listener = listener
        self.timeout_s = float(timeout_s)
        self.max_connections = max(1, int(max_connections))
        self.max_pending = max_pending or _default_max_pending(self.max_connections)
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self.stats = {"timed_out": 0, "shed": 0, "busy": 0, "too_large": 0, "served": 0}
        self._pending: dict[socket.socket, _Pending] = {}  # insertion order = accept order
        self._work: queue.SimpleQueue[tuple[socket.socket, Request] | None] = queue.SimpleQueue()
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

    def answer_now(self, request: Request) -> bytes | None:
        """The response sent from the loop thread at once, or None to queue the request."""
        return None

    def answer(self, request: Request) -> bytes:  # pragma: no cover - subclasses answer
        """The response to ``request``, computed on a pool thread."""
        raise NotImplementedError

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
            self._reply_now(pending, text(status, f"request head over {MAX_HEAD_BYTES} bytes"))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            first = next(iter(self._pending.values()))
            if first.deadline > now:
                return
            self._count("timed_out")
            message = f"no complete request within {self.timeout_s:g} s (WORKER_METRICS__TIMEOUT_S)"
            self._reply_now(first, text(408, message))

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
        request = parse_head(pending.data)
        if isinstance(request, bytes):
            self._reply_now(pending, request)
            return
        immediate = self.answer_now(request)
        if immediate is not None:
            self._count("served")
            self._reply_now(pending, immediate)
            return
        with self._lock:
            if self._queued >= 2 * self.max_connections:
                busy = True
            else:
                busy = False
                self._queued += 1
        if busy:
            self._count("busy")
            self._reply_now(pending, text(503, "busy: too many requests in progress"))
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
                data = self.answer(request)
                with contextlib.suppress(OSError):
                    sock.sendall(data)
            except Exception:
                log.exception("metrics.request_failed", path=request.path)
            finally:
                with self._lock:
                    self._queued -= 1
                self._count("served")
                _close(sock)


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
