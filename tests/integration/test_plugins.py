"""Plugins found through entry points: a third-party sink package installed with pip."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import wait_until, write_images
from tests.processes import WorkerProcess, cli, run_python

pytestmark = pytest.mark.integration


def test_third_party_sink_is_listed_and_used_by_classify(
    tmp_path: Path, queue_env: dict[str, str]
) -> None:
    listed = cli(queue_env, "plugins")
    assert listed.returncode == 0
    assert "mw_test_plugins:RecordingSink" in listed.stdout
    write_images(tmp_path / "imgs", 3)
    out = tmp_path / "recorded"
    proc = cli(queue_env, "classify", str(tmp_path / "imgs"), "--sink", f"record:{out}")
    assert proc.returncode == 0, proc.stderr
    ids = [json.loads(line)["job_id"] for line in proc.stdout.splitlines()]
    assert sorted(p.stem for p in out.glob("*.json")) == sorted(ids)


def test_classify_sink_failure_is_reported(tmp_path: Path, queue_env: dict[str, str]) -> None:
    write_images(tmp_path / "imgs", 1)
    blocker = tmp_path / "down"
    blocker.write_text("x")
    out = tmp_path / "recorded"
    proc = cli(
        queue_env,
        "classify",
        str(tmp_path / "imgs"),
        "--sink",
        f"record:{out},fail_while={blocker}",
    )
    assert proc.returncode == 1
    # stderr is not a terminal: the summary is the classify.finished log event
    [summary] = [line for line in proc.stderr.splitlines() if "classify.finished" in line]
    assert json.loads(summary)["sink_failures"] == 1
    assert len(proc.stdout.splitlines()) == 1  # the result itself is still printed


def test_third_party_sink_is_used_by_the_queue(
    tmp_path: Path, queue_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]
    out = tmp_path / "recorded"
    worker = start_worker(env={"WORKER_SINKS": json.dumps([f"record:{out}"])})  # a default sink
    job = {"job_id": "tp-1", "image": {"uri": str(image)}}
    code = f"from worker.client import submit\nsubmit({job!r})"
    assert run_python(code, queue_env).returncode == 0
    wait_until((out / "tp-1.json").exists, 60, "the plugin's delivery")
    ready = worker.events("worker.ready")[0]
    assert ready["sinks"] == ["record"]
    assert worker.stop() == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ftp:ftp://host/", "unknown sink 'ftp' (known: local, record, s3, webhook)"),
        ("record:/tmp/x,colour=red", "bad options for sink 'record'"),
        ("webhook:http://127.0.0.1/hook", "needs a signing secret"),
    ],
)
def test_bad_sink_settings_fail_at_start(
    tmp_path: Path, queue_env: dict[str, str], spec: str, message: str
) -> None:
    write_images(tmp_path / "imgs", 1)
    proc = cli(queue_env, "classify", str(tmp_path / "imgs"), "--sink", spec)
    assert proc.returncode == 2
    assert message in proc.stderr
    env = {**queue_env, "WORKER_SINKS": json.dumps([spec])}
    serve = cli(env, "serve")
    assert serve.returncode == 2
    assert message in serve.stderr
