"""Shared fixtures. The tiny model is built once per session and saved as a local-dir
checkpoint, the same way users serve a fine-tuned model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import write_policy
from worker.checkpoint import TINY_MODEL_CFG, build_untrained, save_checkpoint
from worker.model import LoadedModel, load_model
from worker.settings import Settings


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
