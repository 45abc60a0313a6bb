"""Writing `worker eval` results: metrics.json, report.md, PNG plots (matplotlib, Agg) and
scores.jsonl (each image's scores)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from worker.tuning import metrics
from worker.tuning.datasets import Example
from worker.tuning.evaluation import BAND_RECALL, REVIEW_STATUSES, CategoryMetrics, EvalReport


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_threshold(value: float | None) -> str:
    """A suggested threshold for display: 3 decimals, or as many as it takes not to show
    0.000 or 1.000 for a value that is neither (one-vs-background scores often sit within
    1e-4 of 0 or 1, and there a 3-decimal threshold would flag everything or nothing)."""
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if text in ("0.000", "1.000") and 0.0 < value < 1.0:
        if value < 0.5:
            return f"{value:.2e}"
        digits = 2 - math.floor(math.log10(1.0 - value))
        return f"{value:.{digits}f}".rstrip("0")
    return text


COLUMNS = (
    "category",
    "action",
    "positives",
    "negatives",
    "AP",
    "ROC-AUC",
    "threshold",
    "precision",
    "recall",
    "F1",
    "FPR",
    "suggested",
    "→ precision",
    "→ recall",
    "review band",
)


REVIEW_COLUMNS = (
    "category",
    "threshold",
    "→ precision",
    "→ recall",
    "review_at",
    "→ precision",
    "→ recall",
    "in band",
    "share",
    "note",
)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def review_note(c: CategoryMetrics) -> str:
    """What a category's review_at suggestion is, in words (two-target mode)."""
    if c.review_status is None:
        return ""
    if c.review_status == "band":
        return f"{c.review_positives} of the {c.review_images} in the band are positives"
    return REVIEW_STATUSES[c.review_status]


def review_rows(categories: list[CategoryMetrics]) -> list[list[str]]:
    """One row per category for the two-target table: the suggested threshold and
    review_at, precision and recall flagging at or above each, the images scored in
    between (count and share of the data) and a note."""
    rows = []
    for c in categories:
        band = c.review_status == "band"
        rows.append(
            [
                c.id,
                fmt_threshold(c.suggested_threshold),
                _fmt(c.suggested_precision),
                _fmt(c.suggested_recall),
                fmt_threshold(c.suggested_review_at) if band else "none",
                _fmt(c.review_at_precision),
                _fmt(c.review_at_recall),
                str(c.review_images) if band else "0" if c.review_status == "no_band" else "n/a",
                _percent(c.review_share) if band else "",
                review_note(c),
            ]
        )
    return rows


