"""What `worker finetune` trains on: class texts, label targets, image datasets.

Classes come from a policy (``--policy``: a category's or tag's prompts become its texts,
and the background prompts stand for images with no label) or from the label names put
into a template set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from worker.model import LoadedModel
from worker.policy import PolicyBase
from worker.policy.heads import build_heads, ensemble_texts
from worker.policy.templates import TEMPLATE_SETS
from worker.tuning.datasets import NONE_LABEL, Example, LabelledSet


@dataclass(frozen=True)
class ClassTexts:
    """One entry per class: its id and the texts whose ensemble is its head."""

    ids: list[str]
    texts: list[list[str]]

    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.ids)}


def class_texts(
    labels: Sequence[str],
    *,
    policy: PolicyBase | None,
    templates: str,
    needs_none: bool,
) -> ClassTexts:
    """Texts per class. ``needs_none`` adds a ``none`` class for unlabelled images."""
    ids = list(labels)
    texts: list[list[str]] = []
    if policy is not None:
        tmpl = policy.template_list()
        by_id = policy.class_prompts()
        texts = [ensemble_texts(by_id[c], tmpl) for c in ids]
        if needs_none:
            background = policy.background_prompts()
            if background is None:
                raise ValueError(
                    f"images without a label need a policy with background prompts; "
                    f"a {policy.KIND} policy has none"
                )
            ids.append(NONE_LABEL)
            texts.append(ensemble_texts(background, tmpl))
    else:
        tmpl = TEMPLATE_SETS[templates]
        texts = [ensemble_texts([c], tmpl) for c in ids]
        if needs_none:
            ids.append(NONE_LABEL)
            texts.append(ensemble_texts(["an ordinary photo"], tmpl))
    return ClassTexts(ids, texts)


@torch.no_grad()
def class_heads(model: LoadedModel, classes: ClassTexts) -> torch.Tensor:
    """(C, D) zero-shot heads on the model's device (float32)."""
    unique = list(dict.fromkeys(t for group in classes.texts for t in group))
    vectors = model.encode_texts(unique)
    lookup = dict(zip(unique, vectors, strict=True))
    return build_heads(classes.texts, lookup).to(model.device)


def targets(example: Example, index: dict[str, int]) -> torch.Tensor:
    """Soft target over classes: uniform over the example's labels (or ``none``); an
    empty ``index`` (unlabelled reference images) gives an empty target."""
    if not index:
        return torch.zeros(0)
    target = torch.zeros(len(index))
    for label in example.labels or (NONE_LABEL,):
        target[index[label]] = 1.0
    return target / target.sum()


class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Training examples: ``decode`` gives the frames the worker would score (the serving
    decoder: JPEG draft mode, an animation's frames), ``transform`` augments one of them
    (a random frame of an animation) — on top of the serving decode, never instead."""

    def __init__(
        self,
        examples: Sequence[Example],
        index: dict[str, int],
        transform: Callable[[Image.Image], torch.Tensor],
        decode: Callable[[bytes], list[Image.Image]],
    ) -> None:
        self.examples = list(examples)
        self.index = index
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        example = self.examples[i]
        frames = self.decode(example.path.read_bytes())
        frame = frames[int(torch.randint(len(frames), ()))] if len(frames) > 1 else frames[0]
        return self.transform(frame), targets(example, self.index)


def needs_none(data: LabelledSet) -> bool:
    return any(not e.labels for e in data.examples)
