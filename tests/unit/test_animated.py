"""Animated GIF/WebP/APNG: up to max_frames frames scored, within the pixel budget.

The flagged content sits in the second frame of an animation whose first frame is
innocuous. The threshold is picked from the tiny (untrained) model's own scores of the
two pictures, and both are checked as still images first, so a test cannot pass by
accident: the first frame alone is not flagged, the second alone is.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from PIL import Image, ImageFile

from tests.cli_runner import run_cli
from tests.helpers import COLOURS, SHAPES, image_bytes, shape_image, write_policy
from worker.animation import (
    MAX_ANIMATION_FRAMES,
    decode_frames,
    gif_frame_count,
    png_frame_count,
    spread_frames,
)
from worker.documents import SCHEMA_FILES, ImageRef, ModerationResult, Result, TagsResult
from worker.engine import Engine, WorkItem
from worker.errors import ImageError
from worker.images import decode_image
from worker.model import LoadedModel
from worker.policy.compiled import Observed
from worker.policy.moderation import CompiledModeration
from worker.policy.tags import CompiledTags
from worker.runtime import build_engine
from worker.settings import ImageSettings, Settings

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
FORMATS = ["JPEG", "PNG", "WEBP", "GIF"]
SIZE = 64

ANIM_POLICY = """\
name: anim
kind: moderation
templates: simple
background:
  - a blank white page
  - a photo of nothing
categories:
  - id: red
    prompts: [a red shape]
    threshold: {threshold}
    action: block
    severity: high
