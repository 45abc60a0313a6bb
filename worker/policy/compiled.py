"""A compiled policy: heads ready for one matmul, and how its scores become a result.

:class:`CompiledPolicy` is the one interface the engine, eval, thresholds and fine-tuning
use; each kind implements it in its own module (``moderation.py``, ``tags.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Generic, TypeVar

import torch

from worker.documents import BlocklistResult, Flag, ModerationResult, TagsResult
from worker.policy.schema import PolicyBase

P = TypeVar("P", bound=PolicyBase)
#: Scores and labels are rounded to this many digits in result documents.
SCORE_DIGITS = 6


@dataclass(frozen=True)
class Section:
    """One policy's part of one image's result."""

    body: ModerationResult | TagsResult | BlocklistResult
    flags: list[Flag] = field(default_factory=list)
    labels: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Observed:
    """The image behind a section's scores, for the evidence on its flags: its frames'
    L2-normalised embeddings ``(F, D)`` (one row for a still), for an animation the row
    that gave each class its score, and the model's logit scale."""

    embeddings: torch.Tensor
    logit_scale: float
    rows: Sequence[int] | None = None

    def row(self, index: int) -> torch.Tensor:
        """The embedding that gave class ``index`` its score."""
        return self.embeddings[0 if self.rows is None else self.rows[index]]


@dataclass(frozen=True)
class CompiledPolicy(ABC, Generic[P]):
    """A policy, its version (sha256 of definition + model) and its heads, one per row."""

    policy: P
    version: str
    matrix: torch.Tensor  # (heads, D), L2-normalised rows

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def kind(self) -> str:
        return self.policy.KIND

    def class_ids(self) -> list[str]:
        return list(self._class_ids)

    @cached_property
    def _class_ids(self) -> tuple[str, ...]:
        # Read for every job a section is made for: computed once per compiled policy.
        return tuple(self.policy.class_ids())

    def to(self, device: torch.device | str) -> CompiledPolicy[P]:
        return replace(self, matrix=self.matrix.to(device))

    @abstractmethod
    def scores(self, embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """``(N, D)`` normalised image embeddings -> ``(N, classes)`` scores in [0, 1]: the
        numbers results carry and eval measures (one matmul)."""

    @property
    def shadow(self) -> bool:
        """A shadow policy's flags and labels stay in its own section."""
        return self.policy.mode == "shadow"

    @abstractmethod
    def section(
        self,
        values: Sequence[float],
        frames: Sequence[int] | None = None,
        pdq: str | None = None,
        observed: Observed | None = None,
    ) -> Section:
        """One image's class scores -> its part of the result (flags, tags, labels).
        ``frames``, for an animation, names the frame that gave each class its score;
        ``pdq`` is the image's PDQ hash when a hash list is loaded; ``observed``, when
        given, is the image's embeddings, from which flags get their evidence."""

    @property
    def hash_lists(self) -> tuple[Any, ...]:
        """The PDQ hash lists it matches against (the engine hashes each image when any
        loaded policy has one)."""
        return ()

    def pool_frames(
        self, frames: Sequence[Sequence[float]]
    ) -> tuple[list[float], list[int] | None]:
        """An animation's class scores, one row per frame scored -> one score per class,
        and for each class the row it came from (None when no single row gives it).

        The default is the maximum over frames (the first row on a tie): a class is as
        present as in the frame that shows it most, so content in any scored frame counts
        and a class's score still depends only on its own heads and the image.
        """
        rows = [
            max(range(len(column)), key=column.__getitem__) for column in zip(*frames, strict=True)
        ]
        return [frames[row][cls] for cls, row in enumerate(rows)], rows

    def flagged(self, values: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """What ``section`` would flag (or keep, for tags), for many images at once:
        ``(N, classes)`` scores -> the names it reports and an ``(N, len(names))`` bool
        mask. ``worker policies preview`` counts with it over stored traffic."""
        raise NotImplementedError

    @abstractmethod
    def operating_point(self, index: int) -> tuple[float, str]:
        """The threshold in force for class ``index`` and what crossing it does (eval)."""
