"""The scoring pipeline: fetch -> decode -> preprocess -> encode once -> every policy -> results.

Fetching, decoding and preprocessing run in a thread pool; :meth:`Engine.stream` keeps the
next batch preparing while the current one is encoded. Per-job failures become error
results; one bad image never fails its batch-mates.

An animated image is up to ``max_frames`` frames (:func:`worker.animation.decode_frames`),
each preprocessed like a still and encoded in the same forward pass as the rest of the
batch; each policy then pools its frames' scores (``CompiledPolicy.pool_frames``: the
maximum for moderation, the mean for tags) into one section.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.animation import DEFAULT_MAX_FRAMES, DecodedFrames, decode_frames
from worker.documents import ErrorInfo, ImageInfo, ImageRef, ModelInfo, Result
from worker.errors import JobError
from worker.fetcher import ImageFetcher
from worker.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_SIDE,
    install_decompression_bomb_guard,
)
from worker.log import get_logger
from worker.model import LoadedModel
from worker.pdq import image_pdq
from worker.policy.compiled import Observed
from worker.policy.policyset import PolicySet
from worker.redact import redact_text, redact_uri

if TYPE_CHECKING:
    from worker.settings import ImageSettings

log = get_logger(__name__)

ModelInput = np.ndarray | torch.Tensor  # what LoadedModel.image_input gives for one picture
#: Receives each scored batch's ok results with their images' ``(frames, D)`` embeddings
#: (the embedding store's writer); called on the scoring thread, so it must not block.
Recorder = Callable[[list[tuple[Result, torch.Tensor]]], None]


@dataclass(frozen=True)
class DecodeOptions:
    """How the worker decodes an image: the guards, the frames of an animation and the JPEG
    draft size. Serving, eval and fine-tuning decode through :meth:`open` and
    :func:`frame_inputs` with the options :meth:`from_settings` gives, so they see the same
    pixels."""

    max_pixels: int
    allowed_formats: frozenset[str]
    draft_size: tuple[int, int] | None = None
    max_frames: int = DEFAULT_MAX_FRAMES
    max_side: int = DEFAULT_MAX_SIDE
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    @classmethod
    def from_settings(cls, image: ImageSettings, model: LoadedModel) -> DecodeOptions:
        """The options ``worker.runtime.build_engine`` gives the engine."""
        return cls(
            max_pixels=image.max_pixels,
            allowed_formats=frozenset(f.upper() for f in image.allowed_formats),
            draft_size=model.image_size if image.jpeg_draft else None,
            max_frames=image.max_frames,
            max_side=image.max_side,
            max_aspect_ratio=image.max_aspect_ratio,
        )

    def open(self, data: bytes) -> DecodedFrames:
        """Check the header and plan the frames (:func:`worker.animation.decode_frames`);
        raises ImageError. The frames decode as the result is iterated."""
        return decode_frames(
            data,
            max_pixels=self.max_pixels,
            allowed_formats=self.allowed_formats,
            max_frames=self.max_frames,
            draft_size=self.draft_size,
            max_side=self.max_side,
            max_aspect_ratio=self.max_aspect_ratio,
        )


@dataclass
class FrameInputs:
    """The model inputs of an opened image's frames, and the seconds spent on each stage."""

    inputs: list[ModelInput] = field(default_factory=list)
    decode_s: float = 0.0
    preprocess_s: float = 0.0


