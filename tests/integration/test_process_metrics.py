"""`/metrics` of a running `worker serve` carries the standard ``process_*`` series of that
process (prometheus_client's process collector), next to the worker's own."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.servers import free_port
from tests.processes import WorkerProcess

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, float]:
    """Unlabelled samples of ``/metrics`` by name (plus ``python_info``'s labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name if not sample.labels else f"{sample.name}{sorted(sample.labels)}"
            found[key] = sample.value
    return found


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process_* needs /proc (Linux)")
def test_metrics_has_process_series_of_the_worker(
    queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    port = free_port()
    env = {"WORKER_METRICS__PORT": str(port), "WORKER_METRICS__HOST": "127.0.0.1"}
    worker = start_worker(env=env)
    pid = worker.proc.pid
    first = scrape(port)

    for name in (
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        assert name in first, f"{name} missing from /metrics"
    assert any(name.startswith("python_info") for name in first)
    assert "moderation_batch_size_count" in first  # the worker's own series are still there

    # The numbers are the worker process's, not some other process's.
    rss = proc_status_kib(pid, "VmRSS") * 1024
    assert 0.5 * rss < first["process_resident_memory_bytes"] < 2 * rss
    assert first["process_open_fds"] == pytest.approx(len(os.listdir(f"/proc/{pid}/fd")), abs=10)
    assert first["process_max_fds"] > first["process_open_fds"] > 0
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    assert first["process_start_time_seconds"] == pytest.approx(started, abs=2)
    assert time.time() - first["process_start_time_seconds"] < 600
    assert first["process_cpu_seconds_total"] > 0  # it loaded a model

    # Read at each scrape: CPU time only grows.
    second = scrape(port)
    assert second["process_cpu_seconds_total"] >= first["process_cpu_seconds_total"]
    assert worker.stop() == 0