---
name: anim-tags
kind: tags
templates: simple
top_k: 4
tags: [circle, square, triangle, {{id: red, prompts: [red, crimson]}}]
"""


# ---------------------------------------------------------------------------- makers


def palette_frame(shape: str, colour: str, seed: int) -> Image.Image:
    """A shape picture in P mode: GIF stores it exactly (two colours)."""
    return shape_image(shape, colour, size=SIZE, seed=seed).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=16
    )


def animation(frames: Sequence[Image.Image], fmt: str) -> bytes:
    """An animated ``fmt`` file of ``frames`` (lossless, so frames decode exactly)."""
    first, rest = frames[0], list(frames[1:])
    if fmt == "GIF":
        return image_bytes(first, "GIF", save_all=True, append_images=rest, duration=100)
    rgb = [f.convert("RGB") for f in frames]
    extra: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    return image_bytes(rgb[0], fmt, save_all=True, append_images=rgb[1:], **extra)


def decoded_frames_of(data: bytes) -> list[Image.Image]:
    """Every frame of an animation as Pillow draws it (RGB), independent of worker.images."""
    img = Image.open(io.BytesIO(data))
    frames = []
    for index in range(getattr(img, "n_frames", 1)):
        img.seek(index)
        frames.append(img.convert("RGB"))
    return frames


def numbered_gif(count: int, size: int = 8) -> bytes:
    """A GIF of ``count`` distinct tiny frames (the frame number is in its pixels)."""
    frames = []
    for i in range(count):
        frame = Image.new("P", (size, size), 0)
        frame.putpalette([v for n in range(256) for v in (n, 255 - n, (n * 7) % 256)])
        frame.putpixel((0, 0), i % 256)
        frame.putpixel((1, 0), i // 256)
        frames.append(frame)
    return image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20)


def numbered_webp(count: int, size: int = 8) -> bytes:
    frames = [Image.new("RGB", (size, size), (i % 256, i // 256, 9)) for i in range(count)]
    return image_bytes(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_actl_frames(data: bytes, claimed: int) -> bytes:
    """An APNG whose acTL claims ``claimed`` frames, whatever it holds."""
    at = data.index(b"acTL") - 4
    plays = data[at + 12 : at + 16]
    return data[:at] + _chunk(b"acTL", struct.pack(">I", claimed) + plays) + data[at + 20 :]


@dataclass(frozen=True)
class Scene:
    """An innocuous and a flagged picture for the tiny model, and the threshold between."""

    innocuous: Image.Image  # P mode
    flagged: Image.Image
    third: Image.Image  # another picture, for three-frame animations
    threshold: float
    policy_dir: Path
    cache_dir: Path


@pytest.fixture(scope="module")
def scene(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: LoadedModel, tiny_model_name: str
) -> Scene:
    """Scores candidate stills for category ``red`` and puts the threshold between the
    lowest and the highest."""
    root = tmp_path_factory.mktemp("animated")
    policy_dir = root / "policies"
    write_policy(policy_dir, ANIM_POLICY.format(threshold=0.5), "anim.yaml")
    settings = Settings(
        model={"name": tiny_model_name, "pretrained": ""},
        cache_dir=root / "cache",
        policy_dir=policy_dir,
        device="cpu",
        decode_workers=2,
    )
    candidates = [
        palette_frame(shape, colour, seed)
        for seed, (shape, colour) in enumerate(
            (shape, colour) for shape in SHAPES for colour in COLOURS
        )
    ]
    engine = build_engine(settings, model=tiny_model)
    try:
        results = engine.process([still_item(f"c{i}", c) for i, c in enumerate(candidates)])
    finally:
        engine.close()
    scores = [moderation(r).scores["red"] for r in results]
    low = min(range(len(scores)), key=scores.__getitem__)
    high = max(range(len(scores)), key=scores.__getitem__)
    assert scores[high] - scores[low] > 1e-3, scores
    third = next(i for i in range(len(scores)) if i not in (low, high))
    threshold = round((scores[low] + scores[high]) / 2, 6)
    write_policy(policy_dir, ANIM_POLICY.format(threshold=threshold), "anim.yaml")
    return Scene(
        candidates[low], candidates[high], candidates[third], threshold, policy_dir, root / "cache"
    )


@pytest.fixture
def make_engine(
    scene: Scene, tiny_model: LoadedModel, tiny_model_name: str
) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**image: Any) -> Engine:
        settings = Settings(
            model={"name": tiny_model_name, "pretrained": ""},
            cache_dir=scene.cache_dir,
            policy_dir=scene.policy_dir,
            device="cpu",
            decode_workers=2,
            image=image,
        )
        engine = build_engine(settings, model=tiny_model)
        # worker/runtime.py's build_engine does not pass the setting on yet (see
        # test_build_engine_passes_max_frames); the engine's own knob is the same thing.
        engine.max_frames = settings.image.max_frames
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def still_item(job_id: str, img: Image.Image, fmt: str = "PNG") -> WorkItem:
    data = image_bytes(img.convert("RGB"), fmt)
    return WorkItem(job_id=job_id, image=ImageRef(data=base64.b64encode(data).decode()))


def data_item(job_id: str, data: bytes) -> WorkItem:
    return WorkItem(job_id=job_id, image=ImageRef(data=base64.b64encode(data).decode()))


def moderation(result: Result) -> ModerationResult:
    assert result.status == "ok", result.error
    section = result.policies["anim"]
    assert isinstance(section, ModerationResult)
    return section


def tags_of(result: Result) -> dict[str, float]:
    section = result.policies["anim-tags"]
    assert isinstance(section, TagsResult)
    return {t.tag: t.score for t in section.tags}


@pytest.fixture
def decoded_pixels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The canvas pixels of every frame Pillow decodes while it is active."""
    counted: list[int] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> Any:
        if self.tile:
            counted.append(self.size[0] * self.size[1])
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return counted


# ---------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_content_in_the_second_frame_is_flagged_and_named(
    fmt: str, scene: Scene, make_engine: Callable[..., Engine]
) -> None:
    data = animation([scene.innocuous, scene.flagged], fmt)
    first, second = decoded_frames_of(data)
    assert first.tobytes() == scene.innocuous.convert("RGB").tobytes()
    assert second.tobytes() == scene.flagged.convert("RGB").tobytes()
    engine = make_engine()
    alone_first, alone_second, anim = engine.process(
        [still_item("first", first), still_item("second", second), data_item("anim", data)]
    )
    # Preconditions: each frame as a still image.
    assert moderation(alone_first).flags == []
    assert [f.category for f in moderation(alone_second).flags] == ["red"]
    # The animation is flagged, by frame 1.
    assert anim.status == "ok"
    assert [(f.category, f.frame) for f in anim.flags] == [("red", 1)]
    assert moderation(anim).flags == anim.flags
    assert anim.image.format == fmt
    assert (anim.image.frames_scored, anim.image.frames_total) == (2, 2)
    assert anim.image.frame_indices == [0, 1]
    assert moderation(anim).scores["red"] == pytest.approx(
        moderation(alone_second).scores["red"], abs=2e-6
    )


