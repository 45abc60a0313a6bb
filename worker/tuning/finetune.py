"""The whole `worker finetune` run: validate, baseline, train, WiSE-FT, checkpoint, report."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.checkpoint import save_checkpoint
from worker.errors import DataError
from worker.log import get_logger
from worker.model import LoadedModel, fingerprint_model, model_config
from worker.policy import LoadedPolicy
from worker.settings import Settings
from worker.tuning.datasets import Example, LabelledSet, read_labelled, validate
from worker.tuning.embedder import embed_files
from worker.tuning.finetune_data import (
    ClassTexts,
    ImageDataset,
    class_heads,
    class_texts,
    needs_none,
)
from worker.tuning.trainer import (
    TrainConfig,
    Trainer,
    interpolate,
    load_resume,
    load_trainable,
    seed_everything,
    trainable_names,
    trainable_state,
)

log = get_logger(__name__)
STATE_DIR = ".resume"
DEFAULT_ALPHAS = tuple(round(a * 0.1, 1) for a in range(11))


@dataclass
class FinetuneOptions:
    data: Path
    out: Path
    policy: LoadedPolicy | None = None
    templates: str = "simple"
    control: Path | None = None
    control_templates: str = "simple"
    control_margin: float = 0.02
    alphas: Sequence[float] = DEFAULT_ALPHAS
    min_per_class: int = 5
    resume: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Scored:
    accuracy: float
    per_class: dict[str, dict[str, float]]


class Judge:
    """Accuracy of the model's current weights on labelled examples, through the same
    decode/preprocess/encode path the worker serves with."""

    def __init__(
        self,
        model: LoadedModel,
        settings: Settings,
        classes: ClassTexts,
        examples: Sequence[Example],
    ) -> None:
        self.model = model
        self.settings = settings
        self.classes = classes
        self.examples = list(examples)
        self.index = classes.index()

    def score(self, heads: torch.Tensor) -> Scored:
        if not self.examples:
            return Scored(float("nan"), {})
        features = embed_files(
            self.model,
            [e.path for e in self.examples],
            None,
            max_pixels=self.settings.image.max_pixels,
            allowed_formats=self.settings.image.allowed_formats,
            max_side=self.settings.image.max_side,
            max_aspect_ratio=self.settings.image.max_aspect_ratio,
            workers=self.settings.decode_workers,
        ).embeddings.to(heads.device)
        predicted = (features @ heads.T).argmax(dim=1).cpu().numpy()
        truth = [{self.index[label] for label in (e.labels or ("none",))} for e in self.examples]
        hits = np.array([p in t for p, t in zip(predicted, truth, strict=True)])
        per_class = {}
        for cls, i in self.index.items():
            positive = np.array([i in t for t in truth])
            flagged = predicted == i
            tp = int(np.sum(flagged & positive))
            per_class[cls] = {
                "support": int(positive.sum()),
                "precision": tp / int(flagged.sum()) if flagged.any() else 0.0,
                "recall": tp / int(positive.sum()) if positive.any() else 0.0,
            }
        return Scored(float(hits.mean()), per_class)


def check_data(opts: FinetuneOptions) -> tuple[LabelledSet, LabelledSet | None, list[str]]:
    """Every data problem at once, before any model is loaded."""
    problems: list[str] = []
    data = read_labelled(opts.data)
    known = opts.policy.policy.class_ids() if opts.policy else None
    classes = sorted({label for e in data.examples for label in e.labels})
    checks: list[tuple[list[str] | None, int, tuple[str, ...], bool]] = [
        (known, 0, (), True),  # every file readable, every label known
        (classes, opts.min_per_class, ("train",), False),
        (classes, 1, ("val",), False),
    ]
    for wanted, minimum, splits, images in checks:
        try:
            validate(
                data, classes=wanted, min_per_class=minimum, splits=splits, check_images=images
            )
        except DataError as exc:
            problems.extend(exc.problems)
    control = None
    if opts.control is not None:
        try:
            control = read_labelled(opts.control)
            validate(control, classes=None, min_per_class=1, splits=())
        except DataError as exc:
            problems.extend(f"control: {p}" for p in exc.problems)
    if problems:
        raise DataError(list(dict.fromkeys(problems)))
    return data, control, classes


def run_finetune(
    settings: Settings,
    model: LoadedModel,
    opts: FinetuneOptions,
    data: LabelledSet,
    control: LabelledSet | None,
    labels: list[str],
    hooks: dict[str, Callable[..., None]] | None = None,
) -> dict[str, Any]:
    hooks = hooks or {}
    seed_everything(opts.train.seed)
    state_dir = opts.out / STATE_DIR
    resume_state = load_resume(state_dir) if opts.resume else None
    classes = class_texts(
        labels,
        policy=opts.policy.policy if opts.policy else None,
        templates=opts.templates,
        needs_none=needs_none(data),
    )
    heads = class_heads(model, classes)
    val = Judge(model, settings, classes, data.split("val"))
    held_out = data.split("test") or data.split("val")
    test = Judge(model, settings, classes, held_out)
    control_judge = control_heads = None
    if control is not None:
        control_classes = class_texts(
            control.classes,
            policy=None,
            templates=opts.control_templates,
            needs_none=needs_none(control),
        )
        control_heads = class_heads(model, control_classes)
        control_judge = Judge(model, settings, control_classes, control.examples)
    names = trainable_names(model.model, opts.train.train_text)
    zero_shot = trainable_state(model.model, names)
    before_test = test.score(heads)
    before_val = val.score(heads).accuracy

    def control_accuracy() -> float | None:
        if control_judge is None or control_heads is None:
            return None
        return control_judge.score(control_heads).accuracy

    before_control = control_accuracy()

    from open_clip.transform import PreprocessCfg, image_transform_v2

    train_tf = image_transform_v2(PreprocessCfg(**model.model.visual.preprocess_cfg), is_train=True)
    trainer = Trainer(
        model,
        classes,
        heads,
        ImageDataset(data.split("train"), classes.index(), train_tf),
        lambda: val.score(heads).accuracy,
        opts.train,
        state_dir,
    )
    probe = None
    if opts.train.method == "lp-ft" and resume_state is None:
        probe = trainer.linear_probe(hooks.get("lp_epoch"))
    tuned = trainer.fit(resume_state, hooks.get("step"), hooks.get("epoch"), probe)

    curve = []
    for alpha in opts.alphas:
        load_trainable(model.model, interpolate(zero_shot, tuned, alpha))
        point = {"alpha": float(alpha), "val_acc": val.score(heads).accuracy}
        control_acc = control_accuracy()
        if control_acc is not None:
            point["control_acc"] = control_acc
        curve.append(point)
        log.info("finetune.alpha", **point)
    floor = (before_control - opts.control_margin) if before_control is not None else None
    allowed = [p for p in curve if floor is None or p["control_acc"] >= floor - 1e-12]
    chosen = max(allowed, key=lambda p: (p["val_acc"], -p["alpha"]))
    load_trainable(model.model, interpolate(zero_shot, tuned, chosen["alpha"]))
    after_test = test.score(heads)
    after_val = val.score(heads).accuracy
    after_control = control_accuracy()

    cfg = model_config(model.name)
    name = save_checkpoint(model.model, cfg, opts.out)
    fingerprint = fingerprint_model(model.model, cfg)
    shutil.rmtree(state_dir, ignore_errors=True)
    history = trainer.history
    return {
        "checkpoint": name,
        "base_model": model.describe(),
        "fingerprint": fingerprint,
        "classes": classes.ids,
        "data": {
            "source": str(opts.data),
            "train": len(data.split("train")),
            "val": len(data.split("val")),
            "held_out": len(held_out),
            "held_out_split": "test" if data.split("test") else "val",
        },
        "config": {
            **asdict(opts.train),
            "templates": opts.templates,
            "policy": opts.policy.name if opts.policy else None,
        },
        "zero_shot": {
            "held_out_acc": before_test.accuracy,
            "val_acc": before_val,
            "per_class": before_test.per_class,
        },
        "fine_tuned": {
            "held_out_acc": after_test.accuracy,
            "val_acc": after_val,
            "per_class": after_test.per_class,
        },
        "alpha": chosen["alpha"],
        "alpha_curve": curve,
        "control": None
        if before_control is None
        else {
            "source": str(opts.control),
            "zero_shot_acc": before_control,
            "chosen_acc": after_control,
            "margin": opts.control_margin,
            "within_margin": after_control is not None
            and after_control >= before_control - opts.control_margin - 1e-12,
        },
        "history": {"epochs": history.epochs, "steps": history.steps},
        "throughput": {
            "train_images_per_s": history.images_per_s,
            "peak_memory_mb": history.peak_memory_mb,
            "device": str(model.device),
        },
    }
