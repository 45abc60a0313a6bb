"""Binary classification metrics on scores. Pure numpy, no I/O.

Definitions follow scikit-learn's (the tests check equality to 1e-9 on fixed arrays):
average precision is Σ (Rₙ − Rₙ₋₁)·Pₙ over distinct thresholds, ROC-AUC is the trapezoid
area under the ROC curve with tied scores handled as one step, and a threshold ``t``
predicts positive when ``score >= t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

Floats = NDArray[np.float64]


def _counts(y_true: ArrayLike, scores: ArrayLike) -> tuple[Floats, Floats, Floats]:
    """(true positives, false positives, thresholds) at each distinct score, descending."""
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last_of_run = np.r_[np.where(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[last_of_run]
    fps = (1 + last_of_run) - tps
    return tps, fps, s[last_of_run]


def precision_recall_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[Floats, Floats, Floats]:
    """(precision, recall, thresholds) with thresholds ascending, as scikit-learn returns them
    (precision ends with 1 and recall with 0, for no threshold)."""
    tps, fps, thresholds = _counts(y_true, scores)
    positives = tps[-1]
    precision = np.divide(tps, tps + fps, out=np.zeros_like(tps), where=(tps + fps) != 0)
    recall = np.ones_like(tps) if positives == 0 else tps / positives
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(y_true: ArrayLike, scores: ArrayLike) -> float:
    precision, recall, _ = precision_recall_curve(y_true, scores)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    tps, fps, _ = _counts(y_true, scores)
    if tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def threshold_for_precision(y_true: ArrayLike, scores: ArrayLike, target: float) -> float | None:
    """The threshold with the most recall among those whose precision is at least
    ``target`` (the highest such threshold on a recall tie), or None if none reaches it."""
    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    ok = np.where(precision[:-1] >= target)[0]
    if not ok.size:
        return None
    best = recall[ok].max()
    return float(thresholds[ok[recall[ok] == best]].max())


def threshold_for_recall(y_true: ArrayLike, scores: ArrayLike, target: float) -> float | None:
    """The highest threshold whose recall is at least ``target`` (the most precision at that
    recall), or None if no threshold reaches it. Recall only falls as the threshold rises,
    so every threshold at or below it reaches the target and none above it does."""
    _, recall, thresholds = precision_recall_curve(y_true, scores)
    ok = np.where(recall[:-1] >= target)[0]
    return float(thresholds[ok].max()) if ok.size else None


def in_band(scores: ArrayLike, low: float, high: float) -> NDArray[np.bool_]:
    """Which scores fall in ``[low, high)``: at or above ``low``, below ``high`` (a review
    band: ``review_at`` to ``threshold``)."""
    s = np.asarray(scores, dtype=np.float64)
    return (s >= low) & (s < high)


@dataclass(frozen=True)
class AtThreshold:
    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0


def at_threshold(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> AtThreshold:
    y = np.asarray(y_true, dtype=bool)
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    return AtThreshold(
        threshold,
        int(np.sum(predicted & y)),
        int(np.sum(predicted & ~y)),
        int(np.sum(~predicted & y)),
        int(np.sum(~predicted & ~y)),
    )
