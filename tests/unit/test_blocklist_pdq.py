"""``kind: blocklist`` by PDQ hash, through the served path: `worker classify` of altered
copies of listed pictures, every result carrying the image's PDQ hash, and a hash file
that reloads like a policy."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from tests.cli_runner import run_cli
from tests.synthetic import textured_photo
from worker.documents import ImageRef
from worker.engine import WorkItem
from worker.model import LoadedModel
from worker.pdq import hex_to_bits, image_pdq
from worker.policy import LoadedPolicy
from worker.policy.blocklist import DEFAULT_MAX_DISTANCE
from worker.policy.policyset import PolicySet
from worker.queue.reload import PolicyWatcher
from worker.runtime import build_engine, compile_configured
from worker.settings import Settings

POLICY = """\
name: known-bad
kind: blocklist
pdq: [hashes/shared.txt]   # HASH[,ID] per line, as hash-sharing programs export them
"""


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, fraction: float) -> Image.Image:
    dx, dy = round(img.width * fraction / 2), round(img.height * fraction / 2)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


ALTERATIONS: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg-q40": lambda img: _jpeg(img, 40),
    "resized-60": lambda img: _png(img.resize((round(img.width * 0.6), round(img.height * 0.6)))),
    "cropped-8": lambda img: _png(_crop(img, 0.08)),
    "brighter": lambda img: _png(ImageEnhance.Brightness(img).enhance(1.3)),
    "mirrored": lambda img: _png(ImageOps.mirror(img)),
}


def _distance(a: str, b: str) -> int:
    return int(np.unpackbits(hex_to_bits(a) ^ hex_to_bits(b)).sum())


@pytest.fixture
def world(tmp_path: Path, tiny_model_name: str) -> dict[str, Path]:
    """20 listed pictures (only their hashes are shared), their altered copies and 200
    unrelated pictures; a blocklist policy over the hash file."""
    policies, images = tmp_path / "policies", tmp_path / "images"
    (policies / "hashes").mkdir(parents=True)
    images.mkdir()
    lines = ["# shared by a hash-sharing programme"]
    for i in range(20):
        original = textured_photo(i)
        lines.append(f"{image_pdq(_png(original))[0]},case-{i}")
        for name, alter in ALTERATIONS.items():
            (images / f"copy-{i}-{name}.bin").write_bytes(alter(original))
    for i in range(200):
        (images / f"unrelated-{i}.png").write_bytes(_png(textured_photo(1000 + i)))
    (policies / "hashes" / "shared.txt").write_text("\n".join(lines) + "\n")
    (policies / "known-bad.yaml").write_text(POLICY)
    return {"policies": policies, "images": images, "cache": tmp_path / "cache"}


def test_altered_copies_are_matched_through_classify(
    world: dict[str, Path], tiny_model_name: str
) -> None:
    env = {
        "WORKER_MODEL__NAME": tiny_model_name,
        "WORKER_CACHE_DIR": str(world["cache"]),
        "WORKER_POLICY_DIR": str(world["policies"]),
        "WORKER_DEVICE": "cpu",
        "WORKER_IMAGE__ALLOWED_FORMATS": '["JPEG","PNG"]',
    }
    out = world["images"].parent / "results.jsonl"
    proc = run_cli("classify", str(world["images"] / "*"), "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    results = {
        Path(r["image"]["uri"]).name: r for r in map(json.loads, out.read_text().splitlines())
    }
    assert len(results) == 300
    listed = {
        ident: digest
        for digest, ident in (
            line.split(",")
            for line in (world["policies"] / "hashes" / "shared.txt").read_text().split("\n")[1:]
            if line
        )
    }
    for name, result in results.items():  # every result carries its hash, as image_pdq gives it
        assert result["status"] == "ok", result
        expected = image_pdq((world["images"] / name).read_bytes())
        assert (result["image"]["pdq"], result["image"]["pdq_quality"]) == expected

    print(f"\nPDQ blocklist, `worker classify`: 20 listed, max_distance {DEFAULT_MAX_DISTANCE}")
    for alteration in ALTERATIONS:
        copies = [(i, results[f"copy-{i}-{alteration}.bin"]) for i in range(20)]
        within = [
            (i, r)
            for i, r in copies
            if _distance(r["image"]["pdq"], listed[f"case-{i}"]) <= DEFAULT_MAX_DISTANCE
        ]
        matched = [
            (i, r)
            for i, r in within
            if r["decision"] == {"action": "block", "categories": ["known-bad/pdq"]}
            and r["flags"][0]["item"] == f"case-{i}"
            and r["flags"][0]["distance"] == _distance(r["image"]["pdq"], listed[f"case-{i}"])
        ]
        print(
            f"  {alteration:11} PDQ puts {len(within):2}/20 within the distance; "
            f"matched {len(matched)}/{len(within)}"
        )
        assert len(matched) >= 0.95 * len(within)
        if alteration in ("jpeg-q40", "resized-60", "brighter"):
            assert len(within) >= 18  # PDQ's own robustness to these, for scale
    unrelated = [r for name, r in results.items() if name.startswith("unrelated-")]
    assert [r["decision"]["action"] for r in unrelated] == ["allow"] * 200
    assert all(r["policies"]["known-bad"]["matches"] == [] for r in unrelated)


def test_a_replaced_hash_file_reloads_like_a_policy(
    world: dict[str, Path], make_settings: Callable[..., Settings], tiny_model: LoadedModel
) -> None:
    settings = make_settings(policy_dir=world["policies"])
    engine = build_engine(settings, model=tiny_model)

    def recompile(loaded: list[LoadedPolicy]) -> PolicySet:
        return compile_configured(settings, engine.model, loaded)

    watcher = PolicyWatcher(engine, settings.policy_dir, recompile, interval_s=0.05)
    try:
        image = world["images"] / "unrelated-0.png"

        def decision() -> str:
            [result] = engine.process([WorkItem("j", ImageRef(uri=str(image)))])
            return str(result.decision.action if result.decision else None)

        assert decision() == "allow"
        assert not watcher.check()  # nothing changed
        hashes = world["policies"] / "hashes" / "shared.txt"
        hashes.write_text(hashes.read_text() + f"{image_pdq(image.read_bytes())[0]},new-case\n")
        assert watcher.check()  # the hash file alone changed: a reload
        assert decision() == "block"
        hashes.write_text("not a hash\n")
        assert not watcher.check()  # a bad file is refused; the last good list stays
        assert "shared.txt:1:" in watcher.rejected[0]
        assert decision() == "block"
    finally:
        engine.close()


def test_policies_check_reads_the_hash_files_and_image_lists(
    world: dict[str, Path], tiny_model_name: str
) -> None:
    env = {"WORKER_POLICY_DIR": str(world["policies"])}
    ok = run_cli("policies", "check", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "blocklist 'known-bad'" in ok.stderr
    hashes = world["policies"] / "hashes" / "shared.txt"
    hashes.write_text(hashes.read_text() + "abc,short\n")
    (world["policies"] / "known-bad.yaml").write_text(POLICY + "images: [gone/*.png]\n")
    bad = run_cli("policies", "check", env=env)
    assert bad.returncode == 1
    assert f"{hashes}:22: not a PDQ hash" in bad.stderr
    assert "'gone/*.png': the pattern matches no file" in bad.stderr
