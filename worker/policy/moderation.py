"""``kind: moderation``: categories scored one-vs-background, flags at a threshold.

A category's score for image ``x`` is its probability in a softmax, scaled by the model's
``logit_scale``, over that category's head and the background heads only (see
:func:`worker.policy.scoring.one_vs_background`), so adding, removing or editing another
category never changes it and thresholds stay valid while the policy grows. An animation
scores each category at its maximum over the frames scored, and a flag names that frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from worker.documents import Flag, ModerationResult
from worker.policy.compiled import SCORE_DIGITS, CompiledPolicy, Section
from worker.policy.heads import build_heads, ensemble_texts
from worker.policy.schema import (
    MAX_CLASSES,
    Action,
    Ident,
    PolicyBase,
    Prompt,
    Severity,
    Strict,
    unique_ids,
)
from worker.policy.scoring import one_vs_background


class Category(Strict):
    """A moderation category: prompts describing it, and what to do when it scores high."""

    id: Ident
    prompts: list[Prompt] = Field(min_length=1)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    action: Action = "flag"
    severity: Severity = "medium"
    description: str = ""


class ModerationPolicy(PolicyBase):
    """Categories scored one-vs-background; a score at or above the threshold is a flag."""

    KIND: ClassVar[str] = "moderation"
    HAS_THRESHOLDS: ClassVar[bool] = True

    kind: Literal["moderation"] = "moderation"
    background: list[Prompt] = Field(min_length=1)
    categories: list[Category] = Field(min_length=1, max_length=MAX_CLASSES)

    _unique_categories = unique_ids("categories", "category")

    def class_prompts(self) -> dict[str, list[str]]:
        return {c.id: list(c.prompts) for c in self.categories}

    def background_prompts(self) -> list[str] | None:
        return list(self.background)

    def text_groups(self) -> list[list[str]]:
        templates = self.template_list()
        categories = [ensemble_texts(c.prompts, templates) for c in self.categories]
        return categories + [ensemble_texts([b], templates) for b in self.background]

    def compile(self, lookup: Mapping[str, torch.Tensor], version: str) -> CompiledModeration:
        return CompiledModeration(self, version, build_heads(self.text_groups(), lookup))


@dataclass(frozen=True)
class CompiledModeration(CompiledPolicy[ModerationPolicy]):
    """Rows of ``matrix``: the categories, then each background prompt."""

    @property
    def num_categories(self) -> int:
        return len(self.policy.categories)

    def scores(self, embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
        return one_vs_background(embeddings, self.matrix, self.num_categories, logit_scale)

    def section(self, values: Sequence[float], frames: Sequence[int] | None = None) -> Section:
        scores: dict[str, float] = {}
        flags: list[Flag] = []
        for index, (category, score) in enumerate(zip(self.policy.categories, values, strict=True)):
            scores[category.id] = round(score, SCORE_DIGITS)
            if score >= category.threshold:
                where = {} if frames is None else {"frame": frames[index]}
                flags.append(self._flag(category, score, **where))
        flags.sort(key=lambda f: f.score, reverse=True)
        return Section(ModerationResult(version=self.version, scores=scores, flags=flags), flags)

    def _flag(self, category: Category, score: float, **evidence: Any) -> Flag:
        return Flag(
            policy=self.name,
            category=category.id,
            score=round(score, SCORE_DIGITS),
            threshold=category.threshold,
            action=category.action,
            severity=category.severity,
            **evidence,
        )

    def operating_point(self, index: int) -> tuple[float, str]:
        category = self.policy.categories[index]
        return category.threshold, category.action
