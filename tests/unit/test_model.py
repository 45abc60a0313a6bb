"""Model loading: every failure is immediate and names the setting; never random weights."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from worker.checkpoint import TINY_MODEL_CFG, WEIGHTS_FILE, build_untrained, save_checkpoint
from worker.errors import ConfigurationError, ModelLoadError
from worker.model import LoadedModel, load_model, resolve_autocast, resolve_device


def test_local_dir_loads_with_fingerprint(tiny_model: LoadedModel, tiny_model_name: str) -> None:
    assert tiny_model.name == tiny_model_name
    assert len(tiny_model.fingerprint) == 16
    assert tiny_model.image_size == (64, 64)
    again = load_model(tiny_model_name, None, device="cpu")
    assert again.fingerprint == tiny_model.fingerprint  # deterministic


def test_fingerprint_changes_with_weights(tmp_path: Path, tiny_model: LoadedModel) -> None:
    name = save_checkpoint(build_untrained(TINY_MODEL_CFG, seed=1), TINY_MODEL_CFG, tmp_path)
    assert load_model(name, None, device="cpu").fingerprint != tiny_model.fingerprint


def test_weights_file_with_builtin_name(tmp_path: Path) -> None:
    """name + weights file: the form for a downloaded .safetensors of a built-in model."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model("RN50", pretrained=None)
    path = tmp_path / "rn50.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model("RN50", str(path), device="cpu")
    assert loaded.pretrained == str(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key].cpu(), value)
        break


def test_missing_local_dir_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"WORKER_MODEL__NAME=local-dir:.*open_clip_config"):
        load_model(f"local-dir:{tmp_path / 'nope'}", None, device="cpu")


def test_local_dir_without_weights_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelLoadError, match="WORKER_MODEL__NAME"):
        load_model(f"local-dir:{tmp_path / 'm'}", None, device="cpu")


def test_empty_pretrained_is_refused_not_random() -> None:
    with pytest.raises(ModelLoadError, match=r"WORKER_MODEL__PRETRAINED is empty.*at random"):
        load_model("ViT-B-32", "", device="cpu")


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(ModelLoadError, match=r"WORKER_MODEL__PRETRAINED=nope.*laion2b_s34b_b79k"):
        load_model("ViT-B-32", "nope", device="cpu")


def test_unknown_model_suggests_names() -> None:
    with pytest.raises(
        ModelLoadError, match=r"unknown model WORKER_MODEL__NAME=ViT-B-33.*ViT-B-32"
    ):
        load_model("ViT-B-33", "laion2b_s34b_b79k", device="cpu")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The default model with no network and no cache: a clear error within seconds."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("ViT-B-32", "laion2b_s34b_b79k", device="cpu", hub_probe_timeout_s=2)
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "WORKER_MODEL__NAME=local-dir:" in message
    assert "unreachable" in message


def test_hf_hub_name_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="hf-hub:org/repo"):
        load_model("hf-hub:org/repo", None, device="cpu", hub_probe_timeout_s=2)


def test_devices_and_precision() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigurationError, match="WORKER_DEVICE=cuda:0"):
            resolve_device("cuda:0")
    assert resolve_autocast("auto", torch.device("cpu")) is None
    assert resolve_autocast("auto", torch.device("cuda")) is torch.float16
    assert resolve_autocast("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigurationError, match="WORKER_PRECISION=fp16"):
        resolve_autocast("fp16", torch.device("cpu"))


def test_split_preprocessing_equals_open_clip_preprocess(tiny_model: LoadedModel) -> None:
    """Threads make uint8 arrays; the batch is normalised at once: same numbers as open_clip."""
    from tests.helpers import shape_image

    images = [shape_image("circle", "red", size=s, seed=s) for s in (50, 96, 300)]
    assert tiny_model.pil_stage is not None
    reference = torch.stack([tiny_model.preprocess(im) for im in images])
    batched = tiny_model.batch_pixels([tiny_model.image_input(im) for im in images])
    assert torch.equal(batched, reference)
