"""Compiling loaded policies against a model into the heads the engine scores with."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.documents import BlocklistResult, Decision, Flag, ModerationResult, TagsResult
from worker.embedding_cache import CachedEmbedder, EmbeddingCache
from worker.log import get_logger
from worker.model import LoadedModel
from worker.pdq import MIN_MATCH_QUALITY
from worker.policy import LoadedPolicy
from worker.policy.compiled import CompiledPolicy, Observed, Section
from worker.policy.heads import ImageItem, compile_policy

log = get_logger(__name__)
CACHE_FILE = "embeddings.sqlite3"


@dataclass(frozen=True)
class CompileStats:
    seconds: float
    texts: int
    encoded: int


@dataclass(frozen=True)
class PolicySet:
    """Compiled policies by name. Immutable: a reload builds a new set and swaps it in."""

    compiled: dict[str, CompiledPolicy[Any]]
    sources: dict[str, LoadedPolicy]
    stats: dict[str, CompileStats] = field(default_factory=dict)

    def versions(self) -> dict[str, str]:
        return {name: c.version for name, c in self.compiled.items()}

    def __contains__(self, name: object) -> bool:
        return name in self.compiled

    def names(self) -> list[str]:
        return list(self.compiled)

    @property
    def hashes_images(self) -> bool:
        """Whether any policy matches PDQ hashes (the engine then hashes every image)."""
        return any(c.hash_lists for c in self.compiled.values())

    def score(
        self, embeddings: torch.Tensor, logit_scale: float, names: Sequence[str] | None = None
    ) -> dict[str, list[list[float]]]:
        """Scores of each policy (default: every one) for every embedding row: one matmul
        per policy."""
        return {
            name: self.compiled[name].scores(embeddings, logit_scale).cpu().tolist()
            for name in names or self.names()
        }

    def assemble(
        self,
        names: Sequence[str],
        scores: Mapping[str, Sequence[Sequence[float]]],
        observed: Observed,
        frame_indices: Sequence[int] | None = None,
        pdq: tuple[str | None, int | None] = (None, None),
    ) -> Assembled:
        """One image's part of a result from its rows of :meth:`score` (one row per frame
        scored, ``frame_indices`` naming the frames of an animation): each policy's
        section, and the live policies' flags, labels and decision. ``pdq`` is the image's
        hash and quality, matched only at quality 50 or more."""
        hash_, quality = pdq
        usable = hash_ if (quality or 0) >= MIN_MATCH_QUALITY else None
        sections: dict[str, ModerationResult | TagsResult | BlocklistResult] = {}
        flags: list[Flag] = []
        labels: list[tuple[str, float]] = []
        for name in names:
            compiled = self.compiled[name]
            rows = scores[name]
            if frame_indices is None:
                section: Section = compiled.section(rows[0], pdq=usable, observed=observed)
            else:
                values, drivers = compiled.pool_frames(rows)
                where = None if drivers is None else [frame_indices[r] for r in drivers]
                seen = Observed(observed.embeddings, observed.logit_scale, drivers)
                section = compiled.section(values, where, pdq=usable, observed=seen)
            sections[name] = section.body
            if not compiled.shadow:
                flags.extend(section.flags)
                labels.extend(section.labels)
        best_first = sorted(labels, key=lambda pair: pair[1], reverse=True)
        return Assembled(
            policies=sections,
            flags=sorted(flags, key=lambda f: f.score, reverse=True),
            labels=list(dict.fromkeys(tag for tag, _ in best_first)),
            decision=Decision.of(flags),
        )


@dataclass(frozen=True)
class Assembled:
    """The scored part of an ok result."""

    policies: dict[str, ModerationResult | TagsResult | BlocklistResult]
    flags: list[Flag]
    labels: list[str]
    decision: Decision

    def fields(self) -> dict[str, Any]:
        return {
            "policies": self.policies,
            "flags": self.flags,
            "labels": self.labels,
            "decision": self.decision,
        }


def open_prompt_cache(cache_dir: Path, model: LoadedModel) -> EmbeddingCache:
    return EmbeddingCache(cache_dir / CACHE_FILE, model.fingerprint)


#: Gathers what a policy lists (images by reference, hash lists by reference); see
#: :class:`worker.materials.MaterialsGatherer`.
Gather = Callable[[LoadedPolicy], tuple[Mapping[str, Sequence[ImageItem]], Mapping[str, Any]]]


def compile_policies(
    loaded: list[LoadedPolicy],
    model: LoadedModel,
    cache: EmbeddingCache | None,
    on_progress: Callable[[str, int, int], None] | None = None,
    gather: Gather | None = None,
) -> PolicySet:
    """Compile every policy; only prompts missing from ``cache`` reach the text tower.

    ``on_progress(policy_name, done, total)`` reports prompts encoded for a policy.
    ``gather`` supplies the images and hash lists of policies that list any (required
    for those).
    """
    compiled: dict[str, CompiledPolicy[Any]] = {}
    stats: dict[str, CompileStats] = {}
    for item in loaded:

        def progress(done: int, total: int, name: str = item.name) -> None:
            if on_progress is not None:
                on_progress(name, done, total)

        embedder = CachedEmbedder(model.encode_texts, cache, progress)
        started = time.perf_counter()
        images: Mapping[str, Sequence[ImageItem]] = {}
        hash_lists: Mapping[str, Any] = {}
        if item.policy.image_refs() or item.policy.hash_refs():
            if gather is None:
                raise ValueError(f"policy {item.name!r} lists images or hash files: pass gather")
            images, hash_lists = gather(item)
        policy = compile_policy(item.policy, embedder, model.fingerprint, images, hash_lists)
        policy = policy.to(model.device)
        seconds = time.perf_counter() - started
        stats[item.name] = CompileStats(seconds, embedder.hits + embedder.misses, embedder.misses)
        compiled[item.name] = policy
        log.info(
            "policy.compiled",
            policy=item.name,
            version=policy.version[:12],
            texts=embedder.hits + embedder.misses,
            encoded=embedder.misses,
            ms=round(seconds * 1000),
        )
    return PolicySet(compiled, {item.name: item for item in loaded}, stats)
