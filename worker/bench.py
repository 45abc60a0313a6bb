"""Throughput measurements shared by `benchmarks/` scripts: raw encoder vs the real pipeline.

Speed does not depend on weight values, so benchmarks may build an *untrained* copy of an
architecture (``untrained_checkpoint``) when real weights cannot be downloaded; results
from it are labelled as such and are never used for scoring.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.checkpoint import CONFIG_FILE, save_checkpoint
from worker.documents import ImageRef
from worker.engine import Engine, WorkItem
from worker.model import LoadedModel


def untrained_checkpoint(arch: str, directory: Path) -> str:
    """A local-dir checkpoint of ``arch`` with random weights (speed measurements only)."""
    import open_clip

    if not (directory / CONFIG_FILE).is_file():
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown architecture {arch!r}")
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        save_checkpoint(model, cfg, directory)
    return f"local-dir:{directory}"


def synthetic_photos(directory: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """JPEG 'photos' of smooth random colour fields: realistic decode cost, no content."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = directory / f"photo_{i:04d}.jpg"
        if not path.exists():
            small = rng.integers(0, 256, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
            noise = rng.integers(-12, 12, (size[1], size[0], 3))
            arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Measurement:
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _timed(fn: Callable[[], Any], images: int) -> Measurement:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return Measurement(images, time.perf_counter() - started)


def raw_encoder(model: LoadedModel, paths: Sequence[Path], batch_size: int) -> Measurement:
    """``encode_image`` alone on already preprocessed tensors (the ceiling)."""
    pixels = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in paths])
    if model.device.type == "cuda":
        pixels = pixels.pin_memory()
    model.encode_images(pixels[:batch_size])  # warm-up

    def run() -> None:
        for start in range(0, len(pixels), batch_size):
            model.encode_images(pixels[start : start + batch_size])

    return _timed(run, len(pixels))


def classify_pipeline(engine: Engine, paths: Sequence[Path], batch_size: int) -> Measurement:
    """What `worker classify` does per image: fetch, decode, preprocess, encode, score, JSON."""
    items = [WorkItem(job_id=f"bench-{i}", image=ImageRef(uri=str(p))) for i, p in enumerate(paths)]
    list(engine.stream(items[:batch_size], batch_size))  # warm-up

    def run() -> None:
        for result in engine.stream(items, batch_size):
            result.to_json()

    return _timed(run, len(items))


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, {device}, torch {torch.__version__}, Python {platform.python_version()}"
    )
