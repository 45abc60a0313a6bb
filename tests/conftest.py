"""Shared fixtures. The tiny model is built once per session and saved as a local-dir
checkpoint, the same way users serve a fine-tuned model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import write_policy
from worker.checkpoint import TINY_MODEL_CFG, build_untrained, save_checkpoint
from worker.model import LoadedModel, load_model
from worker.settings import Settings


def _share_the_cores() -> None:
    """Under pytest-xdist each worker process (and each process its tests start) would run
    one OpenMP thread per core: with 2 workers on 2 cores, 4 or more threads spin against
    each other and torch runs several times slower. Split the cores between the workers,
    unless OMP_NUM_THREADS already says otherwise."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny CLIP saved as a local-dir checkpoint (fixed seed)."""
    directory = tmp_path_factory.mktemp("tiny-model")
    save_checkpoint(build_untrained(TINY_MODEL_CFG, seed=0), TINY_MODEL_CFG, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_name(tiny_model_dir: Path) -> str:
    return f"local-dir:{tiny_model_dir}"


@pytest.fixture(scope="session")
def tiny_model(tiny_model_name: str) -> LoadedModel:
    return load_model(tiny_model_name, None, device="cpu")


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    write_policy(directory)
    return directory


@pytest.fixture
def make_settings(
    tmp_path: Path, tiny_model_name: str, policy_dir: Path
) -> Callable[..., Settings]:
    """Settings for the tiny model with a fresh cache dir; keyword overrides win."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model": {"name": tiny_model_name, "pretrained": ""},
            "cache_dir": tmp_path / "cache",
            "policy_dir": policy_dir,
            "device": "cpu",
            "decode_workers": 2,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def worker_env(
    tmp_path: Path, tiny_model_name: str, policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Environment for running `worker` commands against the tiny model."""
    env = {
        "WORKER_MODEL__NAME": tiny_model_name,
        "WORKER_CACHE_DIR": str(tmp_path / "cache"),
        "WORKER_POLICY_DIR": str(policy_dir),
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def trained_model_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny CLIP after 160 steps (~20 s) of contrastive pre-training on filled shapes."""
    from tests.synthetic import pretrain_tiny_clip

    return pretrain_tiny_clip(tmp_path_factory.mktemp("trained-tiny"))


@pytest.fixture
def eval_env(tmp_path: Path, trained_model_name: str) -> dict[str, str]:
    """Environment for `worker eval` tests: the trained tiny CLIP and the colours policy
    (tests.synthetic.COLOURS_POLICY) in a fresh policy directory."""
    from tests.synthetic import colours_env

    return colours_env(tmp_path, trained_model_name)
