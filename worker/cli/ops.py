"""Operations commands: `worker health` and `worker bench`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker.cli.common import EXIT_FAILED, require_redis, state, stderr
from worker.cli.errors import exits_on_errors, fail
from worker.settings import DEFAULT_BATCH_SIZE


def health(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(help="Worker endpoint [default: http://127.0.0.1:WORKER_METRICS__PORT]."),
    ] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for an answer.")] = 5.0,
) -> None:
    """Ask a running worker whether it is ready: model loaded, Redis reachable, policies valid.

    Prints the /readyz JSON and exits 0 when ready, 1 otherwise (for Docker HEALTHCHECK,
    Kubernetes exec probes and scripts).
    """
    settings = state(ctx).settings
    base = url or f"http://127.0.0.1:{settings.metrics.port}"
    if urllib.parse.urlsplit(base).scheme not in {"http", "https"}:
        fail(f"--url must be http://HOST:PORT or https://HOST:PORT, not {base!r}")
    if url is None and not settings.metrics.port:
        fail("the worker's endpoint is off (WORKER_METRICS__PORT=0): give --url or set the port")
    try:
        with urllib.request.urlopen(base.rstrip("/") + "/readyz", timeout=timeout) as response:
            body = response.read().decode()
    except urllib.error.HTTPError as exc:  # 503 carries the failing checks
        body = exc.read().decode()
    except (OSError, ValueError) as exc:  # refused, timed out, a malformed host
        reason = getattr(exc, "reason", None) or exc
        stderr.print(
            f"[red]unreachable[/red] {escape(base)}: {escape(str(reason))}", soft_wrap=True
        )
        raise typer.Exit(EXIT_FAILED) from None
    try:
        ready = bool(json.loads(body).get("ready"))
    except (ValueError, AttributeError):
        stderr.print(
            f"[red]error[/red] {escape(base)}/readyz did not answer with a worker's JSON "
            "(is --url the worker's metrics endpoint?)",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_FAILED) from None
    typer.echo(body.strip())
    if not ready:
        raise typer.Exit(EXIT_FAILED)


def bench(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help="Model to measure [default: WORKER_MODEL__NAME].")
    ] = None,
    untrained: Annotated[
        str | None,
        typer.Option(
            help="Measure an untrained copy of this architecture (e.g. ViT-B-32; `tiny`: "
            "the test suite's 64x64 CLIP) when real weights are not available: speed does "
            "not depend on them."
        ),
    ] = None,
    images: Annotated[int, typer.Option(min=8, help="Synthetic 640x480 JPEGs to score.")] = 96,
    batch_size: Annotated[int, typer.Option(min=1)] = DEFAULT_BATCH_SIZE,
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved rounds; medians are shown.")] = 3,
    queue: Annotated[
        bool, typer.Option(help="Also measure the queue path (needs redis-server).")
    ] = True,
    redis_url: Annotated[
        str | None, typer.Option(help="Use this Redis instead of starting one.")
    ] = None,
    workdir: Annotated[Path, typer.Option(help="Images, caches and logs go here.")] = Path(
        ".bench"
    ),
    encoder: Annotated[
        str,
        typer.Option(
            help="clip: the real image encoder. none: a zero-cost stand-in (fixed "
            "embeddings), so the figure is the queue path's own ceiling in jobs/s."
        ),
    ] = "clip",
    jobs_per_message: Annotated[
        list[int] | None,
        typer.Option(
            "--jobs-per-message",
            min=1,
            help="With --encoder none: jobs packed per queue message; repeat to compare "
            "(default: 1 and 32).",
        ),
    ] = None,
    jobs: Annotated[
        int, typer.Option(min=1, help="With --encoder none: jobs per round and setting.")
    ] = 4096,
    inline: Annotated[
        bool,
        typer.Option(
            help="With --encoder none: jobs carry their image inline (base64); "
            "--no-inline sends paths to JPEG files instead (the file source reads them)."
        ),
    ] = True,
    decode: Annotated[
        bool,
        typer.Option(
            help="With --encoder none: decode and preprocess each image for real; "
            "--no-decode takes that out too (a fixed model input per job), leaving the "
            "serial per-job work of the queue path, which more cores do not speed up."
        ),
    ] = True,
) -> None:
    """Measure raw encode_image img/s, `worker classify` img/s and the queue path img/s in one
    run, with ratios to raw and the per-stage time breakdown.

    With --encoder none: the queue path's own ceiling (real redis-server, `worker serve`,
    intake, batching, decode, scoring and result store; the encoder replaced by a stand-in),
    in jobs/s for each --jobs-per-message, interleaved in one run."""
    if encoder not in {"clip", "none"}:
        fail(f"--encoder must be clip or none, not {encoder!r}")
    if encoder == "none":
        from worker.cli.ceiling import Ceiling, bench_ceiling

        run = Ceiling(
            model,
            untrained,
            batch_size,
            rounds,
            redis_url,
            workdir,
            jobs_per_message or [1, 32],
            jobs,
            inline,
            decode,
        )
        bench_ceiling(ctx, run)
        return
    if jobs_per_message:
        fail("--jobs-per-message needs --encoder none")
    from worker.model import load_model
    from worker.ops.bench import (
        classify_pipeline,
        machine,
        queue_round,
        raw_encoder,
        redis_server,
        synthetic_photos,
        worker_process,
    )
    from worker.plugins import PluginContext
    from worker.queue.delivery import SinkCache
    from worker.runtime import build_engine

    settings = state(ctx).settings
    if queue and redis_url is not None:
        require_redis(redis_url, "--redis-url")
    elif queue and shutil.which("redis-server") is None:
        fail("redis-server is not installed: install it, give --redis-url, or use --no-queue")
    from worker.cli.ceiling import model_for_bench

    name, pretrained = model_for_bench(ctx, model, untrained, workdir)
    paths = synthetic_photos(workdir / "photos", images)
    run_settings = settings.model_copy(
        update={
            "model": settings.model.model_copy(
                update={"name": name, "pretrained": pretrained or ""}
            ),
            "cache_dir": workdir / "cache",
            "batch": settings.batch.model_copy(update={"max_size": batch_size}),
        }
    )
    with exits_on_errors():
        loaded = load_model(
            name,
            pretrained,
            device=settings.device,
            precision=settings.precision,
            download_dir=settings.model.download_dir,
        )
        engine = build_engine(run_settings, model=loaded)
    sinks = SinkCache(PluginContext(settings=run_settings))
    local = sinks.get({"type": "local", "path": str(workdir / "results")})
    rates: dict[str, list[float]] = {"raw": [], "classify": [], "queue": []}
    stages: dict[str, list[float]] = {}
    env = {
        **os.environ,
        "WORKER_MODEL__NAME": name,
        "WORKER_MODEL__PRETRAINED": pretrained or "",
        "WORKER_CACHE_DIR": str(workdir / "cache"),
        "WORKER_POLICY_DIR": str(settings.policy_dir),
        "WORKER_FILE_ROOTS": json.dumps([str(workdir.resolve())]),
        "WORKER_BATCH__MAX_SIZE": str(batch_size),
        "WORKER_METRICS__PORT": "0",
    }
    with contextlib.ExitStack() as stack:
        queue_settings = None
        if queue:
            url = stack.enter_context(redis_server(redis_url, workdir))
            env["WORKER_BROKER_URL"] = url
            stack.enter_context(worker_process(env, workdir / "worker.log"))
            queue_settings = run_settings.model_copy(update={"broker_url": url})
        measure = {
            "raw": lambda n: raw_encoder(loaded, paths, batch_size).rate,
            "classify": lambda n: (
                classify_pipeline(engine, paths, batch_size, local.deliver, stages).rate
            ),
        }
        if queue_settings is not None:
            qs = queue_settings
            measure["queue"] = lambda n: queue_round(qs, paths, f"bench{n}").rate
        order = list(measure)
        for number in range(rounds):
            # Rotate the order each round, so drift on a shared machine favours no path.
            for key in order[number % len(order) :] + order[: number % len(order)]:
                rates[key].append(measure[key](number))
            summary = ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items() if v)
            stderr.print(f"round {number + 1}: {summary}")
    engine.close()
    sinks.close()
    _print(name, untrained, loaded, paths, batch_size, rounds, rates, stages, machine())


def _print(
    name: str,
    untrained: str | None,
    loaded: object,
    paths: list[Path],
    batch_size: int,
    rounds: int,
    rates: dict[str, list[float]],
    stages: dict[str, list[float]],
    machine: str,
) -> None:
    raw = statistics.median(rates["raw"])
    console = Console(width=110)
    label = f"{untrained} (untrained weights: speed only)" if untrained else name
    console.print(f"machine: {machine}; cores: {os.cpu_count()}")
    console.print(
        f"model: {label} on {loaded.device}; batch {batch_size}; "  # type: ignore[attr-defined]
        f"{len(paths)} JPEG 640x480; medians of {rounds} round(s)"
    )
    table = Table(title="throughput", title_justify="left")
    for column in ("path", "img/s", "ratio to raw", "rounds"):
        table.add_column(column, justify="right" if column != "path" else "left")
    names = {
        "raw": "raw encode_image",
        "classify": "worker classify (+ local sink)",
        "queue": "queue (submit -> stored, 1 worker)",
    }
    for key, values in rates.items():
        if values:
            rate = statistics.median(values)
            table.add_row(
                names[key],
                f"{rate:.2f}",
                f"{rate / raw:.3f}",
                " / ".join(f"{v:.1f}" for v in values),
            )
    console.print(table)
    breakdown = Table(title="classify stage time per image (mean ms)", title_justify="left")
    for column in ("stage", "ms", "note"):
        breakdown.add_column(column)
    notes = {
        "fetch": "read the file",
        "decode": "JPEG draft decode",
        "preprocess": "resize + crop (threads)",
        "encode": "batch forward / batch size",
        "score": "all policies / batch size",
        "sink": "local sink write",
    }
    for stage in ("fetch", "decode", "preprocess", "encode", "score", "sink"):
        if stages.get(stage):
            breakdown.add_row(stage, f"{statistics.mean(stages[stage]):.2f}", notes[stage])
    console.print(breakdown)
