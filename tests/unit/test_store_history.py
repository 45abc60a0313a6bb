"""The embedding store through the served path: `worker classify` keeps one row per image,
`worker rescore` gives what a fresh `worker classify` gives, and `worker policies preview`
counts what the two sets of results say (in-process, with the tiny trained CLIP)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tests.cli_runner import run_cli
from tests.synthetic import colours_env, write_shape_set
from worker.store import COLUMNS, EmbeddingStore, vectors

EDITED = """\
# The colours policy after an edit: red widened and re-thresholded, blue's threshold
# moved, green removed, purple added.
name: colours
kind: moderation
templates: simple
background:
  - a white shape
categories:
  - id: red
    prompts: [red shape, crimson shape, orange shape]
    threshold: {red}
    action: review
  - id: blue
    prompts: [blue shape]
    threshold: {blue}
    action: block
    severity: high
  - id: purple
    prompts: [purple shape, violet shape]
    threshold: 0.5
"""


def _results(text: str) -> dict[str, dict[str, Any]]:
    return {doc["job_id"]: doc for doc in map(json.loads, text.splitlines())}


def _animated(path: Path) -> None:
    """A two-frame GIF: a red frame, then a blue one (scores pool over the frames)."""
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((220, 30, 30), (30, 30, 220))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, trained_model_name: str) -> dict[str, Any]:
    """One store for the module: a folder of colour shapes (and one animation) classified
    with the deployed colours policy. The last test deletes the images."""
    root = tmp_path_factory.mktemp("history")
    env = colours_env(root, trained_model_name)
    write_shape_set(root / "set", per_class=4, label="colour", seed=5)
    folder = root / "set" / "images"
    _animated(folder / "anim.gif")
    first = run_cli("classify", str(folder), env=env)
    assert first.returncode == 0, first.stderr
    return {"env": env, "folder": folder, "live": _results(first.stdout), "root": root}


def _table(env: dict[str, str]) -> pa.Table:
    store = EmbeddingStore(str(Path(env["WORKER_CACHE_DIR"]) / "store"))
    table = store.table()
    assert table is not None
    return table.to_arrow()


def test_classify_keeps_one_row_per_image_and_a_second_run_adds_none(
    history: dict[str, Any],
) -> None:
    live, eval_env = history["live"], history["env"]
    table = _table(eval_env)
    assert tuple(table.column_names) == COLUMNS
    assert sorted(table.column("job_id").to_pylist()) == sorted(live)
    dim = table.schema.field("embedding").type.list_size
    embeddings = vectors(table.column("embedding"), dim)
    assert embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert str(table.schema.field("created_at").type) == "timestamp[us, tz=UTC]"
    for row in table.to_pylist():
        delivered = live[row["job_id"]]
        assert json.loads(row["result"]) == delivered  # the document as delivered
        assert row["uri"] == delivered["image"]["uri"]
        assert row["image_sha256"] == delivered["image"]["sha256"]
        assert row["fingerprint"] == delivered["model"]["fingerprint"]
        assert json.loads(row["metadata"]) == {}
        animated = row["uri"].endswith(".gif")
        assert (row["frames"] is None) != animated
    print(f"{table.num_rows} rows after the first run")
    again = run_cli("classify", str(history["folder"]), env=eval_env)
    assert again.returncode == 0
    assert _table(eval_env).num_rows == len(live)
    print(f"{_table(eval_env).num_rows} rows after the second run")


def test_rescore_of_the_deployed_policy_writes_every_row_once(history: dict[str, Any]) -> None:
    eval_env = history["env"]
    out = history["root"] / "all.jsonl"
    first = run_cli("rescore", "--policy", "colours", "--out", str(out), env=eval_env)
    assert first.returncode == 0, first.stderr
    assert sorted(_results(out.read_text())) == sorted(history["live"])
    assert "resuming" not in first.stderr
    assert not list((Path(eval_env["WORKER_CACHE_DIR"]) / "rescore").glob("*.json"))


def _edited_thresholds(live: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Thresholds at the median of the measured scores, so the edit moves flags both ways."""
    scores = {
        c: [doc["policies"]["colours"]["scores"][c] for doc in live.values()]
        for c in ("red", "blue")
    }
    return {c: float(statistics.median(values)) for c, values in scores.items()}


