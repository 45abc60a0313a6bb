"""Embeddings x heads -> scores. Pure tensor functions: no I/O, no model, no Celery.

One-vs-background (moderation): category ``c``'s score for image ``x`` is its probability
in a softmax, scaled by the model's ``logit_scale``, over ``c``'s head and the background
heads only::

    score_c = exp(s·x·h_c) / (exp(s·x·h_c) + Σ_b exp(s·x·h_b))
            = sigmoid(s·x·h_c − logsumexp_b(s·x·h_b))

so it depends on nothing but ``c``'s prompts, the background prompts and the image: adding,
removing or editing another category never changes it. A category shown by exemplar images
sums over the background *exemplar* heads instead (``backgrounds``), so text heads and
image heads are never compared with each other.

Softmax (tags): one softmax over the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def one_vs_background(
    embeddings: torch.Tensor,
    matrix: torch.Tensor,
    num_classes: int,
    logit_scale: float,
    backgrounds: Sequence[range] | None = None,
) -> torch.Tensor:
    """``(N, D)`` embeddings, ``matrix`` rows = ``num_classes`` class heads then the
    background heads -> ``(N, num_classes)`` scores in [0, 1] (one matmul).

    ``backgrounds[c]``, when given, is the range of background rows class ``c`` is
    contrasted with (by default every row after the classes)."""
    logits = logit_scale * embeddings @ matrix.to(embeddings).T
    classes = logits[:, :num_classes]
    if backgrounds is None:
        background = logits[:, num_classes:]
        return torch.sigmoid(classes - torch.logsumexp(background, dim=1, keepdim=True))
    sums: dict[range, torch.Tensor] = {
        rows: torch.logsumexp(logits[:, rows.start : rows.stop], dim=1)
        for rows in dict.fromkeys(backgrounds)
    }
    per_class = torch.stack([sums[rows] for rows in backgrounds], dim=1)
    return torch.sigmoid(classes - per_class)


def softmax_scores(
    embeddings: torch.Tensor, matrix: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """``(N, D)`` embeddings -> ``(N, rows)`` softmax over every row of ``matrix``."""
    logits = logit_scale * embeddings @ matrix.to(embeddings).T
    return logits.softmax(dim=1)
