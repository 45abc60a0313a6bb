"""Policy -> heads: equal to open_clip's reference, cached, and compiled incrementally."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from worker.embedding_cache import CachedEmbedder, EmbeddingCache
from worker.model import LoadedModel
from worker.policy import CompiledModeration, CompiledTags, ModerationPolicy, TagsPolicy
from worker.policy.heads import compile_policy
from worker.policy.policyset import compile_policies, open_prompt_cache
from worker.policy.templates import TEMPLATE_SETS


def uncached(model: LoadedModel) -> CachedEmbedder:
    return CachedEmbedder(model.encode_texts, None)


def test_heads_equal_open_clip_reference(tiny_model: LoadedModel) -> None:
    templates = TEMPLATE_SETS["default"]
    names = ["dog", "cat", "a red circle", "beach", "hot dog", "traffic light", "x"]
    policy = TagsPolicy(name="t", templates="default", tags=names)
    compiled = compile_policy(policy, uncached(tiny_model), tiny_model.fingerprint)
    reference = open_clip.build_zero_shot_classifier(
        tiny_model.model,
        tiny_model.tokenizer,
        classnames=names,
        templates=open_clip.OPENAI_IMAGENET_TEMPLATES,
        num_classes_per_batch=3,
    )
    assert len(templates) == 80
    assert isinstance(compiled, CompiledTags)
    assert compiled.matrix.shape == (len(names), reference.shape[0])
    torch.testing.assert_close(compiled.matrix, reference.T, atol=1e-5, rtol=0)


def test_multi_prompt_head_is_the_ensemble_over_all_prompts(tiny_model: LoadedModel) -> None:
    templates = ["a photo of {}.", "a drawing of {}."]
    prompts = ["a gun", "a rifle", "a person holding a knife"]
    policy = ModerationPolicy(
        name="m",
        templates=templates,
        background=["an ordinary photo"],
        categories=[{"id": "weapons", "prompts": prompts}],
    )
    compiled = compile_policy(policy, uncached(tiny_model), tiny_model.fingerprint)
    # open_clip with one "class" whose templates are every template x prompt text.
    texts = [t.format(p) for p in prompts for t in templates]
    reference = open_clip.build_zero_shot_classifier(
        tiny_model.model,
        tiny_model.tokenizer,
        classnames=["weapons"],
        templates=[lambda _c, text=text: text for text in texts],
    )
    assert isinstance(compiled, CompiledModeration)
    torch.testing.assert_close(compiled.matrix[0], reference[:, 0], atol=1e-5, rtol=0)
    assert compiled.matrix.shape[0] == 2  # one category + one background head
    torch.testing.assert_close(compiled.matrix.norm(dim=1), torch.ones(2))


def _moderation(categories: list[tuple[str, list[str]]]) -> ModerationPolicy:
    return ModerationPolicy(
        name="m",
        templates="simple",
        background=["an ordinary photo", "a blank page"],
        categories=[{"id": i, "prompts": p} for i, p in categories],
    )


def test_adding_a_category_encodes_only_its_prompts(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    from worker.policy import LoadedPolicy

    base = [("weapons", ["a gun", "a rifle"]), ("drugs", ["cocaine"])]
    grown = [*base, ("gambling", ["a casino table", "slot machines"])]
    cache = open_prompt_cache(tmp_path, tiny_model)
    n_templates = len(TEMPLATE_SETS["simple"])

    before = tiny_model.texts_encoded
    compile_policies([LoadedPolicy(_moderation(base), tmp_path / "m.yaml", 1)], tiny_model, cache)
    cold = tiny_model.texts_encoded - before
    assert cold == (2 + 1 + 2) * n_templates  # categories + background prompts

    before = tiny_model.texts_encoded
    grown_set = compile_policies(
        [LoadedPolicy(_moderation(grown), tmp_path / "m.yaml", 1)], tiny_model, cache
    )
    assert tiny_model.texts_encoded - before == 2 * n_templates  # only "gambling"'s prompts
    assert grown_set.stats["m"].encoded == 2 * n_templates

    # A fresh process (new cache connection) recompiles nothing at all.
    cache.close()
    reopened = open_prompt_cache(tmp_path, tiny_model)
    before = tiny_model.texts_encoded
    again = compile_policies(
        [LoadedPolicy(_moderation(grown), tmp_path / "m.yaml", 1)], tiny_model, reopened
    )
    assert tiny_model.texts_encoded == before
    torch.testing.assert_close(again.compiled["m"].matrix, grown_set.compiled["m"].matrix)


def test_cache_is_keyed_by_model_fingerprint(tiny_model: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    a = EmbeddingCache(path, "model-a")
    a.put_many({"a photo of a dog.": torch.ones(4)})
    assert set(a.get_many(["a photo of a dog.", "other"])) == {"a photo of a dog."}
    b = EmbeddingCache(path, "model-b")
    assert b.get_many(["a photo of a dog."]) == {}


@pytest.mark.parametrize("prompt", ["a gun", "cocaine"])
def test_cached_and_uncached_heads_are_identical(
    tiny_model: LoadedModel, tmp_path: Path, prompt: str
) -> None:
    policy = _moderation([("c", [prompt])])
    cache = EmbeddingCache(tmp_path / "c.sqlite3", tiny_model.fingerprint)
    first = compile_policy(policy, CachedEmbedder(tiny_model.encode_texts, cache), "fp")
    second = compile_policy(policy, CachedEmbedder(tiny_model.encode_texts, cache), "fp")
    direct = compile_policy(policy, uncached(tiny_model), "fp")
    assert torch.equal(first.matrix, second.matrix)
    torch.testing.assert_close(first.matrix, direct.matrix, atol=1e-6, rtol=0)
