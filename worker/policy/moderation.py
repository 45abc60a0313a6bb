"""``kind: moderation``: categories scored one-vs-background, flags at a threshold.

A category's score for image ``x`` is its probability in a softmax, scaled by the model's
``logit_scale``, over that category's head and the background heads only (see
:func:`worker.policy.scoring.one_vs_background`), so adding, removing or editing another
category never changes it and thresholds stay valid while the policy grows. An animation
scores each category at its maximum over the frames scored, and a flag names that frame.

A category is described by text (``prompts``: its head is the template ensemble, and the
background is the ``background`` prompts) or shown by images (``exemplars``: its head is
the normalised mean of the exemplars' normalised embeddings, and the background is the
policy's ``background_exemplars``, each its own head). Image-image cosines run well above
image-text ones (CLIP's modality gap), so an exemplar head is only ever contrasted with
image heads, and a text head with text heads.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from worker.documents import Evidence, Flag, ModerationResult
from worker.policy.compiled import SCORE_DIGITS, CompiledPolicy, Observed, Section
from worker.policy.heads import Materials, build_head, build_heads, ensemble_texts
from worker.policy.schema import (
    MAX_CLASSES,
    MAX_IMAGE_REFS,
    Action,
    FileRef,
    Ident,
    PolicyBase,
    Prompt,
    Severity,
    Strict,
    unique_ids,
)
from worker.policy.scoring import one_vs_background


class Category(Strict):
    """A moderation category: prompts describing it (or example images of it), and what to
    do when it scores high. A score in ``[review_at, threshold)`` is a ``review`` flag."""

    id: Ident
    prompts: list[Prompt] = Field(default_factory=list)
    exemplars: list[FileRef] = Field(default_factory=list, max_length=MAX_IMAGE_REFS)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    review_at: float | None = Field(None, ge=0.0, le=1.0)
    action: Action = "flag"
    severity: Severity = "medium"
    description: str = ""

    @model_validator(mode="after")
    def _one_definition(self) -> Category:
        if not self.prompts and not self.exemplars:
            raise PydanticCustomError("no_definition", "a category needs prompts or exemplars")
        if self.prompts and self.exemplars:
            raise PydanticCustomError(
                "both_definitions",
                "give either 'prompts' (text) or 'exemplars' (images), not both: a head is "
                "compared with backgrounds of its own kind",
            )
        if self.review_at is not None and self.review_at >= self.threshold:
            raise PydanticCustomError(
                "review_band",
                "review_at ({review_at}) must be below threshold ({threshold}): scores in "
                "[review_at, threshold) go to review",
                {"review_at": self.review_at, "threshold": self.threshold},
            )
        return self

    def band(self, score: float) -> tuple[float, Action] | None:
        """The bound ``score`` reached and its action: ``(threshold, action)`` at or above
        the threshold, ``(review_at, "review")`` in the review band, else None."""
        if score >= self.threshold:
            return self.threshold, self.action
        if self.review_at is not None and score >= self.review_at:
            return self.review_at, "review"
        return None


class ModerationPolicy(PolicyBase):
    """Categories scored one-vs-background; a score at or above the threshold is a flag."""

    KIND: ClassVar[str] = "moderation"
    HAS_THRESHOLDS: ClassVar[bool] = True

    kind: Literal["moderation"] = "moderation"
    background: list[Prompt] = Field(default_factory=list)
    background_exemplars: list[FileRef] = Field(default_factory=list, max_length=MAX_IMAGE_REFS)
    categories: list[Category] = Field(min_length=1, max_length=MAX_CLASSES)

    _unique_categories = unique_ids("categories", "category")

    @model_validator(mode="after")
    def _backgrounds_for_each_side(self) -> ModerationPolicy:
        if any(c.prompts for c in self.categories) and not self.background:
            raise PydanticCustomError(
                "background_needed",
                "missing key 'background': categories with prompts need prompts of "
                "ordinary content to be contrasted with",
            )
        if any(c.exemplars for c in self.categories) and not self.background_exemplars:
            raise PydanticCustomError(
                "background_needed",
                "missing key 'background_exemplars': categories with exemplars need images "
                "of ordinary content for your platform (against text backgrounds an image "
                "head would score every image near 1: CLIP's image-image cosines run "
                "higher than image-text ones)",
            )
        return self

    def class_ids(self) -> list[str]:
        return [c.id for c in self.categories]

    def class_prompts(self) -> dict[str, list[str]]:
        """Text categories' prompts (an exemplar category has none: it has images)."""
        return {c.id: list(c.prompts) for c in self.categories}

    def background_prompts(self) -> list[str] | None:
        return list(self.background)

    def text_groups(self) -> list[list[str]]:
        templates = self.template_list()
        categories = [ensemble_texts(c.prompts, templates) for c in self.categories if c.prompts]
        return categories + [ensemble_texts([b], templates) for b in self.background]

    def image_refs(self) -> list[str]:
        refs = [ref for c in self.categories for ref in c.exemplars]
        return list(dict.fromkeys(refs + list(self.background_exemplars)))

    def compile(self, materials: Materials, version: str) -> CompiledModeration:
        groups = self.text_groups()
        templates = self.template_list()
        text = iter(build_heads(groups, materials.texts) if groups else ())
        rows: list[torch.Tensor] = []
        exemplar_ids: list[tuple[str, ...]] = []
        # Evidence: each category's prompts (their own template ensembles) or exemplars.
        witness_rows: list[torch.Tensor] = []
        witnesses: list[tuple[str, ...]] = []
        for category in self.categories:
            if category.prompts:
                rows.append(next(text))
                exemplar_ids.append(())
                one_each = [ensemble_texts([p], templates) for p in category.prompts]
                witness_rows.append(build_heads(one_each, materials.texts))
                witnesses.append(tuple(category.prompts))
            else:
                items = materials.items(category.exemplars)
                stacked = torch.stack([i.embedding for i in items])
                rows.append(build_head(stacked))
                exemplar_ids.append(tuple(i.id for i in items))
                witness_rows.append(stacked)
                witnesses.append(tuple(i.id for i in items))
        rows.extend(text)  # the text background heads
        backgrounds = materials.items(self.background_exemplars)
        rows.extend(i.embedding for i in backgrounds)
        return CompiledModeration(
            self,
            version,
            torch.stack(rows),
            text_backgrounds=len(self.background),
            exemplar_ids=tuple(exemplar_ids),
            witness_matrix=torch.cat(witness_rows),
            witnesses=tuple(witnesses),
            background_names=tuple(self.background) + tuple(i.id for i in backgrounds),
        )


