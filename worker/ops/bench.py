"""Throughput measurements shared by `benchmarks/` scripts: raw encoder vs the real pipeline.

Speed does not depend on weight values, so benchmarks may build an *untrained* copy of an
architecture (``untrained_checkpoint``) when real weights cannot be downloaded; results
from it are labelled as such and are never used for scoring.

The pipeline ceiling (``worker bench --encoder none``) runs a real `worker serve` whose
image encoder is a zero-cost stand-in (:func:`serve_without_encoder`): everything else
(queue, intake, batching, fetch, decode, preprocess, scoring, result store) is the real
code, so its jobs/s is what the queue path could feed an encoder at most.
"""

from __future__ import annotations

import json
import os
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

#: ``untrained_checkpoint``'s name for the test suite's tiny CLIP (64x64 input, 64-d
#: embeddings): the least per-image work, for the queue path's own ceiling.
TINY_ARCH = "tiny"


def untrained_checkpoint(arch: str, directory: Path) -> str:
    """A local-dir checkpoint of ``arch`` (an open_clip architecture, or ``tiny``) with
    random weights (speed measurements only)."""
    import open_clip

    if arch == TINY_ARCH and not (directory / CONFIG_FILE).is_file():
        from worker.checkpoint import TINY_MODEL_CFG, build_untrained

        save_checkpoint(build_untrained(TINY_MODEL_CFG, seed=0), TINY_MODEL_CFG, directory)
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


#: A `worker serve` whose image encoder is the zero-cost stand-in (the pipeline ceiling).
SERVE_WITHOUT_ENCODER = (
    "from worker.ops.bench import serve_without_encoder; serve_without_encoder()"
)


#: Set to "0" for the stand-in worker: decode and preprocessing taken out as well.
DECODE_ENV = "MW_BENCH_DECODE"


