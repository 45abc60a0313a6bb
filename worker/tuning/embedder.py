"""Embedding many image files with one model, through the image-embedding cache.

Images are decoded exactly as the worker serves them: :class:`worker.engine.DecodeOptions`
(the same guards, JPEG draft size and frames of an animation the engine gets from
settings) and :func:`worker.engine.frame_inputs` (decode, then ``model.image_input``), so
what eval measures and fine-tuning validates on is what ``worker classify`` scores. Every
scored frame gives a row: an animation has up to ``max_frames`` rows, a still one.

Files are read, hashed and header-checked in a thread pool; only images whose frames are
not all cached are decoded, preprocessed and encoded. A cached vector is keyed by the
image's sha256 *and its decode* (:func:`frame_key`: draft size, frames, pixel budget,
frame index), so a vector from another setting, or from the old first-frame path keyed by
the bare sha256, is never used for a different decode. `worker eval` re-run after a policy
edit therefore encodes no image at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.nn.functional import normalize

from worker.embedding_cache import EmbeddingCache
from worker.engine import DecodeOptions, ModelInput, frame_inputs
from worker.errors import JobError
from worker.images import (
    install_decompression_bomb_guard,
)
from worker.model import LoadedModel

if TYPE_CHECKING:
    from worker.settings import Settings


@dataclass(frozen=True)
class EmbeddedFiles:
    embeddings: torch.Tensor  # (total frames, D) on the CPU, files in input order
    encoded: int  # how many images (files) went through the image tower
    cached: int  # how many came from the cache
    spans: list[tuple[int, int]]  # each file's [start, end) rows; a still has one row
    sha256s: list[str] = field(default_factory=list)  # each file's, in input order

    def per_file_mean(self) -> torch.Tensor:
        """(N, D): one row per file, the L2-normalised mean of its frames' rows (a still's
        row unchanged)."""
        rows = []
        for start, end in self.spans:
            frames = self.embeddings[start:end]
            rows.append(frames[0] if end - start == 1 else normalize(frames.mean(0), dim=0))
        return torch.stack(rows) if rows else torch.empty(0, self.embeddings.shape[-1])


def frame_key(sha256: str, options: DecodeOptions, frame: int) -> str:
    """The cache key of one frame's embedding: the image and everything that decides its
    pixels and which frames are scored (draft size, max frames, the pixel budget)."""
    draft = "x".join(map(str, options.draft_size)) if options.draft_size else "none"
    return (
        f"{sha256}:draft={draft}:frames={options.max_frames}:pixels={options.max_pixels}"
        f":frame={frame}"
    )


def decode_like_serving(data: bytes, settings: Settings, model: LoadedModel) -> list[Image.Image]:
    """The RGB frames the worker hands to ``model.image_input`` for ``data`` (JPEG draft
    mode, the frames of an animation, every guard); raises JobError for a bad file."""
    install_decompression_bomb_guard(settings.image.max_pixels)
    decoded = DecodeOptions.from_settings(settings.image, model).open(data)
    return [frame.image for frame in decoded]


@dataclass(frozen=True)
class _File:
    data: bytes
    sha256: str
    plan: list[int]  # the frames the decode will give (fewer if a GIF frame grows the canvas)


def embed_files(
    model: LoadedModel,
    paths: Sequence[Path] | Sequence[str],
    cache: EmbeddingCache | None,
    options: DecodeOptions,
    *,
    batch_size: int = 64,
    workers: int = 0,
    on_progress: Callable[[int], None] | None = None,
    read: Callable[[Any], bytes] = Path.read_bytes,
) -> EmbeddedFiles:
    """L2-normalised embeddings of every frame the worker scores in ``paths``, decoded as
    the engine decodes them with ``options`` (:meth:`DecodeOptions.from_settings`:
    ``WORKER_IMAGE__*``); raises JobError naming a file that fails. ``on_progress(n)``
    counts files done; ``batch_size`` caps the frames per encoder call (a file's frames
    are never split). ``read`` gives a file's bytes (a policy's exemplars are read
    through the worker's sources)."""
    install_decompression_bomb_guard(options.max_pixels)  # as the engine does

    def named(path: object, exc: JobError) -> JobError:
        return JobError(f"{path}: {exc.message}", code=exc.code)

    def load(path: Path | str) -> _File:
        try:
            data = read(path)
            decoded = options.open(data)  # the header checks and the frame plan, no pixel
        except JobError as exc:
            raise named(path, exc) from None
        return _File(data, decoded.sha256, decoded.plan)

    def prepare(index: int) -> tuple[list[int], list[ModelInput]]:
        try:
            decoded = options.open(files[index].data)
            inputs = frame_inputs(decoded, model).inputs
        except JobError as exc:
            raise named(paths[index], exc) from None
        return decoded.indices, inputs

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        files = list(pool.map(load, paths))
        keys = [[frame_key(f.sha256, options, k) for k in f.plan] for f in files]
        found = cache.get_many([k for ks in keys for k in ks]) if cache is not None else {}
        rows: dict[str, list[torch.Tensor]] = {}  # sha256 -> its frames' embeddings
        for file, file_keys in zip(files, keys, strict=True):
            if all(k in found for k in file_keys):
                rows[file.sha256] = [found[k] for k in file_keys]
        cached = sum(f.sha256 in rows for f in files)
        if on_progress is not None and cached:
            on_progress(cached)
        missing = [i for i, f in enumerate(files) if f.sha256 not in rows]
        unique = list({files[i].sha256: i for i in missing}.values())
        for chunk in _chunks(unique, [len(files[i].plan) for i in unique], batch_size):
            prepared = list(pool.map(prepare, chunk))
            inputs = [pixels for _, frames in prepared for pixels in frames]
            vectors = model.encode_images(model.batch_pixels(inputs)).float().cpu()
            fresh: dict[str, torch.Tensor] = {}
            start = 0
            for index, (indices, _) in zip(chunk, prepared, strict=True):
                file = files[index]
                own = list(vectors[start : start + len(indices)])
                start += len(indices)
                rows[file.sha256] = own
                fresh.update(
                    (frame_key(file.sha256, options, k), v)
                    for k, v in zip(indices, own, strict=True)
                )
            if cache is not None:
                cache.put_many(fresh)
            if on_progress is not None:
                done = {files[i].sha256 for i in chunk}
                on_progress(sum(1 for i in missing if files[i].sha256 in done))
    spans: list[tuple[int, int]] = []
    stacked: list[torch.Tensor] = []
    for file in files:
        spans.append((len(stacked), len(stacked) + len(rows[file.sha256])))
        stacked.extend(rows[file.sha256])
    embeddings = torch.stack(stacked) if stacked else torch.empty(0, 0)
    return EmbeddedFiles(
        embeddings, len(unique), len(files) - len(missing), spans, [f.sha256 for f in files]
    )


def _chunks(items: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """``items`` in order, cut so each chunk's sizes sum to at most ``limit`` (a single item
    larger than that is a chunk of its own)."""
    out: list[list[int]] = []
    total = limit
    for item, size in zip(items, sizes, strict=True):
        if total + size > limit:
            out.append([])
            total = 0
        out[-1].append(item)
        total += size
    return out