def frame_inputs(decoded: DecodedFrames, model: LoadedModel) -> FrameInputs:
    """Decode and preprocess the frames to score, one at a time (a still has one); only one
    decoded picture is held at a time. Raises ImageError for a bad frame."""
    out = FrameInputs()
    frames = iter(decoded)
    while True:
        started = time.perf_counter()
        frame = next(frames, None)  # decodes it (and any frame before it)
        decoded_at = time.perf_counter()
        out.decode_s += decoded_at - started
        if frame is None:
            return out
        out.inputs.append(model.image_input(frame.image))
        del frame
        out.preprocess_s += time.perf_counter() - decoded_at


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
    frames: list[ModelInput] = field(default_factory=list)  # model inputs
    error: JobError | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def animated(self) -> bool:
        return self.info.frame_indices is not None


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
        max_frames: int = DEFAULT_MAX_FRAMES,
    ) -> None:
        self.model = model
        self.policies = policies  # replaced wholesale on reload; reads see one set or the other
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.max_aspect_ratio = max_aspect_ratio
        self.max_frames = max_frames
        self.allowed_formats = frozenset(f.upper() for f in allowed_formats)
        self.draft_size = model.image_size if jpeg_draft else None
        self.workers = decode_workers or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        self.worker_name = f"{socket.gethostname()}/{os.getpid()}"
        self.recorder: Recorder | None = None
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
            self._decode(prep, data)
        except JobError as exc:
            prep.error = exc
        except Exception as exc:  # a bug or an exotic failure: still one job's error
            log.exception("job.failed", job_id=item.job_id)
            prep.error = JobError(f"{type(exc).__name__}: {exc}", code="internal_error")
        return prep

    def decode_options(self) -> DecodeOptions:
        """How this engine decodes (eval and fine-tuning build the same from settings)."""
        return DecodeOptions(
            max_pixels=self.max_pixels,
            allowed_formats=self.allowed_formats,
            draft_size=self.draft_size,
            max_frames=self.max_frames,
            max_side=self.max_side,
            max_aspect_ratio=self.max_aspect_ratio,
        )

    def _decode(self, prep: Prepared, data: bytes) -> None:
        """Decode and preprocess the frames to score (a still has one)."""
        started = time.perf_counter()
        decoded = self.decode_options().open(data)
        header = {"sha256": decoded.sha256, "width": decoded.width, "height": decoded.height}
        prep.info = prep.info.model_copy(update=header | {"format": decoded.format})
        opened_s = time.perf_counter() - started
        frames = frame_inputs(decoded, self.model)
        prep.frames = frames.inputs
        if decoded.animated:
            animation = {
                "frames_scored": len(decoded.indices),
                "frames_total": decoded.frames_total,
                "frame_indices": list(decoded.indices),
            }
            prep.info = prep.info.model_copy(update=animation)
        prep.timings["decode"] = round((opened_s + frames.decode_s) * 1000, 3)
        prep.timings["preprocess"] = round(frames.preprocess_s * 1000, 3)
        if self.policies.hashes_images:
            started = time.perf_counter()
            pdq, quality = image_pdq(data)  # the full-resolution decode, not the draft
            prep.info = prep.info.model_copy(update={"pdq": pdq, "pdq_quality": quality})
            prep.timings["pdq"] = _ms(started)

    # ------------------------------------------------------------------ encoding and scoring

    def _encode(self, pixels: list[ModelInput]) -> list[torch.Tensor | Exception]:
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
        """Encode the prepared images of ``batch`` together (every frame of every image in
        one encoder call) and score every requested policy."""
        policies = self.policies  # one snapshot for the whole batch, whatever reloads meanwhile
        ready = [p for p in batch if p.error is None and p.frames]
        good: list[tuple[Prepared, int]] = []  # and how many frames (embedding rows) it has
        embeddings: list[torch.Tensor] = []
        if ready:
            started = time.perf_counter()
            encoded = self._encode([pixels for p in ready for pixels in p.frames])
            encode_ms = round(_ms(started) / len(ready), 3)
            start = 0
            for prep in ready:
                rows = encoded[start : start + len(prep.frames)]
                start += len(prep.frames)
                prep.frames = []  # the model inputs are spent
                prep.timings["encode"] = encode_ms
                failed = [e for e in rows if isinstance(e, Exception)]
                if failed:
                    prep.error = JobError(f"encoding failed: {failed[0]}", code="internal_error")
                else:
                    good.append((prep, len(rows)))
                    embeddings.extend(e for e in rows if isinstance(e, torch.Tensor))
        results: dict[int, Result] = {}
        recorded: list[tuple[Result, torch.Tensor]] = []
        if good:
            started = time.perf_counter()
            stacked = torch.stack(embeddings)
            per_policy = policies.score(stacked, self.model.logit_scale)
            score_ms = round(_ms(started) / len(good), 3)
            start = 0
            for prep, count in good:
                prep.timings["score"] = score_ms
                span = range(start, start + count)
                start += count
                result = self._ok_result(prep, span, per_policy, policies, stacked)
                results[id(prep)] = result
                if result.status == "ok":
                    recorded.append((result, stacked[span.start : span.stop]))
        if recorded and self.recorder is not None:
            try:
                self.recorder(recorded)
            except Exception:  # the store is a by-product: never fail scored jobs for it
                log.exception("store.record_failed", rows=len(recorded))
        return [results.get(id(p)) or self._error_result(p) for p in batch]

    def _ok_result(
        self,
        prep: Prepared,
        rows: range,
        per_policy: dict[str, list[list[float]]],
        policies: PolicySet,
        embeddings: torch.Tensor,
    ) -> Result:
        names = prep.item.policies or policies.names()
        gone = [n for n in names if n not in policies]
        if gone:  # removed by a reload between preparing and scoring this image
            prep.error = JobError(
                f"unknown policy {', '.join(map(repr, gone))}", code="policy_not_found"
            )
            return self._error_result(prep)
        scored = policies.assemble(
            names,
            {name: per_policy[name][rows.start : rows.stop] for name in names},
            Observed(embeddings[rows.start : rows.stop], self.model.logit_scale),
            prep.info.frame_indices if prep.animated else None,
            (prep.info.pdq, prep.info.pdq_quality),
        )
        return self._result(prep, status="ok", **scored.fields())

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
