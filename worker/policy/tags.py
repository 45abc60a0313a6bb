"""``kind: tags``: a vocabulary scored with one softmax; the top_k tags above min_score."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from worker.documents import TagScore, TagsResult
from worker.policy.compiled import SCORE_DIGITS, CompiledPolicy, Observed, Section
from worker.policy.heads import Materials, build_heads, ensemble_texts
from worker.policy.schema import MAX_CLASSES, PolicyBase, Prompt, Strict, unique_ids
from worker.policy.scoring import softmax_scores


class Tag(Strict):
    """A tag of a vocabulary; ``prompts`` default to the tag itself."""

    id: Prompt
    prompts: list[Prompt] = Field(default_factory=list)

    @model_validator(mode="after")
    def _default_prompts(self) -> Tag:
        if not self.prompts:
            object.__setattr__(self, "prompts", [self.id])
        return self


class TagsPolicy(PolicyBase):
    """A tag vocabulary scored with one softmax; the top_k tags above min_score are kept."""

    KIND: ClassVar[str] = "tags"

    kind: Literal["tags"] = "tags"
    top_k: int = Field(5, ge=1)
    min_score: float = Field(0.0, ge=0.0, le=1.0)
    tags: list[Tag] = Field(min_length=1, max_length=MAX_CLASSES)

    @field_validator("tags", mode="before")
    @classmethod
    def _strings_are_tags(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"id": v} if isinstance(v, str) else v for v in value]
        return value

    _unique_tags = unique_ids("tags", "tag")

    def class_prompts(self) -> dict[str, list[str]]:
        return {t.id: list(t.prompts) for t in self.tags}

    def text_groups(self) -> list[list[str]]:
        templates = self.template_list()
        return [ensemble_texts(t.prompts, templates) for t in self.tags]

    def compile(self, materials: Materials, version: str) -> CompiledTags:
        return CompiledTags(self, version, build_heads(self.text_groups(), materials.texts))


@dataclass(frozen=True)
class CompiledTags(CompiledPolicy[TagsPolicy]):
    """One row of ``matrix`` per tag."""

    def scores(self, embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
        return softmax_scores(embeddings, self.matrix, logit_scale)

    def top(self, values: Sequence[float]) -> list[tuple[str, float]]:
        """The ``top_k`` ``(tag, score)`` at or above ``min_score``, best first."""
        # nlargest is sorted(..., reverse=True)[:k] (ties included) without sorting them all.
        ranked = heapq.nlargest(
            self.policy.top_k, zip(self._class_ids, values, strict=True), key=lambda pair: pair[1]
        )
        return [(t, p) for t, p in ranked if p >= self.policy.min_score]

    def pool_frames(
        self, frames: Sequence[Sequence[float]]
    ) -> tuple[list[float], list[int] | None]:
        """Tags describe the whole animation: each tag's mean over the frames scored, before
        ``top_k`` and ``min_score`` are applied."""
        return [math.fsum(column) / len(frames) for column in zip(*frames, strict=True)], None

    def section(
        self,
        values: Sequence[float],
        frames: Sequence[int] | None = None,
        pdq: str | None = None,
        observed: Observed | None = None,
    ) -> Section:
        kept = self.top(values)
        tags = [TagScore(tag=t, score=round(s, SCORE_DIGITS)) for t, s in kept]
        body = TagsResult(version=self.version, mode=self.policy.mode, tags=tags)
        return Section(body, labels=kept)

    def flagged(self, values: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The tags kept: the ``top_k`` at or above ``min_score``."""
        k = min(self.policy.top_k, values.shape[1])
        top = torch.zeros_like(values, dtype=torch.bool)
        top.scatter_(1, values.topk(k, dim=1).indices, True)
        return self.class_ids(), top & (values >= self.policy.min_score)

    def operating_point(self, index: int) -> tuple[float, str]:
        return self.policy.min_score, "tag"