@dataclass(frozen=True)
class CompiledModeration(CompiledPolicy[ModerationPolicy]):
    """Rows of ``matrix``: the categories, each text background prompt, then each
    background exemplar. ``exemplar_ids[c]`` names the exemplars of an exemplar category
    (empty for a text one)."""

    text_backgrounds: int = 0
    exemplar_ids: tuple[tuple[str, ...], ...] = ()
    #: Evidence: rows = every category's prompt heads (one template ensemble per prompt)
    #: or exemplar embeddings, category after category; ``witnesses[c]`` names c's rows.
    witness_matrix: torch.Tensor | None = None
    witnesses: tuple[tuple[str, ...], ...] = ()
    #: The background rows of ``matrix`` by name (prompt, or background exemplar id).
    background_names: tuple[str, ...] = ()

    def to(self, device: torch.device | str) -> CompiledModeration:
        witness = None if self.witness_matrix is None else self.witness_matrix.to(device)
        return replace(self, matrix=self.matrix.to(device), witness_matrix=witness)

    @property
    def num_categories(self) -> int:
        return len(self.policy.categories)

    @cached_property
    def _witness_starts(self) -> tuple[int, ...]:
        """The first row of each category's witnesses in ``witness_matrix`` (read per
        flag: computed once per compiled policy)."""
        return tuple(itertools.accumulate((len(w) for w in self.witnesses), initial=0))

    def evidence(self, index: int, embedding: torch.Tensor, logit_scale: float) -> Evidence:
        """Category ``index``'s closest prompt (or exemplar) and closest background for
        one image embedding ``(D,)``, by cosine."""
        assert self.witness_matrix is not None
        start = self._witness_starts[index]
        names = self.witnesses[index]
        own = self.witness_matrix[start : start + len(names)].to(embedding) @ embedding
        best = int(own.argmax())
        first = self.num_categories
        if self.exemplar_ids[index]:
            rows = range(first + self.text_backgrounds, self.matrix.shape[0])
        else:
            rows = range(first, first + self.text_backgrounds)
        similarity = float(own[best])
        evidence = Evidence(prompt=names[best], similarity=round(similarity, SCORE_DIGITS))
        if rows:
            theirs = self.matrix[rows.start : rows.stop].to(embedding) @ embedding
            nearest = int(theirs.argmax())
            against = float(theirs[nearest])
            evidence.background = self.background_names[nearest + rows.start - first]
            evidence.background_similarity = round(against, SCORE_DIGITS)
            evidence.margin = round(logit_scale * (similarity - against), 4)
        return evidence

    def scores(self, embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
        first = self.num_categories
        if not any(self.exemplar_ids):  # text only: every other row is a background prompt
            return one_vs_background(embeddings, self.matrix, first, logit_scale)
        text = range(first, first + self.text_backgrounds)
        images = range(first + self.text_backgrounds, self.matrix.shape[0])
        backgrounds = [images if ids else text for ids in self.exemplar_ids]
        return one_vs_background(embeddings, self.matrix, first, logit_scale, backgrounds)

    def section(
        self,
        values: Sequence[float],
        frames: Sequence[int] | None = None,
        pdq: str | None = None,
        observed: Observed | None = None,
    ) -> Section:
        scores: dict[str, float] = {}
        flags: list[Flag] = []
        for index, (category, score) in enumerate(zip(self.policy.categories, values, strict=True)):
            scores[category.id] = round(score, SCORE_DIGITS)
            crossed = category.band(score)
            if crossed is None:
                continue
            bound, action = crossed
            extra: dict[str, Any] = {"frame": None if frames is None else frames[index]}
            if observed is not None and self.witness_matrix is not None:
                found = self.evidence(index, observed.row(index), observed.logit_scale)
                if self.exemplar_ids[index]:  # an exemplar category names its closest item
                    extra |= {"item": found.prompt, "similarity": found.similarity}
                    found = found.model_copy(update={"prompt": None})
                extra["evidence"] = found
            flags.append(self._flag(category, score, bound, action, **extra))
        flags.sort(key=lambda f: f.score, reverse=True)
        body = ModerationResult(
            version=self.version, mode=self.policy.mode, scores=scores, flags=flags
        )
        return Section(body, flags)

    def _flag(
        self, category: Category, score: float, bound: float, action: Action, **evidence: Any
    ) -> Flag:
        return Flag(
            policy=self.name,
            category=category.id,
            score=round(score, SCORE_DIGITS),
            threshold=bound,
            action=action,
            severity=category.severity,
            **evidence,
        )

    def flagged(self, values: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """A category is flagged from its ``review_at`` when it has one, else from its
        threshold (any flag, whatever its action)."""
        bounds = [
            c.threshold if c.review_at is None else c.review_at for c in self.policy.categories
        ]
        return self.class_ids(), values >= values.new_tensor(bounds)

    def operating_point(self, index: int) -> tuple[float, str]:
        category = self.policy.categories[index]
        return category.threshold, category.action
