"""Policy -> classifier heads. Pure functions: no I/O, no model, no Celery.

A head is the prompt ensemble of one category, tag or background prompt: every
``template.format(prompt)`` is embedded and L2-normalised, the embeddings are averaged and
the mean is normalised again, exactly as ``open_clip.build_zero_shot_classifier`` does.
Heads are built from a ``text -> embedding`` mapping, so where the embeddings come from
(the text tower, a cache) is the caller's business.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from worker.policy import ModerationPolicy, Policy, TagsPolicy

#: Maps texts to L2-normalised embeddings, encoding whatever it does not know yet.
Embedder = Callable[[Sequence[str]], Mapping[str, torch.Tensor]]


def ensemble_texts(prompts: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every ``template.format(prompt)``, prompt-major (the order open_clip uses)."""
    return [template.format(prompt) for prompt in prompts for template in templates]


def build_head(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean of normalised embeddings ``(n, D)``, normalised again -> ``(D,)``."""
    mean = embeddings.mean(dim=0)
    head: torch.Tensor = mean / mean.norm()
    return head


def build_heads(
    groups: Sequence[Sequence[str]], lookup: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """One head per group of texts -> ``(len(groups), D)``."""
    return torch.stack([build_head(torch.stack([lookup[t] for t in group])) for group in groups])


def _prompt_groups(policy: Policy) -> dict[str, list[list[str]]]:
    """The text groups whose ensembles become the policy's heads."""
    templates = policy.template_list()
    if isinstance(policy, ModerationPolicy):
        return {
            "categories": [ensemble_texts(c.prompts, templates) for c in policy.categories],
            "background": [ensemble_texts([b], templates) for b in policy.background],
        }
    return {"tags": [ensemble_texts(t.prompts, templates) for t in policy.tags]}


def policy_texts(policy: Policy) -> list[str]:
    """Every distinct text the policy needs embedded, in first-use order."""
    seen: dict[str, None] = {}
    for groups in _prompt_groups(policy).values():
        for group in groups:
            seen.update(dict.fromkeys(group))
    return list(seen)


def policy_version(policy: Policy, model_fingerprint: str) -> str:
    """sha256 of the compiled policy: its expanded definition and the model it was built for."""
    return hashlib.sha256(f"{model_fingerprint}:{policy.definition_hash()}".encode()).hexdigest()


@dataclass(frozen=True)
class CompiledModeration:
    """Heads of a moderation policy: ``matrix`` rows are categories then background."""

    policy: ModerationPolicy
    version: str
    matrix: torch.Tensor  # (C + K, D)

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def num_categories(self) -> int:
        return len(self.policy.categories)


@dataclass(frozen=True)
class CompiledTags:
    """Heads of a tag vocabulary, one row per tag."""

    policy: TagsPolicy
    version: str
    matrix: torch.Tensor  # (V, D)

    @property
    def name(self) -> str:
        return self.policy.name


CompiledPolicy = CompiledModeration | CompiledTags


def compile_policy(policy: Policy, embed: Embedder, model_fingerprint: str) -> CompiledPolicy:
    """Build the heads of ``policy`` from embeddings supplied by ``embed``."""
    groups = _prompt_groups(policy)
    lookup = embed(policy_texts(policy))
    version = policy_version(policy, model_fingerprint)
    if isinstance(policy, ModerationPolicy):
        matrix = torch.cat(
            [build_heads(groups["categories"], lookup), build_heads(groups["background"], lookup)]
        )
        return CompiledModeration(policy, version, matrix)
    return CompiledTags(policy, version, build_heads(groups["tags"], lookup))
