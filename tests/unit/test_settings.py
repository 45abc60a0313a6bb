"""Settings: WORKER_ env vars with __ nesting, a TOML file, and errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import ConfigurationError
from worker.settings import SHIPPED_POLICY_DIR, load_settings


def test_defaults() -> None:
    s = load_settings()
    assert (s.model.name, s.model.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert s.device == "auto"
    assert s.policy_dir == SHIPPED_POLICY_DIR
    assert (SHIPPED_POLICY_DIR / "moderation.yaml").is_file()


def test_environment_with_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MODEL__NAME", "local-dir:/models/mine")
    monkeypatch.setenv("WORKER_BATCH__MAX_SIZE", "8")
    monkeypatch.setenv("WORKER_DEVICE", "cuda:1")
    monkeypatch.setenv("WORKER_SINKS", '["local:out.jsonl"]')
    s = load_settings()
    assert s.model.name == "local-dir:/models/mine"
    assert s.model.pretrained == "laion2b_s34b_b79k"
    assert s.batch.max_size == 8
    assert s.device == "cuda:1"
    assert s.sinks == ["local:out.jsonl"]


def test_config_file_below_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "worker.toml"
    cfg.write_text('device = "cpu"\n[model]\nname = "ViT-B-16"\n[batch]\nmax_size = 4\n')
    monkeypatch.setenv("WORKER_BATCH__MAX_SIZE", "16")
    s = load_settings(cfg)
    assert (s.device, s.model.name, s.batch.max_size) == ("cpu", "ViT-B-16", 16)
    monkeypatch.setenv("WORKER_CONFIG_FILE", str(cfg))
    assert load_settings().model.name == "ViT-B-16"


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("WORKER_BATCH__MAX_SIZE", "-1", "WORKER_BATCH__MAX_SIZE"),
        ("WORKER_DEVICE", "tpu", "WORKER_DEVICE"),
        ("WORKER_PRECISION", "int4", "WORKER_PRECISION"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, named: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigurationError, match=named):
        load_settings()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
