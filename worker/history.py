"""Policies over stored traffic: preview an edit, re-score history. No image is read.

Both stream the embedding store (:meth:`worker.store.EmbeddingStore.scan`) in column
batches over the rows of the loaded model's fingerprint and a time window, and score each
batch with one matmul per policy, so their memory does not grow with the table.

- :func:`preview` counts, per category, what the deployed policy flags and what the
  edited one would: flagged now, flagged with the edit, newly flagged, no longer flagged,
  with sample URIs. It reads only ``embedding``, ``frames`` and ``uri`` (never the stored
  result JSON).
- :func:`rescore` builds the result document each stored row gets under a policy as it is
  now: the same sections, flags, evidence and decision the engine gives a fresh image.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.documents import ImageInfo, ModelInfo, Result
from worker.policy.compiled import CompiledPolicy, Observed
from worker.store import EmbeddingStore, vectors

if TYPE_CHECKING:
    import pyarrow as pa

    from worker.model import LoadedModel
    from worker.policy.policyset import PolicySet

#: The columns preview reads (never ``result``: decoding JSON would dominate its time).
PREVIEW_COLUMNS = ("embedding", "frames", "uri")
RESCORE_COLUMNS = ("job_id", "embedding", "frames", "uri", "metadata", "result", "created_at")


@dataclass
class StoredBatch:
    """One scanned batch: its Arrow columns, the embeddings to score (a still's row, each
    frame of an animation) and, per stored row, its span of those embeddings."""

    batch: pa.RecordBatch
    embeddings: torch.Tensor  # (M, D), M >= rows
    spans: list[range] | None  # None: every row is a still (M == rows, row i is span i)

    @property
    def rows(self) -> int:
        return int(self.batch.num_rows)

    def frames_of(self, row: int) -> range:
        return range(row, row + 1) if self.spans is None else self.spans[row]


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over Arrow's read-only buffer, without a copy: only ever read (torch warns
    that it cannot mark it read-only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def stored_batches(
    store: EmbeddingStore,
    columns: Sequence[str],
    fingerprint: str,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[StoredBatch]:
    """The rows of ``fingerprint`` in ``[since, until)``, batch by batch."""
    dim = store.dim()
    if dim is None:
        return
    for batch in store.scan(columns, fingerprint, since, until):
        stills = vectors(batch.column("embedding"), dim)
        frames = batch.column("frames")
        if frames.null_count == batch.num_rows:
            yield StoredBatch(batch, _read_only_tensor(stills), None)
            continue
        parts: list[np.ndarray] = []
        spans: list[range] = []
        start = 0
        for row, listed in enumerate(frames):
            part = stills[row : row + 1] if not listed.is_valid else vectors(listed.values, dim)
            parts.append(part)
            spans.append(range(start, start + len(part)))
            start += len(part)
        yield StoredBatch(batch, torch.from_numpy(np.concatenate(parts)), spans)


def pooled_scores(
    compiled: CompiledPolicy[Any], stored: StoredBatch, scores: torch.Tensor
) -> torch.Tensor:
    """``(M, classes)`` scores of a batch's embeddings -> ``(rows, classes)``: an
    animation's frames pooled as the engine pools them."""
    if stored.spans is None:
        return scores
    out = scores.new_empty(stored.rows, scores.shape[1])
    for row, span in enumerate(stored.spans):
        if len(span) == 1:
            out[row] = scores[span.start]
        else:
            values, _ = compiled.pool_frames(scores[span.start : span.stop].tolist())
            out[row] = scores.new_tensor(values)
    return out


# --------------------------------------------------------------------------- preview


@dataclass
class CategoryChange:
    flagged_now: int = 0
    flagged_with_edit: int = 0
    newly_flagged: int = 0
    no_longer_flagged: int = 0
    samples: dict[str, list[str]] = field(
        default_factory=lambda: {"newly_flagged": [], "no_longer_flagged": []}
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "flagged_now": self.flagged_now,
            "flagged_with_edit": self.flagged_with_edit,
            "newly_flagged": self.newly_flagged,
            "no_longer_flagged": self.no_longer_flagged,
            "samples": self.samples,
        }


