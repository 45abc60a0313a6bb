"""Retrieval over the embedding store: what `worker search` and `worker store index` do.

Search reads only rows of the loaded model's fingerprint (others are counted, never
mixed) and scores each by the exact cosine of query and stored embedding. Where there is
no ANN index, or fewer than :data:`MIN_INDEX_ROWS` rows to search, it scans them: one
matrix product per Arrow batch and a running top k (:class:`TopK`). Over an index it asks
for ``max(k * OVERFETCH, MIN_CANDIDATES)`` candidates, prefiltered on fingerprint and
time, and re-ranks them by the exact cosine of their stored embeddings: the index only
chooses the candidates.

Why IVF_HNSW_SQ (lancedb 0.40, 2 CPU cores, cosine, recall@10 over 100 queries;
50,000 clustered 512-d unit vectors, sqrt(rows) partitions, 20 probes): it builds in
4 s with recall 0.98 before the re-rank and 1.00 after re-ranking 100 candidates; IVF_PQ
(64 sub-vectors) took 197 s to build and had 0.48 before the re-rank (1.00 after). At
200,000 rows HNSW_SQ re-ranked to 0.998 with 20 probes and 1.000 with 50, hence
:func:`nprobes_for`.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from worker.store import EmbeddingStore, Hit

#: Fewer rows than this get no ANN index, and are searched by a scan (exact, and fast).
MIN_INDEX_ROWS = 10_000
#: Candidates the ANN index proposes per result wanted, at least MIN_CANDIDATES.
OVERFETCH = 10
MIN_CANDIDATES = 100
#: IVF partitions probed per query, at least (more for a large index: nprobes_for).
MIN_NPROBES = 20
VECTOR_INDEX = "embedding_idx"
#: job_id: merge_insert on the primary key; created_at: --since and retention;
#: fingerprint (a few distinct values): the filter of every search.
SCALAR_INDEXES = (("job_id", "BTree"), ("created_at", "BTree"), ("fingerprint", "Bitmap"))

# ---------------------------------------------------------------------- the pure part


def partitions_for(rows: int) -> int:
    """IVF partitions of an index over ``rows`` rows: about sqrt(rows)."""
    return max(1, round(math.sqrt(rows)))


def nprobes_for(indexed_rows: int) -> int:
    """Partitions probed per query: a quarter of them, at least :data:`MIN_NPROBES`.
    (Recall before the re-rank depends on the share probed: on 20,000 uniform 64-d
    vectors, sqrt(rows) partitions, 20 of 141 probed gave 0.59, 50 of 141 0.84; on
    clustered 512-d vectors like CLIP's, 20 of 223 gave 0.98.)"""
    return max(MIN_NPROBES, math.ceil(partitions_for(indexed_rows) / 4))


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest ``scores``, highest first."""
    chosen = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
    return chosen[np.argsort(-scores[chosen], kind="stable")]


class TopK:
    """The ``k`` best rows seen so far, fed one batch of scores at a time."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.hits: list[Hit] = []

    def add(self, scores: np.ndarray, job_ids: pa.Array, uris: pa.Array) -> None:
        from worker.store import Hit

        chosen = top_indices(scores, self.k)
        if len(self.hits) == self.k:  # only rows that beat the current k-th can enter
            chosen = chosen[scores[chosen] > self.hits[-1].score]
        if not len(chosen):
            return
        ids = job_ids.take(chosen).to_pylist()
        links = uris.take(chosen).to_pylist()
        fresh = [Hit(i, u, float(s)) for i, u, s in zip(ids, links, scores[chosen], strict=True)]
        self.hits = sorted(self.hits + fresh, key=lambda hit: -hit.score)[: self.k]


# ---------------------------------------------------------------------- searching


def scan_search(
    store: EmbeddingStore,
    query: np.ndarray,
    fingerprint: str,
    since: datetime | None,
    k: int,
) -> list[Hit]:
    """Exact: every row of ``fingerprint`` (stored since ``since``), one batch at a time."""
    from worker.store import vectors

    best = TopK(k)
    dim = len(query)
    for batch in store.scan(["job_id", "uri", "embedding"], fingerprint, since):
        scores = vectors(batch.column("embedding"), dim) @ query
        best.add(scores, batch.column("job_id"), batch.column("uri"))
    return best.hits


def index_search(
    table: Any, query: np.ndarray, where: str, k: int, nprobes: int
) -> tuple[list[Hit], int]:
    """The ANN index's candidates (``where`` applied before the search), re-ranked by
    the exact cosine of their stored embeddings; (the best ``k``, candidates read)."""
    from worker.store import vectors

    found = (
        table.search(query, vector_column_name="embedding")
        .distance_type("cosine")
        .nprobes(nprobes)
        .where(where, prefilter=True)
        .limit(max(k * OVERFETCH, MIN_CANDIDATES))
        .select(["job_id", "uri", "embedding", "_distance"])
        .to_arrow()
    )
    best = TopK(k)
    if found.num_rows:
        scores = vectors(found.column("embedding"), len(query)) @ query
        best.add(
            scores, found.column("job_id").combine_chunks(), found.column("uri").combine_chunks()
        )
    return best.hits, found.num_rows


def vector_index(table: Any) -> tuple[str, int] | None:
    """(name, rows it covers) of the table's index on ``embedding``; None without one."""
    for index in table.list_indices():
        if list(index.columns) == ["embedding"]:
            return index.name, int(index.num_indexed_rows)
    return None
