"""The embedding store: every scored image's embedding, kept in a LanceDB table.

One table, ``embeddings`` (columns in :data:`COLUMNS`), that DuckDB, Polars or Spark can
read as it is. ``job_id`` is the table's primary key: rows are written with
``merge_insert`` on it, so a redelivered job (or a second ``worker classify`` of the same
files) adds no second row, and two writers racing on one job id conflict and retry in
Lance's commit instead of both inserting (Lance detects the clash because the key is
recorded as the table's primary key).

Writes never sit on the scoring path: :class:`StoreWriter` queues rows and a thread of its
own commits them in batches. A store that cannot be written is logged and counted; the job
it came from is answered all the same (the row is what is lost, never the job).

Reads stream: :meth:`EmbeddingStore.scan` yields Arrow record batches of the columns asked
for, over the rows of one model fingerprint and a time window, so preview, rescore and
search hold one batch at a time whatever the table's size.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.errors import ConfigurationError
from worker.log import get_logger

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from worker.documents import Result
    from worker.settings import Settings

log = get_logger(__name__)

TABLE = "embeddings"
#: The contract's columns, in table order (``frames`` is ours: an animation's frame
#: embeddings, so it can be re-scored exactly as it was served; null for a still).
COLUMNS = (
    "job_id",
    "image_sha256",
    "fingerprint",
    "embedding",
    "frames",
    "uri",
    "created_at",
    "metadata",
    "result",
)
#: ``WORKER_STORE__URI`` value that turns the store off.
OFF = "none"
#: Rows per Arrow batch read by scans.
SCAN_BATCH_ROWS = 65_536
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class StoreError(ConfigurationError):
    """The store cannot be opened, read or written (the message names the fix)."""


def parse_time(value: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 time (``2026-11-01T00:00:00Z``; a date alone is midnight UTC) or a
    duration back from now (``30d``, ``12h``, ``90m``, ``45s``, ``2w``) -> aware UTC time.
    Raises ConfigurationError naming both forms."""
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigurationError(
            f"{value!r} is not a time: give RFC 3339 (2026-11-01T00:00:00Z) or a duration "
            "back from now (30d, 12h, 90m)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_time(value: datetime) -> str:
    return f"timestamp '{value.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f')}'"


def row_filter(
    fingerprint: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> str | None:
    """The SQL filter of rows of ``fingerprint`` with ``since <= created_at < until``."""
    parts = []
    if fingerprint is not None:
        parts.append(f"fingerprint = {_sql_string(fingerprint)}")
    if since is not None:
        parts.append(f"created_at >= {_sql_time(since)}")
    if until is not None:
        parts.append(f"created_at < {_sql_time(until)}")
    return " AND ".join(parts) or None


def table_schema(dim: int) -> pa.Schema:
    """The ``embeddings`` table for ``dim``-dimensional embeddings."""
    import pyarrow as pa

    vector = pa.list_(pa.float32(), dim)
    return pa.schema(
        [
            pa.field("job_id", pa.string(), nullable=False),
            pa.field("image_sha256", pa.string()),
            pa.field("fingerprint", pa.string(), nullable=False),
            pa.field("embedding", vector, nullable=False),
            pa.field("frames", pa.list_(vector)),
            pa.field("uri", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("metadata", pa.string()),
            pa.field("result", pa.string()),
        ]
    )


def embedding_dim(schema: pa.Schema) -> int:
    import pyarrow as pa

    kind = schema.field("embedding").type
    assert isinstance(kind, pa.FixedSizeListType)
    return int(kind.list_size)


def vectors(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A fixed-size-list column -> ``(rows, dim)`` float32 (no copy for one chunk)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat: np.ndarray = column.flatten().to_numpy(zero_copy_only=False)  # respects a slice
    return flat.reshape(-1, dim)


@dataclass(frozen=True)
class EmbeddingRow:
    """One scored image as the store keeps it."""

    job_id: str
    image_sha256: str | None
    fingerprint: str
    embedding: np.ndarray  # (D,) float32, L2-normalised
    frames: np.ndarray | None  # (F, D) for an animation, else None
    uri: str | None
    created_at: datetime
    metadata: str
    result: str

    @classmethod
    def of(cls, result: Result, frames: torch.Tensor) -> EmbeddingRow:
        """The row of an ok ``result`` whose image gave the ``(F, D)`` frame embeddings
        (one row for a still). An animation's ``embedding`` is the normalised mean of
        its frames (what search compares); ``frames`` keeps each one."""
        rows = frames.detach().float().cpu().numpy().astype(np.float32, copy=False)
        if len(rows) == 1:
            embedding, kept = rows[0], None
        else:
            mean = rows.mean(axis=0)
            embedding, kept = mean / np.linalg.norm(mean), rows
        return cls(
            job_id=result.job_id,
            image_sha256=result.image.sha256,
            fingerprint=result.model.fingerprint,
            embedding=np.ascontiguousarray(embedding, dtype=np.float32),
            frames=kept,
            uri=result.image.uri,
            created_at=result.created_at.astimezone(UTC),
            metadata=json.dumps(result.metadata, separators=(",", ":")),
            result=result.to_json(),
        )


def rows_table(rows: Sequence[EmbeddingRow], schema: pa.Schema) -> pa.Table:
    """Rows -> an Arrow table of ``schema`` (one row per job id: the first one kept)."""
    import pyarrow as pa

    dim = embedding_dim(schema)
    unique = list({row.job_id: row for row in reversed(rows)}.values())[::-1]
    for row in unique:
        if row.embedding.shape != (dim,):
            raise StoreError(
                f"the store holds {dim}-dimensional embeddings and this model gives "
                f"{row.embedding.shape[-1]}: point WORKER_STORE__URI at another location "
                "for this model"
            )
    flat = np.concatenate([row.embedding for row in unique]) if unique else np.zeros(0)
    vector_type = schema.field("embedding").type
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    frames = pa.array(
        [None if row.frames is None else row.frames.tolist() for row in unique],
        type=pa.list_(vector_type),
    )
    columns = {
        "job_id": pa.array([r.job_id for r in unique], pa.string()),
        "image_sha256": pa.array([r.image_sha256 for r in unique], pa.string()),
        "fingerprint": pa.array([r.fingerprint for r in unique], pa.string()),
        "embedding": embedding,
        "frames": frames,
        "uri": pa.array([r.uri for r in unique], pa.string()),
        "created_at": pa.array([r.created_at for r in unique], pa.timestamp("us", tz="UTC")),
        "metadata": pa.array([r.metadata for r in unique], pa.string()),
        "result": pa.array([r.result for r in unique], pa.string()),
    }
    return pa.table(columns, schema=schema)


def storage_options(uri: str, settings: Settings) -> dict[str, str]:
    """Object-store options for an ``s3://`` store from the worker's S3 settings and the
    AWS environment. An ``http://`` endpoint (MinIO, a test server) needs ``allow_http``;
    credentials come from the standard AWS variables or profile, read by Lance."""
    if not uri.startswith("s3://"):
        return {}
    options: dict[str, str] = {}
    endpoint = settings.s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    region = settings.s3.region or os.environ.get("AWS_REGION")
    region = region or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["aws_region"] = region
    if settings.s3.addressing_style == "virtual":
        options["aws_virtual_hosted_style_request"] = "true"
    options["timeout"] = f"{int(settings.s3.read_timeout_s)}s"
    options["connect_timeout"] = f"{int(settings.s3.connect_timeout_s)}s"
    return options


def store_uri(settings: Settings) -> str | None:
    """Where the store lives (None: turned off): ``WORKER_STORE__URI``, by default
    ``<WORKER_CACHE_DIR>/store``."""
    uri = settings.store.uri.strip()
    if uri.lower() == OFF:
        return None
    if not uri:
        return str(settings.cache_dir / "store")
    if "://" in uri and not uri.startswith(("s3://", "file://")):
        raise ConfigurationError(
            f"WORKER_STORE__URI={uri!r}: give a directory, s3://bucket/prefix or 'none'"
        )
    return uri.removeprefix("file://")


@dataclass(frozen=True)
class StoreStats:
    uri: str
    rows: int
    fingerprints: dict[str, int]
    bytes: int | None
    versions: int
    indexes: list[str]
    dim: int | None


@dataclass
class Hit:
    job_id: str
    uri: str | None
    score: float
    created_at: datetime | None = None

    def to_json(self) -> str:
        return json.dumps({"uri": self.uri, "job_id": self.job_id, "score": self.score})


class EmbeddingStore:
    """The ``embeddings`` table at one URI (a directory or ``s3://bucket/prefix``)."""

    def __init__(self, uri: str, options: Mapping[str, str] | None = None) -> None:
        self.uri = uri
        self.options = dict(options or {})
        if "://" not in uri:
            Path(uri).mkdir(parents=True, exist_ok=True)
        self._db: Any = None
        self._table: Any = None
        self._lock = threading.Lock()

    @property
    def db(self) -> Any:
        """The LanceDB connection, made on first use (connecting to ``s3://`` lists the
        bucket): an object store that is down when a worker starts costs rows, which the
        writer counts, not the worker."""
        if self._db is None:
            import lancedb

            try:
                self._db = lancedb.connect(self.uri, storage_options=self.options or None)
            except Exception as exc:
                raise StoreError(f"cannot open the embedding store at {self.uri}: {exc}") from exc
        return self._db

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingStore | None:
        uri = store_uri(settings)
        if uri is None:
            return None
        return cls(uri, storage_options(uri, settings))

    # ------------------------------------------------------------------ the table

    def table(self, dim: int | None = None) -> Any:
        """The ``embeddings`` table; created for ``dim`` when given and missing. None when
        it does not exist and ``dim`` is None."""
        with self._lock:
            if self._table is None:
                try:
                    self._table = self.db.open_table(TABLE)
                except (ValueError, FileNotFoundError) as exc:
                    if "not found" not in str(exc).lower() and "not exist" not in str(exc):
                        raise StoreError(f"cannot open the store at {self.uri}: {exc}") from exc
                    if dim is None:
                        return None
                    self._table = self._create(dim)
            return self._table

    def _create(self, dim: int) -> Any:
        table: Any = self.db.create_table(TABLE, schema=table_schema(dim), exist_ok=True)
        if not self._primary_key(table):
            try:
                table.set_unenforced_primary_key("job_id")
            except Exception:  # another writer set it first
                log.debug("store.primary_key_race", exc_info=True)
        return table

    @staticmethod
    def _primary_key(table: Any) -> bool:
        meta = table.schema.field("job_id").metadata or {}
        return any(b"primary" in key.lower() for key in meta)

    def dim(self) -> int | None:
        table = self.table()
        return None if table is None else embedding_dim(table.schema)

    # ------------------------------------------------------------------ writing

    def add(self, rows: Sequence[EmbeddingRow]) -> int:
        """Insert the rows whose job id is not in the table yet; returns how many were."""
        if not rows:
            return 0
        table = self.table(len(rows[0].embedding))
        data = rows_table(rows, table.schema)
        outcome = table.merge_insert("job_id").when_not_matched_insert_all().execute(data)
        return int(getattr(outcome, "num_inserted_rows", len(rows)))

    # ------------------------------------------------------------------ reading

    def count(self, where: str | None = None) -> int:
        table = self.table()
        return 0 if table is None else int(table.count_rows(where))

    def count_others(
        self, fingerprint: str, since: datetime | None = None, until: datetime | None = None
    ) -> int:
        """Rows of every other model fingerprint in the window: what a command working on
        ``fingerprint``'s rows leaves out, and says it does."""
        window = row_filter(since=since, until=until)
        others = f"NOT ({row_filter(fingerprint)})"
        return self.count(f"{others} AND {window}" if window else others)

    def fingerprints(self) -> dict[str, int]:
        """Rows per model fingerprint, most first."""
        counts: dict[str, int] = {}
        for batch in self.scan(columns=["fingerprint"]):
            values, tallies = np.unique(
                batch.column("fingerprint").to_numpy(zero_copy_only=False), return_counts=True
            )
            for value, tally in zip(values, tallies, strict=True):
                counts[str(value)] = counts.get(str(value), 0) + int(tally)
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def scan(
        self,
        columns: Sequence[str],
        fingerprint: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        batch_rows: int = SCAN_BATCH_ROWS,
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` over the rows of ``fingerprint`` (all when None)
        with ``since <= created_at < until``; one batch in memory at a time."""
        table = self.table()
        if table is None:
            return
        query = table.search().select(list(columns))
        where = row_filter(fingerprint, since, until)
        if where:
            query = query.where(where)
        for batch in query.to_batches(batch_rows):
            if batch.num_rows:
                yield batch

    def first_created(self, fingerprint: str | None = None) -> datetime | None:
        """The earliest ``created_at`` of the rows of ``fingerprint`` (None: no rows)."""
        earliest: datetime | None = None
        for batch in self.scan(["created_at"], fingerprint):
            import pyarrow.compute as pc

            low = pc.min(batch.column("created_at")).as_py()
            if low is not None and (earliest is None or low < earliest):
                earliest = low
        return None if earliest is None else earliest.astimezone(UTC)

    def stats(self) -> StoreStats:
        table = self.table()
        if table is None:
            return StoreStats(self.uri, 0, {}, None, 0, [], None)
        size = None
        try:
            size = int(table.stats()["total_bytes"])
        except Exception:
            size = _dir_size(Path(self.uri)) if "://" not in self.uri else None
        indexes = [
            f"{i.name} ({i.index_type} on {', '.join(i.columns)})" for i in table.list_indices()
        ]
        return StoreStats(
            uri=self.uri,
            rows=table.count_rows(),
            fingerprints=self.fingerprints(),
            bytes=size,
            versions=len(table.list_versions()),
            indexes=indexes,
            dim=embedding_dim(table.schema),
        )

    def has_vector_index(self) -> bool:
        table = self.table()
        if table is None:
            return False
        return any("embedding" in i.columns for i in table.list_indices())


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class WriterCounts:
    written: int = 0  # rows new to the table
    skipped: int = 0  # rows whose job id was there already
    failed: int = 0  # rows given up after retries (store unreachable)
    dropped: int = 0  # rows refused because the queue was full


@dataclass
class StoreWriter:
    """Commits rows in the background, in batches; scoring never waits on the store.

    :meth:`put` queues rows (the oldest are dropped, and counted, when ``max_pending``
    rows wait already); a thread commits up to ``batch_rows`` at a time, at least every
    ``interval_s``. A failed commit is retried ``attempts`` times with backoff, then its
    rows are logged and counted as failed: the jobs they came from are answered anyway.
    """

    store: EmbeddingStore
    batch_rows: int = 512
    interval_s: float = 1.0
    max_pending: int = 20_000
    attempts: int = 3
    backoff_s: float = 0.5
    on_outcome: Any = None  # Callable[[str, int], None]: ("written"|"skipped"|..., rows)
    counts: WriterCounts = field(default_factory=WriterCounts)

    def __post_init__(self) -> None:
        self._queue: queue.Queue[EmbeddingRow | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def put(self, rows: Sequence[EmbeddingRow]) -> None:
        with self._pending_lock:
            room = self.max_pending - self._pending
            kept = list(rows[:room]) if room > 0 else []
            self._pending += len(kept)
            if kept:
                self._idle.clear()
        refused = len(rows) - len(kept)
        if refused:
            self._count("dropped", refused)
            log.error("store.rows_dropped", rows=refused, pending=self.max_pending)
        for row in kept:
            self._queue.put(row)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued row is committed or given up; False on timeout."""
        return self._idle.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued now (without waiting for the flush interval; up to
        ``timeout`` seconds), then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():  # the store is still failing: what is left is lost
            with self._pending_lock:
                abandoned = self._pending
            self._count("failed", abandoned)
            log.error("store.close_timeout", rows=abandoned, seconds=timeout)

    def _count(self, outcome: str, rows: int) -> None:
        setattr(self.counts, outcome, getattr(self.counts, outcome) + rows)
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome, rows)
            except Exception:
                log.debug("store.count_failed", exc_info=True)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[EmbeddingRow] = []
            first = self._queue.get()
            if first is None:
                break
            batch.append(first)
            deadline = time.monotonic() + self.interval_s
            while len(batch) < self.batch_rows:
                try:
                    row = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if row is None:
                    stop = True
                    break
                batch.append(row)
            self._commit(batch)
            with self._pending_lock:
                self._pending -= len(batch)
                if self._pending == 0:
                    self._idle.set()

    def _commit(self, rows: list[EmbeddingRow]) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                started = time.perf_counter()
                inserted = self.store.add(rows)
            except Exception as exc:
                if attempt < self.attempts and not isinstance(exc, StoreError):
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                    continue
                self._count("failed", len(rows))
                log.error(
                    "store.write_failed",
                    rows=len(rows),
                    attempts=attempt,
                    store=self.store.uri,
                    error=str(exc)[:300],
                )
                return
            self._count("written", inserted)
            if len(rows) > inserted:
                self._count("skipped", len(rows) - inserted)
            log.debug(
                "store.written",
                rows=inserted,
                skipped=len(rows) - inserted,
                ms=round((time.perf_counter() - started) * 1000, 1),
            )
            return
