"""Embeddings x heads -> scores. Pure tensor functions: no I/O, no model, no Celery.

One-vs-background (moderation): category ``c``'s score for image ``x`` is its probability
in a softmax, scaled by the model's ``logit_scale``, over ``c``'s head and the background
heads only::

    score_c = exp(s·x·h_c) / (exp(s·x·h_c) + Σ_b exp(s·x·h_b))
            = sigmoid(s·x·h_c − logsumexp_b(s·x·h_b))

so it depends on nothing but ``c``'s prompts, the background prompts and the image: adding,
removing or editing another category never changes it.

Softmax (tags): one softmax over the whole vocabulary.
"""

from __future__ import annotations

import torch


def one_vs_background(
    embeddings: torch.Tensor, matrix: torch.Tensor, num_classes: int, logit_scale: float
) -> torch.Tensor:
    """``(N, D)`` embeddings, ``matrix`` rows = ``num_classes`` class heads then the
    background heads -> ``(N, num_classes)`` scores in [0, 1] (one matmul)."""
    logits = logit_scale * embeddings @ matrix.to(embeddings).T
    classes = logits[:, :num_classes]
    background = logits[:, num_classes:]
    return torch.sigmoid(classes - torch.logsumexp(background, dim=1, keepdim=True))


def softmax_scores(
    embeddings: torch.Tensor, matrix: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """``(N, D)`` embeddings -> ``(N, rows)`` softmax over every row of ``matrix``."""
    logits = logit_scale * embeddings @ matrix.to(embeddings).T
    return logits.softmax(dim=1)