def test_classify_flags_the_second_frame(
    scene: Scene, tmp_path: Path, worker_env: dict[str, str], policy_dir: Path
) -> None:
    write_policy(policy_dir, ANIM_POLICY.format(threshold=scene.threshold), "anim.yaml")
    for fmt in ("GIF", "WEBP"):
        path = tmp_path / f"anim.{fmt.lower()}"
        path.write_bytes(animation([scene.innocuous, scene.flagged], fmt))
    proc = run_cli(
        "classify", str(tmp_path / "anim.gif"), str(tmp_path / "anim.webp"), "--policy", "anim",
        env=worker_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    schema = json.loads((SCHEMAS / SCHEMA_FILES["result"]).read_text())
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == 2
    for doc in docs:
        jsonschema.validate(doc, schema)
        assert doc["image"]["frames_scored"] == 2
        assert [(f["category"], f["frame"]) for f in doc["flags"]] == [("red", 1)]


def test_max_frames_1_scores_the_first_frame_only(
    scene: Scene, make_engine: Callable[..., Engine]
) -> None:
    data = animation([scene.innocuous, scene.flagged], "GIF")
    engine = make_engine(max_frames=1)
    anim, first = engine.process([data_item("anim", data), still_item("first", scene.innocuous)])
    assert anim.status == "ok"
    assert anim.flags == []  # the old behaviour: frame 1 is never looked at
    assert (anim.image.frames_scored, anim.image.frames_total) == (1, 2)
    assert anim.image.frame_indices == [0]
    # ... and the first frame scores exactly as that picture does alone.
    assert anim.policies == first.policies


def test_frames_scored_is_reported_and_bounded_by_max_frames(
    scene: Scene, make_engine: Callable[..., Engine]
) -> None:
    frames = [scene.innocuous, scene.third] * 6 + [scene.flagged]  # 13 frames, flagged last
    data = animation(frames, "GIF")
    result = make_engine(max_frames=4).process([data_item("anim", data)])[0]
    assert result.image.frames_scored == 4
    assert result.image.frames_total == 13
    assert result.image.frame_indices == [0, 4, 8, 12]  # spread evenly, first and last
    assert [(f.category, f.frame) for f in result.flags] == [("red", 12)]


def test_tags_are_the_mean_over_frames_and_categories_the_max(
    scene: Scene, make_engine: Callable[..., Engine]
) -> None:
    frames = [scene.innocuous, scene.flagged, scene.third]
    data = animation(frames, "GIF")
    engine = make_engine()
    result = engine.process([data_item("anim", data)])[0]
    assert result.image.frame_indices == [0, 1, 2]
    model = engine.model
    per_frame = []
    for frame in decoded_frames_of(data):  # each frame scored as a still image, alone
        still = decode_image(image_bytes(frame, "PNG"), max_pixels=10**6, allowed_formats=FORMATS)
        per_frame.append(model.encode_images(model.batch_pixels([model.image_input(still.image)])))
    tags = engine.policies.compiled["anim-tags"]
    mod = engine.policies.compiled["anim"]
    assert isinstance(tags, CompiledTags)
    assert isinstance(mod, CompiledModeration)
    tag_rows = [tags.scores(e, model.logit_scale)[0].tolist() for e in per_frame]
    mean = [sum(column) / len(tag_rows) for column in zip(*tag_rows, strict=True)]
    expected = dict(tags.top(mean))
    got = tags_of(result)
    assert list(got) == list(expected)  # top_k on the mean, best first
    for tag, score in expected.items():
        assert got[tag] == pytest.approx(score, abs=1e-6)
    red = [mod.scores(e, model.logit_scale)[0, 0].item() for e in per_frame]
    assert moderation(result).scores["red"] == pytest.approx(max(red), abs=2e-6)
    assert [f.frame for f in result.flags] == [max(range(3), key=red.__getitem__)]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_still_images_score_exactly_as_before(fmt: str, make_engine: Callable[..., Engine]) -> None:
    img = shape_image("circle", "red", size=300 if fmt == "JPEG" else 96, seed=3)
    other = shape_image("square", "blue", size=96, seed=4)
    engine = make_engine()
    batch = [image_bytes(img, fmt), image_bytes(other, "PNG")]
    results = engine.process([data_item(f"s{i}", d) for i, d in enumerate(batch)])
    # The engine's path before animations: decode_image (JPEG draft included), one
    # model input per image, one encoder call, each policy's section of its row.
    model = engine.model
    pixels = []
    for data in batch:
        decoded = decode_image(
            data,
            max_pixels=engine.max_pixels,
            allowed_formats=engine.allowed_formats,
            draft_size=model.image_size,
            max_side=engine.max_side,
            max_aspect_ratio=engine.max_aspect_ratio,
        )
        pixels.append(model.image_input(decoded.image))
    embeddings = model.encode_images(model.batch_pixels(pixels))
    for row, result in enumerate(results):
        assert result.status == "ok"
        seen = Observed(embeddings[row : row + 1], model.logit_scale)
        expected = {
            name: compiled.section(
                compiled.scores(embeddings, model.logit_scale).tolist()[row], observed=seen
            )
            for name, compiled in engine.policies.compiled.items()
        }
        assert result.policies == {name: s.body for name, s in expected.items()}  # bit for bit
        assert result.image.frames_scored is None
        assert result.image.frames_total is None
        assert result.image.frame_indices is None
        assert all(f.frame is None for f in result.flags)


def test_every_frame_is_encoded_in_the_batch_forward_pass(
    scene: Scene, make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    calls: list[int] = []
    original = engine.model.encode_images

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return original(pixels)

    monkeypatch.setattr(engine.model, "encode_images", counting)
    items = [
        still_item("a", scene.third),
        data_item("gif", animation([scene.innocuous, scene.flagged, scene.third], "GIF")),
        data_item("webp", animation([scene.innocuous, scene.flagged], "WEBP")),
        still_item("b", scene.flagged),
    ]
    results = engine.process(items)
    assert calls == [1 + 3 + 2 + 1]
    assert [r.image.frames_scored for r in results] == [None, 3, 2, None]


# ---------------------------------------------------------------------------- the pixel budget


def test_frames_over_the_budget_are_not_decoded(
    make_engine: Callable[..., Engine], decoded_pixels: list[int]
) -> None:
    data = numbered_gif(20, size=50)
    budget = 50 * 50 * 5  # five canvases
    result = make_engine(max_pixels=budget).process([data_item("anim", data)])[0]
    assert result.status == "ok"
    assert result.image.frames_total == 20
    assert result.image.frames_scored == 5
    assert result.image.frame_indices == [0, 1, 2, 3, 4]
    assert sum(decoded_pixels) <= budget
    decoded_pixels.clear()
    frames = decode_frames(data, max_pixels=budget, allowed_formats=FORMATS)
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert frames.pixels_decoded == sum(decoded_pixels) <= budget


def test_a_frame_over_the_budget_is_refused(make_engine: Callable[..., Engine]) -> None:
    data = numbered_gif(3, size=50)
    result = make_engine(max_pixels=50 * 50 - 1).process([data_item("anim", data)])[0]
    assert result.error is not None
    assert result.error.code == "image_too_large"


def test_a_frame_that_grows_the_canvas_past_a_cap_is_refused_before_decoding(
    decoded_pixels: list[int],
) -> None:
    base = Image.new("P", (20, 20), 0)
    base.putpalette([v for n in range(256) for v in (n, n, n)])
    changed = base.copy()
    changed.paste(200, (5, 5, 10, 10))
    data = image_bytes(base, "GIF", save_all=True, append_images=[changed])
    descriptor = b"\x2c" + struct.pack("<HHHH", 5, 5, 5, 5)
    at = data.index(descriptor)
    grown = data[:at] + b"\x2c" + struct.pack("<HHHH", 3000, 5, 5, 5) + data[at + 9 :]
    frames = decode_frames(grown, max_pixels=20 * 20 * 8, allowed_formats=FORMATS)
    with pytest.raises(ImageError) as info:
        list(frames)
    assert info.value.code == "image_too_large"
    assert decoded_pixels == [20 * 20]  # the first frame only


@pytest.mark.parametrize("make", [numbered_gif, numbered_webp], ids=["GIF", "WEBP"])
def test_two_thousand_frames_cost_at_most_the_frame_cap(
    make: Callable[[int], bytes],
    make_engine: Callable[..., Engine],
    decoded_pixels: list[int],
) -> None:
    data = make(2000)
    result = make_engine().process([data_item("anim", data)])[0]
    assert result.status == "ok"
    assert result.image.frames_scored == ImageSettings().max_frames
    indices = result.image.frame_indices or []
    assert indices[0] == 0
    assert indices[-1] == MAX_ANIMATION_FRAMES - 1
    # GIF frames are counted only up to the cap; WebP's demuxer knows its count.
    assert result.image.frames_total == (None if make is numbered_gif else 2000)
    # Pillow decodes each GIF frame it passes through (at most the cap); libwebp decodes
    # up to the frame asked for, the last index above.
    assert len(decoded_pixels) <= MAX_ANIMATION_FRAMES
    assert gif_frame_count(numbered_gif(2000)) is None
    assert gif_frame_count(numbered_gif(2000), limit=5000) == 2000


def test_an_apng_claiming_100000_frames_is_held_to_the_frames_it_has() -> None:
    frames = [Image.new("RGB", (16, 16), (i * 80, 0, 0)) for i in range(3)]
    data = with_actl_frames(animation(frames, "PNG"), 100_000)
    assert png_frame_count(data) == 3
    decoded = decode_frames(data, max_pixels=10**6, allowed_formats=FORMATS)
    assert decoded.frames_total == 3
    got = [(f.index, f.image.getpixel((0, 0))) for f in decoded]
    assert got == [(0, (0, 0, 0)), (1, (80, 0, 0)), (2, (160, 0, 0))]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_a_truncated_later_frame_is_unreadable_unless_only_the_first_is_scored(
    fmt: str,
) -> None:
    frames = [
        shape_image(s, c, size=80, seed=i)
        for i, (s, c) in enumerate(zip(SHAPES, COLOURS, strict=False))
    ]
    data = animation([f.convert("P") for f in frames] if fmt == "GIF" else frames, fmt)
    cut = data[: len(data) - len(data) // 6]
    if fmt == "WEBP":  # libwebp checks the whole file when it opens it
        with pytest.raises(ImageError) as info:
            list(decode_frames(cut, max_pixels=10**6, allowed_formats=FORMATS))
        assert info.value.code == "image_unreadable"
        return
    first = decode_frames(cut, max_pixels=10**6, allowed_formats=FORMATS, max_frames=1)
    assert [f.index for f in first] == [0]
    with pytest.raises(ImageError) as info:
        list(decode_frames(cut, max_pixels=10**6, allowed_formats=FORMATS))
    assert info.value.code == "image_unreadable"


# ---------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize(("count", "wanted"), [(1, 8), (2, 8), (13, 4), (1000, 8), (9, 9)])
def test_frames_are_spread_evenly_with_the_first_and_last(count: int, wanted: int) -> None:
    picked = spread_frames(count, wanted)
    assert len(picked) == min(count, wanted)
    assert picked == sorted(set(picked))
    assert picked[0] == 0
    assert picked[-1] == count - 1
    gaps = {b - a for a, b in itertools.pairwise(picked)}
    assert max(gaps, default=0) - min(gaps, default=0) <= 1


def test_pooling_is_max_for_moderation_and_mean_for_tags(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()
    mod = engine.policies.compiled["anim"]
    tags = engine.policies.compiled["anim-tags"]
    assert mod.pool_frames([[0.2], [0.9], [0.9], [0.1]]) == ([0.9], [1])  # first on a tie
    values, rows = tags.pool_frames([[0.1, 0.5, 0.3, 0.1], [0.3, 0.1, 0.5, 0.1]])
    assert rows is None
    assert values == pytest.approx([0.2, 0.3, 0.4, 0.1])
    threshold = float(mod.operating_point(0)[0])
    section = mod.section([threshold], frames=[7])
    assert [f.frame for f in section.flags] == [7]
    assert [f.frame for f in mod.section([threshold]).flags] == [None]


def test_the_setting_and_old_documents() -> None:
    assert ImageSettings().max_frames == 8
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKER_IMAGE__MAX_FRAMES", "3")
        assert Settings().image.max_frames == 3
    old = {
        "job_id": "j",
        "status": "ok",
        "image": {"uri": "x.gif", "width": 1, "height": 1},
        "model": {"name": "m", "pretrained": "", "fingerprint": "f"},
        "flags": [{"policy": "p", "category": "c", "score": 0.9, "threshold": 0.5,
                   "action": "block", "severity": "high"}],
    }  # fmt: skip
    result = Result.model_validate(old)  # a document without the new fields still reads
    assert result.image.frames_scored is None
    assert result.flags[0].frame is None


def test_build_engine_passes_max_frames(
    make_settings: Callable[..., Settings], tiny_model: LoadedModel
) -> None:
    engine = build_engine(make_settings(image={"max_frames": 3}), model=tiny_model)
    try:
        assert engine.max_frames == 3
    finally:
        engine.close()
