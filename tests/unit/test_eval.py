"""`worker eval` end to end (in-process) on a synthetic labelled set with a tiny trained
CLIP."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli_runner import run_cli
from tests.synthetic import COLOURS_POLICY as POLICY
from tests.synthetic import write_shape_set


def test_eval_writes_metrics_report_plots_then_reuses_embeddings(
    tmp_path: Path, eval_env: dict[str, str]
) -> None:
    data = write_shape_set(tmp_path / "data", per_class=25, style="filled", label="colour")
    out = tmp_path / "eval"
    args = ["eval", "--data", str(data), "--policy", "colours", "--out", str(out)]
    first = run_cli(*args, "--target-precision", "0.8", env=eval_env)
    assert first.returncode == 1  # 'yellow' and 'purple' are not categories of the policy
    assert "unknown label 'yellow' (25 image(s))" in first.stderr
    assert "model.loaded" not in first.stderr  # refused before the model loads

    rows = data.read_text().splitlines()
    data.write_text(
        "\n".join(r.replace(",yellow", ",").replace(",purple", ",") for r in rows) + "\n"
    )
    first = run_cli(*args, "--target-precision", "0.8", env=eval_env)
    assert first.returncode == 0, first.stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["images"] == 125  # 75 positives, 50 unlabelled negatives
    assert doc["timings"]["encoded"] == 125
    by_id = {c["id"]: c for c in doc["categories"]}
    assert set(by_id) == {"red", "blue", "green"}
    assert all(c["support"] == 25 and c["negatives"] == 100 for c in by_id.values())
    assert all(c["average_precision"] > 0.8 for c in by_id.values())  # the model knows colours
    assert by_id["red"]["review_band"] is not None  # a review action gets a band
    assert by_id["blue"]["review_band"] is None
    for name in ("report.md", "pr_curves.png", "histograms.png"):
        assert (out / name).stat().st_size > 1000
    assert "| red | review | 25 | 100 |" in (out / "report.md").read_text()

    # Add a category: the second run compiles its prompts but encodes no image.
    policy = Path(eval_env["WORKER_POLICY_DIR"]) / "colours.yaml"
    policy.write_text(POLICY + "  - id: yellow\n    prompts: [yellow shape]\n")
    second = run_cli(*args, env=eval_env)
    assert second.returncode == 0, second.stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["timings"] == {**doc["timings"], "encoded": 0, "cached": 125}
    assert "0 encoded, 125 from the cache" in second.stderr
    assert {c["id"] for c in doc["categories"]} == {"red", "blue", "green", "yellow"}


def test_write_thresholds_changes_only_threshold_values(
    tmp_path: Path, eval_env: dict[str, str]
) -> None:
    data = write_shape_set(tmp_path / "data", per_class=20, style="filled", label="colour")
    rows = data.read_text().splitlines()
    data.write_text(
        "\n".join(r.replace(",yellow", ",").replace(",purple", ",") for r in rows) + "\n"
    )
    policy = Path(eval_env["WORKER_POLICY_DIR"]) / "colours.yaml"
    before = policy.read_text()
    proc = run_cli(
        "eval",
        "--data",
        str(data),
        "--policy",
        str(policy),
        "--out",
        str(tmp_path / "e"),
        "--target-recall",
        "0.9",
        "--write-thresholds",
        env=eval_env,
    )
    assert proc.returncode == 0, proc.stderr
    after = policy.read_text()
    assert after != before
    changed = [
        (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert changed, "some threshold should move"
    for old, new in changed:
        assert old.strip().startswith("threshold:")
        assert new.strip().startswith("threshold:")
        assert old.split("#")[1:] == new.split("#")[1:]  # trailing comments survive
    assert "# Colours policy used by the eval tests." in after
    assert "# warm colours" in after
    assert (
        "-    threshold:" in proc.stdout or "-    threshold: 0.5" in proc.stdout
    )  # the printed diff
    suggested = {
        c["id"]: c["suggested_threshold"]
        for c in json.loads((tmp_path / "e" / "metrics.json").read_text())["categories"]
    }
    written = {
        float(line.split("threshold:")[1].split("#")[0])
        for line in after.splitlines()
        if "threshold:" in line
    }
    assert {float(v) for v in suggested.values() if v is not None} == written  # unrounded
