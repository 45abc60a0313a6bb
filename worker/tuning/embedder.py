"""Embedding many image files with one model, through the image-embedding cache.

Files are read and hashed in a thread pool; only images whose sha256 is not cached for
this model fingerprint are decoded, preprocessed and encoded. `worker eval` re-run after
a policy edit therefore encodes no image at all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.embedding_cache import EmbeddingCache
from worker.errors import JobError
from worker.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_SIDE, decode_image
from worker.model import LoadedModel


@dataclass(frozen=True)
class EmbeddedFiles:
    embeddings: torch.Tensor  # (N, D) on the CPU, rows in input order
    encoded: int  # how many images went through the image tower
    cached: int


def _read(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def embed_files(
    model: LoadedModel,
    paths: Sequence[Path],
    cache: EmbeddingCache | None,
    *,
    max_pixels: int,
    allowed_formats: Sequence[str],
    batch_size: int = 64,
    workers: int = 0,
    on_progress: Callable[[int], None] | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> EmbeddedFiles:
    """L2-normalised embeddings of ``paths``; raises JobError naming a file that fails."""
    formats = frozenset(f.upper() for f in allowed_formats)
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        read = list(pool.map(_read, paths))
        digests = [digest for _, digest in read]
        found = cache.get_many(digests) if cache is not None else {}
        if on_progress is not None and found:
            on_progress(sum(d in found for d in digests))
        missing = [i for i, d in enumerate(digests) if d not in found]
        unique = list({digests[i]: i for i in missing}.values())

        def prepare(index: int) -> np.ndarray | torch.Tensor:
            try:
                decoded = decode_image(
                    read[index][0],
                    max_pixels=max_pixels,
                    allowed_formats=formats,
                    max_side=max_side,
                    max_aspect_ratio=max_aspect_ratio,
                )
            except JobError as exc:
                raise JobError(f"{paths[index]}: {exc.message}", code=exc.code) from None
            return model.image_input(decoded.image)

        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            inputs = list(pool.map(prepare, chunk))
            vectors = model.encode_images(model.batch_pixels(inputs)).float().cpu()
            fresh = {digests[i]: v for i, v in zip(chunk, vectors, strict=True)}
            if cache is not None:
                cache.put_many(fresh)
            found.update(fresh)
            if on_progress is not None:
                on_progress(sum(1 for i in missing if digests[i] in fresh))
    stacked = torch.stack([found[d] for d in digests]) if digests else torch.empty(0, 0)
    return EmbeddedFiles(stacked, len(unique), len(paths) - len(missing))
