"""Real servers on loopback for tests: a scripted HTTP server and moto's S3 server."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.processes import python


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


#: A handler decides the answer: (status, headers, body) or a callable that writes itself.
Answer = tuple[int, dict[str, str], bytes]
#: What the server does for a request: a fixed answer, or a handler that writes its own.
Route = Answer | Callable[[BaseHTTPRequestHandler], None]


@dataclass
class HttpServer:
    """A threaded HTTP server on ``host`` whose answers are scripted per request."""

    host: str = "127.0.0.1"
    answers: list[Route] = field(default_factory=list)
    default: Answer = (200, {}, b"")
    #: Per-path answers (checked before ``answers``): a fixed answer for that path.
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.requests.append(
                    Recorded(self.command, self.path, dict(self.headers), body, time.time())
                )
                if self.path in server.routes:
                    answer = server.routes[self.path]
                else:
                    answer = server.answers.pop(0) if server.answers else server.default
                if callable(answer):
                    answer(self)
                    return
                status, headers, payload = answer
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle  # noqa: N815

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.httpd = Server((self.host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def slow_drip(total: int, interval: float) -> Callable[[BaseHTTPRequestHandler], None]:
    """An answer that sends one byte every ``interval`` seconds."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(total))
        handler.send_header("Content-Type", "image/png")
        handler.end_headers()
        try:
            for _ in range(total):
                handler.wfile.write(b"\x89")
                handler.wfile.flush()
                time.sleep(interval)
        except OSError:
            pass

    return answer


def endless_body(
    chunk: int = 1 << 20, chunks: int = 100, sent: list[int] | None = None
) -> Callable[[BaseHTTPRequestHandler], None]:
    """An answer streaming ``chunks`` MiB without a Content-Length (until the client hangs up)."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        block = b"\x00" * chunk
        try:
            for _ in range(chunks):
                handler.wfile.write(block)
                if sent is not None:
                    sent.append(len(block))
        except OSError:
            pass

    return answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def moto_server() -> Iterator[str]:
    """moto's standalone S3 server as a subprocess on 127.0.0.1; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        python("-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def redis_values(url: str) -> str:
    """Every value the worker keeps under ``mw:*`` in the Redis at ``url`` (strings, hash
    values, sorted-set members), one per line: what a person reading Redis would see."""
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    values: list[str] = []
    for key in client.keys("mw:*"):
        kind = client.type(key)
        if kind == "hash":
            values.extend(str(v) for v in client.hgetall(key).values())
        elif kind == "string":
            values.append(str(client.get(key)))
        elif kind == "zset":
            values.extend(str(m) for m in client.zrange(key, 0, -1))
    return "\n".join(values)