@dataclass
class PolicyPreview:
    """What one edited policy changes over the stored rows scanned."""

    policy: str
    deployed: bool  # False: no policy of that name is deployed (everything is new)
    rows: int = 0
    categories: dict[str, CategoryChange] = field(default_factory=dict)
    not_previewed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "deployed": self.deployed,
            "rows": self.rows,
            "categories": {name: c.to_dict() for name, c in self.categories.items()},
            "not_previewed": self.not_previewed,
        }


def _flag_matrix(
    compiled: CompiledPolicy[Any] | None, stored: StoredBatch, logit_scale: float
) -> tuple[list[str], torch.Tensor | None]:
    """(category ids, ``(rows, categories)`` flagged mask) of one batch; ([], None) for no
    policy."""
    if compiled is None:
        return [], None
    scores = compiled.scores(stored.embeddings, logit_scale)
    return compiled.flagged(pooled_scores(compiled, stored, scores))


def _columns(
    names: list[str], mask: torch.Tensor | None, order: list[str], rows: int
) -> torch.Tensor:
    """``mask``'s columns in the order of ``order`` (all False for a name not in ``names``)."""
    if mask is not None and names == order:
        return mask
    index = {name: i for i, name in enumerate(names)}
    none = torch.zeros(rows, dtype=torch.bool)
    columns = [mask[:, index[n]] if mask is not None and n in index else none for n in order]
    return torch.stack(columns, dim=1)