def _flagged(results: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    flagged: dict[str, set[str]] = {}
    for job_id, doc in results.items():
        for flag in doc["policies"]["colours"]["flags"]:
            flagged.setdefault(flag["category"], set()).add(job_id)
    return flagged


def test_rescore_and_preview_agree_with_fresh_classify(history: dict[str, Any]) -> None:
    """Runs last: it deletes the images, to show rescore does not need them."""
    live, eval_env, tmp_path = history["live"], history["env"], history["root"]
    edited = tmp_path / "edited" / "colours.yaml"
    edited.parent.mkdir()
    edited.write_text(EDITED.format(**_edited_thresholds(live)))
    fresh_run = run_cli("classify", str(history["folder"]), "--policy", str(edited), env=eval_env)
    assert fresh_run.returncode == 0, fresh_run.stderr
    fresh = _results(fresh_run.stdout)

    # preview: counts equal those computed from the two sets of results
    shown = run_cli("policies", "preview", str(edited), "--json", "--sample", "3", env=eval_env)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)["policies"]["colours"]
    assert report["rows"] == len(live)
    before, after = _flagged(live), _flagged(fresh)
    expected = {}
    for category in ("red", "blue", "green", "purple"):
        now, edit = before.get(category, set()), after.get(category, set())
        expected[category] = {
            "flagged_now": len(now),
            "flagged_with_edit": len(edit),
            "newly_flagged": len(edit - now),
            "no_longer_flagged": len(now - edit),
        }
    counted = {
        c: {k: v for k, v in counts.items() if k != "samples"}
        for c, counts in report["categories"].items()
    }
    print(f"preview: {counted}")
    assert counted == expected
    assert any(v["newly_flagged"] for v in expected.values())
    assert any(v["no_longer_flagged"] for v in expected.values())
    uris = {doc["image"]["uri"]: job for job, doc in live.items()}
    for category, counts in report["categories"].items():
        for uri in counts["samples"]["newly_flagged"]:
            assert uris[uri] in after[category] - before.get(category, set())
        assert len(counts["samples"]["newly_flagged"]) == min(
            3, expected[category]["newly_flagged"]
        )

    # rescore, after the image files are gone: the scores a fresh classify gives
    shutil.rmtree(history["folder"])
    out = tmp_path / "rescored.jsonl"
    rescored_run = run_cli("rescore", "--policy", str(edited), "--out", str(out), env=eval_env)
    assert rescored_run.returncode == 0, rescored_run.stderr
    rescored = _results(out.read_text())
    assert set(rescored) == set(fresh)
    worst = 0.0
    for job_id, doc in rescored.items():
        want = fresh[job_id]
        got_scores = doc["policies"]["colours"]["scores"]
        want_scores = want["policies"]["colours"]["scores"]
        assert set(got_scores) == set(want_scores)
        worst = max([worst] + [abs(got_scores[c] - want_scores[c]) for c in want_scores])
        assert doc["flags"] == want["flags"]  # evidence included
        assert doc["decision"] == want["decision"]
        assert doc["image"] == want["image"]
        assert doc["model"] == want["model"]
    print(f"largest score difference rescore vs classify: {worst:.2e}")
    assert worst <= 1e-4

    # --changed-only: exactly the rows whose flags differ from the stored (live) result
    changed = tmp_path / "changed.jsonl"
    only = run_cli(
        "rescore", "--policy", str(edited), "--out", str(changed), "--changed-only", env=eval_env
    )
    assert only.returncode == 0, only.stderr

    def decided(doc: dict[str, Any]) -> list[tuple[str, str]]:
        return sorted((f["category"], f["action"]) for f in doc["policies"]["colours"]["flags"])

    differ = {job for job in live if decided(live[job]) != decided(fresh[job])}
    assert set(_results(changed.read_text())) == differ
    print(f"--changed-only: {len(differ)} of {len(live)} documents")
