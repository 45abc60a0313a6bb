"""Throughput measurements shared by `benchmarks/` scripts: raw encoder vs the real pipeline.

Speed does not depend on weight values, so benchmarks may build an *untrained* copy of an
architecture (``untrained_checkpoint``) when real weights cannot be downloaded; results
from it are labelled as such and are never used for scoring.
"""

from __future__ import annotations

import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from PIL import Image

from worker.checkpoint import CONFIG_FILE, save_checkpoint
from worker.documents import ImageRef, Result
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


def classify_pipeline(
    engine: Engine,
    paths: Sequence[Path],
    batch_size: int,
    deliver: Callable[[Result], None] | None = None,
    stages: dict[str, list[float]] | None = None,
) -> Measurement:
    """What `worker classify` does per image: fetch, decode, preprocess, encode, score, JSON
    (and, with ``deliver``, a sink). ``stages`` collects per-image milliseconds per stage."""
    items = [WorkItem(job_id=f"bench-{i}", image=ImageRef(uri=str(p))) for i, p in enumerate(paths)]
    list(engine.stream(items[:batch_size], batch_size))  # warm-up

    def run() -> None:
        for result in engine.stream(items, batch_size):
            result.to_json()
            if deliver is not None:
                started = time.perf_counter()
                deliver(result)
                result.timings_ms["sink"] = (time.perf_counter() - started) * 1000
            if stages is not None:
                for stage, ms in result.timings_ms.items():
                    stages.setdefault(stage, []).append(ms)

    return _timed(run, len(items))


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, {device}, torch {torch.__version__}, Python {platform.python_version()}"
    )


@contextmanager
def redis_server(url: str | None, workdir: Path) -> Iterator[str]:
    """Use ``url``, or start a throw-away redis-server on 127.0.0.1 for the benchmark."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def worker_process(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A `worker serve` subprocess, ready (model loaded, policies compiled) when yielded."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve"],
            env={**env, "WORKER_LOG_FORMAT": "json", "WORKER_LOG_LEVEL": "info"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 900
            while "worker.ready" not in log_path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start; see {log_path}")
                time.sleep(0.2)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def queue_round(settings: Any, paths: Sequence[Path], tag: str) -> Measurement:
    """Submit one job per path, time until the last result is stored."""
    from worker.client import Client

    client = Client(settings)
    started = time.perf_counter()
    ids = [
        client.submit({"job_id": f"bench-{tag}-{i}", "image": {"uri": str(p.resolve())}})
        for i, p in enumerate(paths)
    ]
    for job_id in ids:
        result = client.wait(job_id, timeout=900)
        if result.status != "ok":
            raise RuntimeError(f"benchmark job failed: {result.error}")
    return Measurement(len(ids), time.perf_counter() - started)
