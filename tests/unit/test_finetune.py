"""`worker finetune` on a synthetic domain with a tiny pre-trained CLIP.

The domain: *outlined* shapes on cluttered backgrounds, labelled by colour. The tiny CLIP
was pre-trained on *filled* shapes on plain backgrounds, so its zero-shot accuracy there
is near chance; fine-tuning should lift it well past that.

In-process (typer's CliRunner). A run killed mid-way and resumed needs a real process:
tests/integration/test_finetune_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cli_runner import run_cli
from tests.synthetic import write_finetune_domain, write_shape_set
from worker.engine import DecodeOptions
from worker.errors import DataError
from worker.model import LoadedModel, load_model
from worker.policy import LoadedPolicy, load_policy_file
from worker.settings import Settings
from worker.tuning.embedder import embed_files
from worker.tuning.finetune import FinetuneOptions, FinetuneRun, check_data
from worker.tuning.trainer import TrainConfig, load_trainable, seed_everything

pytestmark = pytest.mark.slow
EPOCHS = ["--epochs", "20", "--lr", "3e-3", "--batch-size", "32", "--patience", "8"]


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_finetune_domain(tmp_path_factory.mktemp("domain"))


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shape_set(
        tmp_path_factory.mktemp("control"), per_class=15, style="filled", label="colour", seed=4
    )


@pytest.fixture
def env(tmp_path: Path, trained_model_name: str) -> dict[str, str]:
    return {
        "WORKER_MODEL__NAME": trained_model_name,
        "WORKER_CACHE_DIR": str(tmp_path / "cache"),
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
    }


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, trained_model_name: str, domain: Path) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "ckpt"
    env = {
        "WORKER_MODEL__NAME": trained_model_name,
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
        "WORKER_CACHE_DIR": str(out.parent / "cache"),
    }
    proc = run_cli("finetune", "--data", str(domain), "--out", str(out), *EPOCHS, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_finetune_beats_zero_shot_by_15_points(tuned: Path) -> None:
    report = json.loads((tuned / "report.json").read_text())
    before = report["zero_shot"]["held_out_acc"]
    after = report["fine_tuned"]["held_out_acc"]
    assert after - before >= 0.15, (before, after)
    text = (tuned / "report.md").read_text()
    assert f"{100 * before:.1f}%" in text
    assert f"{100 * after:.1f}%" in text
    assert len(report["alpha_curve"]) == 11
    assert report["history"]["epochs"][0]["epoch"] == 1
    # --lr and --epochs given: no sweep, the given values used
    assert report["sweep"] == []
    assert (report["config"]["lr"], report["config"]["epochs"]) == (3e-3, 20)
    assert report["recipe"] == {"objective": ["domain loss only"], "lr": "given (--lr)"}
    assert set(report["fine_tuned"]["per_class"]) == {"red", "green", "blue", "yellow", "purple"}
    assert (tuned / "training_curve.png").stat().st_size > 5000
    assert report["throughput"]["train_images_per_s"] > 0


def test_checkpoint_serves_with_a_new_fingerprint(
    tuned: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    report = json.loads((tuned / "report.json").read_text())
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "colours.yaml").write_text(
        "name: colours\nkind: tags\ntemplates: simple\ntop_k: 1\n"
        "tags: [red, green, blue, yellow, purple]\n"
    )
    samples = write_shape_set(
        tmp_path / "samples", per_class=10, style="outline", label="colour", seed=9
    )
    correct = {}
    for name in (env["WORKER_MODEL__NAME"], f"local-dir:{tuned}"):
        served = {**env, "WORKER_MODEL__NAME": name, "WORKER_POLICY_DIR": str(policies)}
        proc = run_cli("classify", str(samples.parent / "images"), env=served)
        assert proc.returncode == 0, proc.stderr[-2000:]
        docs = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(docs) == 50
        assert all(d["model"]["name"] == name for d in docs)
        hits = [Path(d["image"]["uri"]).name.split("-")[1] == d["labels"][0] for d in docs]
        correct[name] = sum(hits)
    assert {d["model"]["fingerprint"] for d in docs} == {report["fingerprint"]}
    assert report["fingerprint"] != report["base_model"]["fingerprint"]
    # the served model does the domain task: 50 unseen domain images, base vs tuned
    assert correct[f"local-dir:{tuned}"] >= correct[env["WORKER_MODEL__NAME"]] + 8, correct


@pytest.fixture
def colours_policy(tmp_path: Path) -> LoadedPolicy:
    path = tmp_path / "colours.yaml"
    path.write_text("name: colours\nkind: tags\ntags: [red, green, blue, yellow, purple]\n")
    return load_policy_file(path)[0]


def test_bad_data_is_reported_before_training(
    tmp_path: Path, domain: Path, colours_policy: LoadedPolicy
) -> None:
    root = domain.parent
    good = domain.read_text().splitlines()[1:]
    no_purple = [r for r in good if not r.endswith(",purple")]
    purple = [r.rsplit(",", 1)[0] for r in good if r.endswith(",purple")]
    (root / "images" / "garbage.png").write_bytes(b"not a png at all")
    cases = {
        "missing file": ([*good, "images/nope.png,red,train"], "missing file: "),
        "unreadable image": (
            [*good, "images/garbage.png,red,train"],
            "unreadable image",
        ),
        "unknown label": (
            [*good, f"{purple[0]},magenta,train"],
            "unknown label 'magenta' (1 image(s))",
        ),
        "too few": (
            [*no_purple, *(f"{p},purple,train" for p in purple[:3]), f"{purple[3]},purple,val"],
            "class 'purple' has 3 image(s) in the train split; at least 5 are needed",
        ),
        "empty class": (
            [*no_purple, *(f"{p},purple,val" for p in purple[:4])],
            "class 'purple' has no images in the train split",
        ),
    }
    for name, (rows, message) in cases.items():
        data = root / f"{name.replace(' ', '-')}.csv"
        data.write_text("image,label,split\n" + "\n".join(rows) + "\n")
        opts = FinetuneOptions(data=data, out=tmp_path / "out", policy=colours_policy)
        with pytest.raises(DataError) as info:
            check_data(opts)
        found = [p for p in info.value.problems if message in p]
        assert found, (name, info.value.problems)
        if name in {"missing file", "unreadable image"}:  # names the CSV line and the file
            assert f"{data}:{len(rows) + 1}:" in found[0]
            assert ("nope.png" if name == "missing file" else "garbage.png") in found[0]
    folders = tmp_path / "folders"
    for colour in ("red", "green"):
        (folders / colour).mkdir(parents=True)
    (folders / "red" / "a.png").write_bytes(next((root / "images").glob("*.png")).read_bytes())
    with pytest.raises(DataError, match="green: empty class folder"):
        check_data(FinetuneOptions(data=folders, out=tmp_path / "out"))


def test_bad_data_exits_before_the_model_loads(
    tmp_path: Path, env: dict[str, str], domain: Path
) -> None:
    rows = domain.read_text().splitlines()
    data = domain.parent / "with-missing.csv"
    data.write_text("\n".join([*rows, "images/nowhere.png,red"]) + "\n")
    proc = run_cli("finetune", "--data", str(data), "--out", str(tmp_path / "out"), env=env)
    assert proc.returncode == 1
    assert f"{data}:{len(rows) + 1}: missing file" in proc.stderr
    assert "model.loaded" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_lp_ft_method_runs_and_reports(tmp_path: Path, env: dict[str, str], domain: Path) -> None:
    out = tmp_path / "lpft"
    proc = run_cli(
        "finetune",
        "--data",
        str(domain),
        "--out",
        str(out),
        "--method",
        "lp-ft",
        "--epochs",
        "2",
        "--lp-epochs",
        "2",
        "--lr",
        "1e-3",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "lp-ft"
    assert [e["epoch"] for e in report["history"]["epochs"]] == [1, 2]
    assert (out / "open_clip_model.safetensors").is_file()


def test_reference_images_hold_the_base_embeddings(
    tmp_path: Path,
    env: dict[str, str],
    trained_model_name: str,
    domain: Path,
    control: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--reference DIR`` (unlabelled everyday images) anchors feature distillation when
    no control set is given: after the same training (same seed, data and epochs; the
    last epoch kept, no WiSE-FT, so nothing chosen on validation differs), the tuned
    model's embeddings of other everyday images stay closer to the base model's."""
    reference = control.parent / "images"
    args = ["--data", str(domain), "--lr", "3e-3", "--epochs", "2", "--reference", str(reference)]
    proc = run_cli("finetune", *args, "--out", str(tmp_path / "cli"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["recipe"]["objective"] == [
        "feature distillation to the base model on reference images"
    ]
    assert report["control"] is None
    assert "No `--control` set was given" in (tmp_path / "cli" / "report.md").read_text()

    unseen = write_shape_set(
        tmp_path / "unseen", per_class=8, style="filled", label="colour", seed=7
    )
    images = sorted((unseen.parent / "images").glob("*.png"))
    kept = {}
    for distill in (0.0, 5.0):
        model = load_model(trained_model_name, None, device="cpu")
        base = embeddings(model, images)
        config = TrainConfig(lr=3e-3, epochs=4, patience=10, distill=distill)
        opts = FinetuneOptions(data=domain, out=tmp_path / str(distill), reference=reference)
        data, _, labels = check_data(opts)
        run = FinetuneRun(Settings(), model, opts, data, None, labels, {})
        monkeypatch.setattr(run, "rank", lambda record: (record["epoch"],))  # the last epoch
        seed_everything(0)
        load_trainable(model.model, run.trainer(config, None).fit())
        kept[distill] = float((base * embeddings(model, images)).sum(-1).mean())
    assert kept[5.0] > kept[0.0], kept  # mean cosine to the base model's embeddings


def embeddings(model: LoadedModel, images: list[Path]) -> torch.Tensor:
    options = DecodeOptions.from_settings(Settings().image, model)
    return embed_files(model, images, None, options).embeddings
