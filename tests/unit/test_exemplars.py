"""Exemplar categories: a category shown by images, scored one-vs-background against the
policy's background exemplars, measured by `worker eval` and served by `worker classify`.

The model is the tiny trained CLIP with CLIP's modality gap made visible
(:func:`tests.synthetic.with_modality_gap`): its image-image cosines run far above its
image-text ones, as real CLIP's do. On it, an exemplar head contrasted with *text*
backgrounds scores every image near 1 (the failure the policy schema refuses), while the
same head against background exemplars separates the category.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from tests.cli_runner import run_cli
from tests.synthetic import COLOURS, SHAPES, render, with_modality_gap
from worker.model import load_model
from worker.policy.heads import build_head
from worker.policy.scoring import one_vs_background

EXEMPLAR_POLICY = """\
# A category shown by five images instead of described by prompts.
name: memes
kind: moderation
background_exemplars: [ordinary/*.png]
categories:
  - id: template
    exemplars: [examples/template-*.png]   # globs resolve against this file's folder
    threshold: 0.5
"""
#: The same policy with a text category (and its background prompts) and a second
#: exemplar category added: neither may move a template score.
GROWN_POLICY = (
    EXEMPLAR_POLICY.replace(
        "background_exemplars:",
        "templates: simple\nbackground: [a white shape]\nbackground_exemplars:",
    )
    + """\
  - id: red
    prompts: [red shape]
  - id: square
    exemplars: [examples/square-*.png]
"""
)


@pytest.fixture(scope="module")
def gap_model(tmp_path_factory: pytest.TempPathFactory, trained_model_name: str) -> str:
    return with_modality_gap(trained_model_name, tmp_path_factory.mktemp("gap-model"))


#: The look the exemplar category stands for (a "template": one shape in one colour).
TEMPLATE = ("circle", "red")


def _member(name: str) -> bool:
    return name.startswith("member-")


def _picture(rng: random.Random, member: bool) -> Image.Image:
    """A member of the template, or any other shape/colour pair."""
    if member:
        return render(*TEMPLATE, rng, style="filled")
    while (pair := (rng.choice(SHAPES), rng.choice(list(COLOURS)))) == TEMPLATE:
        pass
    return render(*pair, rng, style="filled")


@pytest.fixture
def world(tmp_path: Path, gap_model: str) -> dict[str, Path]:
    """Policy folder with 5 exemplars of the template, 5 of another look (a blue square,
    for the grown policy) and 12 ordinary images; a labelled set of 30 members and 60
    others; the cache."""
    rng = random.Random(7)
    policies = tmp_path / "policies"
    (policies / "examples").mkdir(parents=True)
    (policies / "ordinary").mkdir()
    for i in range(5):
        _picture(rng, True).save(policies / "examples" / f"template-{i}.png")
        render("square", "blue", rng, style="filled").save(
            policies / "examples" / f"square-{i}.png"
        )
    for i in range(12):
        _picture(rng, False).save(policies / "ordinary" / f"ordinary-{i}.png")
    (policies / "memes.yaml").write_text(EXEMPLAR_POLICY)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for i in range(90):
        member = i < 30
        name = f"images/{'member' if member else 'other'}-{i}.png"
        _picture(rng, member).save(data / name)
        rows.append([name, "template" if member else ""])
    with (data / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "label"], *rows])
    return {"policies": policies, "data": data, "cache": tmp_path / "cache"}


def _env(world: dict[str, Path], model: str) -> dict[str, str]:
    return {
        "WORKER_MODEL__NAME": model,
        "WORKER_CACHE_DIR": str(world["cache"]),
        "WORKER_POLICY_DIR": str(world["policies"]),
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
    }


def _scores(path: Path, category: str) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["image"]: r["scores"][category] for r in rows}


def _served(world: dict[str, Path], model: str, category: str = "template") -> dict[str, float]:
    """`worker classify` of the labelled images: file name -> the category's score."""
    out = world["data"] / "served.jsonl"
    proc = run_cli(
        "classify", str(world["data"] / "images"), "--out", str(out), env=_env(world, model)
    )
    assert proc.returncode == 0, proc.stderr
    served = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["decision"]["action"] for r in served} <= {"allow", "flag"}
    return {
        Path(r["image"]["uri"]).name: r["policies"]["memes"]["scores"][category] for r in served
    }


def test_modality_gap_is_why_exemplars_need_image_backgrounds(
    world: dict[str, Path], gap_model: str
) -> None:
    """On a model with the gap, an exemplar head against a text background scores nearly
    every image above 0.5; against background exemplars, served by `worker classify`, the
    same head ranks the template's members first and leaves the rest low."""
    model = load_model(gap_model, None, device="cpu")
    examples = sorted((world["policies"] / "examples").glob("template-*.png"))
    images = sorted((world["data"] / "images").glob("*.png"))

    def encode(paths: list[Path]) -> torch.Tensor:
        inputs = [model.image_input(Image.open(p).convert("RGB")) for p in paths]
        return model.encode_images(model.batch_pixels(inputs)).float()

    shots, x = encode(examples), encode(images)
    texts = model.encode_texts(["a photo of a white shape."]).float()
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool)
    image_image = (x @ x.T)[off_diagonal].mean().item()
    image_text = (x @ texts.T).mean().item()
    print(f"gap model: mean image-image cosine {image_image:.3f}, image-text {image_text:.3f}")
    assert image_image - image_text > 0.4  # the gap is there, as with real CLIP weights

    head = build_head(shots).unsqueeze(0)
    naive = one_vs_background(x, torch.cat([head, texts]), 1, model.logit_scale)[:, 0]
    others = torch.tensor([not _member(p.name) for p in images])
    naive_flagged = (naive[others] >= 0.5).float().mean().item()
    print(f"against a text background: {naive_flagged:.0%} of non-members score >= 0.5")
    assert naive_flagged > 0.9

    scores = _served(world, gap_model)
    names = sorted(scores)
    truth = [_member(n) for n in names]
    ap = average_precision_score(truth, [scores[n] for n in names])
    flagged = sum(scores[n] >= 0.5 for n in names if not _member(n))
    print(f"against background exemplars (served): AP {ap:.3f}, {flagged}/60 non-members >= 0.5")
    assert ap > 0.9
    assert flagged <= 6


def test_eval_reports_an_exemplar_category_and_another_category_leaves_it_unchanged(
    world: dict[str, Path], gap_model: str
) -> None:
    env = _env(world, gap_model)
    policy = world["policies"] / "memes.yaml"
    args = ["eval", "--data", str(world["data"] / "labels.csv"), "--policy", str(policy)]
    first = run_cli(*args, "--out", str(world["data"] / "e1"), env=env)
    assert first.returncode == 0, first.stderr + first.stdout
    metrics = json.loads((world["data"] / "e1" / "metrics.json").read_text())
    template = {c["id"]: c for c in metrics["categories"]}["template"]
    print(f"exemplar-only category: AP {template['average_precision']:.3f} in worker eval")
    assert (template["support"], template["negatives"]) == (30, 60)
    assert template["average_precision"] > 0.9
    # eval measures what serving scores
    served = _served(world, gap_model)
    measured = _scores(world["data"] / "e1" / "scores.jsonl", "template")
    assert max(abs(served[Path(k).name] - v) for k, v in measured.items()) < 1e-5

    policy.write_text(GROWN_POLICY)
    second = run_cli(*args, "--out", str(world["data"] / "e2"), env=env)
    assert second.returncode == 0, second.stderr + second.stdout
    after = _scores(world["data"] / "e2" / "scores.jsonl", "template")
    assert measured.keys() == after.keys()
    drift = max(abs(measured[k] - after[k]) for k in measured)
    print(f"largest change of a template score after adding two categories: {drift:.2e}")
    assert drift <= 1e-5
    assert "0 encoded, 90 from the cache" in second.stderr


def test_exemplar_files_are_part_of_the_policy_version(
    world: dict[str, Path], gap_model: str
) -> None:
    env = _env(world, gap_model)
    one = world["data"] / "images" / "member-0.png"

    def version() -> str:
        proc = run_cli("classify", str(one), env=env)
        assert proc.returncode == 0, proc.stderr
        return str(json.loads(proc.stdout)["policies"]["memes"]["version"])

    first = version()
    assert version() == first
    _picture(random.Random(99), False).save(world["policies"] / "examples" / "template-4.png")
    assert version() != first


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (
            ("background_exemplars: [ordinary/*.png]\n", ""),
            "missing key 'background_exemplars'",
        ),
        (
            ("exemplars: [examples/template-*.png]", "exemplars: [nothing-*.png]"),
            "'nothing-*.png': the pattern matches no file",
        ),
        (("    exemplars:", "    prompts: [a circle]\n    exemplars:"), "not both"),
    ],
)
def test_exemplar_policy_errors_name_the_fix(
    world: dict[str, Path], gap_model: str, edit: tuple[str, str], fragment: str
) -> None:
    policy = world["policies"] / "memes.yaml"
    policy.write_text(EXEMPLAR_POLICY.replace(*edit))
    image = world["data"] / "images" / "member-0.png"
    proc = run_cli("classify", str(image), env=_env(world, gap_model))
    assert proc.returncode != 0
    assert str(policy) in proc.stderr, proc.stderr
    assert fragment in proc.stderr, proc.stderr


def test_finetune_refuses_an_exemplar_policy_before_loading_the_model(
    world: dict[str, Path], gap_model: str
) -> None:
    policy = world["policies"] / "memes.yaml"
    proc = run_cli(
        "finetune",
        "--data",
        str(world["data"] / "labels.csv"),
        "--policy",
        str(policy),
        "--out",
        str(world["data"] / "tuned"),
        env=_env(world, gap_model),
    )
    assert proc.returncode != 0
    assert "fine-tuning trains against text heads, and template has none" in proc.stderr
    assert "model.loaded" not in proc.stderr


def test_globs_resolve_below_a_policy_folder_whose_path_has_glob_characters(
    tmp_path: Path,
) -> None:
    from worker.materials import expand_ref

    base = tmp_path / "team[1]*" / "policies"
    (base / "examples").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.txt"):
        (base / "examples" / name).write_bytes(b"x")
    found = expand_ref("examples/*.png", base)
    assert found == [
        ("a", str(base / "examples" / "a.png")),
        ("b", str(base / "examples" / "b.png")),
    ]
    absolute = expand_ref(str(base / "examples" / "a.png"), tmp_path)
    assert absolute == [("a", str(base / "examples" / "a.png"))]
