"""The worker's HTTP endpoint: ``/metrics`` (Prometheus), ``/livez`` and ``/readyz``.

``/readyz`` answers 200 with a JSON body when the model is loaded, Redis answers and at
least one policy is in service; 503 with the same body (saying what failed) otherwise.
A policy edit that was rejected does not make the worker unready (it keeps serving the
last good policies) but shows up in the body.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.errors import ConfigurationError
from worker.log import get_logger
from worker.telemetry import Telemetry

log = get_logger(__name__)


class HealthServer:
    """Serves metrics and health in a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        telemetry: Telemetry,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        self.telemetry = telemetry
        self.readiness = readiness
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server.telemetry.registry), CONTENT_TYPE_LATEST)
                elif path == "/livez":
                    self._send(200, b'{"status": "ok"}\n', "application/json")
                elif path == "/readyz":
                    ready, checks = server.readiness()
                    body = json.dumps({"ready": ready, **checks}).encode() + b"\n"
                    self._send(200 if ready else 503, body, "application/json")
                else:
                    self._send(404, b"not found: try /metrics, /livez, /readyz\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {host}:{port} for /metrics ({exc.strerror}); set "
                "WORKER_METRICS__PORT to a free port, or 0 to turn the endpoint off"
            ) from None
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("metrics.listening", port=self.port, paths=["/metrics", "/livez", "/readyz"])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
