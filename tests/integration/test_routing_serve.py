"""Routing by decision through a real `worker serve` on a real redis-server, delivering to
a real HTTP receiver that verifies every webhook's signature with `standardwebhooks`.

Default sinks (``WORKER_SINKS``): one webhook for every result and one with
``when=review``. Jobs naming their own sinks use ``"when": "block"`` and
``"when": ["review", "block"]`` (and then the defaults do not apply). The images' bands are
read from the tiny model's scores first (`worker classify` in this process), so each job's
decision is known before it is submitted. A job whose sink has a bad ``when`` is answered
with an error result, and the worker carries on.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from standardwebhooks import Webhook

from tests.cli_runner import run_cli
from tests.helpers import BANDED_POLICY, choose_bounds, wait_until, write_images, write_policy
from tests.integration.queue_helpers import queue_client, queue_drained
from tests.integration.servers import HttpServer
from tests.processes import WorkerProcess, cli
from worker.errors import PluginError
from worker.queue.app import send_job

pytestmark = pytest.mark.integration
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#: The narrowest gap a band bound may sit in (it sits in the middle: half of it each side).
BANDS = ("allow", "review", "block")


@pytest.fixture
def receiver() -> Iterator[HttpServer]:
    server = HttpServer("127.0.0.1")
    yield server
    server.close()


def banded_images(root: Path, env: dict[str, str]) -> tuple[dict[str, Path], Path]:
    """One image per band (the one farthest from the bounds) and the policy directory
    whose ``mod`` policy puts them there."""
    images = write_images(root / "imgs", 12)
    policies = root / "policies"
    write_policy(policies, BANDED_POLICY.format(bounds="    threshold: 1.0\n"), "mod.yaml")
    first = run_cli("classify", str(root / "imgs"), env={**env, "WORKER_POLICY_DIR": str(policies)})
    assert first.returncode == 0, first.stderr
    docs = [json.loads(line) for line in first.stdout.splitlines()]
    scores = {Path(d["image"]["uri"]).name: d["policies"]["mod"]["scores"]["weapons"] for d in docs}
    review_at, threshold = choose_bounds(list(scores.values()))
    middle = (review_at + threshold) / 2
    by_name = {p.name: p for p in images}
    chosen = {
        "allow": min(scores, key=scores.__getitem__),
        "review": min(scores, key=lambda n: abs(scores[n] - middle)),
        "block": max(scores, key=scores.__getitem__),
    }
    print(f"\nweapons scores: {dict(sorted(scores.items(), key=lambda kv: kv[1]))}")
    print(f"review_at={review_at} threshold={threshold} chosen={chosen}")
    assert scores[chosen["allow"]] < review_at <= scores[chosen["review"]] < threshold
    assert threshold <= scores[chosen["block"]]
    bounds = f"    threshold: {threshold}\n    review_at: {review_at}\n"
    write_policy(policies, BANDED_POLICY.format(bounds=bounds), "mod.yaml")
    return {band: by_name[name] for band, name in chosen.items()}, policies


def received(server: HttpServer) -> dict[str, list[dict[str, Any]]]:
    """The verified bodies by path (standardwebhooks raises if a signature is wrong)."""
    bodies: dict[str, list[dict[str, Any]]] = {}
    for request in server.requests:
        body = Webhook(SECRET).verify(request.body, request.headers)
        assert request.headers["webhook-id"] == body["job_id"]
        bodies.setdefault(request.path, []).append(body)
    return bodies


def test_serve_routes_results_by_decision(
    tmp_path: Path,
    queue_env: dict[str, str],
    receiver: HttpServer,
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    images, policies = banded_images(tmp_path, queue_env)
    corrupt = tmp_path / "imgs" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + os.urandom(300))
    env = {
        **queue_env,
        "WORKER_POLICY_DIR": str(policies),
        "WORKER_WEBHOOK__SECRET": SECRET,
        "WORKER_HTTP__ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "WORKER_SINKS": json.dumps(
            [f"webhook:{receiver.url('/all')}", f"webhook:{receiver.url('/review')},when=review"]
        ),
    }
    worker = start_worker(env=env)
    client = queue_client(env, monkeypatch)
    own_sinks: list[dict[str, Any]] = [
        {"type": "webhook", "url": receiver.url("/block"), "when": "block"},
        {"type": "webhook", "url": receiver.url("/flagged"), "when": ["review", "block"]},
    ]
    # the client refuses a bad `when` itself; one sent without it is answered by the worker
    bad_when: dict[str, Any] = {
        "job_id": "bad-when",
        "image": {"uri": str(images["block"])},
        "sinks": [{"type": "webhook", "url": receiver.url("/block"), "when": "delete"}],
    }
    with pytest.raises(PluginError, match="when="):
        client.submit(bad_when)
    bad_list = {**bad_when, "job_id": "bad-when-list"}
    bad_list["sinks"] = [{**own_sinks[1], "when": ["review", "remove"]}]
    sources = {**images, "corrupt": corrupt}
    for band, image in sources.items():
        client.submit({"job_id": f"d-{band}", "image": {"uri": str(image)}})
    send_job(client.app, bad_when)
    for band, image in sources.items():
        client.submit({"job_id": f"j-{band}", "image": {"uri": str(image)}, "sinks": own_sinks})
    send_job(client.app, bad_list)

    expected = {
        "/all": {"d-allow", "d-review", "d-block", "d-corrupt"},
        "/review": {"d-review"},
        "/block": {"j-block"},
        "/flagged": {"j-review", "j-block"},
    }
    total = sum(map(len, expected.values()))
    wait_until(lambda: len(worker.events("sink.delivered")) >= total, 90, "every delivery")
    url = env["WORKER_BROKER_URL"]
    wait_until(lambda: queue_drained(url), 30, "an empty queue")
    results = {
        job_id: client.wait(job_id, timeout=30)
        for job_id in [f"{p}-{band}" for p in "dj" for band in sources] + ["bad-when"]
    }
    results["bad-when-list"] = client.wait("bad-when-list", timeout=30)
    time.sleep(1.0)  # room for a stray duplicate or late delivery to show up
    assert redis.Redis.from_url(url).zcard("mw:retries") == 0

    bodies = received(receiver)
    got = {path: Counter(b["job_id"] for b in items) for path, items in bodies.items()}
    print(f"received: { {p: sorted(c) for p, c in got.items()} }")
    assert {path: set(c) for path, c in got.items()} == expected
    assert all(n == 1 for c in got.values() for n in c.values()), f"duplicates: {got}"
    assert len(worker.events("sink.delivered")) == total
    for items in bodies.values():
        for body in items:
            band = body["job_id"].split("-", 1)[1]
            if band == "corrupt":
                assert body["status"] == "error"
                assert body["error"]["code"] == "image_unreadable"
                assert body["decision"] is None
            else:
                categories = [] if band == "allow" else ["mod/weapons"]
                assert body["decision"] == {"action": band, "categories": categories}
                assert body == results[body["job_id"]].model_dump(mode="json")

    for band in BANDS:  # the stored results agree with what was delivered
        for prefix in "dj":
            decision = results[f"{prefix}-{band}"].decision
            assert decision is not None
            assert decision.action == band
    assert results["j-corrupt"].error is not None
    assert results["j-corrupt"].error.code == "image_unreadable"
    for job_id in ("bad-when", "bad-when-list"):
        refused = results[job_id]
        assert refused.status == "error"
        assert refused.decision is None
        assert refused.error is not None
        assert refused.error.code == "sink_not_allowed"
        assert "when=" in refused.error.message
    assert {e["job_id"] for e in worker.events("job.refused")} == {"bad-when", "bad-when-list"}
    assert worker.proc.poll() is None, "the worker is still up"
    assert "Traceback" not in worker.log()
    assert worker.stop() == 0
    print(f"took {time.monotonic() - started:.1f} s")


def test_serve_refuses_a_bad_when_in_worker_sinks_at_start_up(
    tmp_path: Path, queue_env: dict[str, str]
) -> None:
    env = {
        **queue_env,
        # no model there: a bad default sink must be found before the model loads
        "WORKER_MODEL__NAME": f"local-dir:{tmp_path / 'no-model'}",
        "WORKER_SINKS": json.dumps([f"local:{tmp_path / 'out.jsonl'},when=review|delete"]),
    }
    proc = cli(env, "serve", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    assert "when=" in message
    assert all(action in message for action in ("allow", "flag", "review", "block"))
    assert "WORKER_MODEL__NAME" not in message
    assert "Traceback" not in proc.stderr
