"""`worker eval`: score a labelled set with a policy, measure each category, suggest thresholds.

Images are decoded and scores computed by the same code that serves (the engine's decode,
``heads`` + ``scoring``, ``pool_frames`` for an animation's frames), so what is measured is
what runs. Image embeddings come from the cache when this model has seen the image
before, so re-checking after a policy edit costs a recompile of the edited prompts only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from worker.policy import CompiledPolicy
from worker.tuning import metrics
from worker.tuning.embedder import EmbeddedFiles

#: Review bands: below the low edge pass, above the high edge act, between -> a human.
BAND_RECALL = 0.9
BAND_PRECISION = 0.9
#: The precision target when no target is given.
DEFAULT_PRECISION = 0.9

#: ``CategoryMetrics.review_status`` in two-target mode (``--target-precision`` and
#: ``--target-recall``): why a category has a suggested ``review_at`` or not.
REVIEW_STATUSES = {
    "band": "scores in [review_at, threshold) go to a person",
    "no_band": "no band: the threshold already meets the recall target",
    "precision_unreached": "precision target not reached: nothing suggested",
    "no_positives": "no positives: nothing suggested",
}


@dataclass
class CategoryMetrics:
    id: str
    action: str
    support: int  # positives
    negatives: int
    average_precision: float
    roc_auc: float
    threshold: float  # the policy's current threshold
    precision: float
    recall: float
    f1: float
    fpr: float
    suggested_threshold: float | None = None
    suggested_precision: float | None = None
    suggested_recall: float | None = None
    review_band: tuple[float, float] | None = None
    # Two-target mode only: the suggested review_at (the highest threshold with recall at
    # least the recall target), precision and recall flagging at or above it, and the
    # images scored in [review_at, suggested threshold): the human review load.
    review_status: str | None = None  # a key of REVIEW_STATUSES
    suggested_review_at: float | None = None
    review_at_precision: float | None = None
    review_at_recall: float | None = None
    review_images: int | None = None
    review_positives: int | None = None
    review_share: float | None = None


@dataclass
class EvalReport:
    policy: str
    kind: str
    version: str
    model: dict[str, str]
    images: int
    target: dict[str, float]
    categories: list[CategoryMetrics]
    macro: dict[str, float] = field(default_factory=dict)
    micro: dict[str, float] = field(default_factory=dict)
    #: Two-target mode: images in at least one category's review band (count and share).
    review_load: dict[str, float] | None = None
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def two_targets(self) -> bool:
        return "precision" in self.target and "recall" in self.target

    def to_dict(self) -> dict[str, Any]:
        finite: dict[str, Any] = _finite(asdict(self))
        return finite


def _finite(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def policy_scores(
    compiled: CompiledPolicy[Any], embedded: EmbeddedFiles, logit_scale: float
) -> np.ndarray:
    """(N, C) scores of every class of the policy for each file, as the worker computes
    them: a still's row of ``compiled.scores``; an animation's frame rows pooled by
    ``compiled.pool_frames`` (moderation: the maximum over frames, tags: the mean)."""
    emb = embedded.embeddings.to(compiled.matrix.device)
    frames = compiled.scores(emb, logit_scale).cpu().double().numpy()
    out = np.empty((len(embedded.spans), frames.shape[1]), dtype=np.float64)
    for row, (start, end) in enumerate(embedded.spans):
        if end - start == 1:
            out[row] = frames[start]
        else:
            out[row] = compiled.pool_frames(frames[start:end].tolist())[0]
    return out


def evaluate(
    compiled: CompiledPolicy[Any],
    truth: np.ndarray,
    scores: np.ndarray,
    *,
    target_precision: float | None = None,
    target_recall: float | None = None,
) -> list[CategoryMetrics]:
    """Per-class metrics. ``truth`` is (N, C) bool, ``scores`` (N, C).

    The suggested threshold has the most recall at ``target_precision`` (default
    :data:`DEFAULT_PRECISION`), or, given ``target_recall`` alone, the most precision at
    it. Given both, the threshold follows the precision target and a ``review_at`` is
    suggested for the recall target (see :func:`suggest_review_at`)."""
    out = []
    for index, class_id in enumerate(compiled.class_ids()):
        y, s = truth[:, index], scores[:, index]
        threshold, action = compiled.operating_point(index)
        at = metrics.at_threshold(y, s, threshold)
        has_both = 0 < y.sum() < y.size
        item = CategoryMetrics(
            id=class_id,
            action=action,
            support=int(y.sum()),
            negatives=int(y.size - y.sum()),
            average_precision=metrics.average_precision(y, s) if y.any() else float("nan"),
            roc_auc=metrics.roc_auc(y, s) if has_both else float("nan"),
            threshold=threshold,
            precision=at.precision,
            recall=at.recall,
            f1=at.f1,
            fpr=at.fpr,
        )
        if y.any():
            if target_recall is not None and target_precision is None:
                suggested = metrics.threshold_for_recall(y, s, target_recall)
            else:
                precision = DEFAULT_PRECISION if target_precision is None else target_precision
                suggested = metrics.threshold_for_precision(y, s, precision)
            if suggested is not None:
                sat = metrics.at_threshold(y, s, suggested)
                item.suggested_threshold = suggested
                item.suggested_precision = sat.precision
                item.suggested_recall = sat.recall
            if action == "review":
                low = metrics.threshold_for_recall(y, s, BAND_RECALL)
                high = metrics.threshold_for_precision(y, s, BAND_PRECISION)
                if low is not None and high is not None:
                    item.review_band = (min(low, high), max(low, high))
        if target_precision is not None and target_recall is not None:
            suggest_review_at(item, y, s, target_recall)
        out.append(item)
    return out


def suggest_review_at(
    item: CategoryMetrics, y: np.ndarray, s: np.ndarray, target_recall: float
) -> None:
    """Fill ``item``'s review fields: ``review_at`` is the highest threshold whose recall
    is at least ``target_recall``; it makes a band only below the suggested threshold."""
    if not y.any():
        item.review_status = "no_positives"
        return
    if item.suggested_threshold is None:
        item.review_status = "precision_unreached"
        return
    # Never None with positives: the lowest score has recall 1.
    review_at = metrics.threshold_for_recall(y, s, target_recall)
    if review_at is None or review_at >= item.suggested_threshold:
        item.review_status = "no_band"
        return
    at = metrics.at_threshold(y, s, review_at)
    band = metrics.in_band(s, review_at, item.suggested_threshold)
    item.review_status = "band"
    item.suggested_review_at = review_at
    item.review_at_precision = at.precision
    item.review_at_recall = at.recall
    item.review_images = int(band.sum())
    item.review_positives = int((band & y.astype(bool)).sum())
    item.review_share = float(band.mean())


def review_load(categories: list[CategoryMetrics], scores: np.ndarray) -> dict[str, float]:
    """Images in at least one category's suggested review band: how many and what share
    of the data (an image in several bands is counted once)."""
    hit = np.zeros(scores.shape[0], dtype=bool)
    for index, c in enumerate(categories):
        if c.suggested_review_at is not None and c.suggested_threshold is not None:
            hit |= metrics.in_band(scores[:, index], c.suggested_review_at, c.suggested_threshold)
    return {"images": int(hit.sum()), "share": float(hit.mean()) if hit.size else 0.0}


def summarise(
    categories: list[CategoryMetrics], truth: np.ndarray, scores: np.ndarray
) -> tuple[dict[str, float], dict[str, float]]:
    """Macro averages over classes with positives, and micro figures at current thresholds."""
    with_support = [c for c in categories if c.support > 0]

    def mean(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else float("nan")

    macro = {
        "average_precision": mean([c.average_precision for c in with_support]),
        "roc_auc": mean([c.roc_auc for c in with_support]),
        "precision": mean([c.precision for c in with_support]),
        "recall": mean([c.recall for c in with_support]),
        "f1": mean([c.f1 for c in with_support]),
    }
    thresholds = np.array([c.threshold for c in categories])
    predicted = scores >= thresholds[None, :]
    tp = int(np.sum(predicted & truth))
    fp = int(np.sum(predicted & ~truth))
    fn = int(np.sum(~predicted & truth))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    micro = {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
    return macro, micro
