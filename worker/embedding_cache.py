"""On-disk embedding caches, keyed by (model fingerprint, key).

Prompts are keyed by their exact text (editing one category of a policy re-encodes only
the texts that are new); images by the sha256 of their bytes (re-running `worker eval`
after a policy edit encodes no image). SQLite in WAL mode: many worker processes may read
and fill a cache at once.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from worker.log import get_logger

log = get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (fingerprint, key)
) WITHOUT ROWID
"""
TABLES = {"prompt": "prompt_embeddings", "image": "image_embeddings"}
_LOOKUP_CHUNK = 500  # stay under SQLite's bound-parameter limit


class EmbeddingCache:
    """A persistent ``key -> float32 vector`` store for one model fingerprint."""

    def __init__(self, path: Path, fingerprint: str, kind: str = "prompt") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fingerprint = fingerprint
        self.table = TABLES[kind]
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=60.0, check_same_thread=False)
        with self._lock, self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA.format(table=self.table))

    def get_many(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                chunk = unique[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT key, vector FROM {self.table} "
                    f"WHERE fingerprint = ? AND key IN ({marks})",
                    [self.fingerprint, *chunk],
                ).fetchall()
                for key, blob in rows:
                    found[key] = torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy())
        return found

    def put_many(self, embeddings: Mapping[str, torch.Tensor]) -> None:
        rows = [
            (self.fingerprint, key, int(vec.numel()), vec.float().cpu().numpy().tobytes())
            for key, vec in embeddings.items()
        ]
        with self._lock, self._conn:
            self._conn.executemany(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?, ?)", rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class CachedEmbedder:
    """Embeds texts through the cache, encoding only the misses, ``chunk_size`` at a time.

    ``on_progress(done, total)`` is called after each chunk of misses.
    """

    def __init__(
        self,
        encode: Callable[[Sequence[str]], torch.Tensor],
        cache: EmbeddingCache | None,
        on_progress: Callable[[int, int], None] | None = None,
        chunk_size: int = 256,
    ) -> None:
        self.chunk_size = chunk_size
        self._encode = encode
        self._cache = cache
        self._on_progress = on_progress
        self.hits = 0
        self.misses = 0

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        found = self._cache.get_many(texts) if self._cache is not None else {}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        self.hits += len(found)
        self.misses += len(missing)
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            fresh = dict(zip(chunk, self._encode(chunk), strict=True))
            if self._cache is not None:
                self._cache.put_many(fresh)  # stored per chunk: an interrupted compile resumes
            found.update(fresh)
            if self._on_progress is not None:
                self._on_progress(start + len(chunk), len(missing))
        return found
