"""``kind: blocklist`` by embedding, through `worker classify`: altered copies of listed
images match their item, unrelated images match nothing.

The model is :func:`tests.copy_model.train_copy_model`, the tiny CLIP trained for ~25 s to
tell random scenes apart (the caption-trained tiny CLIP sees every busy scene alike). 20
scenes are listed; each is copied under five alterations whose parameters the training
never replays (JPEG quality 40, resized to 60 %, cropped 8 %, brightness ×1.3, mirrored),
and 200 unrelated scenes come from another seed. A second policy, ``probe``, lists the
same images with ``min_similarity: -1``, so every image gets a match naming its nearest
listed image and the similarity: the distributions come from the CLI's results as well.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageEnhance, ImageOps

from tests.cli_runner import run_cli
from tests.copy_model import random_scene, train_copy_model

LISTED = 20
UNRELATED = 200
#: Between the two distributions, measured with this world on training seeds 0-4: a
#: copy's similarity to its own listed image (5th percentile of the 100 copies 0.956-0.979;
#: the lowest single copies 0.87-0.95, brightened or cropped ones) and an unrelated scene's
#: to its nearest listed image (highest of the 200: 0.858-0.898). Midway between 0.898 and
#: 0.956, rounded.
MIN_SIMILARITY = 0.925
#: How far from the threshold the 5th-percentile copy and the most similar unrelated scene
#: must stay (the five seeds kept 0.027 or more): a threshold balanced on an edge would
#: pass today and flake after the next torch upgrade.
MARGIN = 0.015
#: The policy's result for one image, by its path under the images folder.
Result = dict[str, Any]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg40(img: Image.Image) -> tuple[str, bytes]:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40)
    return ".jpg", buf.getvalue()


def _resize60(img: Image.Image) -> tuple[str, bytes]:
    return ".png", _png(img.resize((round(img.width * 0.6), round(img.height * 0.6))))


def _crop8(img: Image.Image) -> tuple[str, bytes]:
    """8 % of the width and of the height cut away, unevenly (5 % left, 3 % right, 3 %
    top, 5 % bottom), so the centre moves too."""
    w, h = img.size
    return ".png", _png(
        img.crop((round(w * 0.05), round(h * 0.03), round(w * 0.97), round(h * 0.95)))
    )


def _brighter(img: Image.Image) -> tuple[str, bytes]:
    return ".png", _png(ImageEnhance.Brightness(img).enhance(1.3))


def _mirror(img: Image.Image) -> tuple[str, bytes]:
    return ".png", _png(ImageOps.mirror(img))


#: Each alteration: the altered picture's file suffix and bytes.
ALTERATIONS: dict[str, Callable[[Image.Image], tuple[str, bytes]]] = {
    "jpeg40": _jpeg40,
    "resize60": _resize60,
    "crop8": _crop8,
    "bright130": _brighter,
    "mirror": _mirror,
}


def _policy(name: str, min_similarity: float, action: str) -> str:
    return (
        f"name: {name}\nkind: blocklist\nimages: [listed/*.png]\n"
        f"min_similarity: {min_similarity}\naction: {action}\n"
    )


@dataclass(frozen=True)
class World:
    """policies/ (known.yaml, probe.yaml, listed/item-NN.png) and images/ (copies/
    <alteration>/item-NN.*, unrelated/other-NNN.png), and the `worker` environment."""

    root: Path
    policies: Path
    images: Path
    env: dict[str, str]


def classify(world: World, policy: str, *sources: Path) -> dict[str, Result]:
    """`worker classify` of ``sources`` against ``policy``: each result by its file's path
    under the images folder (``copies/mirror/item-03.png``), or its absolute path."""
    out = world.root / f"results-{len(list(world.root.glob('results-*')))}.jsonl"
    proc = run_cli(
        "classify", *map(str, sources), "--policy", policy, "--out", str(out), env=world.env
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["status"] == "ok" for r in results), [r["error"] for r in results]
    by_file = {}
    for result in results:
        path = Path(result["image"]["uri"])
        key = path.relative_to(world.images) if path.is_relative_to(world.images) else path
        by_file[str(key)] = result
    return by_file


def copies(alteration: str) -> list[tuple[str, str]]:
    """(file under images/, the listed item it copies) of each copy ``alteration`` made."""
    suffix = ".jpg" if alteration == "jpeg40" else ".png"
    return [
        (f"copies/{alteration}/item-{index:02d}{suffix}", f"item-{index:02d}")
        for index in range(LISTED)
    ]


def unrelated() -> list[str]:
    return [f"unrelated/other-{index:03d}.png" for index in range(UNRELATED)]


def nearest(result: Result) -> tuple[str, float]:
    """The probe's answer for one image: its nearest listed item and the similarity."""
    (match,) = result["policies"]["probe"]["matches"]
    return match["item"], match["similarity"]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


@pytest.fixture(scope="module")
def copy_model_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    return train_copy_model(tmp_path_factory.mktemp("copy-model"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, copy_model_name: str) -> World:
    root = tmp_path_factory.mktemp("blocklist")
    policies, images = root / "policies", root / "images"
    (policies / "listed").mkdir(parents=True)
    (policies / "known.yaml").write_text(_policy("known", MIN_SIMILARITY, "block"))
    (policies / "probe.yaml").write_text(_policy("probe", -1.0, "flag"))
    rng = random.Random(1)
    for index in range(LISTED):
        scene = random_scene(rng)
        (policies / "listed" / f"item-{index:02d}.png").write_bytes(_png(scene))
        for name, alter in ALTERATIONS.items():
            suffix, data = alter(scene)
            folder = images / "copies" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"item-{index:02d}{suffix}").write_bytes(data)
    (images / "unrelated").mkdir()
    rng = random.Random(2)
    for index in range(UNRELATED):
        (images / "unrelated" / f"other-{index:03d}.png").write_bytes(_png(random_scene(rng)))
    env = {
        "WORKER_MODEL__NAME": copy_model_name,
        "WORKER_CACHE_DIR": str(root / "cache"),
        "WORKER_POLICY_DIR": str(policies),
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
    }
    return World(root, policies, images, env)


