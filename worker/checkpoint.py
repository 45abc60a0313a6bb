"""open_clip ``local-dir`` checkpoints: ``open_clip_config.json`` + ``open_clip_model.safetensors``.

``WORKER_MODEL__NAME=local-dir:DIR`` serves any directory written here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from worker.model import LOCAL_DIR_PREFIX

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

#: A CLIP small enough to build and train in seconds on a CPU (tests, examples).
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_checkpoint(
    model: Any,
    model_cfg: dict[str, Any],
    out_dir: Path,
    preprocess_cfg: dict[str, Any] | None = None,
) -> str:
    """Write ``model`` as a local-dir checkpoint; returns the ``local-dir:`` model name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    pp = asdict(PreprocessCfg())
    pp.update(getattr(model.visual, "preprocess_cfg", None) or {})
    pp.update(preprocess_cfg or {})
    pp["size"] = model_cfg["vision_cfg"]["image_size"]
    config = {"model_cfg": model_cfg, "preprocess_cfg": pp}
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    tmp.replace(out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return LOCAL_DIR_PREFIX + str(out_dir)


def build_untrained(model_cfg: dict[str, Any], seed: int = 0) -> Any:
    """A randomly initialised open_clip CLIP, for tests and speed benchmarks only."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    model.eval()
    return model
