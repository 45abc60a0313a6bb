"""`worker eval --target-precision P --target-recall R`: a threshold for precision P and a
``review_at`` for recall R per category, the review load between them, and both written
back unrounded (end to end, in-process, with the tiny trained CLIP of tests.synthetic)."""

from __future__ import annotations

import csv
import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

from tests.cli_runner import CliResult, run_cli
from tests.synthetic import write_shape_set
from worker.errors import PolicyError
from worker.policy.loading import load_policy_file
from worker.tuning.thresholds import edit_thresholds, write_checked

CATEGORIES = ("red", "blue", "green")

#: The colours policy with review bands already set, and comments around them.
BANDED_POLICY = """\
# Colours policy with review bands.
name: colours
kind: moderation
templates: simple
background:
  - a white shape
categories:
  # warm colours
  - id: red
    prompts: [red shape, crimson shape]
    threshold: 1.0
    review_at: 0.9999999   # left above any threshold eval can suggest
    # a person looks at red
    action: review
  - id: blue
    prompts: [blue shape]
    threshold: 0.5   # keep an eye on this one
    action: block
    severity: high
  - id: green
    prompts: [green shape]
    threshold: 0.5
    review_at: 1.0e-07
"""


def _policy(env: dict[str, str]) -> Path:
    return Path(env["WORKER_POLICY_DIR"]) / "colours.yaml"


def _colour_rows(csv_path: Path, prefix: str) -> list[tuple[str, str]]:
    """The rows of a colour set, yellow and purple made unlabelled (negatives)."""
    with csv_path.open() as handle:
        return [
            (f"{prefix}{r['image']}", r["label"] if r["label"] in CATEGORIES else "")
            for r in csv.DictReader(handle)
        ]


def _filled_set(root: Path) -> Path:
    """Filled shapes, the model's own world: every colour separable (no band needed)."""
    path = write_shape_set(root, per_class=10, style="filled", label="colour")
    rows = _colour_rows(path, "")
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("image", "label"), *rows])
    return path


def _mixed_set(root: Path) -> Path:
    """Filled shapes plus outlined ones on clutter (which the model scores near 0 or 1,
    often the wrong way): high precision only at scores within 1e-4 of 1, full recall only
    down near 0, so the suggestions are extreme and the bands wide."""
    rows = []
    for style, seed in (("filled", 1), ("outline", 2)):
        sub = write_shape_set(root / style, per_class=10, style=style, label="colour", seed=seed)
        rows += _colour_rows(sub, f"{style}/")
    path = root / "labels.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("image", "label"), *rows])
    return path


