"""`worker eval` decodes, preprocesses and pools an image exactly as `worker classify` does.

Both commands run through the CLI with the same environment on the same files, and eval's
per-image scores (``scores.jsonl``) are compared with classify's results. The JPEGs are
300-500 px, so JPEG draft mode (the tiny model's input is 64 px) changes the decode: the
old eval path (no draft, first frame only) is measured too, and must give different scores,
so the comparison cannot pass by accident. An animated GIF's frames are pooled like
serving's; the embedding cache is keyed by the decode.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from torch.nn.functional import normalize

from tests.cli_runner import run_cli
from tests.helpers import image_bytes
from tests.synthetic import COLOURS, SHAPES, render
from tests.synthetic import COLOURS_POLICY as POLICY
from worker.documents import ImageRef
from worker.embedding_cache import EmbeddingCache
from worker.engine import DecodeOptions, WorkItem
from worker.errors import JobError
from worker.model import LoadedModel
from worker.runtime import build_engine
from worker.settings import Settings
from worker.tuning.embedder import decode_like_serving, embed_files

CLASSES = ("red", "blue", "green")
JPEGS = 80
Scores = dict[str, dict[str, float]]  # file name -> class -> score


def noisy_shape(rng: random.Random, colour: str, size: int) -> Image.Image:
    """A filled shape under heavy noise: the trained tiny model ranks these imperfectly, so
    a small change of decode moves average precision."""
    img = render(rng.choice(SHAPES), colour, rng, size=size, style="filled")
    noise = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (size, size, 3))
    return Image.blend(img, Image.fromarray(noise.astype(np.uint8)), 0.7)


def write_csv(root: Path, rows: list[tuple[str, str]]) -> Path:
    path = root / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    return path


def gif_frames() -> list[Image.Image]:
    """Five frames: nothing, green, red, green, blue. With max_frames 3 the frames scored
    are 0, 2 and 4, so green stays low unless every frame is scored."""
    rng = random.Random(7)
    plan = [("circle", "yellow"), ("square", "green"), ("triangle", "red")]
    plan += [("star", "green"), ("circle", "blue")]
    return [
        render(shape, colour, rng, size=64).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        for shape, colour in plan
    ]


def pillow_frames(data: bytes) -> list[Image.Image]:
    """Every frame of an animation as Pillow draws it, in RGB."""
    img = Image.open(io.BytesIO(data))
    out = []
    for index in range(getattr(img, "n_frames", 1)):
        img.seek(index)
        out.append(img.convert("RGB"))
    return out


def eval_run(env: dict[str, str], data: Path, out: Path, **image: str) -> dict[str, Any]:
    """`worker eval` with ``WORKER_IMAGE__*`` overrides: metrics.json plus its scores."""
    extra = {f"WORKER_IMAGE__{k.upper()}": v for k, v in image.items()}
    proc = run_cli(
        "eval", "--data", str(data), "--policy", "colours", "--out", str(out), env=env | extra
    )
    assert proc.returncode == 0, proc.stderr
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    metrics["scores"] = {Path(line["image"]).name: line["scores"] for line in lines}
    metrics["labels"] = {Path(line["image"]).name: line["labels"] for line in lines}
    return metrics


def classify_run(env: dict[str, str], images: Path, out: Path, **image: str) -> dict[str, Any]:
    """`worker classify` of every file under ``images``: each file's result document."""
    extra = {f"WORKER_IMAGE__{k.upper()}": v for k, v in image.items()}
    proc = run_cli(
        "classify", str(images), "--policy", "colours", "--out", str(out), env=env | extra
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["status"] == "ok" for r in results), results
    return {Path(r["image"]["uri"]).name: r for r in results}


def scores_of(results: dict[str, Any]) -> Scores:
    return {name: r["policies"]["colours"]["scores"] for name, r in results.items()}


def largest_gap(a: Scores, b: Scores, names: list[str]) -> float:
    return max(abs(a[n][c] - b[n][c]) for n in names for c in CLASSES)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, trained_model_name: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("one-path")
    policies = root / "policies"
    policies.mkdir()
    (policies / "colours.yaml").write_text(POLICY)
    return {
        "WORKER_MODEL__NAME": trained_model_name,
        "WORKER_CACHE_DIR": str(root / "cache"),
        "WORKER_POLICY_DIR": str(policies),
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
    }


@dataclass(frozen=True)
class JpegRuns:
    names: list[str]
    old: dict[str, Any]  # eval without draft mode: the old eval path's decode
    new: dict[str, Any]  # eval with the serving settings (draft mode on), cache from `old`
    again: dict[str, Any]  # the same eval once more
    classify: Scores


