"""Assembling an engine from settings: the one place entry points turn settings into objects."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from worker.engine import Engine
from worker.fetcher import ImageFetcher
from worker.model import LoadedModel, load_model
from worker.plugins import PluginContext, make_sources
from worker.policy import LoadedPolicy, select_policies
from worker.policyset import PolicySet, compile_policies, open_prompt_cache
from worker.settings import Settings


def load_configured_model(settings: Settings) -> LoadedModel:
    return load_model(
        settings.model.name,
        settings.model.pretrained,
        device=settings.device,
        precision=settings.precision,
        download_dir=settings.model.download_dir,
        hub_probe_timeout_s=settings.model.hub_probe_timeout_s,
    )


def compile_configured(
    settings: Settings,
    model: LoadedModel,
    loaded: list[LoadedPolicy],
    on_progress: Callable[[str, int, int], None] | None = None,
) -> PolicySet:
    cache = open_prompt_cache(settings.cache_dir, model)
    try:
        return compile_policies(loaded, model, cache, on_progress)
    finally:
        cache.close()


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
    )