def serve_without_encoder() -> None:
    """Run `worker serve` (this process's argv after it) with the device's part of the work
    replaced by a stand-in that costs nothing: ``encode_images`` gives every image the same
    fixed embedding (the model's L2-normalised text embedding of "a photo", so embedding
    size and the policy matmuls are the real ones), and ``batch_pixels`` only stacks the
    uint8 arrays (what a GPU host does on the CPU; the float normalisation runs on the GPU
    there, and on a CPU it would be the encoder's cost, not the queue path's). Fetch,
    decode, resize, scoring, results, the queue and the result store run as in
    production."""
    from worker.cli import main
    from worker.model import LoadedModel

    fixed: dict[int, torch.Tensor] = {}

    def batch_pixels(
        self: LoadedModel, inputs: Sequence[np.ndarray | torch.Tensor]
    ) -> torch.Tensor:
        if isinstance(inputs[0], torch.Tensor):
            return torch.stack([torch.as_tensor(i) for i in inputs])
        return torch.from_numpy(np.stack(inputs))

    def encode_images(self: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        count = int(pixels.shape[0])
        embedding = fixed.get(id(self))
        if embedding is None:
            embedding = fixed[id(self)] = self.encode_texts(["a photo"]).to(self.device)
        with self._lock:
            self.images_encoded += count
        return embedding.expand(count, -1)

    LoadedModel.batch_pixels = batch_pixels  # type: ignore[method-assign]
    LoadedModel.encode_images = encode_images  # type: ignore[method-assign]
    if os.environ.get(DECODE_ENV) == "0":
        _take_out_decoding()
    sys.argv = ["worker", "serve", *sys.argv[1:]]
    main()


def _take_out_decoding() -> None:
    """``Engine._decode`` as a stand-in: the image bytes are hashed (the result names them)
    and every job gets one fixed, already preprocessed model input, so what is left is the
    serial per-job work of the queue path (decode threads scale with cores; it does not)."""
    import hashlib

    from PIL import Image

    from worker.engine import Engine, Prepared

    inputs: dict[int, np.ndarray | torch.Tensor] = {}

    def decode(self: Engine, prep: Prepared, data: bytes) -> None:
        width, height = self.model.image_size
        pixels = inputs.get(id(self.model))
        if pixels is None:
            picture = Image.new("RGB", (width, height), "gray")
            pixels = inputs[id(self.model)] = self.model.image_input(picture)
        header = {"sha256": hashlib.sha256(data).hexdigest(), "width": width, "height": height}
        prep.info = prep.info.model_copy(update=header | {"format": "JPEG"})
        prep.frames.append(pixels)

    Engine._decode = decode  # type: ignore[method-assign]


#: The stand-in worker run from another source tree: this file's stand-in (loaded by path)
#: around that tree's `worker serve` (for before/after comparisons of the queue code).
_SERVE_TREE_WITHOUT_ENCODER = (
    "import importlib.util as u, sys; s = u.spec_from_file_location('mw_bench', {path!r}); "
    "m = sys.modules['mw_bench'] = u.module_from_spec(s); s.loader.exec_module(m); "
    "m.serve_without_encoder()"
)


@contextmanager
def worker_process(
    env: dict[str, str], log_path: Path, *, encoder: bool = True, tree: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A `worker serve` subprocess, ready (model loaded, policies compiled) when yielded;
    with ``encoder=False``, one with the zero-cost encoder stand-in, and with ``tree`` too,
    one running the ``worker`` package of that source tree (an older checkout, say)."""
    command = ["-m", "worker", "serve"] if encoder else ["-c", SERVE_WITHOUT_ENCODER]
    run_env = {**env, "WORKER_LOG_FORMAT": "json", "WORKER_LOG_LEVEL": "info"}
    if tree is not None and not encoder:
        command = ["-c", _SERVE_TREE_WITHOUT_ENCODER.format(path=str(Path(__file__).resolve()))]
        run_env["PYTHONPATH"] = str(tree.resolve())
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, *command],
            env=run_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tree.resolve() if tree is not None else None,
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


def input_size_images(directory: Path, side: int, count: int = 16) -> list[Path]:
    """Small JPEG files (smooth colour fields) exactly at the model's input size: fetching
    and decoding them is real work, but resizing is skipped, so the queue path's own
    costs dominate the measurement."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        path = directory / f"input_{side}_{i:03d}.jpg"
        if not path.exists():
            cells = max(side // 16, 2)
            small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR)
            image.save(path, quality=85)
        paths.append(path)
    return paths


def input_side(model_name: str) -> int:
    """The image side the model's preprocessing produces (224 when it cannot be read)."""
    from worker.model import model_config

    try:
        size = model_config(model_name).get("vision_cfg", {}).get("image_size", 224)
    except Exception:  # a hub name without network: the common size
        return 224
    return int(size if isinstance(size, int) else size[0])


@dataclass(frozen=True)
class CeilingRound:
    """One measurement of the queue path with the encoder stand-in."""

    jobs: int
    per_message: int
    enqueue_s: float  # submit_many, while the worker was paused
    drain_s: float  # worker resumed -> every result stored

    @property
    def rate(self) -> float:
        return self.jobs / self.drain_s if self.drain_s > 0 else 0.0

    @property
    def enqueue_rate(self) -> float:
        return self.jobs / self.enqueue_s if self.enqueue_s > 0 else 0.0


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block, so the queue fills before the worker drains it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_for_results(
    client: redis.Redis, job_ids: Sequence[str], timeout: float, poll_s: float = 0.002
) -> None:
    """Until every job id has a stored result (``mw:result:{id}``). The queue is FIFO, so
    the ids are checked in submission order, a few at a time: the poller stays cheap
    (it shares the machine with the worker it measures)."""
    pending = [f"mw:result:{job_id}" for job_id in job_ids]
    deadline = time.monotonic() + timeout
    window = 64
    while pending:
        head = pending[:window]
        if int(client.exists(*head)) == len(head):
            del pending[:window]
            continue
        if time.monotonic() > deadline:
            missing = f"{len(pending)} of {len(job_ids)}"
            raise RuntimeError(f"{missing} results still missing after {timeout:g} s")
        time.sleep(poll_s)


def ceiling_round(
    settings: Any,
    worker_pid: int,
    images: Sequence[Path],
    jobs: int,
    per_message: int,
    tag: str,
    timeout: float = 900,
    *,
    inline: bool = False,
) -> CeilingRound:
    """Fill the queue with ``jobs`` jobs, ``per_message`` to a message, while the worker is
    paused; then time from resuming it until every result is stored. Every result must be
    ``ok``. With ``inline``, the jobs carry the image bytes (base64) instead of a path."""
    import base64

    from worker.client import Client

    client = Client(settings)
    if inline:
        refs = [
            {"data": base64.b64encode(p.read_bytes()).decode(), "filename": p.name} for p in images
        ]
    else:
        refs = [{"uri": str(p.resolve())} for p in images]
    documents = [{"job_id": f"{tag}-{i}", "image": refs[i % len(refs)]} for i in range(jobs)]
    with paused(worker_pid):
        started = time.perf_counter()
        ids = client.submit_many(documents, per_message)
        enqueue_s = time.perf_counter() - started
    started = time.perf_counter()  # the worker resumes: it drains a full queue
    wait_for_results(client.jobs.redis, ids, timeout)
    drain_s = time.perf_counter() - started
    for start in range(0, len(ids), 1024):
        for job_id, raw in zip(
            ids[start : start + 1024],
            client.jobs.redis.mget([f"mw:result:{i}" for i in ids[start : start + 1024]]),
            strict=True,
        ):
            document = json.loads(raw) if raw is not None else {"error": "no result"}
            if document.get("status") != "ok":
                raise RuntimeError(f"benchmark job {job_id} failed: {document.get('error')}")
    return CeilingRound(jobs, per_message, enqueue_s, drain_s)
