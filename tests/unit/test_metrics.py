"""Metric code against scikit-learn's implementations on fixed arrays (1e-9)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from worker.tuning import metrics

RNG = np.random.default_rng(7)
CASES = {
    "separable": (np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])),
    "ties": (
        np.array([1, 0, 1, 0, 1, 0, 0, 1]),
        np.array([0.5, 0.5, 0.9, 0.1, 0.5, 0.3, 0.9, 0.7]),
    ),
    "random": (RNG.integers(0, 2, 500), RNG.random(500)),
    "coarse": (RNG.integers(0, 2, 300), np.round(RNG.random(300), 1)),
    "imbalanced": (
        np.r_[np.ones(7), np.zeros(193)].astype(int),
        np.r_[RNG.random(7) * 0.5 + 0.5, RNG.random(193) * 0.8],
    ),
}


def _sklearn_threshold_for_precision(y: np.ndarray, s: np.ndarray, target: float) -> float | None:
    precision, recall, thresholds = precision_recall_curve(y, s)
    candidates = [
        (recall[i], thresholds[i]) for i in range(len(thresholds)) if precision[i] >= target
    ]
    return float(max(candidates)[1]) if candidates else None


def _sklearn_threshold_for_recall(y: np.ndarray, s: np.ndarray, target: float) -> float | None:
    _, recall, thresholds = precision_recall_curve(y, s)
    ok = np.where(recall[:-1] >= target)[0]
    return float(thresholds[ok].max()) if ok.size else None


@pytest.mark.parametrize("name", list(CASES))
def test_matches_scikit_learn(name: str) -> None:
    y, s = CASES[name]
    assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    ours = metrics.precision_recall_curve(y, s)
    theirs = precision_recall_curve(y, s)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-9, rtol=0)
    for target in (0.5, 0.8, 0.9, 0.95, 1.0):
        expected = _sklearn_threshold_for_precision(y, s, target)
        got = metrics.threshold_for_precision(y, s, target)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got == pytest.approx(expected, abs=1e-9)
        expected = _sklearn_threshold_for_recall(y, s, target)
        got = metrics.threshold_for_recall(y, s, target)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got == pytest.approx(expected, abs=1e-9)


def test_threshold_meets_its_target() -> None:
    y, s = CASES["random"]
    t = metrics.threshold_for_precision(y, s, 0.6)
    assert t is not None
    assert metrics.at_threshold(y, s, t).precision >= 0.6
    t = metrics.threshold_for_recall(y, s, 0.9)
    assert t is not None
    assert metrics.at_threshold(y, s, t).recall >= 0.9


def test_counts_at_threshold() -> None:
    y = np.array([1, 1, 0, 0, 1])
    s = np.array([0.9, 0.4, 0.6, 0.1, 0.5])
    at = metrics.at_threshold(y, s, 0.5)
    assert (at.tp, at.fp, at.fn, at.tn) == (2, 1, 1, 1)
    assert at.precision == pytest.approx(2 / 3)
    assert at.recall == pytest.approx(2 / 3)
    assert at.fpr == pytest.approx(0.5)


def test_single_class_auc_is_nan() -> None:
    assert np.isnan(metrics.roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
