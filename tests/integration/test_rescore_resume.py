"""`worker rescore` killed mid-run resumes after the last finished day: every stored row
ends up in `--out` exactly once, and the days already done are not sent again.

The run is a real `worker rescore` process delivering to a webhook on loopback; the
webhook's server SIGKILLs it on the first delivery of the second day, so the kill lands
at a known point (the first day finished and saved, the second under way) without any
timing guess.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np

from tests.integration.servers import HttpServer
from tests.processes import python
from tests.synthetic import write_shape_set
from worker.store import EmbeddingRow, EmbeddingStore

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
DAYS_BACK = (3, 2, 1)


def _spread_over_days(store: EmbeddingStore) -> dict[str, int]:
    """Copies of every stored row 1, 2 and 3 days back (new job ids): job id -> day."""
    table = store.table()
    assert table is not None
    rows = table.to_arrow().to_pylist()
    day_of: dict[str, int] = {row["job_id"]: 0 for row in rows}
    copies = []
    for back in DAYS_BACK:
        for row in rows:
            job_id = f"{row['job_id']}-{back}d"
            copies.append(
                EmbeddingRow(
                    job_id=job_id,
                    image_sha256=row["image_sha256"],
                    fingerprint=row["fingerprint"],
                    embedding=np.asarray(row["embedding"], dtype=np.float32),
                    frames=None,
                    uri=row["uri"],
                    created_at=row["created_at"] - timedelta(days=back),
                    metadata=row["metadata"],
                    result=row["result"],
                )
            )
            day_of[job_id] = back
    assert store.add(copies) == len(copies)
    return day_of


def test_a_killed_rescore_resumes_after_its_last_finished_day(
    eval_env: dict[str, str], tmp_path: Path
) -> None:
    write_shape_set(tmp_path / "set", per_class=3, label="colour", seed=9)
    env = {
        **os.environ,
        **eval_env,
        "WORKER_WEBHOOK__SECRET": SECRET,
        "WORKER_HTTP__ALLOW_NETWORKS": '["127.0.0.1/32"]',
    }
    classified = subprocess.run(
        python("-m", "worker", "classify", str(tmp_path / "set" / "images"), "-o", os.devnull),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert classified.returncode == 0, classified.stderr
    store = EmbeddingStore(str(Path(eval_env["WORKER_CACHE_DIR"]) / "store"))
    day_of = _spread_over_days(store)

    process: dict[str, subprocess.Popen[str]] = {}
    received: list[str] = []
    killed: list[str] = []

    def hook(handler: BaseHTTPRequestHandler) -> None:
        job_id = json.loads(server.requests[-1].body)["job_id"]  # the server read the body
        received.append(job_id)
        if not killed and day_of[job_id] < max(DAYS_BACK):  # the first of the next day
            killed.append(job_id)
            process["run"].send_signal(signal.SIGKILL)
        handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    server = HttpServer(default=(200, {}, b""))
    server.routes["/hook"] = hook
    out = tmp_path / "rescored.jsonl"
    command = python(
        "-m",
        "worker",
        "rescore",
        "--policy",
        "colours",
        "--since",
        "4d",
        "--until",
        (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
        "--out",
        str(out),
        "--sink",
        f"webhook:{server.url('/hook')}",
    )
    try:
        process["run"] = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _, first_err = process["run"].communicate(timeout=180)
        assert process["run"].returncode == -signal.SIGKILL, first_err
        assert killed, "the run was not interrupted"
        lines_at_kill = out.read_text().splitlines()
        oldest = [j for j, day in day_of.items() if day == max(DAYS_BACK)]
        print(
            f"killed at {killed[0]} (day -{day_of[killed[0]]}); {len(received)} deliveries, "
            f"{len(lines_at_kill)} lines in --out at the kill"
        )
        again = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=180, check=False
        )
    finally:
        server.close()
    assert again.returncode == 0, again.stderr
    assert re.search(r"resuming: \d+ of \d+ days done", again.stderr), again.stderr
    documents: list[dict[str, Any]] = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [doc["job_id"] for doc in documents]
    print(f"{len(ids)} documents after the resumed run, {len(set(ids))} distinct")
    assert sorted(ids) == sorted(day_of)  # every stored row exactly once
    rest = len(day_of) - len(oldest)
    assert len(received) == len(oldest) + 1 + rest  # the killed delivery, then the rest
    assert set(received[-rest:]) == set(day_of) - set(oldest)  # the finished day not resent