def _eval(env: dict[str, str], data: Path, out: Path, *extra: str) -> CliResult:
    """`worker eval` on ``data`` into ``out``; its stderr with the console's wrapping undone."""
    proc = run_cli(
        "eval", "--data", str(data), "--policy", "colours", "--out", str(out), *extra, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return CliResult(proc.returncode, proc.stdout, " ".join(proc.stderr.split()))


def _categories(out: Path) -> dict[str, dict[str, Any]]:
    doc = json.loads((out / "metrics.json").read_text())
    return {c["id"]: c for c in doc["categories"]}


def _scores(out: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(labels, scores) per category, from the run's scores.jsonl."""
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    truth = {c: np.array([c in line["labels"] for line in lines]) for c in CATEGORIES}
    scores = {c: np.array([line["scores"][c] for line in lines]) for c in CATEGORIES}
    return truth, scores


def _sklearn_suggestions(
    y: np.ndarray, s: np.ndarray, precision_target: float, recall_target: float
) -> tuple[float | None, float | None]:
    """(threshold, review_at) computed independently: the threshold with the most recall
    among points with precision >= P (the higher on a tie), and the highest threshold with
    recall >= R."""
    precision, recall, thresholds = precision_recall_curve(y, s)
    points = [
        (recall[i], thresholds[i])
        for i in range(len(thresholds))
        if precision[i] >= precision_target
    ]
    threshold = float(max(points)[1]) if points else None
    reach = [thresholds[i] for i in range(len(thresholds)) if recall[i] >= recall_target]
    return threshold, float(max(reach)) if reach else None


def _read_back(path: Path) -> dict[str, tuple[float, float | None]]:
    [loaded] = load_policy_file(path)
    dumped = loaded.policy.model_dump()
    return {c["id"]: (c["threshold"], c["review_at"]) for c in dumped["categories"]}


def test_both_targets_match_scikit_learn_and_count_the_review_load(
    tmp_path: Path, eval_env: dict[str, str]
) -> None:
    out = tmp_path / "e"
    proc = _eval(
        eval_env, _mixed_set(tmp_path / "data"), out, "--target-precision", "0.9",
        "--target-recall", "0.95",
    )  # fmt: skip
    got, (truth, scores) = _categories(out), _scores(out)
    in_any_band = np.zeros(len(truth["red"]), dtype=bool)
    statuses = {}
    for cid in CATEGORIES:
        c, y, s = got[cid], truth[cid], scores[cid]
        threshold, review_at = _sklearn_suggestions(y, s, 0.9, 0.95)
        assert c["suggested_threshold"] == threshold
        statuses[cid] = c["review_status"]
        if threshold is None:
            assert c["review_status"] == "precision_unreached"
            assert c["suggested_review_at"] is None
            continue
        assert review_at is not None  # with positives, the lowest score has recall 1
        if review_at >= threshold:
            assert c["review_status"] == "no_band"
            assert c["suggested_review_at"] is None
            continue
        band = (s >= review_at) & (s < threshold)
        in_any_band |= band
        assert c["review_status"] == "band"
        assert c["suggested_review_at"] == review_at
        assert c["review_images"] == int(band.sum())
        assert c["review_share"] == pytest.approx(band.mean(), abs=1e-12)
        assert c["review_positives"] == int((band & y).sum())
        flagged = s >= review_at
        assert c["review_at_recall"] == pytest.approx((flagged & y).sum() / y.sum())
        assert c["review_at_recall"] >= 0.95
        assert c["review_at_precision"] == pytest.approx((flagged & y).sum() / flagged.sum())
        acted = s >= threshold
        assert c["suggested_precision"] == pytest.approx((acted & y).sum() / acted.sum())
        assert c["suggested_precision"] >= 0.9
    print("statuses", statuses, "load", int(in_any_band.sum()))
    assert "band" in statuses.values(), "the mixed set should need a review band somewhere"
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["target"] == {"precision": 0.9, "recall": 0.95}
    assert doc["review_load"]["images"] == int(in_any_band.sum())
    assert doc["review_load"]["share"] == pytest.approx(in_any_band.mean(), abs=1e-12)

    report = (out / "report.md").read_text()
    assert "## Review bands" in report
    assert f"**Review load**: {int(in_any_band.sum())} of {len(in_any_band)} images" in report
    banded = next(cid for cid in CATEGORIES if statuses[cid] == "band")
    share = f"{got[banded]['review_share']:.1%}"
    *_, row = (line for line in report.splitlines() if line.startswith(f"| {banded} |"))
    assert share in row
    assert f"| {got[banded]['review_images']} |" in row
    if "precision_unreached" in statuses.values():
        assert "precision target not reached" in report
    assert "review_at" in proc.stdout  # the console table
    assert share in proc.stdout
    assert f"review load: {int(in_any_band.sum())} of {len(in_any_band)} images" in proc.stderr


def test_write_thresholds_writes_both_unrounded(tmp_path: Path, eval_env: dict[str, str]) -> None:
    policy = _policy(eval_env)
    policy.chmod(0o640)
    before = policy.read_text()
    out = tmp_path / "e"
    proc = _eval(
        eval_env, _mixed_set(tmp_path / "data"), out, "--target-precision", "0.9",
        "--target-recall", "1.0", "--write-thresholds",
    )  # fmt: skip
    got = _categories(out)
    written = {cid: c for cid, c in got.items() if c["suggested_threshold"] is not None}
    banded = {cid: c for cid, c in written.items() if c["suggested_review_at"] is not None}
    print({cid: (c["suggested_threshold"], c["suggested_review_at"]) for cid, c in written.items()})
    assert banded, "full recall on the mixed set needs a band"
    # What makes rounding dangerous: thresholds within 1e-4 of 1, review_at within 1e-3 of 0.
    assert any(c["suggested_threshold"] > 0.9999 for c in written.values())
    assert any(c["suggested_review_at"] < 1e-3 for c in banded.values())

    after = policy.read_text()
    read = _read_back(policy)  # the loader accepts it
    for cid in CATEGORIES:
        if cid in written:
            expected = (written[cid]["suggested_threshold"], written[cid]["suggested_review_at"])
            assert read[cid] == expected  # exactly the floats suggested: not rounded
        else:
            assert read[cid] == (0.5, None)  # no suggestion: untouched
    lines = after.splitlines()
    for cid in banded:
        start = lines.index(f"  - id: {cid}")
        block = lines[start + 1 : start + 5]
        at = next(i for i, line in enumerate(block) if line.strip().startswith("threshold:"))
        assert block[at + 1].strip().startswith("review_at:")  # right after threshold
    assert "# Colours policy used by the eval tests." in after
    assert "# warm colours" in after
    assert "# keep an eye on this one" in after
    assert before.count("\n") + len(banded) == after.count("\n")  # one line per review_at
    assert "+    review_at: " in proc.stdout  # the printed diff
    assert f"wrote {len(written)} threshold(s) and {len(banded)} review_at" in proc.stderr
    assert stat.S_IMODE(policy.stat().st_mode) == 0o640
    assert sorted(p.name for p in policy.parent.iterdir()) == ["colours.yaml"]


def test_no_band_when_the_threshold_meets_the_recall_target(
    tmp_path: Path, eval_env: dict[str, str]
) -> None:
    policy = _policy(eval_env)
    policy.write_text(BANDED_POLICY)
    out = tmp_path / "e"
    proc = _eval(
        eval_env, _filled_set(tmp_path / "data"), out, "--target-precision", "0.9",
        "--target-recall", "0.75", "--write-thresholds",
    )  # fmt: skip
    got = _categories(out)
    for cid in CATEGORIES:
        assert got[cid]["suggested_threshold"] is not None
        assert got[cid]["suggested_recall"] >= 0.75  # separable: recall is high already
        assert got[cid]["review_status"] == "no_band"
        assert got[cid]["suggested_review_at"] is None
    assert json.loads((out / "metrics.json").read_text())["review_load"]["images"] == 0
    report = (out / "report.md").read_text()
    assert report.count("no band: the threshold already meets the recall target") == 3
    assert "no band" in proc.stdout

    # red's review_at (0.9999999) is not below its new threshold: removed, with a note;
    # green's (1e-07) still is: kept, with a note that no band is needed.
    assert got["red"]["suggested_threshold"] <= 0.9999999
    read = _read_back(policy)
    assert read["red"] == (got["red"]["suggested_threshold"], None)
    assert read["green"] == (got["green"]["suggested_threshold"], 1e-07)
    assert read["blue"] == (got["blue"]["suggested_threshold"], None)
    assert "note: red: removed review_at 0.9999999" in proc.stderr
    assert "note: green: kept review_at 1.0e-07" in proc.stderr
    after = policy.read_text()
    assert "# left above any threshold" not in after  # went with its line
    lines = after.splitlines()
    at = lines.index("    # a person looks at red")  # the comment on the next line stays
    assert lines[at - 1].strip().startswith("threshold:")
    assert lines[at + 1] == "    action: review"


def test_single_target_removes_a_review_at_the_new_threshold_would_pass(
    tmp_path: Path, eval_env: dict[str, str]
) -> None:
    policy = _policy(eval_env)
    policy.write_text(BANDED_POLICY)
    out = tmp_path / "e"
    proc = _eval(
        eval_env, _filled_set(tmp_path / "data"), out, "--target-recall", "0.9",
        "--write-thresholds",
    )  # fmt: skip
    got = _categories(out)
    assert all(c["review_status"] is None for c in got.values())  # one target: no band
    assert json.loads((out / "metrics.json").read_text())["review_load"] is None
    assert "## Review bands" not in (out / "report.md").read_text()
    read = _read_back(policy)
    assert read["red"] == (got["red"]["suggested_threshold"], None)
    assert read["green"] == (got["green"]["suggested_threshold"], 1e-07)  # still valid: kept
    assert "note: red: removed review_at 0.9999999" in proc.stderr
    assert "green" not in proc.stderr.split("note:", 1)[-1]  # no note for a valid one
    assert "    # a person looks at red" in policy.read_text()
    assert f"wrote {len(got)} threshold(s) into" in proc.stderr


POLICY_FOR_EDITS = """\
name: precise
kind: moderation
background: [an ordinary photo]
categories:
  - id: rare
    prompts: [a gun]
    threshold: 0.5   # high bar

    # the next key
    action: block
  - id: common
    prompts: [a photo]
    threshold: 0.9
    review_at: 0.8   # old band
    # severity follows
    severity: high
  # the last category
  - id: kept
    prompts: [a cat]
    review_at: 0.1
"""


def test_edit_puts_extreme_values_and_moves_comments_with_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "precise.yaml"
    path.write_text(POLICY_FOR_EDITS)
    edit = edit_thresholds(
        path,
        "precise",
        {"rare": 0.99996, "common": 0.7, "kept": 0.3},
        {"rare": 4e-05, "common": None},
    )
    write_checked(edit)
    assert _read_back(path) == {
        "rare": (0.99996, 4e-05),
        "common": (0.7, None),
        "kept": (0.3, 0.1),
    }
    text = path.read_text()
    print(text)
    assert (
        "    threshold: 0.99996 # high bar\n    review_at: 4.0e-05\n\n    # the next key\n" in text
    )
    assert "    threshold: 0.7\n    # severity follows\n    severity: high\n" in text
    assert "old band" not in text
    assert "    prompts: [a cat]\n    threshold: 0.3\n    review_at: 0.1\n" in text
    assert "  # the last category\n  - id: kept\n" in text
    assert edit.notes == [
        "common: removed review_at 0.8: not below the new threshold 0.7, so no review band"
    ]


def test_write_checked_refuses_a_file_the_loader_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "precise.yaml"
    path.write_text(POLICY_FOR_EDITS)
    edit = edit_thresholds(path, "precise", {"rare": 0.3}, {"rare": 0.4})
    with pytest.raises(PolicyError) as caught:
        write_checked(edit)
    [problem] = caught.value.problems
    assert problem.path == str(path)
    assert "review_at (0.4) must be below threshold (0.3)" in problem.message
    assert "not written" in problem.message
    assert path.read_text() == POLICY_FOR_EDITS
    assert [p.name for p in tmp_path.iterdir()] == ["precise.yaml"]  # no temporary left


def test_help_explains_the_two_target_mode() -> None:
    proc = run_cli("eval", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "Give both --target-precision P and --target-recall R" in text
    assert "review_at" in text
