"""`worker store stats|index|compact` and `worker search`: the embedding store at the
command line. How search works, and why the index it builds: ``worker/retrieval.py``.
"""

from __future__ import annotations

import json
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from worker.cli.common import state, stderr
from worker.cli.errors import fail
from worker.log import get_logger, json_logging

if TYPE_CHECKING:
    import numpy as np

    from worker.model import LoadedModel
    from worker.settings import Settings
    from worker.store import EmbeddingStore

log = get_logger("worker.cli")

app = typer.Typer(
    help="The embedding store (WORKER_STORE__URI): rows per model, the ANN index, "
    "retention and compaction.",
    no_args_is_help=True,
)

SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Only rows stored since this time: RFC 3339 (2026-11-01T00:00:00Z) or a "
        "duration back from now (30d, 12h).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object for machines.")]


def text_query(model: LoadedModel, text: str) -> np.ndarray:
    """The text encoded exactly as given (no prompt template), L2-normalised."""
    import numpy as np

    return np.ascontiguousarray(model.encode_texts([text])[0].numpy(), dtype=np.float32)


def image_query(model: LoadedModel, settings: Settings, source: str, data: bytes) -> np.ndarray:
    """The image decoded and encoded as the engine does; an animation is the normalised
    mean of its scored frames (what the store keeps in ``embedding``)."""
    from worker.engine import DecodeOptions
    from worker.tuning.embedder import embed_files

    options = DecodeOptions.from_settings(settings.image, model)
    embedded = embed_files(model, [source], None, options, workers=1, read=lambda _: data)
    import numpy as np

    return np.ascontiguousarray(embedded.per_file_mean()[0].numpy(), dtype=np.float32)


def fetch_image(settings: Settings, source: str) -> bytes:
    """The bytes ``source`` names, through the worker's sources (paths, s3://, https://)."""
    from worker.documents import ImageRef
    from worker.errors import JobError
    from worker.fetcher import ImageFetcher
    from worker.plugins import PluginContext, make_sources

    fetcher = ImageFetcher(make_sources(PluginContext(settings=settings)), settings.image.max_bytes)
    try:
        return fetcher.fetch(ImageRef(uri=source))
    except JobError as exc:
        fail(f"--image {source}: {exc.message}")
    finally:
        fetcher.close()


# ---------------------------------------------------------------------- helpers


def _note(event: str, text: str, **fields: Any) -> None:
    """Tell the user on stderr: a log event where the logs are JSON lines, else text."""
    if json_logging():
        log.info(event, **fields)
    else:
        stderr.print(text, soft_wrap=True)


def _open(ctx: typer.Context) -> tuple[Settings, EmbeddingStore, Any]:
    """(settings, store, its table: None while nothing is stored); exit 2 when the store
    is off or cannot be opened."""
    from worker.store import EmbeddingStore, StoreError

    settings = state(ctx).settings
    try:
        store = EmbeddingStore.from_settings(settings)
        if store is None:
            fail(
                "the embedding store is off (WORKER_STORE__URI=none): set WORKER_STORE__URI "
                "to its directory or s3://bucket/prefix"
            )
        return settings, store, store.table()
    except StoreError as exc:
        fail(str(exc))


def _empty(store: EmbeddingStore) -> str:
    return (
        f"the embedding store at {store.uri} is empty (`worker classify` and `worker serve` "
        "fill it)"
    )


def disk_bytes(store: EmbeddingStore, table: Any) -> int:
    """Bytes on disk of every version and index of a local store; the current version's
    data for an object store (its listing would cost a request per file)."""
    if "://" not in store.uri:
        root = Path(store.uri)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return int(table.stats()["total_bytes"])


def _size(value: int | None) -> str:
    if value is None:
        return "unknown"
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if amount < 1000 or unit == "TB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    raise AssertionError("unreachable")


