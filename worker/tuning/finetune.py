"""The whole `worker finetune` run: validate, baseline, train, WiSE-FT, checkpoint, report."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.checkpoint import save_checkpoint
from worker.engine import DecodeOptions, ModelInput, frame_inputs
from worker.errors import DataError
from worker.log import get_logger
from worker.model import LoadedModel, fingerprint_model, model_config
from worker.policy import LoadedPolicy
from worker.settings import Settings
from worker.tuning.datasets import Example, LabelledSet, read_labelled, validate
from worker.tuning.embedder import EmbeddedFiles, decode_like_serving
from worker.tuning.finetune_data import (
    ClassTexts,
    ImageDataset,
    class_heads,
    class_texts,
    needs_none,
)
from worker.tuning.trainer import (
    Anchors,
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


#: The learning-rate sweep: a log grid by decades, then the half-decades either side of
#: the best. Decades cover both a ViT-B-32 (best near 1e-5) and small models (near 1e-3).
LR_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
SWEEP_FILE = "sweep.json"


@dataclass
class FinetuneOptions:
    data: Path
    out: Path
    policy: LoadedPolicy | None = None
    templates: str = "simple"
    control: Path | None = None
    control_templates: str = "simple"
    control_margin: float = 0.02
    reference: Path | None = None  # unlabelled images for feature distillation
    alphas: Sequence[float] = DEFAULT_ALPHAS
    min_per_class: int = 5
    resume: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    lr: float | None = None  # None: chosen by the sweep
    lr_grid: Sequence[float] = LR_GRID
    epochs: int | None = None  # most epochs of the full run; None: from the data's size
    sweep_epochs: int | None = None  # epochs of each trial; None: from the data's size
    patience: int | None = None  # None: a quarter of the full run's epochs (at least 3)


#: Optimizer steps the defaults aim at: a trial of the sweep runs about SWEEP_STEPS, the
#: full run at most about FULL_STEPS (early stopping usually ends it sooner); a small data
#: set therefore gets more epochs, a large one fewer, never under MIN_EPOCHS in full.
SWEEP_STEPS = 40
FULL_STEPS = 240
MIN_EPOCHS = 10


def schedule(opts: FinetuneOptions, train_images: int) -> dict[str, Any]:
    """Epochs of the trials and of the full run, and the patience, with the reason."""
    cfg = opts.train
    steps = max(max(train_images // cfg.batch_size, 1) // cfg.grad_accum, 1)
    epochs = opts.epochs or max(MIN_EPOCHS, math.ceil(FULL_STEPS / steps))
    trial = opts.sweep_epochs or max(1, math.ceil(SWEEP_STEPS / steps))
    patience = opts.patience or max(3, epochs // 4)
    why = (
        f"{train_images} training images make {steps} optimizer step(s) per epoch; "
        + ("--epochs given" if opts.epochs else f"about {FULL_STEPS} steps at most")
        + f" → {epochs} epoch(s), stopping after {patience} without a better validation "
        f"score; each learning-rate trial runs {trial} epoch(s)"
    )
    return {
        "steps_per_epoch": steps,
        "epochs": min(epochs, 1000),
        "trial_epochs": trial,
        "patience": patience,
        "why": why,
    }


@dataclass
class Scored:
    accuracy: float
    per_class: dict[str, dict[str, float]]


class Judge:
    """Accuracy of the model's current weights on labelled examples, through the path the
    worker serves with: each file is decoded and preprocessed once by the serving code
    (:class:`worker.engine.DecodeOptions`, :func:`worker.engine.frame_inputs`) and kept
    (up to ``HELD_FRAMES`` frames), then re-encoded at every call; an animation's frames
    are averaged like eval's ``per_file_mean``."""

    HELD_FRAMES = 4096

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
        self.options = DecodeOptions.from_settings(settings.image, model)
        self.held: list[list[ModelInput]] | None = None

    def _prepare(self) -> list[list[ModelInput]]:
        if self.held is not None:
            return self.held

        def one(example: Example) -> list[ModelInput]:
            decoded = self.options.open(example.path.read_bytes())
            return frame_inputs(decoded, self.model).inputs

        with ThreadPoolExecutor(self.settings.decode_workers or os.cpu_count() or 1) as pool:
            inputs = list(pool.map(one, self.examples))
        if sum(map(len, inputs)) <= self.HELD_FRAMES:
            self.held = inputs
        return inputs

    @torch.no_grad()
    def features(self) -> torch.Tensor:
        """(N, D) L2-normalised embeddings, one per example (an animation's frames
        averaged by ``EmbeddedFiles.per_file_mean``, as eval does)."""
        batch: list[ModelInput] = []
        spans: list[tuple[int, int]] = []
        for frames in self._prepare():
            spans.append((len(batch), len(batch) + len(frames)))
            batch.extend(frames)
        vectors = [
            self.model.encode_images(self.model.batch_pixels(batch[i : i + 64])).float()
            for i in range(0, len(batch), 64)
        ]
        return EmbeddedFiles(torch.cat(vectors), 0, 0, spans).per_file_mean()

    def score(self, heads: torch.Tensor) -> Scored:
        if not self.examples:
            return Scored(float("nan"), {})
        features = self.features().to(heads.device)
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
    if opts.policy is not None:
        shown = [c for c, prompts in opts.policy.policy.class_prompts().items() if not prompts]
        if shown or known == []:
            problems.append(
                f"--policy {opts.policy.name}: fine-tuning trains against text heads, and "
                f"{', '.join(shown) or 'this ' + opts.policy.policy.KIND + ' policy'} has "
                "none (exemplar categories and blocklists are images); give a policy of "
                "prompts, or none to use the labels as prompts"
            )
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
            replay, judged = split_control(control)
            if not replay or not judged:
                problems.append(
                    f"control: {opts.control} needs images in its train split (replayed in "
                    f"training) and in val or test (judged): it has {len(replay)} and "
                    f"{len(judged)}; add a split column, or more images"
                )
        except DataError as exc:
            problems.extend(f"control: {p}" for p in exc.problems)
    if opts.reference is not None and not reference_images(opts.reference):
        problems.append(f"--reference {opts.reference}: no images found")
    if problems:
        raise DataError(list(dict.fromkeys(problems)))
    return data, control, classes


