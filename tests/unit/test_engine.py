"""The pipeline: one embedding per image, every policy, per-image errors, ordered output."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import image_bytes, shape_image, write_images
from worker.documents import ImageRef, ModerationResult, Result, TagsResult
from worker.engine import Engine, WorkItem
from worker.model import LoadedModel
from worker.runtime import build_engine
from worker.settings import Settings


@pytest.fixture
def engine(make_settings: Callable[..., Settings], tiny_model: LoadedModel) -> Iterator[Engine]:
    eng = build_engine(make_settings(), model=tiny_model)
    yield eng
    eng.close()


def items_for(paths: list[Path]) -> list[WorkItem]:
    return [WorkItem(job_id=f"job-{i}", image=ImageRef(uri=str(p))) for i, p in enumerate(paths)]


def test_results_for_every_policy(engine: Engine, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "imgs", 5)
    results = engine.process(items_for(paths))
    assert [r.job_id for r in results] == [f"job-{i}" for i in range(5)]
    for result in results:
        assert result.status == "ok"
        assert set(result.policies) == {"shapes", "shape-tags"}
        mod = result.policies["shapes"]
        assert isinstance(mod, ModerationResult)
        assert set(mod.scores) == {"red", "circle", "blue"}
        assert all(0.0 <= s <= 1.0 for s in mod.scores.values())
        assert result.image.width == 96
        assert len(result.image.sha256 or "") == 64
        assert result.model.fingerprint == engine.model.fingerprint
        assert {"fetch", "decode", "preprocess", "encode", "score"} <= set(result.timings_ms)
        flagged = {f.category for f in result.flags}
        assert flagged == {c for c, s in mod.scores.items() if s >= 0.5}
        tags = result.policies["shape-tags"]
        assert isinstance(tags, TagsResult)
        assert 1 <= len(tags.tags) <= 3
        assert result.labels == [t.tag for t in tags.tags]


def test_each_image_is_encoded_once_for_all_policies(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_images(tmp_path / "imgs", 4)
    calls: list[int] = []
    original = engine.model.encode_images

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return original(pixels)

    monkeypatch.setattr(engine.model, "encode_images", counting)
    engine.process(items_for(paths))
    assert calls == [4]


def test_scores_match_a_direct_computation(engine: Engine, tmp_path: Path) -> None:
    path = write_images(tmp_path / "imgs", 1)[0]
    result = engine.process(items_for([path]))[0]
    model = engine.model
    pixels = model.preprocess(shape_image("circle", "red", seed=0)).unsqueeze(0)
    compiled = engine.policies.compiled["shapes"]
    direct = compiled.scores(model.encode_images(pixels), model.logit_scale)[0]
    section = result.policies["shapes"]
    assert isinstance(section, ModerationResult)
    got = torch.tensor(list(section.scores.values()))
    torch.testing.assert_close(got, direct, atol=2e-6, rtol=0)


def test_bad_images_do_not_fail_their_batch(engine: Engine, tmp_path: Path) -> None:
    good = write_images(tmp_path / "imgs", 3)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (tmp_path / "notes.txt").write_text("not an image")
    items = items_for(
        [
            good[0],
            tmp_path / "corrupt.jpg",
            good[1],
            tmp_path / "notes.txt",
            tmp_path / "missing.png",
            good[2],
        ]
    )
    items.append(WorkItem(job_id="bad-policy", image=ImageRef(uri=str(good[0])), policies=["nope"]))
    items.append(WorkItem(job_id="bad-b64", image=ImageRef(data="!!!not base64!!!")))
    results = engine.process(items)
    statuses = [(r.status, r.error.code if r.error else None) for r in results]
    assert statuses == [
        ("ok", None),
        ("error", "image_unreadable"),
        ("ok", None),
        ("error", "image_unreadable"),
        ("error", "source_not_found"),
        ("ok", None),
        ("error", "policy_not_found"),
        ("error", "source_invalid"),
    ]
    assert all(r.policies == {} and r.flags == [] for r in results if r.status == "error")


def test_inline_data_and_policy_selection(engine: Engine) -> None:
    data = base64.b64encode(image_bytes(shape_image("square", "blue"), "PNG")).decode()
    item = WorkItem(
        job_id="inline",
        image=ImageRef(data=data, filename="x.png"),
        policies=["shape-tags"],
        metadata={"user": 7},
    )
    result = engine.process([item])[0]
    assert result.status == "ok"
    assert list(result.policies) == ["shape-tags"]
    assert result.flags == []
    assert result.metadata == {"user": 7}
    assert result.image.filename == "x.png"
    Result.model_validate_json(result.to_json())  # round-trips


def test_stream_keeps_order_across_batches(engine: Engine, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "imgs", 11)
    streamed = list(engine.stream(items_for(paths), batch_size=4))
    assert [r.job_id for r in streamed] == [f"job-{i}" for i in range(11)]
    batch = engine.process(items_for(paths))
    for a, b in zip(streamed, batch, strict=True):
        # Batch composition changes float summation order: equal to rounding, not bitwise.
        mod_a, mod_b = a.policies["shapes"], b.policies["shapes"]
        assert isinstance(mod_a, ModerationResult)
        assert isinstance(mod_b, ModerationResult)
        for name in ("red", "circle", "blue"):
            sa = mod_a.scores[name]
            sb = mod_b.scores[name]
            assert sa == pytest.approx(sb, abs=1e-5)


def test_encoder_failure_splits_the_batch(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch the encoder rejects is split so only the failing image errors."""
    paths = write_images(tmp_path / "imgs", 4)
    original = engine.model.encode_images
    poison = engine.model.preprocess(shape_image("triangle", "blue", seed=2))

    def fragile(pixels: torch.Tensor) -> torch.Tensor:
        if any(torch.equal(p, poison) for p in pixels):
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(pixels)

    monkeypatch.setattr(engine.model, "encode_images", fragile)
    results = engine.process(items_for(paths))
    assert [r.status for r in results] == ["ok", "ok", "error", "ok"]
    assert results[2].error is not None
    assert results[2].error.code == "internal_error"


def test_batch_size_from_memory() -> None:
    from worker.runtime import batch_from_memory

    mib = 1 << 20
    assert batch_from_memory(10_000 * mib, 20 * mib) == 296  # 60% of 10 GB / 20 MB, multiple of 8
    assert batch_from_memory(100 * mib, 50 * mib) == 8  # never below 8
    assert batch_from_memory(80_000 * mib, 1 * mib) == 1024  # never above 1024


def test_auto_batch_size_is_32_on_cpu(
    make_settings: Callable[..., Settings], tiny_model: LoadedModel
) -> None:
    from worker.runtime import resolve_batch_size

    assert resolve_batch_size(make_settings(batch={"max_size": 0}), tiny_model) == 32
    assert resolve_batch_size(make_settings(batch={"max_size": 12}), tiny_model) == 12


def test_policy_removed_between_prepare_and_score(engine: Engine, tmp_path: Path) -> None:
    """A reload that drops a policy mid-batch turns that job into policy_not_found."""
    from dataclasses import replace

    path = write_images(tmp_path / "imgs", 1)[0]
    item = WorkItem(job_id="racy", image=ImageRef(uri=str(path)), policies=["shape-tags"])
    prepared = engine.prepare(item)
    assert prepared.error is None
    before = engine.policies
    engine.policies = replace(
        before, compiled={k: v for k, v in before.compiled.items() if k != "shape-tags"}
    )
    try:
        [result] = engine.score([prepared])
    finally:
        engine.policies = before
    assert result.status == "error"
    assert result.error is not None
    assert result.error.code == "policy_not_found"
