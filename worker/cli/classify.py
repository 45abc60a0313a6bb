"""`worker classify`: score local files and URIs in-process, no broker."""

from __future__ import annotations

import glob
import hashlib
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer
from rich.table import Table

from worker.cli.common import EXIT_FAILED, parse_sink_specs, progress_bar, state, stderr
from worker.cli.errors import fail
from worker.documents import ImageRef, Result
from worker.errors import ConfigurationError
from worker.fetcher import IMAGE_SUFFIXES, uri_scheme
from worker.log import get_logger, json_logging
from worker.plugins import PluginContext

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.queue.delivery import SinkCache
    from worker.store import StoreWriter, WriterCounts

GLOB_CHARS = set("*?[")


def _local_path(src: str) -> Path | None:
    """The path ``src`` names, or None for a URI another source handles (s3://, https://)."""
    if uri_scheme(src) not in {"", "file"}:
        return None
    return Path(src.removeprefix("file://")).expanduser()


def expand_sources(sources: list[str]) -> list[str]:
    """Paths, directories (recursive, image suffixes only), globs and URIs -> URIs in order.

    A glob that matches no file is a ConfigurationError (exit 2: ``no files match …``), so
    is a set of sources that holds no image at all. Other names that do not exist are kept,
    so they come out as ``source_not_found`` results.
    """
    out: list[str] = []
    empty_dirs: list[str] = []
    for src in sources:
        path = _local_path(src)
        if path is None:
            out.append(src)
        elif path.is_dir():
            found = [
                str(p)
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ]
            out.extend(found)
            if not found:
                empty_dirs.append(src)
        elif not path.exists() and GLOB_CHARS & set(src):
            matches = [m for m in sorted(glob.glob(str(path), recursive=True)) if Path(m).is_file()]
            if not matches:
                raise ConfigurationError(f"no files match {src!r} (check the pattern)")
            out.extend(matches)
        else:
            out.append(src)
    if not out:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ConfigurationError(
            f"no image files in {', '.join(empty_dirs or sources)} (looked for {suffixes})"
        )
    return out


def require_some_source(uris: list[str]) -> None:
    """ConfigurationError when every source is a local path that does not exist: nothing
    could be scored (a few missing among others become ``source_not_found`` results)."""
    paths = [_local_path(u) for u in uris]
    if all(p is not None and not p.exists() for p in paths):
        more = f" (and {len(uris) - 1} more)" if len(uris) > 1 else ""
        raise ConfigurationError(f"no such file or directory: {uris[0]}{more}")


def job_id_for(uri: str) -> str:
    """A stable job id per source, so re-running classify overwrites rather than duplicates."""
    return "cli-" + hashlib.sha256(uri.encode()).hexdigest()[:24]


def _summary(
    results: list[Result],
    seconds: float,
    sink_failures: list[str],
    store: WriterCounts | None = None,
) -> None:
    """The run's summary on stderr: a table on a terminal, one ``classify.finished`` log
    event where the logs are JSON lines (one format per run)."""
    ok = sum(r.status == "ok" for r in results)
    errors = Counter(r.error.code for r in results if r.error is not None)
    flags = Counter(f"{f.policy}/{f.category}" for r in results for f in r.flags)
    rate = len(results) / seconds if seconds > 0 else 0.0
    if json_logging():
        get_logger("worker.cli").info(
            "classify.finished",
            images=len(results),
            ok=ok,
            errors=dict(errors),
            flags=dict(flags),
            sink_failures=len(sink_failures),
            store_rows=None if store is None else vars(store),
            img_per_s=round(rate, 1),
            seconds=round(seconds, 2),
        )
        return
    table = Table(title="classify", show_header=False, title_justify="left")
    table.add_row("images", str(len(results)))
    table.add_row("ok", str(ok))
    table.add_row("errors", ", ".join(f"{c}: {n}" for c, n in errors.most_common()) or "0")
    table.add_row("flags", ", ".join(f"{c}: {n}" for c, n in flags.most_common()) or "none")
    if sink_failures:
        table.add_row("sink failures", f"{len(sink_failures)}: {sink_failures[0]}")
    if store is not None:
        lost = f", failed {store.failed + store.dropped}" if store.failed or store.dropped else ""
        table.add_row("store", f"{store.written} rows added, {store.skipped} there already{lost}")
    table.add_row("throughput", f"{rate:.1f} img/s ({seconds:.1f} s)")
    stderr.print(table)


def _close(engine: Engine, sinks: SinkCache, writer: StoreWriter | None) -> None:
    """Stop the engine and the sinks, then commit the store rows still queued."""
    engine.close()
    sinks.close()
    if writer is not None:
        writer.close()


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
    # The model stack loads here, not at import: `worker submit` (which shares
    # expand_sources) and the light client never import torch.
    from worker.engine import WorkItem
    from worker.queue.delivery import SinkCache, deliver_inline
    from worker.runtime import build_engine, record_embeddings, resolve_batch_size

    settings = state(ctx).settings
    uris = expand_sources(sources)
    require_some_source(uris)
    if out is not None and not out.parent.is_dir():
        fail(f"--out {out}: directory {out.parent} does not exist")
    sink_configs = parse_sink_specs(sink or [])
    sinks = SinkCache(PluginContext(settings=settings))
    try:
        for config in sink_configs:  # bad sink settings fail before the model loads
            sinks.get(config)
        engine = build_engine(settings, policy_refs=policy or [])
    except BaseException:
        sinks.close()
        raise
    writer = None
    try:
        out_file: TextIO = out.open("w", encoding="utf-8") if out else sys.stdout
        writer = record_embeddings(engine, settings)  # None: WORKER_STORE__URI=none
    except BaseException:  # e.g. PermissionError: one line, exit 2 (CliGroup)
        _close(engine, sinks, writer)
        raise
    items = (WorkItem(job_id=job_id_for(u), image=ImageRef(uri=u)) for u in uris)
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
        _close(engine, sinks, writer)
    counts = None if writer is None else writer.counts
    _summary(results, time.perf_counter() - started, sink_failures, counts)
    if not any(r.status == "ok" for r in results) or sink_failures:
        raise typer.Exit(EXIT_FAILED)