def split_control(control: LabelledSet) -> tuple[list[Example], list[Example]]:
    """The control set's replay part (its train split) and its judged part (val + test):
    what the recipe trains on is never what it is judged by."""
    return control.split("train"), [e for e in control.examples if e.split != "train"]


class FinetuneRun:
    """Everything one `worker finetune` needs between loading the data and writing the
    checkpoint: the judges, the anchors, the base weights, the sweep and the full run."""

    def __init__(
        self,
        settings: Settings,
        model: LoadedModel,
        opts: FinetuneOptions,
        data: LabelledSet,
        control: LabelledSet | None,
        labels: list[str],
        hooks: dict[str, Callable[..., None]],
    ) -> None:
        self.settings, self.model, self.opts, self.data = settings, model, opts, data
        self.hooks = hooks
        self.state_dir = opts.out / STATE_DIR
        policy = opts.policy.policy if opts.policy else None
        self.classes = class_texts(
            labels, policy=policy, templates=opts.templates, needs_none=needs_none(data)
        )
        self.heads = class_heads(model, self.classes)
        self.val = Judge(model, settings, self.classes, data.split("val"))
        self.held_out = data.split("test") or data.split("val")
        self.test = (  # without a test split the held-out set is val: one judge decodes it
            Judge(model, settings, self.classes, self.held_out) if data.split("test") else self.val
        )
        self.control_judge: Judge | None = None
        self.control_heads: torch.Tensor | None = None
        anchors: list[Example] = []
        if control is not None:
            known = set(policy.class_ids()) if policy is not None else set()
            control_classes = class_texts(  # the policy's own texts when it names the labels
                control.classes,
                policy=policy if set(control.classes) <= known else None,
                templates=opts.control_templates,
                needs_none=needs_none(control),
            )
            self.control_heads = class_heads(model, control_classes)
            replay, judged = split_control(control)
            self.control_judge = Judge(model, settings, control_classes, judged)
            anchors = replay
            self.control_index = control_classes.index()
        self.anchor_examples = anchors
        self.reference = reference_images(opts.reference) if opts.reference else []
        self.schedule = schedule(opts, len(data.split("train")))
        self.names = trainable_names(model.model, opts.train.train_text)
        self.zero_shot = trainable_state(model.model, self.names)
        self.before_control = self.control_acc()
        self.floor = None
        if self.before_control is not None:
            self.floor = self.before_control - opts.control_margin - 1e-9

        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = PreprocessCfg(**model.model.visual.preprocess_cfg)
        self.train_tf = image_transform_v2(cfg, is_train=True)

    # ------------------------------------------------------------------ judging

    def control_acc(self) -> float | None:
        if self.control_judge is None or self.control_heads is None:
            return None
        return self.control_judge.score(self.control_heads).accuracy

    def evaluate(self) -> dict[str, float]:
        record = {"val_acc": self.val.score(self.heads).accuracy}
        control = self.control_acc()
        if control is not None:
            record["control_acc"] = control
        return record

    def rank(self, record: dict[str, float]) -> tuple[float, ...]:
        """Within the control margin first, then domain validation accuracy; outside it,
        the smallest control drop first."""
        if self.floor is None or "control_acc" not in record:
            return (1.0, record["val_acc"], 0.0)
        if record["control_acc"] >= self.floor:
            return (1.0, record["val_acc"], record["control_acc"])
        return (0.0, record["control_acc"], record["val_acc"])

    # ------------------------------------------------------------------ training

    def anchors(self) -> Anchors | None:
        cfg = self.opts.train
        if self.anchor_examples and self.control_heads is not None:
            dataset = self.dataset(self.anchor_examples, self.control_index)
            return Anchors(dataset, self.control_heads)
        if self.reference and cfg.distill > 0:
            return Anchors(self.dataset(self.reference, {}))
        return None

    def dataset(self, examples: Sequence[Example], index: dict[str, int]) -> ImageDataset:
        """Training images decoded as the worker serves them, augmented on top."""
        settings, model = self.settings, self.model
        return ImageDataset(
            examples, index, self.train_tf, lambda data: decode_like_serving(data, settings, model)
        )

    def trainer(self, config: TrainConfig, state_dir: Path | None) -> Trainer:
        return Trainer(
            self.model,
            self.classes,
            self.heads,
            self.dataset(self.data.split("train"), self.classes.index()),
            self.evaluate,
            config,
            state_dir,
            anchors=self.anchors(),
            rank=self.rank,
        )

    def sweep(self) -> tuple[float, list[dict[str, Any]]]:
        """Short runs over a log grid of learning rates, then the half-decades around the
        best; returns the chosen rate and every trial. Finished trials survive a kill."""
        opts = self.opts
        path = self.state_dir / SWEEP_FILE
        trials: list[dict[str, Any]] = []
        if opts.resume and path.is_file():
            trials = json.loads(path.read_text())
        done = {t["lr"] for t in trials}

        def run(lr: float) -> None:
            if lr in done:
                if "trial" in self.hooks:
                    self.hooks["trial"](next(t for t in trials if t["lr"] == lr))
                return
            load_trainable(self.model.model, self.zero_shot)
            seed_everything(opts.train.seed)
            epochs = self.schedule["trial_epochs"]
            config = replace(opts.train, lr=lr, epochs=epochs, patience=10**6)
            started = time.perf_counter()
            trainer = self.trainer(config, None)
            trainer.fit()
            best = trainer.history.epochs[trainer.best_epoch - 1]
            trial = {
                "lr": lr,
                "epochs": epochs,
                "best_epoch": trainer.best_epoch,
                "val_acc": best["val_acc"],
                "control_acc": best.get("control_acc"),
                "seconds": round(time.perf_counter() - started, 2),
                "history": [
                    {k: e[k] for k in ("epoch", "val_acc", "control_acc") if k in e}
                    for e in trainer.history.epochs
                ],
            }
            trials.append(trial)
            done.add(lr)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(trials, indent=1))
            log.info("finetune.trial", **{k: v for k, v in trial.items() if k != "history"})
            if "trial" in self.hooks:
                self.hooks["trial"](trial)

        def best() -> dict[str, Any]:
            return max(trials, key=lambda t: (self.rank(_record(t)), -t["lr"]))

        if "plan" in self.hooks:
            self.hooks["plan"]("sweep", len(opts.lr_grid) + 2)
        for lr in opts.lr_grid:
            run(lr)
        centre = best()["lr"]
        for lr in (centre / math.sqrt(10), centre * math.sqrt(10)):
            run(float(f"{lr:.3g}"))
        chosen = best()
        log.info("finetune.lr_chosen", lr=chosen["lr"], val_acc=chosen["val_acc"])
        load_trainable(self.model.model, self.zero_shot)
        return chosen["lr"], sorted(trials, key=lambda t: t["lr"])

    def wise(self, tuned: dict[str, torch.Tensor]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The WiSE-FT α curve and the α chosen on validation under the control margin."""
        curve = []
        for alpha in self.opts.alphas:
            load_trainable(self.model.model, interpolate(self.zero_shot, tuned, alpha))
            point = {"alpha": float(alpha), **self.evaluate()}
            curve.append(point)
            log.info("finetune.alpha", **point)
        chosen = max(curve, key=lambda p: (self.rank(p), -p["alpha"]))
        load_trainable(self.model.model, interpolate(self.zero_shot, tuned, chosen["alpha"]))
        return chosen, curve


def _record(trial: dict[str, Any]) -> dict[str, float]:
    record = {"val_acc": trial["val_acc"]}
    if trial.get("control_acc") is not None:
        record["control_acc"] = trial["control_acc"]
    return record


def reference_images(folder: Path) -> list[Example]:
    """The unlabelled ``--reference`` images (distillation anchors)."""
    from worker.fetcher import IMAGE_SUFFIXES

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Example(p, (), "train", str(p)) for p in paths]


def recipe(opts: FinetuneOptions, run: FinetuneRun, swept: bool) -> dict[str, Any]:
    """What the objective held on to, in words for the report."""
    cfg = opts.train
    anchors = []
    if run.anchor_examples and cfg.replay:
        anchors.append(f"replay of {len(run.anchor_examples)} control images")
    if (run.anchor_examples or run.reference) and cfg.distill > 0:
        source = "control" if run.anchor_examples else "reference"
        anchors.append(f"feature distillation to the base model on {source} images")
    if cfg.l2sp > 0:
        anchors.append(f"L2-SP ({cfg.l2sp:g})")
    return {
        "objective": anchors or ["domain loss only"],
        "lr": "chosen by the sweep" if swept else "given (--lr)",
    }


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
    started = time.perf_counter()
    run = FinetuneRun(settings, model, opts, data, control, labels, hooks)
    before_test = run.test.score(run.heads)
    before_val = run.val.score(run.heads).accuracy
    resume_state = load_resume(run.state_dir) if opts.resume else None

    trials: list[dict[str, Any]] = []
    lr = opts.lr
    if lr is None and resume_state is not None:
        lr = resume_state["config"]["lr"]  # the sweep had finished before the kill
    if lr is None:
        lr, trials = run.sweep()
    elif opts.resume and (run.state_dir / SWEEP_FILE).is_file():
        trials = json.loads((run.state_dir / SWEEP_FILE).read_text())
    config = replace(
        opts.train, lr=lr, epochs=run.schedule["epochs"], patience=run.schedule["patience"]
    )
    seed_everything(opts.train.seed)
    if "plan" in hooks:
        hooks["plan"]("train", config.epochs)
    trainer = run.trainer(config, run.state_dir)
    probe = None
    if config.method == "lp-ft" and resume_state is None:
        probe = trainer.linear_probe(hooks.get("lp_epoch"))
    tuned = trainer.fit(resume_state, hooks.get("step"), hooks.get("epoch"), probe)
    chosen, curve = run.wise(tuned)
    after_test = run.test.score(run.heads)
    after_val = run.val.score(run.heads).accuracy
    after_control = run.control_acc()

    cfg = model_config(model.name)
    name = save_checkpoint(model.model, cfg, opts.out)
    fingerprint = fingerprint_model(model.model, cfg)
    shutil.rmtree(run.state_dir, ignore_errors=True)
    history = trainer.history
    return {
        "checkpoint": name,
        "base_model": model.describe(),
        "fingerprint": fingerprint,
        "classes": run.classes.ids,
        "data": {
            "source": str(opts.data),
            "train": len(data.split("train")),
            "val": len(data.split("val")),
            "held_out": len(run.held_out),
            "held_out_split": "test" if data.split("test") else "val",
        },
        "config": {
            **asdict(config),
            "templates": opts.templates,
            "policy": opts.policy.name if opts.policy else None,
        },
        "recipe": recipe(opts, run, swept=opts.lr is None),
        "sweep": trials,
        "schedule": run.schedule,
        "best_epoch": trainer.best_epoch,
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
        if run.before_control is None
        else {
            "source": str(opts.control),
            "replayed": len(run.anchor_examples),
            "judged": len(run.control_judge.examples) if run.control_judge else 0,
            "zero_shot_acc": run.before_control,
            "chosen_acc": after_control,
            "margin": opts.control_margin,
            "within_margin": after_control is not None
            and after_control >= run.before_control - opts.control_margin - 1e-9,
        },
        "history": {"epochs": history.epochs, "steps": history.steps},
        "throughput": {
            "train_images_per_s": history.images_per_s,
            "peak_memory_mb": history.peak_memory_mb,
            "device": str(model.device),
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
