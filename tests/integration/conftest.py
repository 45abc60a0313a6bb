"""Real servers for integration tests: redis-server on 127.0.0.1, worker subprocesses
(started through `tests.processes`, the one helper for that)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import wait_until
from tests.integration.servers import free_port
from tests.processes import REPO, WorkerProcess, python

#: wait_until and free_port lived here once: re-exported for tests that import them from here.
__all__ = ["AWS_ENV", "free_port", "wait_until"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: run scripts/setup.sh (apt-get install redis-server)"
        )
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(up, 10, "redis-server to start")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    redis.Redis.from_url(redis_server).flushall()
    return redis_server


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The third-party test plugin package, pip-installed into its own target directory
    (built from a copy, so no build output lands in the checkout)."""
    target = tmp_path_factory.mktemp("plugins")
    source = tmp_path_factory.mktemp("plugin-src") / "plugin_pkg"
    shutil.copytree(REPO / "tests" / "plugin_pkg", source)
    pip = python("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation")
    subprocess.run(
        [*pip, "--no-index", "--target", str(target), str(source)], check=True, capture_output=True
    )
    return target


@pytest.fixture
def queue_env(
    worker_env: dict[str, str], redis_url: str, tmp_path: Path, plugin_path: Path
) -> dict[str, str]:
    """Environment for worker subprocesses: fast retries, short visibility timeout."""
    return {
        **os.environ,
        **worker_env,
        "PYTHONPATH": os.pathsep.join([str(plugin_path), str(REPO)]),
        "WORKER_BROKER_URL": redis_url,
        "WORKER_FILE_ROOTS": json.dumps([str(tmp_path)]),
        "WORKER_SINK_ROOTS": json.dumps([str(tmp_path)]),
        "WORKER_BATCH__MAX_SIZE": "8",
        "WORKER_BATCH__MAX_WAIT_MS": "100",
        "WORKER_QUEUE__VISIBILITY_TIMEOUT_S": "6",
        "WORKER_QUEUE__RESTORE_INTERVAL_S": "1",
        "WORKER_DELIVERY__BACKOFF_BASE_S": "0.05",
        "WORKER_DELIVERY__BACKOFF_MAX_S": "0.2",
        "WORKER_DELIVERY__POLL_INTERVAL_S": "0.1",
        "WORKER_DELIVERY__LEASE_S": "5",
        "WORKER_MAX_ATTEMPTS": "3",
        "WORKER_DECODE_WORKERS": "2",
        "WORKER_METRICS__PORT": "0",
    }


@pytest.fixture
def start_worker(
    queue_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess({**queue_env, **(env or {})}, log_path, list(args))
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.kill()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from tests.integration.servers import moto_server

    yield from moto_server()


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 S3 client on the moto server, with fresh buckets per test."""
    import boto3

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for bucket in client.list_buckets().get("Buckets", []):
        objects = client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", [])
        for obj in objects:
            client.delete_object(Bucket=bucket["Name"], Key=obj["Key"])
        client.delete_bucket(Bucket=bucket["Name"])
    return client
