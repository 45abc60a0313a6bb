"""`worker bench --encoder none`: the queue path's own ceiling, in jobs/s, at 1, 32, …
jobs per message (see docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.common import require_redis, state, stderr
from worker.cli.errors import fail

#: ViT-B-32's image encode rate on one current GPU (fp16), the figure a feeder must reach.
GPU_ENCODE_IMG_S = 10_000


def model_for_bench(
    ctx: typer.Context, model: str | None, untrained: str | None, workdir: Path
) -> tuple[str, str | None]:
    """The model name and pretrained tag `worker bench` measures (an untrained copy of
    ``untrained`` when given)."""
    from worker.ops.bench import TINY_ARCH, untrained_checkpoint

    settings = state(ctx).settings
    if untrained:
        import open_clip

        if untrained != TINY_ARCH and open_clip.get_model_config(untrained) is None:
            fail(f"--untrained: unknown architecture {untrained!r} (e.g. ViT-B-32, RN50, tiny)")
        return untrained_checkpoint(untrained, workdir / f"untrained-{untrained}"), None
    name = model or settings.model.name
    pretrained = None if name.startswith(("local-dir:", "hf-hub:")) else settings.model.pretrained
    return name, pretrained


@dataclass(frozen=True)
class Ceiling:
    """What `worker bench --encoder none` measures."""

    model: str | None
    untrained: str | None
    batch_size: int
    rounds: int
    redis_url: str | None
    workdir: Path
    per_message: list[int]
    jobs: int
    inline: bool
    decode: bool = True


def bench_ceiling(ctx: typer.Context, run: Ceiling) -> None:
    """`worker bench --encoder none`: the queue path's jobs/s with 1, 32, … jobs/message."""
    from worker.ops.bench import (
        DECODE_ENV,
        ceiling_round,
        input_side,
        input_size_images,
        machine,
        redis_server,
        worker_process,
    )

    settings = state(ctx).settings
    if run.redis_url is not None:
        require_redis(run.redis_url, "--redis-url")
    elif shutil.which("redis-server") is None:
        fail("redis-server is not installed: install it or give --redis-url")
    too_many = [n for n in run.per_message if n > settings.queue.max_jobs_per_message]
    if too_many:
        fail(
            f"--jobs-per-message {too_many[0]} is over WORKER_QUEUE__MAX_JOBS_PER_MESSAGE "
            f"({settings.queue.max_jobs_per_message})"
        )
    name, pretrained = model_for_bench(ctx, run.model, run.untrained, run.workdir)
    side = input_side(name)
    images = input_size_images(run.workdir / "input-images", side)
    env = {
        **os.environ,
        "WORKER_MODEL__NAME": name,
        "WORKER_MODEL__PRETRAINED": pretrained or "",
        "WORKER_CACHE_DIR": str(run.workdir / "cache"),
        "WORKER_POLICY_DIR": str(settings.policy_dir),
        "WORKER_FILE_ROOTS": json.dumps([str(run.workdir.resolve())]),
        "WORKER_BATCH__MAX_SIZE": str(run.batch_size),
        "WORKER_METRICS__PORT": "0",
        # No encoder: the torch ops left are small, and OpenMP threads spinning beside the
        # decode threads only cost (a GPU host runs them on the GPU).
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        DECODE_ENV: "1" if run.decode else "0",
    }
    sizes = list(dict.fromkeys(run.per_message))
    measured: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server(run.redis_url, run.workdir))
        env["WORKER_BROKER_URL"] = url
        proc = stack.enter_context(worker_process(env, run.workdir / "worker.log", encoder=False))
        run_settings = settings.model_copy(update={"broker_url": url})
        for number in range(run.rounds):
            shift = number % len(sizes)  # rotate, so drift on the machine favours no size
            for size in sizes[shift:] + sizes[:shift]:
                tag = f"ceiling{number}-{size}"
                found = ceiling_round(
                    run_settings, proc.pid, images, run.jobs, size, tag, inline=run.inline
                )
                measured[size].append((found.rate, found.enqueue_rate))
            summary = ", ".join(f"{n}/msg {v[-1][0]:.0f} jobs/s" for n, v in measured.items())
            stderr.print(f"round {number + 1}: {summary}")
    label = f"{run.untrained} (untrained weights)" if run.untrained else name
    images_text = f"{side}x{side} JPEG ({images[0].stat().st_size} bytes) " + (
        "inline in the job (base64)" if run.inline else "files read by the file source"
    )
    console = Console(width=110)
    console.print(f"machine: {machine()}; cores: {os.cpu_count()}")
    console.print(
        "pipeline ceiling: the GPU's part (batch normalisation, image encoder) replaced by a "
        f"zero-cost stand-in (fixed embeddings); model {label} for preprocessing and "
        f"policies; batch {run.batch_size}; {run.jobs} jobs per round; images: {images_text} "
        + (
            "(fetch and decode real, no resize needed)"
            if run.decode
            else "(fetched and hashed; decode and preprocessing taken out: a fixed model input)"
        )
        + "; 1 worker (solo pool, "
        f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}); medians of {run.rounds} round(s)"
    )
    print_ceiling(console, measured)


def print_ceiling(console: Console, measured: dict[int, list[tuple[float, float]]]) -> None:
    table = Table(title="queue path without the encoder", title_justify="left")
    for column in ("jobs/message", "jobs/s", "enqueue jobs/s", "rounds (jobs/s)"):
        table.add_column(column, justify="right")
    medians: dict[int, float] = {}
    for size, values in measured.items():
        medians[size] = statistics.median(v[0] for v in values)
        table.add_row(
            str(size),
            f"{medians[size]:.0f}",
            f"{statistics.median(v[1] for v in values):.0f}",
            " / ".join(f"{v[0]:.0f}" for v in values),
        )
    console.print(table)
    sizes = list(medians)
    base = sizes[0]
    for size in sizes[1:]:
        ratio = medians[size] / medians[base] if medians[base] else 0.0
        console.print(f"ratio {size} vs {base} jobs/message: {ratio:.2f}x")
    for size in sizes:
        share = medians[size] / GPU_ENCODE_IMG_S
        console.print(
            f"{size} jobs/message: one worker feeds a GPU at most {medians[size]:.0f} img/s, "
            f"{share:.1%} of a ~{GPU_ENCODE_IMG_S:,} img/s ViT-B-32 encode rate"
        )