def _model_of(table: Any, fingerprint: str) -> dict[str, str] | None:
    """The model named in one row of ``fingerprint`` (its result document)."""
    from worker.store import row_filter

    try:
        rows = table.search().where(row_filter(fingerprint)).select(["result"]).limit(1)
        model = json.loads(rows.to_arrow().column("result")[0].as_py())["model"]
        return {"name": str(model["name"]), "pretrained": str(model.get("pretrained") or "")}
    except Exception:  # a row written by another tool: no model to name
        return None


def _configured(settings: Settings, model: dict[str, str]) -> bool:
    """Whether rows naming ``model`` were written by the model the settings name (by name
    and pretrained tag; ``local-dir:`` and ``hf-hub:`` names have no tag: see
    ``worker.model.load_model``, not imported here because it imports torch)."""
    name, tag = settings.model.name, settings.model.pretrained or ""
    if name.startswith(("local-dir:", "hf-hub:")):
        tag = ""
    return (model["name"], model["pretrained"]) == (name, tag)


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


# ---------------------------------------------------------------------- commands


@app.command()
def stats(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Rows per model fingerprint, size, versions, indexes and embedding dimension.

    The model each fingerprint's rows name is shown; "configured" marks the one
    WORKER_MODEL__NAME names (by name: no model is loaded here; `worker search` checks
    the weights' fingerprint).
    """
    settings, store, table = _open(ctx)
    if table is None and not as_json:
        typer.echo(_empty(store))
        return
    summary = store.stats()
    fingerprints = []
    for fingerprint, rows in summary.fingerprints.items():
        model = _model_of(table, fingerprint)
        configured = model is not None and _configured(settings, model)
        fingerprints.append(
            {"fingerprint": fingerprint, "rows": rows, "model": model, "configured": configured}
        )
    indexes = []
    for index in [] if table is None else table.list_indices():
        # (list_indices has the counts; index_stats would also load a vector index's
        # centroids)
        indexes.append(
            {
                "name": index.name,
                "type": str(index.index_type),
                "columns": list(index.columns),
                "indexed_rows": int(index.num_indexed_rows),
                "unindexed_rows": int(index.num_unindexed_rows),
            }
        )
    report = {
        "uri": store.uri,
        "rows": summary.rows,
        "dim": summary.dim,
        "bytes": summary.bytes,
        "disk_bytes": None if table is None else disk_bytes(store, table),
        "versions": summary.versions,
        "fingerprints": fingerprints,
        "indexes": indexes,
    }
    if as_json:
        typer.echo(json.dumps(report))
        return
    _print_stats(report)


def _print_stats(report: dict[str, Any]) -> None:
    from worker.retrieval import MIN_INDEX_ROWS

    out = Console(highlight=False, soft_wrap=True)
    out.print(f"store     {report['uri']}")
    out.print(f"rows      {report['rows']:,} of {report['dim']}-d embeddings")
    disk = (
        f", {_size(report['disk_bytes'])} on disk with old versions" if report["disk_bytes"] else ""
    )
    out.print(f"size      {_size(report['bytes'])}{disk}")
    out.print(f"versions  {report['versions']}")
    out.print("rows per model fingerprint:")
    for item in report["fingerprints"]:
        model = item["model"]
        name = f"{model['name']} {model['pretrained']}".strip() if model else "(no model named)"
        mark = "  <- configured" if item["configured"] else ""
        out.print(f"  {item['fingerprint']}  {item['rows']:>12,}  {name}{mark}")
    if not report["indexes"]:
        out.print(f"indexes   none (`worker store index` builds them from {MIN_INDEX_ROWS:,} rows)")
    for index in report["indexes"]:
        behind = index["unindexed_rows"]
        late = (
            f", {behind:,} rows not yet in it (`worker store compact` adds them)" if behind else ""
        )
        out.print(
            f"index     {index['name']}: {index['type']} on {', '.join(index['columns'])}{late}"
        )


@app.command()
def index(ctx: typer.Context) -> None:
    """Build the ANN index on `embedding` (IVF_HNSW_SQ, cosine, about sqrt(rows)
    partitions) and scalar indexes on job_id and created_at (BTREE) and fingerprint
    (BITMAP), replacing any there.

    Needs at least 10,000 rows: below that `worker search` scans every row, which is
    exact and fast. Rows stored after the index is built are still found (searched
    exactly) until `worker store compact` adds them to it.
    """
    from lancedb.index import Bitmap, BTree, HnswSq

    from worker.retrieval import MIN_INDEX_ROWS, SCALAR_INDEXES, VECTOR_INDEX, partitions_for

    _, store, table = _open(ctx)
    rows = 0 if table is None else int(table.count_rows())
    if rows < MIN_INDEX_ROWS:
        fail(
            f"the embedding store at {store.uri} holds {rows:,} rows; an ANN index needs at "
            f"least {MIN_INDEX_ROWS:,} (below that `worker search` scans every row, exact and "
            "fast): run `worker store index` again when more images are stored"
        )
    partitions = partitions_for(rows)
    _note(
        "store.indexing",
        f"building the ANN index (IVF_HNSW_SQ, cosine, {partitions} partitions) on {rows:,} rows…",
        rows=rows,
        partitions=partitions,
    )
    started = time.perf_counter()
    with stderr.status("building the ANN index"):
        table.create_index(
            "embedding",
            config=HnswSq(distance_type="cosine", num_partitions=partitions),
            name=VECTOR_INDEX,
            replace=True,
        )
    vector_ms = _elapsed_ms(started)
    configs = {"BTree": BTree, "Bitmap": Bitmap}
    for column, kind in SCALAR_INDEXES:
        table.create_index(column, config=configs[kind](), name=f"{column}_idx", replace=True)
    _note(
        "store.indexed",
        f"indexed {rows:,} rows: ANN index in {vector_ms / 1000:.1f} s, scalar indexes on "
        f"{', '.join(c for c, _ in SCALAR_INDEXES)} in "
        f"{(_elapsed_ms(started) - vector_ms) / 1000:.1f} s",
        rows=rows,
        partitions=partitions,
        vector_ms=vector_ms,
        ms=_elapsed_ms(started),
    )


@app.command()
def compact(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            help="First delete the rows stored before this (retention): RFC 3339 time or a "
            "duration back from now (90d).",
            show_default=False,
        ),
    ] = None,
    keep_versions: Annotated[
        str,
        typer.Option(
            "--keep-versions",
            help="Keep the table versions younger than this, for readers and writers still "
            "on them; 0s removes every old version (only when nothing else uses the store).",
        ),
    ] = "1h",
    as_json: JsonOption = False,
) -> None:
    """Delete old rows (with --older-than), merge small files, add new rows to the
    indexes and remove old table versions; prints rows deleted and bytes before/after."""
    from worker.store import parse_time, row_filter

    now = datetime.now(UTC)
    cutoff = parse_time(older_than, now) if older_than else None
    keep = max(timedelta(0), now - parse_time(keep_versions, now))
    _, store, table = _open(ctx)
    if table is None:
        typer.echo(_empty(store))
        return
    rows_before, bytes_before = int(table.count_rows()), disk_bytes(store, table)
    deleted = 0
    if cutoff is not None:
        where = row_filter(until=cutoff)
        deleted = store.count(where)
        if deleted:
            table.delete(where)
    started = time.perf_counter()
    with stderr.status("compacting"), warnings.catch_warnings():
        # lancedb warns that 0 breaks readers on old versions: --keep-versions says so
        warnings.filterwarnings("ignore", "optimize.cleanup_older_than=0", UserWarning)
        table.optimize(cleanup_older_than=keep)
    rows_after, bytes_after = int(table.count_rows()), disk_bytes(store, table)
    versions = len(table.list_versions())
    if as_json:
        report = {
            "uri": store.uri,
            "deleted": deleted,
            "cutoff": cutoff.isoformat() if cutoff else None,
            "rows_before": rows_before,
            "rows_after": rows_after,
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "versions": versions,
            "ms": _elapsed_ms(started),
        }
        typer.echo(json.dumps(report))
        return
    which = f" stored before {cutoff.isoformat()}" if cutoff else ""
    typer.echo(f"deleted  {deleted:,} rows{which}")
    typer.echo(f"rows     {rows_before:,} -> {rows_after:,}")
    typer.echo(f"bytes    {_size(bytes_before)} -> {_size(bytes_after)}")
    typer.echo(f"versions {versions} (versions younger than {keep_versions} are kept)")
    if bytes_after > bytes_before:
        typer.echo(
            f"(the versions kept still hold the files compacted away: they go at a compact "
            f"after {keep_versions}, or now with --keep-versions 0s if nothing else uses the "
            "store)"
        )


def search(
    ctx: typer.Context,
    text: Annotated[
        str | None,
        typer.Argument(
            help="Text to search for, encoded exactly as given (no prompt templates).",
            show_default=False,
        ),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            "-i",
            help="Search by example: an image path or a URI a source handles (s3://, "
            "https://), decoded and encoded as `worker classify` does.",
            show_default=False,
        ),
    ] = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, max=10_000, help="Results.")] = 10,
    since: SinceOption = None,
    exact: Annotated[
        bool,
        typer.Option("--exact", help="Scan every row even where an ANN index exists (slower)."),
    ] = False,
) -> None:
    """Find stored images by text or by an example image: JSONL of `uri`, `job_id`,
    `score` on stdout, best first.

    Only rows of the loaded model's fingerprint are searched (rows of other models are
    counted on stderr). `score` is the exact cosine between the query and the stored
    embedding; with an ANN index (`worker store index`) its candidates are re-ranked
    exactly. Exits 0 without output when no row matches (an empty store, no row of this
    model, none since --since), 2 for a mistake in the options or settings.
    """
    from worker.errors import JobError
    from worker.retrieval import (
        MIN_INDEX_ROWS,
        index_search,
        nprobes_for,
        scan_search,
        vector_index,
    )
    from worker.runtime import load_configured_model
    from worker.store import parse_time, row_filter

    if (text is None) == (image is None):
        which = "not both" if text is not None else "one of them"
        fail(f"give TEXT or --image SRC, {which} (see `worker search --help`)")
    if text is not None and not text.strip():
        fail("TEXT is empty: give the text to search for")
    start = parse_time(since) if since else None
    settings, store, table = _open(ctx)
    data = fetch_image(settings, image) if image is not None else None
    if table is None or table.count_rows() == 0:
        _note("search.empty", _empty(store), store=store.uri)
        return
    model = load_configured_model(settings)
    started = time.perf_counter()
    if image is not None and data is not None:
        try:
            query = image_query(model, settings, image, data)
        except JobError as exc:  # not an image, or one the guards refuse
            fail(f"--image {exc.message}")
    else:
        query = text_query(model, text or "")
    fingerprint = model.fingerprint
    where = row_filter(fingerprint, start)
    assert where is not None
    others = store.count_others(fingerprint, since=start)
    if others:
        _note(
            "search.other_models",
            f"left out {others:,} rows of other models (`worker store stats` lists them)",
            rows=others,
        )
    mine = store.count(where)
    if not mine:
        when = f" since {start.isoformat()}" if start else ""
        _note(
            "search.no_rows",
            f"no row of this model (fingerprint {fingerprint}){when} in the store",
            fingerprint=fingerprint,
        )
        return
    found = None if exact or mine < MIN_INDEX_ROWS else vector_index(table)
    if found is None:
        hits, how, candidates = scan_search(store, query, fingerprint, start, k), "scan", mine
    else:
        hits, candidates = index_search(table, query, where, k, nprobes_for(found[1]))
        how = "index"
    for hit in hits:
        typer.echo(hit.to_json())
    _note(
        "search.finished",
        f"{len(hits)} results from {mine:,} rows of model {fingerprint} ("
        + ("exact scan" if how == "scan" else f"ANN index, {candidates} candidates re-ranked")
        + f") in {_elapsed_ms(started):.0f} ms",
        results=len(hits),
        rows=mine,
        method=how,
        candidates=candidates,
        ms=_elapsed_ms(started),
    )
