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
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from worker.policy.compiled import CompiledPolicy
    from worker.policy.schema import PolicyBase

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


def policy_texts(policy: PolicyBase) -> list[str]:
    """Every distinct text the policy needs embedded, in first-use order."""
    seen: dict[str, None] = {}
    for group in policy.text_groups():
        seen.update(dict.fromkeys(group))
    return list(seen)


def policy_version(policy: PolicyBase, model_fingerprint: str) -> str:
    """sha256 of the compiled policy: its expanded definition and the model it was built for."""
    return hashlib.sha256(f"{model_fingerprint}:{policy.definition_hash()}".encode()).hexdigest()


def compile_policy(
    policy: PolicyBase, embed: Embedder, model_fingerprint: str
) -> CompiledPolicy[Any]:
    """Build the heads of ``policy`` from embeddings supplied by ``embed``."""
    lookup = embed(policy_texts(policy))
    compiled: CompiledPolicy[Any] = policy.compile(
        lookup, policy_version(policy, model_fingerprint)
    )
    return compiled
