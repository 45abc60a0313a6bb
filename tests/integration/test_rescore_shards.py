"""`worker rescore --shards N` on the serving fleet: a real redis-server and two real
`worker serve` processes sharing a local-directory embedding store (filled by `worker
classify` with the same trained tiny CLIP, so the same fingerprint, and spread over nine
days so that every time shard holds rows).

- The shard files together hold exactly one document per stored row, equal (scores within
  1e-4, flags with their evidence, decision, image) to what the in-process `worker
  rescore` writes.
- The same command again sends nothing: every shard is recorded done.
- A shard that outlasts the visibility timeout (its sink is slow) is not handed to the
  other worker: its heartbeat keeps its message invisible. Its sink gets each document
  once.
- A run whose ``--out`` lies outside WORKER_SINK_ROOTS is refused by the workers' intake,
  and the command says so and exits 1. Shard messages that are not valid (a shard past
  the count, not a document at all) are dead-lettered by the intake; one whose policy
  does not load is dead-lettered by the worker that takes it and recorded failed. The
  workers stay up.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis
from PIL import Image

from tests.cli_runner import run_cli
from tests.helpers import wait_until
from tests.integration.queue_helpers import QUEUE, queue_client, queue_drained
from tests.integration.servers import free_port
from tests.processes import WorkerProcess
from tests.synthetic import COLOURS_POLICY, write_shape_set
from worker.queue.app import send_rescore_shard
from worker.queue.rescore_shards import RESCORE_TASK
from worker.store import EmbeddingRow, EmbeddingStore

pytestmark = pytest.mark.integration
#: Copies of every classified row this many days back (the originals stay at now): the
#: window [earliest, now) cut in three puts -8 d in shard 0, -5 d in 1, -2 d and 0 in 2.
DAYS_BACK = (8, 5, 2)
SHARDS = 3


def _animated(path: Path) -> None:
    """A two-frame GIF (its frames are pooled, from the stored frame embeddings)."""
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((220, 30, 30), (30, 30, 220))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _spread_over_days(store: EmbeddingStore) -> int:
    """Copies of every stored row ``DAYS_BACK`` days back, under new job ids; the rows now."""
    table = store.table()
    assert table is not None
    rows = table.to_arrow().to_pylist()
    dim = len(rows[0]["embedding"])
    copies = [
        EmbeddingRow(
            job_id=f"{row['job_id']}-{back}d",
            image_sha256=row["image_sha256"],
            fingerprint=row["fingerprint"],
            embedding=np.asarray(row["embedding"], dtype=np.float32),
            frames=None
            if row["frames"] is None
            else np.asarray(row["frames"], dtype=np.float32).reshape(-1, dim),
            uri=row["uri"],
            created_at=row["created_at"] - timedelta(days=back),
            metadata=row["metadata"],
            result=row["result"],
        )
        for back in DAYS_BACK
        for row in rows
    ]
    assert store.add(copies) == len(copies)
    return len(rows) + len(copies)


def _documents(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def largest_difference(documents: list[dict[str, Any]], want: dict[str, dict[str, Any]]) -> float:
    """The largest score difference between each document and its counterpart in ``want``
    (by job id), once their flags (evidence included), decision, image and model are
    asserted equal, and their score keys."""
    worst = 0.0
    for doc in documents:
        expected = want[doc["job_id"]]
        for part in ("flags", "decision", "image", "model"):
            assert doc[part] == expected[part], f"{doc['job_id']}: {part}"
        got, wanted = (d["policies"]["colours"]["scores"] for d in (doc, expected))
        assert got.keys() == wanted.keys()
        worst = max(worst, *(abs(got[c] - wanted[c]) for c in wanted))
    return worst


def _shard_doc(run_id: str, shard: int, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "run_id": run_id,
        "shard": shard,
        "shards": 1,
        "since": "2020-01-01T00:00:00+00:00",
        "until": "2030-01-01T00:00:00+00:00",
        "policy": {"name": "colours", "yaml": COLOURS_POLICY},
        "out": None,
        "sinks": [],
        "changed_only": False,
    }
    doc.update(changes)
    return doc


def test_shards_on_two_workers_equal_the_in_process_rescore(
    eval_env: dict[str, str],
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    plugin_path: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    monkeypatch.syspath_prepend(str(plugin_path))  # the `record` sink, for --sink here
    env = {
        **queue_env,
        **eval_env,
        "WORKER_STORE__URI": str(tmp_path / "store"),
        "WORKER_DELIVERY__CONCURRENCY": "1",  # so a slow sink slows the shard down
    }
    workers = [start_worker(env=env, wait=False) for _ in range(2)]  # they load meanwhile

    write_shape_set(tmp_path / "set", per_class=2, label="colour", seed=7)
    folder = tmp_path / "set" / "images"
    _animated(folder / "anim.gif")
    classified = run_cli("classify", str(folder), "-o", os.devnull, env=env)
    assert classified.returncode == 0, classified.stderr
    rows = _spread_over_days(EmbeddingStore(env["WORKER_STORE__URI"]))

    reference_file = tmp_path / "in-process.jsonl"
    in_process = run_cli("rescore", "--policy", "colours", "--out", str(reference_file), env=env)
    assert in_process.returncode == 0, in_process.stderr
    reference = {doc["job_id"]: doc for doc in _documents(reference_file.read_text())}
    assert len(reference) == rows

    for worker in workers:
        worker.wait_ready()
    out = tmp_path / "fleet" / "x"
    out.parent.mkdir()
    command = ("rescore", "--policy", "colours", "--shards", str(SHARDS), "--out", str(out))
    first = run_cli(*command, env=env)
    assert first.returncode == 0, first.stderr
    found = re.search(r"run (\w+): 3 of 3 shards sent", first.stderr)
    assert found, first.stderr
    run_id = found.group(1)

    files = sorted(out.parent.glob("x.shard-*"))
    assert [f.name for f in files] == [f"x.shard-{k:03d}-of-003.jsonl" for k in range(SHARDS)]
    per_shard = [_documents(f.read_text()) for f in files]
    print(f"\n{rows} stored rows; documents per shard: {[len(docs) for docs in per_shard]}")
    assert all(per_shard), "every shard holds rows (they were spread over the days)"
    counted = Counter(doc["job_id"] for docs in per_shard for doc in docs)
    assert set(counted) == set(reference)
    assert set(counted.values()) == {1}, "one document per stored row"
    worst = largest_difference([doc for docs in per_shard for doc in docs], reference)
    print(f"largest score difference shards vs in-process: {worst:.2e}")
    assert worst <= 1e-4

    client = redis.Redis.from_url(env["WORKER_BROKER_URL"], decode_responses=True)
    done = cast(dict[str, str], client.hgetall(f"mw:rescore:{run_id}"))
    summaries = {int(k): json.loads(v) for k, v in done.items()}
    assert sorted(summaries) == list(range(SHARDS))
    assert sum(s["rows"] for s in summaries.values()) == rows
    assert [s["written"] for _, s in sorted(summaries.items())] == [len(d) for d in per_shard]
    by_worker = Counter(s["worker"] for s in summaries.values())
    print(f"shards per worker: {dict(by_worker)}; figures: {summaries}")
    taken = sum(len(w.events("rescore.shard_started")) for w in workers)
    assert taken == SHARDS

    again = run_cli(*command, env=env)
    assert again.returncode == 0, again.stderr
    assert f"run {run_id}: 0 of 3 shards sent" in again.stderr, again.stderr
    assert client.llen(QUEUE) == 0
    time.sleep(0.5)
    assert sum(len(w.events("rescore.shard_started")) for w in workers) == SHARDS

    # One shard, slower than the visibility timeout (6 s): run once, each document
    # delivered once.
    visibility = float(env["WORKER_QUEUE__VISIBILITY_TIMEOUT_S"])
    record = tmp_path / "record"
    sink = f"record:{record},delay_ms={int(1000 * 2 * visibility / rows)}"
    slow = run_cli("rescore", "--policy", "colours", "--shards", "1", "--sink", sink, env=env)
    assert slow.returncode == 0, slow.stderr
    slow_run = re.search(r"run (\w+): 1 of 1 shards sent", slow.stderr)
    assert slow_run, slow.stderr
    figures = json.loads(client.hget(f"mw:rescore:{slow_run.group(1)}", "0") or "{}")
    print(f"slow shard: {figures['seconds']} s, visibility timeout {visibility:g} s")
    assert figures["seconds"] > visibility
    assert figures["delivered"] == rows
    wait_until(lambda: client.zcard("mw:retries") == 0, 30, "the deliveries to finish")
    time.sleep(2 * float(env["WORKER_QUEUE__RESTORE_INTERVAL_S"]))
    runs = [
        e
        for w in workers
        for e in w.events()
        if e.get("run_id") == slow_run.group(1) and e["event"].startswith("rescore.shard")
    ]
    assert [e["event"] for e in runs] == ["rescore.shard_started", "rescore.shard_done"]
    delivered = Counter(
        json.loads(line)["job_id"]
        for line in (record / "deliveries.jsonl").read_text().splitlines()
    )
    assert set(delivered) == set(reference)
    assert set(delivered.values()) == {1}

    # Messages no worker may run: the intake dead-letters them; a policy that does not
    # load is dead-lettered by the worker that takes it, and the run records it failed.
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # outside WORKER_SINK_ROOTS
    refused = run_cli("rescore", "-p", "colours", "--shards", "2", "-o", f"{elsewhere}/y", env=env)
    assert refused.returncode == 1, refused.stderr
    said = " ".join(refused.stderr.split())  # rich wraps long lines
    assert re.search(r"shard 0 failed: refused by the workers: .* WORKER_SINK_ROOTS", said), said
    assert not list(elsewhere.iterdir())
    app = queue_client(env, monkeypatch).app
    bad = {"past-the-count": _shard_doc("bad", 3, shards=3), "a-list": [1, 2]}
    for message_id, argument in bad.items():
        app.send_task(RESCORE_TASK, args=[argument], queue=QUEUE, task_id=message_id)
    broken = {"name": "colours", "yaml": "name: colours\nkind: nope\n"}
    send_rescore_shard(app, _shard_doc("broken", 0, policy=broken), "broken-policy")

    wanted = {f"refused-{m}" for m in bad} | {"rescore-broken-000"}

    def dead_letters() -> dict[str, dict[str, Any]]:
        raw = cast(dict[str, str], client.hgetall("mw:dlq"))
        letters = {k: json.loads(v) for k, v in raw.items()}
        return letters if wanted <= set(letters) else {}

    letters = wait_until(dead_letters, 60, "the bad shard messages in the dead letters")
    for message_id in bad:
        entry = letters[f"refused-{message_id}"]
        assert entry["stage"] == "validate"
        print(f"{message_id}: {entry['error']}")
    assert "shard 3 of 3" in letters["refused-past-the-count"]["error"]
    assert letters["rescore-broken-000"]["stage"] == "rescore"
    assert "does not load" in letters["rescore-broken-000"]["error"]
    assert client.hget("mw:rescore:broken:failed", "0")
    wait_until(lambda: queue_drained(env["WORKER_BROKER_URL"]), 30, "an empty queue")
    for worker in workers:
        assert worker.proc.poll() is None, "the worker is still up"
        assert "Traceback" not in worker.log()
        assert worker.stop() == 0
    print(f"took {time.monotonic() - started:.1f} s")


def test_shards_without_redis_is_one_clear_error(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    policy = tmp_path / "colours.yaml"
    policy.write_text(COLOURS_POLICY)
    broker = f"redis://127.0.0.1:{free_port()}/0"
    args = ("rescore", "--policy", str(policy), "--shards", "2", "--out", str(tmp_path / "x"))
    done = run_cli(*args, env={**worker_env, "WORKER_BROKER_URL": broker})
    assert done.returncode == 2, done.stderr
    assert "cannot reach Redis" in done.stderr
    assert "WORKER_BROKER_URL" in done.stderr
    assert "Traceback" not in done.stderr
    nothing = run_cli("rescore", "--policy", str(policy), "--shards", "2", env=worker_env)
    assert nothing.returncode == 2
    assert "--out or --sink" in nothing.stderr