@contextmanager
def few_threads() -> Iterator[None]:
    """Score stored batches in half the cores' torch threads (one on 2 cores), restored
    after; the other cores are left to Lance's decode. With a torch thread per core, each
    small op waits for a thread another process has descheduled: on 2 busy cores
    (load 2.5) preview of 514,544 rows took 11-12 s that way, 2.4-2.6 s in one thread.
    Process-wide: for the CLI's own process."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) // 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def preview(
    store: EmbeddingStore,
    pairs: Sequence[tuple[CompiledPolicy[Any] | None, CompiledPolicy[Any]]],
    model: LoadedModel,
    since: datetime | None = None,
    sample: int = 5,
    on_rows: Callable[[int], None] | None = None,
) -> list[PolicyPreview]:
    """Count, per category, what each ``(deployed or None, edited)`` pair flags over the
    stored rows of ``model`` since ``since``. ``on_rows(n)`` reports progress."""
    out = [PolicyPreview(edited.name, deployed is not None) for deployed, edited in pairs]
    for report, (_, edited) in zip(out, pairs, strict=True):
        if edited.hash_lists:
            report.not_previewed.append(
                "pdq: the store keeps no PDQ hashes, so hash-list matches are not counted"
            )
    with few_threads():
        for stored in stored_batches(store, PREVIEW_COLUMNS, model.fingerprint, since):
            uris = None
            for report, (deployed, edited) in zip(out, pairs, strict=True):
                report.rows += stored.rows
                now_names, now = _flag_matrix(deployed, stored, model.logit_scale)
                after_names, after = _flag_matrix(edited, stored, model.logit_scale)
                order = list(dict.fromkeys([*now_names, *after_names]))
                if not order:  # e.g. a blocklist of hash files only: nothing to count here
                    continue
                before = _columns(now_names, now, order, stored.rows)
                with_edit = _columns(after_names, after, order, stored.rows)
                new = with_edit & ~before
                gone = before & ~with_edit
                # four reductions a batch, not four per category
                counts = torch.stack(
                    [before.sum(0), with_edit.sum(0), new.sum(0), gone.sum(0)]
                ).tolist()
                for j, name in enumerate(order):
                    change = report.categories.setdefault(name, CategoryChange())
                    change.flagged_now += counts[0][j]
                    change.flagged_with_edit += counts[1][j]
                    change.newly_flagged += counts[2][j]
                    change.no_longer_flagged += counts[3][j]
                    for key, mask, seen in (
                        ("newly_flagged", new, counts[2][j]),
                        ("no_longer_flagged", gone, counts[3][j]),
                    ):
                        kept = change.samples[key]
                        if seen and len(kept) < sample:
                            if uris is None:
                                uris = stored.batch.column("uri").to_pylist()
                            picks = torch.nonzero(mask[:, j]).flatten()[: sample - len(kept)]
                            kept.extend(str(uris[i]) for i in picks.tolist())
            if on_rows is not None:
                on_rows(stored.rows)
    return out


# --------------------------------------------------------------------------- rescore


def day_windows(first: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """``[first, end)`` cut at UTC midnights: the units a rescore finishes and resumes by."""
    windows = []
    start = first
    while start < end:
        midnight = datetime(start.year, start.month, start.day, tzinfo=UTC) + timedelta(days=1)
        stop = min(midnight, end)
        windows.append((start, stop))
        start = stop
    return windows


def _flag_signature(section: dict[str, Any] | None) -> list[Any]:
    """What a policy section decided: its flags (category, action) or kept tags, sorted;
    scores moving without crossing a bound are no change."""
    if not section:
        return []
    flags = section.get("flags", section.get("matches", []))
    decided = sorted((f.get("category"), f.get("action")) for f in flags)
    return [decided, sorted(t.get("tag") for t in section.get("tags", []))]


@dataclass
class Rescored:
    result: Result
    changed: bool  # its flags (or kept tags) differ from the stored result's


def rescore_batch(
    policies: PolicySet,
    name: str,
    stored: StoredBatch,
    model: LoadedModel,
    worker_name: str | None = None,
) -> list[Rescored]:
    """The result document of each stored row of ``stored`` under policy ``name``."""
    scores = policies.score(stored.embeddings, model.logit_scale, [name])[name]
    batch = stored.batch
    job_ids = batch.column("job_id").to_pylist()
    uris = batch.column("uri").to_pylist()
    metadata = batch.column("metadata").to_pylist()
    previous = batch.column("result").to_pylist()
    info = ModelInfo(**model.describe())
    worker = worker_name or f"rescore/{socket.gethostname()}/{os.getpid()}"
    out: list[Rescored] = []
    for row in range(stored.rows):
        span = stored.frames_of(row)
        old = json.loads(previous[row]) if previous[row] else {}
        image = ImageInfo.model_validate(old.get("image") or {"uri": uris[row]})
        animated = image.frame_indices is not None and len(span) > 1
        scored = policies.assemble(
            [name],
            {name: scores[span.start : span.stop]},
            Observed(stored.embeddings[span.start : span.stop], model.logit_scale),
            image.frame_indices if animated else None,
            (image.pdq, image.pdq_quality),
        )
        result = Result(
            job_id=job_ids[row],
            status="ok",
            image=image,
            model=info,
            metadata=json.loads(metadata[row]) if metadata[row] else {},
            worker=worker,
            created_at=datetime.now(UTC),
            **scored.fields(),
        )
        new = scored.policies[name].model_dump(mode="json")
        changed = _flag_signature(new) != _flag_signature(old.get("policies", {}).get(name))
        out.append(Rescored(result, changed))
    return out


@dataclass
class WindowFigures:
    """What re-scoring one window did: rows scanned, documents emitted, rows changed."""

    rows: int = 0
    written: int = 0
    changed: int = 0  # rows whose flags (or kept tags) differ from the stored result's

    def add(self, other: WindowFigures) -> None:
        self.rows += other.rows
        self.written += other.written
        self.changed += other.changed


def rescore_window(
    store: EmbeddingStore,
    policies: PolicySet,
    name: str,
    model: LoadedModel,
    since: datetime | None,
    until: datetime | None,
    emit: Callable[[Result], None],
    *,
    changed_only: bool = False,
    on_rows: Callable[[int], None] | None = None,
) -> WindowFigures:
    """Re-score the stored rows of ``model`` in ``[since, until)`` under policy ``name``
    and hand each document to ``emit`` (only the changed ones with ``changed_only``);
    ``on_rows(n)`` after each stored batch. What `worker rescore` does for each day and a
    fleet worker for each shard (``worker/queue/rescore_shards.py``)."""
    figures = WindowFigures()
    for stored in stored_batches(store, RESCORE_COLUMNS, model.fingerprint, since, until):
        for item in rescore_batch(policies, name, stored, model):
            figures.changed += item.changed
            if item.changed or not changed_only:
                emit(item.result)
                figures.written += 1
        figures.rows += stored.rows
        if on_rows is not None:
            on_rows(stored.rows)
    return figures