@pytest.fixture(scope="module")
def known(world: World) -> dict[str, Result]:
    """Every image's result against the blocklist ``known``."""
    return classify(world, "known", world.images)


@pytest.fixture(scope="module")
def probe(world: World) -> dict[str, Result]:
    """Every image's result against ``probe``: its nearest listed image, and how near."""
    return classify(world, "probe", world.images)


def test_altered_copies_match_their_listed_image(
    known: dict[str, Result], probe: dict[str, Result]
) -> None:
    recall: dict[str, float] = {}
    lowest: dict[str, float] = {}
    for alteration in ALTERATIONS:
        hits, own = 0, []
        for file, item in copies(alteration):
            result = known[file]
            near, similarity = nearest(probe[file])
            own.append(similarity if near == item else -1.0)
            matches = result["policies"]["known"]["matches"]
            if not matches:
                continue
            (match,) = matches
            assert match["item"] == item, (file, match)
            hits += 1
            assert match == {
                "policy": "known",
                "category": "images",
                "score": similarity,
                "threshold": MIN_SIMILARITY,
                "action": "block",
                "severity": "high",
                "frame": None,
                "item": item,
                "distance": None,
                "similarity": similarity,
                "evidence": None,  # a match names its item instead
            }
            assert result["flags"] == [match]
            assert result["decision"] == {"action": "block", "categories": ["known/images"]}
        recall[alteration] = hits / LISTED
        lowest[alteration] = min(own)
    print(f"recall per alteration: {recall}")
    print(f"lowest similarity of a copy to its own listed image: {lowest}")
    assert statistics.mean(recall.values()) >= 0.95, recall
    assert min(recall.values()) >= 0.9, recall


def test_unrelated_images_match_nothing(known: dict[str, Result]) -> None:
    flagged = {file: known[file]["flags"] for file in unrelated() if known[file]["flags"]}
    assert flagged == {}
    for file in unrelated():
        result = known[file]
        assert result["policies"]["known"]["matches"] == []
        assert result["decision"] == {"action": "allow", "categories": []}


def test_copies_and_unrelated_images_lie_apart(probe: dict[str, Result]) -> None:
    """The threshold is not balanced on an edge: 95 % of the copies lie MARGIN above it,
    every unrelated image MARGIN below."""
    own = [
        similarity if near == item else -1.0
        for alteration in ALTERATIONS
        for file, item in copies(alteration)
        for near, similarity in [nearest(probe[file])]
    ]
    other = [nearest(probe[file])[1] for file in unrelated()]
    print(
        f"copies to their own listed image: min {min(own):.3f}, 5th percentile "
        f"{_quantile(own, 0.05):.3f}, median {statistics.median(own):.3f}; unrelated to "
        f"the nearest listed image: max {max(other):.3f}, 99th percentile "
        f"{_quantile(other, 0.99):.3f}, median {statistics.median(other):.3f}"
    )
    assert _quantile(own, 0.05) >= MIN_SIMILARITY + MARGIN
    assert max(other) <= MIN_SIMILARITY - MARGIN


def test_listed_images_match_themselves_first(world: World) -> None:
    results = classify(world, "known", world.policies / "listed")
    assert len(results) == LISTED
    for file, result in results.items():
        match = result["policies"]["known"]["matches"][0]
        assert match["item"] == Path(file).stem
        assert match["similarity"] >= 0.9999


def test_replacing_a_listed_image_changes_the_version_and_the_matches(
    world: World, known: dict[str, Result], tmp_path: Path
) -> None:
    """The YAML stays the same; a listed file's new content makes a new policy version, the
    old picture's copies stop matching and the new picture matches under the old id."""
    by_item: dict[str, list[str]] = {}
    for alteration in ALTERATIONS:
        for file, item in copies(alteration):
            by_item.setdefault(item, []).append(file)
    # The first listed image all of whose copies matched it.
    replaced, old = next(
        (item, files)
        for item, files in by_item.items()
        if all(known[file]["policies"]["known"]["matches"] for file in files)
    )
    (before,) = {known[file]["policies"]["known"]["version"] for file in old}
    policies = tmp_path / "policies"
    shutil.copytree(world.policies, policies)
    new = tmp_path / "new.png"
    new.write_bytes(_png(random_scene(random.Random(3))))
    shutil.copyfile(new, policies / "listed" / f"{replaced}.png")
    env = world.env | {"WORKER_POLICY_DIR": str(policies)}  # and the same embedding cache
    here = World(tmp_path, policies, world.images, env)
    results = classify(here, "known", *(world.images / file for file in old), new)
    (after,) = {result["policies"]["known"]["version"] for result in results.values()}
    assert after != before
    for file in old:
        assert results[file]["policies"]["known"]["matches"] == [], file
        assert results[file]["decision"]["action"] == "allow"
    (match,) = results[str(new)]["policies"]["known"]["matches"]
    assert match["item"] == replaced
    assert match["similarity"] >= 0.9999
