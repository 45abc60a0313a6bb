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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from worker.policy.compiled import CompiledPolicy
    from worker.policy.schema import PolicyBase

#: Maps texts to L2-normalised embeddings, encoding whatever it does not know yet.
Embedder = Callable[[Sequence[str]], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class ImageItem:
    """One image a policy lists (an exemplar, a background exemplar, a known image)."""

    id: str  # the file stem
    sha256: str
    embedding: torch.Tensor  # (D,), L2-normalised


@dataclass(frozen=True)
class Materials:
    """What a policy compiles from: the embeddings of its texts and, for policies that list
    images or hash files, those (gathered by the caller, keyed by the reference as the
    YAML writes it)."""

    texts: Mapping[str, torch.Tensor]
    images: Mapping[str, Sequence[ImageItem]] = field(default_factory=dict)
    hash_lists: Mapping[str, Any] = field(default_factory=dict)  # -> worker.pdq.HashList

    def items(self, refs: Sequence[str]) -> list[ImageItem]:
        """The images ``refs`` expand to, in order, each distinct image (sha256) once."""
        seen: dict[str, ImageItem] = {}
        for ref in refs:
            for item in self.images[ref]:
                seen.setdefault(item.sha256, item)
        return list(seen.values())

    def digest(self) -> str:
        """sha256 over the listed images' and hash files' contents: a policy whose files
        change on disk gets a new version even when its YAML does not."""
        digest = hashlib.sha256()
        for ref in sorted(self.images):
            digest.update(ref.encode() + b"\0")
            for item in self.images[ref]:
                digest.update(f"{item.id}\0{item.sha256}\0".encode())
        for ref in sorted(self.hash_lists):
            digest.update(f"{ref}\0{self.hash_lists[ref].sha256}\0".encode())
        return digest.hexdigest()


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


def policy_version(policy: PolicyBase, model_fingerprint: str, materials: str = "") -> str:
    """sha256 of the compiled policy: its expanded definition, the model it was built for
    and, when it lists images or hash files, their :meth:`Materials.digest`."""
    extra = f":{materials}" if materials else ""
    body = f"{model_fingerprint}:{policy.definition_hash()}{extra}"
    return hashlib.sha256(body.encode()).hexdigest()


def compile_policy(
    policy: PolicyBase,
    embed: Embedder,
    model_fingerprint: str,
    images: Mapping[str, Sequence[ImageItem]] | None = None,
    hash_lists: Mapping[str, Any] | None = None,
) -> CompiledPolicy[Any]:
    """Build the heads of ``policy`` from embeddings supplied by ``embed`` and, for a
    policy that lists images or hash files, those (by reference, as gathered)."""
    materials = Materials(embed(policy_texts(policy)), images or {}, hash_lists or {})
    listed = bool(materials.images or materials.hash_lists)
    version = policy_version(policy, model_fingerprint, materials.digest() if listed else "")
    compiled: CompiledPolicy[Any] = policy.compile(materials, version)
    return compiled
