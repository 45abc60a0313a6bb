"""`worker finetune` killed after its first epoch (SIGKILL: no clean-up at all) resumes
where it stopped instead of starting again. It needs a real process to kill, so it is
here rather than with the in-process finetune tests (tests/unit/test_finetune.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.processes import WorkerProcess, cli
from tests.synthetic import write_finetune_domain

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def env(tmp_path: Path, trained_model_name: str) -> dict[str, str]:
    return {
        **os.environ,
        "WORKER_MODEL__NAME": trained_model_name,
        "WORKER_CACHE_DIR": str(tmp_path / "cache"),
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
    }


def test_interrupted_run_resumes_not_restarts(tmp_path: Path, env: dict[str, str]) -> None:
    domain = write_finetune_domain(tmp_path / "domain")
    out = tmp_path / "ckpt"
    run = ["finetune", "--data", str(domain), "--out", str(out), "--epochs", "6", "--lr", "3e-3"]
    run += ["--patience", "6"]
    first = WorkerProcess(env, tmp_path / "first.log", run, command=())
    try:
        first.wait_for("finetune.epoch_saved", timeout=300)
    finally:
        first.kill(30)  # an interruption after the first epoch
    saved = first.events("finetune.epoch_saved")
    assert [e["epoch"] for e in saved][:1] == [1]
    assert not (out / "report.json").exists()

    again = cli(env, "finetune", "--data", str(domain), "--out", str(out), timeout=600)
    assert again.returncode == 2
    assert "add --resume" in again.stderr

    resumed = cli(env, *run, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [json.loads(x) for x in resumed.stderr.splitlines() if x.startswith("{")]
    assert [e["from_epoch"] for e in events if e["event"] == "finetune.resumed"] == [len(saved) + 1]
    second_run_epochs = [e["epoch"] for e in events if e["event"] == "finetune.epoch_saved"]
    assert second_run_epochs[0] == len(saved) + 1  # continued, did not start again at 1
    report = json.loads((out / "report.json").read_text())
    assert [e["epoch"] for e in report["history"]["epochs"]] == list(range(1, 7))
    assert not (out / ".resume").exists()  # cleaned up once finished


def test_run_killed_in_the_learning_rate_sweep_keeps_its_finished_trials(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The default run (no --lr) starts with a sweep; a kill after its first trial loses
    that trial only: --resume runs the remaining ones and the full run."""
    domain = write_finetune_domain(tmp_path / "domain")
    out = tmp_path / "ckpt"
    run = ["finetune", "--data", str(domain), "--out", str(out), "--epochs", "3"]
    first = WorkerProcess(env, tmp_path / "first.log", run, command=())
    try:
        first.wait_for("finetune.trial", timeout=300)
    finally:
        first.kill(30)
    finished = [e["lr"] for e in first.events("finetune.trial")]
    assert finished
    assert not (out / "report.json").exists()

    resumed = cli(env, *run, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [json.loads(x) for x in resumed.stderr.splitlines() if x.startswith("{")]
    rerun = [e["lr"] for e in events if e["event"] == "finetune.trial"]
    assert not set(rerun) & set(finished), (finished, rerun)
    report = json.loads((out / "report.json").read_text())
    assert len(report["sweep"]) == 7
    assert {t["lr"] for t in report["sweep"]} >= set(finished) | set(rerun)
    assert report["config"]["lr"] in {t["lr"] for t in report["sweep"]}
