"""The scoring pipeline: fetch -> decode -> preprocess -> encode once -> every policy -> results.

Fetching, decoding and preprocessing run in a thread pool; :meth:`Engine.stream` keeps the
next batch preparing while the current one is encoded. Per-job failures become error
results; one bad image never fails its batch-mates.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worker.documents import (
    ErrorInfo,
    Flag,
    ImageInfo,
    ImageRef,
    ModelInfo,
    ModerationResult,
    Result,
    TagsResult,
)
from worker.errors import JobError
from worker.fetcher import ImageFetcher
from worker.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_SIDE,
    decode_image,
    install_decompression_bomb_guard,
)
from worker.log import get_logger
from worker.model import LoadedModel
from worker.policy.policyset import PolicySet
from worker.redact import redact_text, redact_uri

log = get_logger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """One image to score: what a job asks for, minus delivery."""

    job_id: str
    image: ImageRef
    policies: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    item: WorkItem
    info: ImageInfo
    pixels: np.ndarray | torch.Tensor | None = None
    error: JobError | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


class Engine:
    """Scores images against compiled policies with one loaded model."""

    def __init__(
        self,
        model: LoadedModel,
        policies: PolicySet,
        fetcher: ImageFetcher,
        *,
        max_pixels: int,
        allowed_formats: Sequence[str],
        decode_workers: int = 0,
        jpeg_draft: bool = True,
        max_side: int = DEFAULT_MAX_SIDE,
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    ) -> None:
        self.model = model
        self.policies = policies  # replaced wholesale on reload; reads see one set or the other
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.max_aspect_ratio = max_aspect_ratio
        self.allowed_formats = frozenset(f.upper() for f in allowed_formats)
        self.draft_size = model.image_size if jpeg_draft else None
        self.workers = decode_workers or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        self.worker_name = f"{socket.gethostname()}/{os.getpid()}"
        install_decompression_bomb_guard(max_pixels)

    # ------------------------------------------------------------------ preparing one image

    def prepare(self, item: WorkItem) -> Prepared:
        """Fetch, decode and preprocess one image. Never raises for a bad job."""
        prep = Prepared(item, self._image_info(item))
        try:
            unknown = [p for p in item.policies or [] if p not in self.policies]
            if unknown:
                raise JobError(
                    f"unknown policy {', '.join(map(repr, unknown))} (loaded: "
                    f"{', '.join(self.policies.names())})",
                    code="policy_not_found",
                )
            started = time.perf_counter()
            data = self.fetcher.fetch(item.image)
            prep.timings["fetch"] = _ms(started)
            started = time.perf_counter()
            decoded = decode_image(
                data,
                max_pixels=self.max_pixels,
                allowed_formats=self.allowed_formats,
                draft_size=self.draft_size,
                max_side=self.max_side,
                max_aspect_ratio=self.max_aspect_ratio,
            )
            prep.info = prep.info.model_copy(
                update={
                    "sha256": decoded.sha256,
                    "width": decoded.width,
                    "height": decoded.height,
                    "format": decoded.format,
                }
            )
            prep.timings["decode"] = _ms(started)
            started = time.perf_counter()
            prep.pixels = self.model.image_input(decoded.image)
            prep.timings["preprocess"] = _ms(started)
        except JobError as exc:
            prep.error = exc
        except Exception as exc:  # a bug or an exotic failure: still one job's error
            log.exception("job.failed", job_id=item.job_id)
            prep.error = JobError(f"{type(exc).__name__}: {exc}", code="internal_error")
        return prep

    # ------------------------------------------------------------------ encoding and scoring

    def _encode(self, pixels: list[np.ndarray | torch.Tensor]) -> list[torch.Tensor | Exception]:
        """Encode a batch; on failure split it so only the image that fails is lost."""
        try:
            return list(self.model.encode_images(self.model.batch_pixels(pixels)))
        except Exception as exc:
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(pixels) == 1:
                return [exc]
            log.warning("batch.split", size=len(pixels), error=str(exc)[:200])
            half = len(pixels) // 2
            return self._encode(pixels[:half]) + self._encode(pixels[half:])

    def score(self, batch: Sequence[Prepared]) -> list[Result]:
        """Encode the prepared images of ``batch`` together and score every requested policy."""
        policies = self.policies  # one snapshot for the whole batch, whatever reloads meanwhile
        ready = [p for p in batch if p.error is None and p.pixels is not None]
        good: list[tuple[Prepared, torch.Tensor]] = []
        if ready:
            started = time.perf_counter()
            encoded = self._encode([p.pixels for p in ready if p.pixels is not None])
            encode_ms = round(_ms(started) / len(ready), 3)
            for prep, emb in zip(ready, encoded, strict=True):
                prep.timings["encode"] = encode_ms
                if isinstance(emb, Exception):
                    prep.error = JobError(f"encoding failed: {emb}", code="internal_error")
                else:
                    good.append((prep, emb))
        results: dict[int, Result] = {}
        if good:
            started = time.perf_counter()
            per_policy = self._score_all(torch.stack([e for _, e in good]), policies)
            score_ms = round(_ms(started) / len(good), 3)
            for row, (prep, _) in enumerate(good):
                prep.timings["score"] = score_ms
                results[id(prep)] = self._ok_result(prep, row, per_policy, policies)
        return [results.get(id(p)) or self._error_result(p) for p in batch]

    def _score_all(
        self, embeddings: torch.Tensor, policies: PolicySet
    ) -> dict[str, list[list[float]]]:
        """Scores of every loaded policy for every embedding (one matmul per policy)."""
        out: dict[str, list[list[float]]] = {}
        for name, compiled in policies.compiled.items():
            out[name] = compiled.scores(embeddings, self.model.logit_scale).cpu().tolist()
        return out

    def _ok_result(
        self,
        prep: Prepared,
        row: int,
        per_policy: dict[str, list[list[float]]],
        policies: PolicySet,
    ) -> Result:
        names = prep.item.policies or policies.names()
        gone = [n for n in names if n not in policies]
        if gone:  # removed by a reload between preparing and scoring this image
            prep.error = JobError(
                f"unknown policy {', '.join(map(repr, gone))}", code="policy_not_found"
            )
            return self._error_result(prep)
        results: dict[str, ModerationResult | TagsResult] = {}
        flags: list[Flag] = []
        labels: list[tuple[str, float]] = []
        for name in names:
            section = policies.compiled[name].section(per_policy[name][row])
            results[name] = section.body
            flags.extend(section.flags)
            labels.extend(section.labels)
        best_first = sorted(labels, key=lambda pair: pair[1], reverse=True)
        return self._result(
            prep,
            status="ok",
            policies=results,
            flags=sorted(flags, key=lambda f: f.score, reverse=True),
            labels=list(dict.fromkeys(tag for tag, _ in best_first)),
        )

    def _error_result(self, prep: Prepared) -> Result:
        error = prep.error or JobError("image was not prepared", code="internal_error")
        message = redact_text(error.message)
        return self._result(prep, status="error", error=ErrorInfo(code=error.code, message=message))

    @staticmethod
    def _image_info(item: WorkItem) -> ImageInfo:
        uri = redact_uri(item.image.uri) if item.image.uri is not None else None
        return ImageInfo(uri=uri, filename=item.image.filename)

    def refuse(self, item: WorkItem, error: JobError) -> Result:
        """The error result of a job refused before its image was looked at."""
        return self._error_result(Prepared(item, self._image_info(item), error=error))

    def _result(self, prep: Prepared, **fields: Any) -> Result:
        return Result(
            job_id=prep.item.job_id,
            image=prep.info,
            model=ModelInfo(**self.model.describe()),
            metadata=prep.item.metadata,
            timings_ms=prep.timings,
            worker=self.worker_name,
            **fields,
        )

    # ------------------------------------------------------------------ whole batches

    def process(self, items: Sequence[WorkItem], chunks: int = 1) -> list[Result]:
        """Prepare ``items`` in parallel and encode them in ``chunks`` encoder batches; with
        more than one, the first chunk encodes while the rest still decode."""
        if chunks <= 1 or len(items) < 2 * chunks:
            return self.score(list(self.pool.map(self.prepare, items)))
        return list(self.stream(items, math.ceil(len(items) / chunks)))

    def stream(self, items: Iterable[WorkItem], batch_size: int) -> Iterator[Result]:
        """Score ``items`` in order, ``batch_size`` at a time, preparing the next batch
        while the current one is encoded."""
        pending: deque[Future[Prepared]] = deque()
        source = iter(items)

        def top_up() -> None:
            while len(pending) < 2 * batch_size:
                item = next(source, None)
                if item is None:
                    return
                pending.append(self.pool.submit(self.prepare, item))

        top_up()
        while pending:
            batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            top_up()
            yield from self.score([f.result() for f in batch])

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.fetcher.close()
