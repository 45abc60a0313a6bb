"""The embedding cache (SQLite in WAL mode) filled and read by several processes at once,
as several worker processes may. Real processes, so integration (the rest of the cache is
tested in-process in tests/unit/test_heads.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.processes import starmap_in_processes
from worker.embedding_cache import EmbeddingCache

pytestmark = pytest.mark.integration


def _fill(path: str, fingerprint: str, offset: int) -> int:
    cache = EmbeddingCache(Path(path), fingerprint)
    for i in range(40):
        cache.put_many({f"text {offset + i}": torch.full((8,), float(offset + i))})
        cache.get_many([f"text {j}" for j in range(offset, offset + i + 1)])
    cache.close()
    return offset


def test_cache_is_safe_under_concurrent_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite3")
    done = starmap_in_processes(_fill, [(path, "fp", k * 100) for k in range(4)], processes=4)
    assert sorted(done) == [0, 100, 200, 300]
    found = EmbeddingCache(Path(path), "fp").get_many(
        [f"text {k * 100 + i}" for k in range(4) for i in range(40)]
    )
    assert len(found) == 160
    assert float(found["text 305"][0]) == 305.0
