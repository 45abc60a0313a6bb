"""The /metrics, /livez, /readyz endpoint under idle, half-sent and slow connections.

A real ``HealthServer`` on 127.0.0.1 (port 0) and real client sockets: hundreds of
connections that never finish a request must neither stop /livez from answering nor
grow the number of threads, and each is closed once ``timeout_s`` has passed.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from worker.errors import ConfigurationError
from worker.ops.health import MAX_READY_BODY, HealthServer
from worker.ops.http_server import MAX_HEAD_BYTES
from worker.ops.telemetry import Telemetry

pytestmark = [pytest.mark.fault, pytest.mark.integration]

Readiness = Callable[[], tuple[bool, dict[str, Any]]]


def ready() -> tuple[bool, dict[str, Any]]:
    return True, {"model": {"loaded": True}, "redis": {"reachable": True}}


@pytest.fixture
def make_server() -> Iterator[Callable[..., HealthServer]]:
    servers: list[HealthServer] = []

    def make(readiness: Readiness = ready, **options: Any) -> HealthServer:
        server = HealthServer("127.0.0.1", 0, Telemetry(), readiness, **options)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """Every client socket a test opens; all closed at the end, whatever happened."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connect(port: int, clients: list[socket.socket], send: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    clients.append(sock)
    if send:
        sock.sendall(send)
    return sock


