"""The default fine-tune recipe on a hard case, served through `worker classify`.

The domain is a night camera's (``tests.synthetic.render_night``): small objects on dark
noisy backgrounds, in the false colour of a colour-infrared camera, labelled by their
daylight colour. A red object shows green, a green one blue, a yellow one cyan: the
domain's colour cues contradict what the base model knows of daylight images, so the
tiny CLIP (pre-trained on daylight shapes) is near chance there, and fine-tuning on the
domain alone can only gain by forgetting daylight colours. WiSE-FT interpolation cannot
undo that: it trades one for the other.

The acceptance point: with defaults and only ``--data``, ``--policy`` and ``--control``,
the served checkpoint gains at least 15 points on held-out night images while held-out
daylight accuracy drops by at most 2 points; the plain recipe (the same command with
``--no-replay --distill 0``: domain loss, learning-rate sweep, WiSE-FT under the control
margin) falls short. Every accuracy here is measured on images no run trained or chose
on, through `worker classify` with a tags policy (top-1 label).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli_runner import run_cli
from tests.synthetic import COLOURS, write_night_world

pytestmark = pytest.mark.slow
POLICY = (
    "name: colours\nkind: tags\ntemplates: simple\ntop_k: 1\n"
    "tags: [red, green, blue, yellow, purple]\n"
)
GAIN, DROP = 0.15, 0.02


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_night_world(tmp_path_factory.mktemp("night"), POLICY)


def served_accuracy(env: dict[str, str], model: str, labels: Path) -> float:
    """Top-1 accuracy of `worker classify` with ``model`` on the images of ``labels``."""
    proc = run_cli(
        "classify", str(labels.parent / "images"), env={**env, "WORKER_MODEL__NAME": model}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == 80 * len(COLOURS)
    hits = [Path(d["image"]["uri"]).name.split("-")[1] == d["labels"][0] for d in docs]
    return float(sum(hits) / len(hits))


def finetune(
    env: dict[str, str], world: dict[str, Path], out: Path, *extra: str
) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    proc = run_cli(
        "finetune",
        "--data",
        str(world["data"]),
        "--policy",
        "colours",
        "--control",
        str(world["control"]),
        "--out",
        str(out),
        *extra,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), time.perf_counter() - started


def test_default_recipe_adapts_without_forgetting_where_plain_fine_tuning_cannot(
    tmp_path: Path, trained_model_name: str, world: dict[str, Path]
) -> None:
    env = {
        "WORKER_MODEL__NAME": trained_model_name,
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
        "WORKER_CACHE_DIR": str(tmp_path / "cache"),
        "WORKER_POLICY_DIR": str(world["policies"]),
    }
    base_night = served_accuracy(env, trained_model_name, world["held_night"])
    base_day = served_accuracy(env, trained_model_name, world["held_day"])
    assert base_night <= 0.30, "the night domain must be near chance (20%) for the base model"
    assert base_day >= 0.95, "the base model must know daylight colours"

    report, seconds = finetune(env, world, tmp_path / "default")
    night = served_accuracy(env, f"local-dir:{tmp_path / 'default'}", world["held_night"])
    day = served_accuracy(env, f"local-dir:{tmp_path / 'default'}", world["held_day"])
    figures = f"night {base_night:.3f}→{night:.3f}, day {base_day:.3f}→{day:.3f}, {seconds:.0f} s"
    print(f"default recipe: {figures}, lr {report['config']['lr']:g}, α {report['alpha']}")
    assert night - base_night >= GAIN, figures
    assert base_day - day <= DROP, figures
    # the defaults chose the learning rate and the epochs, and said so
    assert len(report["sweep"]) == 7
    assert report["config"]["lr"] in {t["lr"] for t in report["sweep"]}
    assert report["recipe"]["objective"][0].startswith("replay of 100 control images")
    assert "feature distillation" in report["recipe"]["objective"][1]
    assert 1 <= report["best_epoch"] <= report["config"]["epochs"]
    text = (tmp_path / "default" / "report.md").read_text()
    assert text.index("**domain**") < text.index("## The recipe chosen")
    assert "| lr | epochs | val acc | control acc | seconds |" in text
    assert (tmp_path / "default" / "frontier.png").stat().st_size > 5000

    plain, _ = finetune(env, world, tmp_path / "plain", "--no-replay", "--distill", "0")
    p_night = served_accuracy(env, f"local-dir:{tmp_path / 'plain'}", world["held_night"])
    p_day = served_accuracy(env, f"local-dir:{tmp_path / 'plain'}", world["held_day"])
    plain_figures = f"night {base_night:.3f}→{p_night:.3f}, day {base_day:.3f}→{p_day:.3f}"
    print(f"plain recipe: {plain_figures}, lr {plain['config']['lr']:g}, α {plain['alpha']}")
    assert plain["recipe"]["objective"] == ["domain loss only"]
    assert not (p_night - base_night >= GAIN and base_day - p_day <= DROP), plain_figures
    # why: on this domain the plain objective learns the night only by forgetting the day.
    # Some candidate it tried scored better on the night than the one served, but broke the
    # control margin; the margin held the served point back.
    control = plain["control"]
    floor = control["zero_shot_acc"] - control["margin"]
    assert control["chosen_acc"] >= floor - 1e-9
    served = next(p for p in plain["alpha_curve"] if p["alpha"] == plain["alpha"])
    tried = [e for t in plain["sweep"] for e in t["history"]] + plain["history"]["epochs"]
    assert any(e["val_acc"] > served["val_acc"] and e["control_acc"] < floor for e in tried)
