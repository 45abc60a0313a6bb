"""Scoring: one-vs-background moderation, tag softmax, flags and top-k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import COLOURS, SHAPES, shape_image
from worker.documents import ModerationResult
from worker.embedding_cache import CachedEmbedder, EmbeddingCache
from worker.model import LoadedModel
from worker.policy import CompiledModeration, CompiledTags, ModerationPolicy, TagsPolicy
from worker.policy.heads import compile_policy

PROMPTS = [
    "a gun",
    "a rifle",
    "a knife",
    "cocaine",
    "pills",
    "a casino",
    "beer",
    "wine",
    "a cigarette",
    "blood",
    "a swastika",
    "a syringe",
    "a red circle",
    "a blue square",
]


@pytest.fixture(scope="module")
def embedder(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> CachedEmbedder:
    cache = EmbeddingCache(tmp_path_factory.mktemp("c") / "c.sqlite3", tiny_model.fingerprint)
    return CachedEmbedder(tiny_model.encode_texts, cache)


@pytest.fixture(scope="module")
def image_embeddings(tiny_model: LoadedModel) -> torch.Tensor:
    images = [
        shape_image(s, c, seed=i) for i, (s, c) in enumerate(zip(SHAPES * 4, COLOURS, strict=False))
    ]
    return tiny_model.encode_images(torch.stack([tiny_model.preprocess(im) for im in images]))


def _policy(categories: list[tuple[str, list[str], float]]) -> ModerationPolicy:
    return ModerationPolicy(
        name="m",
        templates="simple",
        background=["an ordinary photo", "a blank page"],
        categories=[{"id": i, "prompts": p, "threshold": t} for i, p, t in categories],
    )


def _scores(
    policy: ModerationPolicy, embedder: CachedEmbedder, emb: torch.Tensor, scale: float
) -> dict[str, torch.Tensor]:
    compiled = compile_policy(policy, embedder, "fp")
    assert isinstance(compiled, CompiledModeration)
    scores = compiled.scores(emb, scale)
    return {c.id: scores[:, i] for i, c in enumerate(policy.categories)}


category = st.tuples(
    st.lists(st.sampled_from(PROMPTS), min_size=1, max_size=3, unique=True), st.floats(0, 1)
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    target=category,
    others=st.lists(category, max_size=5),
    changed=st.lists(category, max_size=5),
    keep_first=st.integers(0, 5),
)
def test_category_score_ignores_every_other_category(
    embedder: CachedEmbedder,
    image_embeddings: torch.Tensor,
    tiny_model: LoadedModel,
    target: tuple[list[str], float],
    others: list[tuple[list[str], float]],
    changed: list[tuple[list[str], float]],
    keep_first: int,
) -> None:
    """Adding, removing or editing other categories leaves the target's scores unchanged."""
    scale = tiny_model.logit_scale
    before = [("target", target[0], target[1])] + [
        (f"o{i}", p, t) for i, (p, t) in enumerate(others)
    ]
    # Keep some of the others, drop the rest, edit/add new ones, and move the target.
    after = [(f"o{i}", p, t) for i, (p, t) in enumerate(others[:keep_first])]
    after += [(f"n{i}", p, t) for i, (p, t) in enumerate(changed)]
    after.insert(len(after) // 2, ("target", target[0], target[1]))
    a = _scores(_policy(before), embedder, image_embeddings, scale)["target"]
    b = _scores(_policy(after), embedder, image_embeddings, scale)["target"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_moderation_score_is_softmax_over_category_and_background() -> None:
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    heads = torch.nn.functional.normalize(torch.randn(3 + 4, 16), dim=1)
    policy = _policy([("a", ["x"], 0.5), ("b", ["y"], 0.5), ("c", ["z"], 0.5)])
    compiled = CompiledModeration(policy, "v", heads)
    got = compiled.scores(emb, 50.0)
    for c in range(3):
        logits = 50.0 * emb @ torch.cat([heads[c : c + 1], heads[3:]]).T
        torch.testing.assert_close(got[:, c], logits.softmax(dim=1)[:, 0])


def test_flags_use_threshold_action_and_severity() -> None:
    policy = ModerationPolicy(
        name="m",
        background=["b"],
        categories=[
            {
                "id": "weapons",
                "prompts": ["a gun"],
                "threshold": 0.6,
                "action": "block",
                "severity": "high",
            },
            {"id": "drugs", "prompts": ["pills"], "threshold": 0.9},
            {"id": "alcohol", "prompts": ["beer"], "threshold": 0.3, "action": "review"},
        ],
    )
    compiled = CompiledModeration(policy, "v", torch.zeros(4, 2))
    section = compiled.section([0.6, 0.89, 0.95])
    flags = section.flags
    assert isinstance(section.body, ModerationResult)
    assert section.body.scores == {"weapons": 0.6, "drugs": 0.89, "alcohol": 0.95}
    assert [(f.category, f.action, f.severity, f.threshold) for f in flags] == [
        ("alcohol", "review", "medium", 0.3),
        ("weapons", "block", "high", 0.6),  # score == threshold flags
    ]


def test_tags_softmax_then_top_k_and_min_score() -> None:
    policy = TagsPolicy(name="t", top_k=2, min_score=0.2, tags=["a", "b", "c", "d"])
    compiled = CompiledTags(policy, "v", torch.eye(4))
    probs = compiled.scores(torch.eye(4)[:1], 2.0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1))
    assert compiled.top([0.1, 0.5, 0.15, 0.25]) == [("b", 0.5), ("d", 0.25)]
    assert compiled.top([0.1, 0.5, 0.19, 0.21]) == [("b", 0.5), ("d", 0.21)]
    assert compiled.top([0.3, 0.3, 0.2, 0.19])[:1] == [("a", 0.3)]
    assert compiled.top([0.19, 0.01, 0.4, 0.4]) == [("c", 0.4), ("d", 0.4)]
    assert compiled.top([0.25, 0.25, 0.25, 0.25]) == [("a", 0.25), ("b", 0.25)]
    assert compiled.top([0.1, 0.1, 0.1, 0.7]) == [("d", 0.7)]
