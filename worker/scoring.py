"""Embeddings x heads -> scores -> decisions. Pure functions: no I/O, no model, no Celery.

Moderation (one-vs-background): category ``c``'s score for image ``x`` is its probability
in a softmax, scaled by the model's ``logit_scale``, over ``c``'s head and the background
heads only::

    score_c = exp(s·x·h_c) / (exp(s·x·h_c) + Σ_b exp(s·x·h_b))
            = sigmoid(s·x·h_c − logsumexp_b(s·x·h_b))

so it depends on nothing but ``c``'s prompts, the background prompts and the image: adding,
removing or editing another category never changes it.

Tags: a softmax over the whole vocabulary, then the ``top_k`` tags at or above
``min_score``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.heads import CompiledModeration, CompiledTags


def moderation_scores(
    embeddings: torch.Tensor, compiled: CompiledModeration, logit_scale: float
) -> torch.Tensor:
    """``(N, D)`` normalised image embeddings -> ``(N, C)`` category scores in [0, 1]."""
    logits = logit_scale * embeddings @ compiled.matrix.to(embeddings).T  # one matmul
    categories = logits[:, : compiled.num_categories]
    background = logits[:, compiled.num_categories :]
    return torch.sigmoid(categories - torch.logsumexp(background, dim=1, keepdim=True))


def tag_probabilities(
    embeddings: torch.Tensor, compiled: CompiledTags, logit_scale: float
) -> torch.Tensor:
    """``(N, D)`` normalised image embeddings -> ``(N, V)`` softmax over the vocabulary."""
    logits = logit_scale * embeddings @ compiled.matrix.to(embeddings).T
    return logits.softmax(dim=1)


@dataclass(frozen=True)
class FlagDecision:
    policy: str
    category: str
    score: float
    threshold: float
    action: str
    severity: str


def moderation_decisions(
    scores: list[float], compiled: CompiledModeration
) -> tuple[dict[str, float], list[FlagDecision]]:
    """One image's category scores -> ``{category: score}`` and the flags it raises."""
    by_id: dict[str, float] = {}
    flags: list[FlagDecision] = []
    for category, score in zip(compiled.policy.categories, scores, strict=True):
        by_id[category.id] = score
        if score >= category.threshold:
            flags.append(
                FlagDecision(
                    compiled.name,
                    category.id,
                    score,
                    category.threshold,
                    category.action,
                    category.severity,
                )
            )
    flags.sort(key=lambda f: f.score, reverse=True)
    return by_id, flags


def top_tags(probabilities: list[float], compiled: CompiledTags) -> list[tuple[str, float]]:
    """One image's tag probabilities -> the ``top_k`` ``(tag, score)`` at or above min_score."""
    policy = compiled.policy
    ranked = sorted(
        zip((t.id for t in policy.tags), probabilities, strict=True),
        key=lambda pair: pair[1],
        reverse=True,
    )
    return [(tag, p) for tag, p in ranked[: policy.top_k] if p >= policy.min_score]