@pytest.fixture(scope="module")
def jpeg_runs(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> JpegRuns:
    root = tmp_path_factory.mktemp("jpegs")
    (root / "images").mkdir()
    rng = random.Random(2)
    rows = []
    for i in range(JPEGS):
        colour = list(COLOURS)[i % len(COLOURS)]
        name = f"{i:03d}-{colour}.jpg"
        noisy_shape(rng, colour, rng.randint(300, 500)).save(root / "images" / name, quality=90)
        rows.append((f"images/{name}", colour if colour in CLASSES else ""))
    data = write_csv(root, rows)
    old = eval_run(env, data, root / "old", jpeg_draft="false")
    new = eval_run(env, data, root / "new")
    again = eval_run(env, data, root / "again")
    classify = classify_run(env, root / "images", root / "results.jsonl")
    names = [Path(image).name for image, _ in rows]
    return JpegRuns(names, old, new, again, scores_of(classify))


@dataclass(frozen=True)
class MixedRuns:
    eval: dict[str, Any]
    classify: dict[str, Any]
    stills: list[str]  # PNG and WebP files
    frames: list[str]  # the GIF's frames saved as PNG stills, in order


@pytest.fixture(scope="module")
def mixed_runs(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> MixedRuns:
    """PNG and WebP stills, an animated GIF and its frames as stills, with max_frames 3."""
    root = tmp_path_factory.mktemp("mixed")
    images = root / "images"
    images.mkdir()
    rng = random.Random(3)
    rows, stills = [], []
    for i, colour in enumerate(["red", "blue", "green", "yellow"] * 2):
        fmt, suffix = ("PNG", "png") if i % 2 == 0 else ("WEBP", "webp")
        name = f"still-{i}.{suffix}"
        noisy_shape(rng, colour, rng.randint(90, 300)).save(images / name, fmt)
        rows.append((f"images/{name}", colour if colour in CLASSES else ""))
        stills.append(name)
    frames = gif_frames()
    gif = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    (images / "anim.gif").write_bytes(gif)
    rows.append(("images/anim.gif", "red;blue;green"))
    frame_names = []
    for index, frame in enumerate(pillow_frames(gif)):
        frame_names.append(f"frame-{index}.png")
        frame.save(images / frame_names[-1])
        rows.append((f"images/{frame_names[-1]}", ""))
    data = write_csv(root, rows)
    evaluated = eval_run(env, data, root / "eval", max_frames="3")
    classified = classify_run(env, images, root / "results.jsonl", max_frames="3")
    return MixedRuns(evaluated, classified, stills, frame_names)


# ---------------------------------------------------------------------------- eval == classify


def test_eval_scores_are_classify_scores_for_jpeg_png_and_webp(
    jpeg_runs: JpegRuns, mixed_runs: MixedRuns
) -> None:
    names = jpeg_runs.names
    # Precondition: the old eval decode (no draft mode) scores these JPEGs differently.
    old_gap = largest_gap(jpeg_runs.old["scores"], jpeg_runs.classify, names)
    assert old_gap > 1e-3, old_gap
    assert largest_gap(jpeg_runs.new["scores"], jpeg_runs.classify, names) < 1e-5
    stills = mixed_runs.stills
    assert {Path(n).suffix for n in stills} == {".png", ".webp"}
    assert largest_gap(mixed_runs.eval["scores"], scores_of(mixed_runs.classify), stills) < 1e-5
    assert mixed_runs.eval["labels"]["still-0.png"] == ["red"]


def test_eval_average_precision_is_that_of_classify_scores(jpeg_runs: JpegRuns) -> None:
    names = jpeg_runs.names
    labels = jpeg_runs.new["labels"]
    gaps, old_gaps = {}, {}
    for category in jpeg_runs.new["categories"]:
        cls = category["id"]
        truth = [cls in labels[n] for n in names]
        reference = average_precision_score(truth, [jpeg_runs.classify[n][cls] for n in names])
        gaps[cls] = abs(category["average_precision"] - reference)
        old = next(c for c in jpeg_runs.old["categories"] if c["id"] == cls)
        old_gaps[cls] = abs(old["average_precision"] - reference)
    assert set(gaps) == set(CLASSES)
    assert max(old_gaps.values()) > 1e-3, old_gaps  # the old decode measured another AP
    assert max(gaps.values()) < 1e-3, gaps


def test_an_animated_gif_is_pooled_as_classify_pools_it(mixed_runs: MixedRuns) -> None:
    classified = mixed_runs.classify["anim.gif"]
    assert classified["image"]["frame_indices"] == [0, 2, 4]  # WORKER_IMAGE__MAX_FRAMES=3
    served = classified["policies"]["colours"]["scores"]
    evaluated = mixed_runs.eval["scores"]["anim.gif"]
    assert max(abs(evaluated[c] - served[c]) for c in CLASSES) < 1e-5
    # Preconditions: the pooled scores are the maximum over frames 0, 2 and 4, which is
    # neither the first frame alone (the old eval) nor the maximum over every frame.
    frames = scores_of(mixed_runs.classify)
    per_frame = [frames[name] for name in mixed_runs.frames]
    for cls in CLASSES:
        assert served[cls] == pytest.approx(max(per_frame[i][cls] for i in (0, 2, 4)), abs=1e-5)
    assert max(served[c] - per_frame[0][c] for c in CLASSES) > 1e-3
    assert max(f["green"] for f in per_frame) - served["green"] > 1e-3


# ---------------------------------------------------------------------------- the cache


def test_cached_embeddings_are_reused_only_for_the_same_decode(jpeg_runs: JpegRuns) -> None:
    assert jpeg_runs.old["timings"]["encoded"] == JPEGS
    # The cache the draft-less run filled is not used for draft-mode decodes...
    assert jpeg_runs.new["timings"]["encoded"] == JPEGS
    assert jpeg_runs.new["timings"]["cached"] == 0
    # ...and a run with the same settings encodes nothing and scores the same.
    assert jpeg_runs.again["timings"]["encoded"] == 0
    assert jpeg_runs.again["timings"]["cached"] == JPEGS
    assert jpeg_runs.again["scores"] == jpeg_runs.new["scores"]


def gif_and_png(root: Path) -> list[Path]:
    frames = gif_frames()
    paths = [root / "anim.gif", root / "still.png"]
    paths[0].write_bytes(
        image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    )
    frames[2].convert("RGB").save(paths[1])
    return paths


def test_embed_files_gives_every_frame_and_ignores_old_cache_entries(
    tmp_path: Path, tiny_model: LoadedModel
) -> None:
    paths = gif_and_png(tmp_path)
    cache = EmbeddingCache(tmp_path / "cache.sqlite3", tiny_model.fingerprint, kind="image")
    try:
        # What the old first-frame path stored: a vector keyed by the bare sha256.
        stale = {hashlib.sha256(p.read_bytes()).hexdigest(): torch.ones(4) for p in paths}
        cache.put_many(stale)
        options = DecodeOptions(
            max_pixels=64_000_000,
            allowed_formats=frozenset({"GIF", "PNG"}),
            draft_size=tiny_model.image_size,
            max_frames=3,
        )
        first = embed_files(tiny_model, paths, cache, options)
        second = embed_files(tiny_model, paths, cache, options)
    finally:
        cache.close()
    assert (first.encoded, first.cached) == (2, 0)
    assert (second.encoded, second.cached) == (0, 2)
    assert first.spans == second.spans == [(0, 3), (3, 4)]
    assert torch.equal(first.embeddings, second.embeddings)
    means = first.per_file_mean()
    assert means.shape == (2, first.embeddings.shape[1])
    assert torch.equal(means[1], first.embeddings[3])  # a still's row unchanged
    assert torch.allclose(means[0], normalize(first.embeddings[0:3].mean(0), dim=0))
    assert means.norm(dim=1).sub(1).abs().max() < 1e-5


# ---------------------------------------------------------------------------- one decoder


def test_decode_like_serving_gives_the_pictures_the_engine_preprocesses(
    tiny_model: LoadedModel, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(image={"max_frames": 3})
    rng = random.Random(1)
    jpeg = image_bytes(noisy_shape(rng, "red", 400), "JPEG", quality=90)
    frames = gif_frames()
    gif = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    engine = build_engine(settings, model=tiny_model)
    try:
        assert engine.decode_options() == DecodeOptions.from_settings(settings.image, tiny_model)
        for data in (jpeg, gif):
            prepared = engine.prepare(WorkItem("j", ImageRef(data=base64.b64encode(data).decode())))
            assert prepared.error is None
            pictures = decode_like_serving(data, settings, tiny_model)
            assert len(pictures) == len(prepared.frames)
            for picture, served in zip(pictures, prepared.frames, strict=True):
                assert picture.mode == "RGB"
                assert np.array_equal(np.asarray(tiny_model.image_input(picture)), served)
    finally:
        engine.close()
    assert decode_like_serving(jpeg, settings, tiny_model)[0].size == (100, 100)  # 1/4 scale
    no_draft = make_settings(image={"jpeg_draft": False})
    assert decode_like_serving(jpeg, no_draft, tiny_model)[0].size == (400, 400)
    with pytest.raises(JobError) as caught:
        decode_like_serving(b"not an image", settings, tiny_model)
    assert caught.value.code == "image_unreadable"