def request(port: int, raw: bytes, timeout: float = 5.0) -> tuple[int, bytes, bytes, float]:
    """Send ``raw``, read to EOF: (status, head, body, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body, time.monotonic() - started


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes, float]:
    status, _, body, seconds = request(
        port, f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode(), timeout
    )
    return status, body, seconds


def health_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("health")]


def open_idle(port: int, clients: list[socket.socket], idle: int, half: int) -> list[socket.socket]:
    """``idle`` silent connections and ``half`` that send part of a request, in turn."""
    partials = [
        b"GET /readyz HTTP/1.1\r\nHost: x\r\n",  # headers never finished
        b"GET /livez HTT",  # request line cut short
        b"G",
    ]
    socks = [connect(port, clients) for _ in range(idle)]
    socks += [connect(port, clients, partials[i % len(partials)]) for i in range(half)]
    return socks


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, or None while the connection is still open."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return None
    data = b""
    sock.settimeout(1)
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        pass
    return data


def test_livez_answers_fast_while_hundreds_of_connections_idle(
    make_server: Callable[..., HealthServer], clients: list[socket.socket]
) -> None:
    baseline = threading.active_count()
    server = make_server(timeout_s=5.0, max_connections=4)
    open_idle(server.port, clients, idle=300, half=60)
    deadline = time.monotonic() + 5
    while server.waiting < 360 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.waiting == 360  # all accepted, none answered, none closed

    for path, expected in (("/livez", 200), ("/readyz", 200), ("/metrics", 200)):
        status, body, seconds = get(server.port, path, timeout=1.0)
        assert status == expected, (path, body)
        assert seconds < 1.0, (path, seconds)
    status, body, _ = get(server.port, "/livez")
    assert json.loads(body) == {"status": "ok"}
    assert json.loads(get(server.port, "/readyz")[1])["ready"] is True

    # 360 open connections, yet only the loop thread and at most max_connections handlers.
    names = health_threads()
    assert "health" in names
    assert len(names) <= 1 + 4, names
    assert threading.active_count() - baseline <= 1 + 4
    assert server.waiting == 360  # the probes did not disturb the idle ones


def test_idle_and_slow_connections_are_closed_after_the_timeout(
    make_server: Callable[..., HealthServer], clients: list[socket.socket]
) -> None:
    server = make_server(timeout_s=1.5, max_connections=2)
    started = time.monotonic()
    idle = open_idle(server.port, clients, idle=100, half=30)
    slow = [connect(server.port, clients, b"GET /metrics HTTP/1.1\r\n") for _ in range(5)]
    socks = idle + slow
    outcome: dict[socket.socket, bytes] = {}
    checked_early = False
    while len(outcome) < len(socks) and time.monotonic() - started < 1.5 + 2.0:
        for sock in slow:  # slowloris: one header byte every 100 ms, never the blank line
            if sock not in outcome:
                with contextlib.suppress(OSError):
                    sock.send(b"X")
        for sock in socks:
            if sock not in outcome:
                data = closed_by_server(sock)
                if data is not None:
                    outcome[sock] = data
        if not checked_early and time.monotonic() - started > 0.6:
            checked_early = True
            assert outcome == {}, "closed before the timeout"
            assert get(server.port, "/livez", timeout=1.0)[0] == 200
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    assert checked_early
    assert len(outcome) == len(socks), (
        f"{len(socks) - len(outcome)} still open after {elapsed:.1f} s"
    )
    assert elapsed >= 1.5
    answered = [data for data in outcome.values() if data]
    assert len(answered) >= len(socks) - 5  # a 408 is sent; a trickler may see only a reset
    assert all(data.startswith(b"HTTP/1.1 408 ") for data in answered)
    assert b"WORKER_METRICS__TIMEOUT_S" in answered[0]
    assert server.waiting == 0
    assert server.stats["timed_out"] == len(socks)
    assert get(server.port, "/livez", timeout=1.0)[0] == 200


def test_handler_threads_stay_bounded_under_slow_readiness(
    make_server: Callable[..., HealthServer],
) -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def slow_ready() -> tuple[bool, dict[str, Any]]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.3)
        with lock:
            running -= 1
        return ready()

    server = make_server(slow_ready, timeout_s=5.0, max_connections=3)
    statuses: list[tuple[int, bytes]] = []
    peak_threads = 0

    def probe() -> None:
        status, body, _ = get(server.port, "/readyz")
        with lock:
            statuses.append((status, body))

    callers = [threading.Thread(target=probe) for _ in range(30)]
    for caller in callers:
        caller.start()
    livez_seconds = []
    while any(c.is_alive() for c in callers):
        peak_threads = max(peak_threads, len(health_threads()))
        livez_seconds.append(get(server.port, "/livez", timeout=1.0)[2])
        time.sleep(0.02)
    for caller in callers:
        caller.join()
    assert most <= 3
    assert peak_threads <= 1 + 3
    assert max(livez_seconds) < 1.0  # /livez never waits behind /readyz
    codes = [status for status, _ in statuses]
    assert len(codes) == 30
    assert codes.count(200) >= 3
    assert set(codes) <= {200, 503}
    assert all(b"busy" in body for status, body in statuses if status == 503)
    assert server.stats["busy"] == codes.count(503)


def test_request_heads_are_capped_and_odd_requests_answered(
    make_server: Callable[..., HealthServer],
) -> None:
    port = make_server(timeout_s=2.0).port
    long_header = b"GET /livez HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    assert request(port, long_header)[0] == 431
    assert request(port, b"GET /" + b"a" * (MAX_HEAD_BYTES + 10))[0] == 414
    assert request(port, b"POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")[0] == 405
    assert request(port, b"GET /readyz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")[0] == 413
    chunked = b"GET /readyz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert request(port, chunked)[0] == 413
    assert request(port, b"HELLO\r\n\r\n")[0] == 400
    assert request(port, b"GET /nope HTTP/1.1\r\n\r\n")[0] == 404
    assert request(port, b"GET /livez?verbose=1 HTTP/1.0\n\n")[0] == 200  # bare LF, 1.0
    assert request(port, b"GET http://host/livez HTTP/1.1\r\n\r\n")[0] == 200  # absolute form
    status, head, body, _ = request(port, b"HEAD /livez HTTP/1.1\r\n\r\n")
    assert (status, body) == (200, b"")
    assert b"Content-Length: 17" in head
    assert b"Connection: close" in head


def test_readyz_body_is_bounded_and_a_failing_check_is_unready(
    make_server: Callable[..., HealthServer],
) -> None:
    def huge() -> tuple[bool, dict[str, Any]]:
        errors = [f"policy {i}: " + "x" * 1000 for i in range(500)]  # ~500 kB of messages
        return False, {"policies": {"valid": False, "errors": errors}, "redis": {"up": True}}

    status, body, _ = get(make_server(huge).port, "/readyz")
    assert status == 503
    assert len(body) <= MAX_READY_BODY
    document = json.loads(body)
    assert document["ready"] is False
    assert document["truncated"] is True
    assert document["redis"] == {"up": True}  # short checks survive whole

    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("redis went away")

    status, body, _ = get(make_server(broken).port, "/readyz")
    assert status == 503
    assert json.loads(body) == {
        "ready": False,
        "error": "readiness check failed: redis went away",
    }


def test_oldest_waiting_connections_are_shed_past_the_cap(
    make_server: Callable[..., HealthServer], clients: list[socket.socket]
) -> None:
    server = make_server(timeout_s=10.0, max_pending=50)
    socks = open_idle(server.port, clients, idle=80, half=0)
    deadline = time.monotonic() + 3
    while server.stats["shed"] < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats["shed"] == 30
    assert server.waiting == 50
    time.sleep(0.1)
    shut = [closed_by_server(s) is not None for s in socks]
    assert shut == [True] * 30 + [False] * 50  # the oldest went first, long before 10 s
    assert get(server.port, "/livez", timeout=1.0)[0] == 200


def test_stop_closes_waiting_connections_and_frees_the_port(
    clients: list[socket.socket],
) -> None:
    never_started = HealthServer("127.0.0.1", 0, Telemetry(), ready)
    never_started.stop()  # returns at once

    server = HealthServer("127.0.0.1", 0, Telemetry(), ready, timeout_s=30.0)
    server.start()
    port = server.port
    with pytest.raises(ConfigurationError, match="WORKER_METRICS__PORT"):
        HealthServer("127.0.0.1", port, Telemetry(), ready)
    socks = open_idle(port, clients, idle=20, half=5)
    deadline = time.monotonic() + 3
    while server.waiting < 25 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    time.sleep(0.05)
    assert all(closed_by_server(s) is not None for s in socks)
    assert not server.thread.is_alive()
    again = HealthServer("127.0.0.1", port, Telemetry(), ready)  # the port is free again
    again.stop()
