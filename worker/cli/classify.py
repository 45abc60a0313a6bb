"""`worker classify`: score local files and URIs in-process, no broker."""

from __future__ import annotations

import glob
import hashlib
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, TextIO

import typer
from rich.table import Table

from worker.cli.common import EXIT_FAILED, exits_on_errors, progress_bar, state, stderr
from worker.delivery import SinkCache, deliver_inline
from worker.documents import ImageRef, Result
from worker.engine import WorkItem
from worker.fetcher import uri_scheme
from worker.plugins import PluginContext, parse_sink_spec
from worker.runtime import build_engine, resolve_batch_size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
GLOB_CHARS = set("*?[")


def expand_sources(sources: list[str]) -> list[str]:
    """Paths, directories (recursive, image suffixes only), globs and URIs -> URIs in order.

    Names that match nothing are kept, so they come out as ``source_not_found`` results.
    """
    out: list[str] = []
    for src in sources:
        if uri_scheme(src) not in {"", "file"}:
            out.append(src)
            continue
        path = Path(src.removeprefix("file://")).expanduser()
        if path.is_dir():
            out.extend(
                str(p)
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif not path.exists() and GLOB_CHARS & set(src):
            matches = sorted(glob.glob(str(path), recursive=True))
            out.extend(m for m in matches if Path(m).is_file()) if matches else out.append(src)
        else:
            out.append(src)
    return out


def job_id_for(uri: str) -> str:
    """A stable job id per source, so re-running classify overwrites rather than duplicates."""
    return "cli-" + hashlib.sha256(uri.encode()).hexdigest()[:24]


def _summary(results: list[Result], seconds: float, sink_failures: list[str]) -> Table:
    ok = sum(r.status == "ok" for r in results)
    errors = Counter(r.error.code for r in results if r.error is not None)
    flags = Counter(f"{f.policy}/{f.category}" for r in results for f in r.flags)
    table = Table(title="classify", show_header=False, title_justify="left")
    table.add_row("images", str(len(results)))
    table.add_row("ok", str(ok))
    table.add_row("errors", ", ".join(f"{c}: {n}" for c, n in errors.most_common()) or "0")
    table.add_row("flags", ", ".join(f"{c}: {n}" for c, n in flags.most_common()) or "none")
    if sink_failures:
        table.add_row("sink failures", f"{len(sink_failures)}: {sink_failures[0]}")
    rate = len(results) / seconds if seconds > 0 else 0.0
    table.add_row("throughput", f"{rate:.1f} img/s ({seconds:.1f} s)")
    return table


def classify(
    ctx: typer.Context,
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Image files, directories (searched recursively), globs, file:// URIs "
            "or other URIs an installed source handles (s3://, https://).",
            show_default=False,
        ),
    ],
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            "-p",
            help="Policy name (in WORKER_POLICY_DIR) or YAML path; repeat for several. "
            "Default: every policy in WORKER_POLICY_DIR.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write JSONL here instead of stdout.", dir_okay=False),
    ] = None,
    sink: Annotated[
        list[str] | None,
        typer.Option(
            "--sink",
            "-s",
            help="Also deliver each result: TYPE:TARGET[,key=value…] (local:dir/, "
            "s3:s3://bucket/prefix/, webhook:https://host/hook, or an installed plugin); "
            "repeat for several. Failed deliveries are retried, then reported (exit 1).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            help="Images per encoder batch [default: WORKER_BATCH__MAX_SIZE].",
        ),
    ] = None,
) -> None:
    """Score images against policies and print one JSON result per line.

    Unreadable images become results with status "error" and a stable error code; the
    others are still scored. Exits 0 unless no image at all could be read or a --sink
    delivery failed.
    """
    settings = state(ctx).settings
    uris = expand_sources(sources)
    if not uris:
        stderr.print("[red]error[/red] no images found in the given sources")
        raise typer.Exit(EXIT_FAILED)
    with exits_on_errors():
        sink_configs = [parse_sink_spec(s) for s in sink or []]
        sinks = SinkCache(PluginContext(settings=settings))
        for config in sink_configs:  # bad sink settings fail before the model loads
            sinks.get(config)
        engine = build_engine(settings, policy_refs=policy or [])
    items = (WorkItem(job_id=job_id_for(u), image=ImageRef(uri=u)) for u in uris)
    out_file: TextIO = out.open("w", encoding="utf-8") if out else sys.stdout
    results: list[Result] = []
    sink_failures: list[str] = []
    started = time.perf_counter()
    progress = progress_bar(info=True)
    try:
        with progress:
            task = progress.add_task("scoring", total=len(uris), info="")
            size = batch_size or resolve_batch_size(settings, engine.model)
            for result in engine.stream(items, size):
                out_file.write(result.to_json() + "\n")
                results.append(result)
                sink_failures += deliver_inline(
                    sinks,
                    sink_configs,
                    result,
                    max_attempts=settings.max_attempts,
                    backoff_base_s=settings.delivery.backoff_base_s,
                    backoff_max_s=settings.delivery.backoff_max_s,
                )
                elapsed = time.perf_counter() - started
                progress.update(task, advance=1, info=f"{len(results) / elapsed:.1f} img/s")
    finally:
        if out:
            out_file.close()
        else:
            out_file.flush()
        engine.close()
        sinks.close()
    stderr.print(_summary(results, time.perf_counter() - started, sink_failures))
    if not any(r.status == "ok" for r in results) or sink_failures:
        raise typer.Exit(EXIT_FAILED)
