"""Operations: /metrics, /livez, /readyz of a running worker, and `worker health`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_until, write_images
from tests.integration.servers import free_port
from tests.processes import WorkerProcess, cli, run_python

pytestmark = pytest.mark.integration


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_after_ten_jobs(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    port = free_port()
    env = {"WORKER_METRICS__PORT": str(port), "WORKER_METRICS__HOST": "127.0.0.1"}
    worker = start_worker(env=env)
    images = write_images(tmp_path / "imgs", 9)
    corrupt = tmp_path / "imgs" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)
    out = tmp_path / "out"
    jobs = [
        {
            "job_id": f"m-{i}",
            "image": {"uri": str(p)},
            "sinks": [{"type": "local", "path": str(out)}],
        }
        for i, p in enumerate([*images, corrupt])
    ]
    code = "from worker.client import submit\n" + "\n".join(f"submit({j!r})" for j in jobs)
    assert run_python(code, {**queue_env, **env}).returncode == 0
    wait_until(lambda: len(list(out.glob("*.json"))) == 10, 60, "ten results")
    wait_until(lambda: len(worker.events("sink.delivered")) == 10, 30, "ten deliveries")

    m = samples(f"http://127.0.0.1:{port}/metrics")
    assert m[("moderation_jobs_total", (("code", ""), ("status", "ok")))] == 9
    assert m[("moderation_jobs_total", (("code", "image_unreadable"), ("status", "error")))] == 1
    assert m[("moderation_policy_jobs_total", (("policy", "shapes"),))] == 9
    assert m[("moderation_policy_jobs_total", (("policy", "shape-tags"),))] == 9
    assert m[("moderation_batch_size_sum", ())] == 10
    assert m[("moderation_batch_size_count", ())] >= 1
    assert m[("moderation_stage_seconds_count", (("stage", "encode"),))] == 9
    assert m[("moderation_stage_seconds_count", (("stage", "decode"),))] == 9
    assert m[("moderation_stage_seconds_count", (("stage", "sink"),))] == 10
    assert m[("moderation_deliveries_total", (("outcome", "delivered"), ("sink", "local")))] == 10
    assert m[("moderation_queue_depth", (("queue", "moderation"),))] == 0
    assert m[("moderation_dead_letters", ())] == 0
    flags = sum(v for (name, _), v in m.items() if name == "moderation_flags_total")
    results = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert flags == sum(len(r["flags"]) for r in results)
    info = [labels for (name, labels) in m if name == "moderation_model_info"]
    assert dict(info[0])["fingerprint"] == results[0]["model"]["fingerprint"]
    assert {dict(labels)["policy"] for (name, labels) in m if name == "moderation_policy_info"} == {
        "shapes",
        "shape-tags",
    }

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
        ready = json.loads(response.read())
    assert ready["ready"] is True
    assert ready["redis"]["reachable"] is True
    assert ready["policies"]["valid"] is True
    health = cli(None, "health", "--url", f"http://127.0.0.1:{port}", timeout=60)
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["ready"] is True
    assert worker.stop() == 0
    down = cli(None, "health", "--url", f"http://127.0.0.1:{port}", timeout=60)
    assert down.returncode == 1
    assert "unreachable" in down.stderr
