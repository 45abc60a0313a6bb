"""``kind: blocklist``: known images, matched by embedding similarity and by PDQ hash.

A blocklist lists images (``images:``, each item's id is its file stem) matched when the
cosine between an image's embedding and the listed image's reaches ``min_similarity``,
and/or PDQ hash files (``pdq:``, ``HASH[,ID]`` per line, the format hash-sharing programs
use) matched when the Hamming distance between the image's PDQ hash and a listed one is
at most ``max_distance``. A match is a flag with the policy's ``action`` (``block`` by
default), naming the ``item`` and its ``similarity`` or ``distance``: category ``images``
for an embedding match, ``pdq`` for a hash match.

The embedding side is one matmul against the listed images' embeddings, like every other
policy; the hash side is an index lookup (:class:`worker.pdq.HashList`) with the PDQ hash
the engine computes for each image when any loaded policy lists hash files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from worker.documents import BlocklistResult, Flag
from worker.policy.compiled import SCORE_DIGITS, CompiledPolicy, Observed, Section
from worker.policy.heads import Materials
from worker.policy.schema import MAX_IMAGE_REFS, Action, FileRef, PolicyBase, Severity

if TYPE_CHECKING:
    from worker.pdq import HashList

PDQ_BITS = 256
#: PDQ's own recommendation for "the same image" (Hamming distance over 256 bits).
DEFAULT_MAX_DISTANCE = 31
#: Cosine at or above which a listed image matches by embedding, unless the policy says.
DEFAULT_MIN_SIMILARITY = 0.9


class BlocklistPolicy(PolicyBase):
    """Known images: by embedding (``images``) and by PDQ hash (``pdq``)."""

    KIND: ClassVar[str] = "blocklist"

    kind: Literal["blocklist"] = "blocklist"
    images: list[FileRef] = Field(default_factory=list, max_length=MAX_IMAGE_REFS)
    pdq: list[FileRef] = Field(default_factory=list, max_length=100)
    max_distance: int = Field(DEFAULT_MAX_DISTANCE, ge=0, le=255)
    min_similarity: float = Field(DEFAULT_MIN_SIMILARITY, ge=-1.0, le=1.0)
    action: Action = "block"
    severity: Severity = "high"

    @model_validator(mode="after")
    def _lists_something(self) -> BlocklistPolicy:
        if not self.images and not self.pdq:
            raise PydanticCustomError(
                "empty_blocklist",
                "a blocklist lists 'images' (paths, globs or URIs of known images) and/or "
                "'pdq' (files of PDQ hashes, one per line)",
            )
        return self

    def class_prompts(self) -> dict[str, list[str]]:
        return {}

    def text_groups(self) -> list[list[str]]:
        return []

    def image_refs(self) -> list[str]:
        return list(dict.fromkeys(self.images))

    def hash_refs(self) -> list[str]:
        return list(dict.fromkeys(self.pdq))

    def compile(self, materials: Materials, version: str) -> CompiledBlocklist:
        items = materials.items(self.images)
        matrix = torch.stack([i.embedding for i in items]) if items else torch.empty(0, 0)
        lists = tuple(materials.hash_lists[ref] for ref in self.hash_refs())
        return CompiledBlocklist(self, version, matrix, tuple(i.id for i in items), lists)


@dataclass(frozen=True)
class CompiledBlocklist(CompiledPolicy[BlocklistPolicy]):
    """Rows of ``matrix``: the listed images (``item_ids``); ``lists``: the hash lists."""

    item_ids: tuple[str, ...] = ()
    lists: tuple[HashList, ...] = ()

    @property
    def hash_lists(self) -> tuple[Any, ...]:
        return self.lists

    def class_ids(self) -> list[str]:
        return list(self.item_ids)

    def scores(self, embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """Cosine to every listed image, ``(N, items)``."""
        if not self.item_ids:
            return embeddings.new_zeros(embeddings.shape[0], 0)
        return embeddings @ self.matrix.to(embeddings).T

    def section(
        self,
        values: Sequence[float],
        frames: Sequence[int] | None = None,
        pdq: str | None = None,
        observed: Observed | None = None,
    ) -> Section:
        matches: list[Flag] = []
        policy = self.policy
        if values:
            best = max(range(len(values)), key=values.__getitem__)
            if values[best] >= policy.min_similarity:
                where = {} if frames is None else {"frame": frames[best]}
                similarity = round(values[best], SCORE_DIGITS)
                item = self.item_ids[best]
                matches.append(
                    self._flag(
                        "images",
                        similarity,
                        policy.min_similarity,
                        item=item,
                        similarity=similarity,
                        **where,
                    )
                )
        if pdq is not None and self.lists:
            nearest = [hashes.nearest([pdq], policy.max_distance)[0] for hashes in self.lists]
            found = [match for match in nearest if match is not None]
            if found:
                item, distance = min(found, key=lambda match: match[1])
                score = 1 - distance / PDQ_BITS
                bound = 1 - policy.max_distance / PDQ_BITS
                matches.append(self._flag("pdq", score, bound, item=item, distance=distance))
        body = BlocklistResult(version=self.version, mode=self.policy.mode, matches=matches)
        return Section(body, matches)

    def _flag(self, category: str, score: float, bound: float, **match: Any) -> Flag:
        """A match; a PDQ match's ``score`` is ``1 - distance / 256`` (its ``threshold``
        the same of ``max_distance``), so flags of every kind sort together."""
        return Flag(
            policy=self.name,
            category=category,
            score=round(score, SCORE_DIGITS),
            threshold=round(bound, SCORE_DIGITS),
            action=self.policy.action,
            severity=self.policy.severity,
            **match,
        )

    def flagged(self, values: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Embedding matches only: a PDQ match needs the image's hash, which the store
        does not keep."""
        if not self.item_ids:
            return [], values.new_zeros(values.shape[0], 0, dtype=torch.bool)
        best = values.max(dim=1, keepdim=True).values
        return ["images"], best >= self.policy.min_similarity

    def operating_point(self, index: int) -> tuple[float, str]:
        return self.policy.min_similarity, self.policy.action