def _review_lines(report: EvalReport) -> list[str]:
    precision, recall = report.target["precision"], report.target["recall"]
    load = report.review_load or {"images": 0, "share": 0.0}
    lines = [
        "",
        "## Review bands",
        "",
        f"`threshold`: the most recall at precision ≥ {precision:g}; `review_at`: the "
        f"highest score with recall ≥ {recall:g}. Images scored in `[review_at, threshold)` "
        "go to a person (action `review`); *in band* and *share* are that review load, "
        "counted on these images (it matches production only as far as their mix does).",
        "",
        "| " + " | ".join(REVIEW_COLUMNS) + " |",
        "|---|" + "---:|" * (len(REVIEW_COLUMNS) - 2) + "---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in review_rows(report.categories)]
    lines += [
        "",
        f"**Review load**: {int(load['images'])} of {report.images} images "
        f"({_percent(load['share'])}) fall in at least one category's band.",
    ]
    return lines


def markdown(report: EvalReport) -> str:
    target = ", ".join(f"{k} ≥ {v:g}" for k, v in report.target.items())
    if report.two_targets:
        target = (
            f"precision ≥ {report.target['precision']:g} (threshold) and recall ≥ "
            f"{report.target['recall']:g} (review_at)"
        )
    lines = [
        f"# Evaluation of policy `{report.policy}`",
        "",
        f"- images: {report.images}; model `{report.model['name']}` "
        f"(fingerprint `{report.model['fingerprint']}`); policy version `{report.version[:12]}`",
        f"- suggested thresholds aim for {target}",
        f"- embedding: {report.timings.get('encoded', 0)} image(s) encoded, "
        f"{report.timings.get('cached', 0)} from the cache, "
        f"{report.timings.get('seconds', 0):.1f} s in all",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * (len(COLUMNS) - 3) + "---|",
    ]
    for c in report.categories:
        band = f"{_fmt(c.review_band[0])}–{_fmt(c.review_band[1])}" if c.review_band else ""
        cells = [
            c.id,
            c.action,
            str(c.support),
            str(c.negatives),
            _fmt(c.average_precision),
            _fmt(c.roc_auc),
            _fmt(c.threshold, 2),
            _fmt(c.precision),
            _fmt(c.recall),
            _fmt(c.f1),
            _fmt(c.fpr),
            fmt_threshold(c.suggested_threshold),
            _fmt(c.suggested_precision),
            _fmt(c.suggested_recall),
            band,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    m, u = report.macro, report.micro
    lines += [
        "",
        f"**Macro** (classes with positives): AP {_fmt(m['average_precision'])}, ROC-AUC "
        f"{_fmt(m['roc_auc'])}, precision {_fmt(m['precision'])}, recall {_fmt(m['recall'])}, "
        f"F1 {_fmt(m['f1'])}.",
        f"**Micro** at the current thresholds: precision {_fmt(u['precision'])}, recall "
        f"{_fmt(u['recall'])}, F1 {_fmt(u['f1'])}.",
        "",
        "How to read this: *precision* is the share of flagged images that really belong to "
        "the category; *recall* the share of the category's images that get flagged; *FPR* the "
        "share of other images flagged by mistake. *suggested* is the threshold that meets the "
        "target with the most recall (or precision). For `review` categories the *review band* "
        f"runs from the threshold catching {BAND_RECALL:.0%} of positives to the one that is "
        "right 90% of the time: send images in between to a person.",
        "",
        "Plots: `pr_curves.png` (precision-recall per category, current threshold ●, suggested ▲"
        ", suggested review_at ◆) and `histograms.png` (scores of positives vs negatives, "
        "thresholds as lines).",
    ]
    if report.two_targets:
        lines += _review_lines(report)
    lines.append("")
    return "\n".join(lines)


def _grid(count: int) -> tuple[int, int]:
    cols = min(4, max(count, 1))
    return math.ceil(count / cols), cols


@contextmanager
def _category_figure(
    report: EvalReport, row_height: float, title: str, path: Path
) -> Iterator[list[tuple[Any, int, CategoryMetrics]]]:
    """A grid with one axis per category; saved to ``path`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(report.categories)
    rows, cols = _grid(count)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, row_height * rows), squeeze=False)
    yield list(zip(axes.flat, range(count), report.categories, strict=False))
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    fig.suptitle(f"{title}, policy {report.policy}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_pr_curves(report: EvalReport, truth: np.ndarray, scores: np.ndarray, path: Path) -> None:
    with _category_figure(report, 3.4, "precision-recall", path) as cells:
        for ax, index, c in cells:
            y, s = truth[:, index], scores[:, index]
            ax.set_title(f"{c.id} (AP {_fmt(c.average_precision, 2)}, n+={c.support})", fontsize=9)
            ax.set_xlim(0, 1.02)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("recall", fontsize=8)
            ax.set_ylabel("precision", fontsize=8)
            if not y.any():
                ax.text(0.5, 0.5, "no positives", ha="center", fontsize=8)
                continue
            precision, recall, _ = metrics.precision_recall_curve(y, s)
            ax.step(recall, precision, where="post", color="tab:blue")
            ax.plot(
                [c.recall], [c.precision], "o", color="tab:red", label=f"current {c.threshold:.2f}"
            )
            if c.suggested_threshold is not None:
                ax.plot(
                    [c.suggested_recall],
                    [c.suggested_precision],
                    "^",
                    color="tab:green",
                    label=f"suggested {c.suggested_threshold:.2f}",
                )
            if c.suggested_review_at is not None:
                ax.plot(
                    [c.review_at_recall],
                    [c.review_at_precision],
                    "D",
                    color="tab:purple",
                    label=f"review_at {c.suggested_review_at:.2f}",
                )
            ax.legend(fontsize=7, loc="lower left")


def plot_histograms(report: EvalReport, truth: np.ndarray, scores: np.ndarray, path: Path) -> None:
    bins = np.linspace(0, 1, 41)
    with _category_figure(report, 3.0, "score distributions", path) as cells:
        for ax, index, c in cells:
            y, s = truth[:, index].astype(bool), scores[:, index]
            ax.hist(
                s[~y], bins=bins, alpha=0.6, color="tab:gray", label=f"negatives ({(~y).sum()})"
            )
            ax.hist(s[y], bins=bins, alpha=0.7, color="tab:orange", label=f"positives ({y.sum()})")
            ax.axvline(c.threshold, color="tab:red", linestyle="--", linewidth=1, label="current")
            if c.suggested_threshold is not None:
                ax.axvline(c.suggested_threshold, color="tab:green", linewidth=1, label="suggested")
            if c.suggested_review_at is not None:
                ax.axvline(
                    c.suggested_review_at, color="tab:purple", linewidth=1, label="review_at"
                )
            ax.set_title(c.id, fontsize=9)
            ax.set_xlabel("score", fontsize=8)
            ax.legend(fontsize=7)


def write_report(
    report: EvalReport, truth: np.ndarray, scores: np.ndarray, out_dir: Path
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        out_dir / "metrics.json",
        out_dir / "report.md",
        out_dir / "pr_curves.png",
        out_dir / "histograms.png",
    ]
    written[0].write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown(report), encoding="utf-8")
    plot_pr_curves(report, truth, scores, written[2])
    plot_histograms(report, truth, scores, written[3])
    return written


def write_scores(
    examples: Sequence[Example], class_ids: Sequence[str], scores: np.ndarray, out_dir: Path
) -> Path:
    """scores.jsonl: one line per image, ``{"image", "labels", "scores": {class: score}}``,
    in the data's order; ``image`` is the data's path made absolute (relative paths are
    relative to the CSV/JSONL), the scores are those `worker classify` gives the file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scores.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for example, row in zip(examples, scores.tolist(), strict=True):
            line = {
                "image": os.path.abspath(example.path),
                "labels": list(example.labels),
                "scores": dict(zip(class_ids, row, strict=True)),
            }
            handle.write(json.dumps(line) + "\n")
    return path


def category_table_rows(categories: list[CategoryMetrics]) -> list[list[str]]:
    return [
        [
            c.id,
            str(c.support),
            _fmt(c.average_precision),
            _fmt(c.roc_auc),
            _fmt(c.threshold, 2),
            _fmt(c.precision),
            _fmt(c.recall),
            _fmt(c.fpr),
            fmt_threshold(c.suggested_threshold),
        ]
        for c in categories
    ]
