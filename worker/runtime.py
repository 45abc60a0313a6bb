"""Assembling an engine from settings: the one place entry points turn settings into objects."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from worker.engine import Engine
from worker.fetcher import ImageFetcher
from worker.gpu_claim import CLAIMS_DIR, resolve_auto_device
from worker.log import get_logger
from worker.model import LoadedModel, load_model
from worker.plugins import PluginContext, make_sources
from worker.policy import LoadedPolicy, select_policies
from worker.policy.policyset import PolicySet, compile_policies, open_prompt_cache
from worker.settings import DEFAULT_BATCH_SIZE, Settings

if TYPE_CHECKING:
    from worker.store import StoreWriter

log = get_logger(__name__)


def load_configured_model(settings: Settings) -> LoadedModel:
    model = load_model(
        settings.model.name,
        settings.model.pretrained,
        # auto + several GPUs: the one this process claimed (worker/gpu_claim.py)
        device=resolve_auto_device(settings.device, settings.cache_dir / CLAIMS_DIR),
        precision=settings.precision,
        download_dir=settings.model.download_dir,
        hub_probe_timeout_s=settings.model.hub_probe_timeout_s,
    )
    if settings.torch_compile:
        import torch

        model.model.visual = torch.compile(model.model.visual)
    return model


def batch_from_memory(free_bytes: int, per_image_bytes: int, headroom: float = 0.6) -> int:
    """The largest multiple of 8 (8..1024) whose activations fit in ``headroom`` of free memory."""
    fits = int(free_bytes * headroom) // max(per_image_bytes, 1)
    return max(8, min(1024, fits // 8 * 8))


def resolve_batch_size(settings: Settings, model: LoadedModel) -> int:
    """``WORKER_BATCH__MAX_SIZE``, or for 0 a size measured on the GPU (32 elsewhere)."""
    if settings.batch.max_size:
        return settings.batch.max_size
    if model.device.type != "cuda":
        return DEFAULT_BATCH_SIZE
    import torch

    probe = torch.zeros(8, 3, *model.image_size)
    torch.cuda.synchronize(model.device)
    before = torch.cuda.memory_allocated(model.device)
    torch.cuda.reset_peak_memory_stats(model.device)
    model.encode_images(probe)
    per_image = (torch.cuda.max_memory_allocated(model.device) - before) // 8
    free, _ = torch.cuda.mem_get_info(model.device)
    size = batch_from_memory(free, per_image)
    log.info("batch.sized", size=size, free_mb=free >> 20, per_image_mb=round(per_image / 2**20, 2))
    return size


def compile_configured(
    settings: Settings,
    model: LoadedModel,
    loaded: list[LoadedPolicy],
    on_progress: Callable[[str, int, int], None] | None = None,
) -> PolicySet:
    cache = open_prompt_cache(settings.cache_dir, model)
    gatherer = None
    if any(p.policy.image_refs() or p.policy.hash_refs() for p in loaded):
        from worker.materials import MaterialsGatherer

        gatherer = MaterialsGatherer(settings, model)
    try:
        return compile_policies(
            loaded, model, cache, on_progress, gatherer.gather if gatherer else None
        )
    finally:
        cache.close()
        if gatherer is not None:
            gatherer.close()


def build_engine(
    settings: Settings,
    *,
    policy_refs: Sequence[str] = (),
    service: bool = False,
    model: LoadedModel | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Engine:
    """Validate policies (fast, before the model loads), load the model, compile, wire sources."""
    loaded = select_policies(policy_refs, settings.policy_dir)
    model = model or load_configured_model(settings)
    policies = compile_configured(settings, model, loaded, on_progress)
    context = PluginContext(settings=settings, service=service)
    fetcher = ImageFetcher(make_sources(context), settings.image.max_bytes)
    return Engine(
        model,
        policies,
        fetcher,
        max_pixels=settings.image.max_pixels,
        allowed_formats=settings.image.allowed_formats,
        decode_workers=settings.decode_workers,
        jpeg_draft=settings.image.jpeg_draft,
        max_side=settings.image.max_side,
        max_frames=settings.image.max_frames,
        max_aspect_ratio=settings.image.max_aspect_ratio,
    )


def record_embeddings(
    engine: Engine, settings: Settings, on_outcome: Callable[[str, int], None] | None = None
) -> StoreWriter | None:
    """Keep every image ``engine`` scores in the embedding store (``WORKER_STORE__URI``;
    None when it is ``none``): a background writer commits the rows in batches.
    ``on_outcome(outcome, rows)`` counts them (written, skipped, failed, dropped)."""
    from worker.store import EmbeddingRow, EmbeddingStore, StoreWriter

    store = EmbeddingStore.from_settings(settings)
    if store is None:
        return None
    writer = StoreWriter(
        store,
        batch_rows=settings.store.batch_rows,
        interval_s=settings.store.flush_interval_s,
        max_pending=settings.store.max_pending_rows,
        on_outcome=on_outcome,
    )
    engine.recorder = lambda scored: writer.put([EmbeddingRow.of(r, e) for r, e in scored])
    log.info("store.open", store=store.uri)
    return writer
