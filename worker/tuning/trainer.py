"""One fine-tuning run of the image tower (``Trainer.fit``), as `worker finetune` uses it.

The loss (docs/tuning.md has the recipe and the figures behind it):

1. **Domain**: contrastive against the class prompts (FLYP-style): image embeddings
   against the class texts' embeddings, scaled by the model's learnable temperature. The
   text tower is frozen by default, so the class heads are the zero-shot heads the worker
   serves. ``--train-text`` also trains it (a sampled template per class per step).
   ``--method lp-ft`` first fits a linear head initialised from the zero-shot heads.
2. **Anchors**, so that what the domain data do not cover is not forgotten: every batch
   also carries anchor images (the ``--control`` set's training part, or ``--reference``
   images), encoded in the same forward pass.

   - *replay*: labelled control images against their own class heads (the same loss);
   - *distillation* (ZSCL-style feature distillation, which subsumes LwF's logit
     distillation: equal features give equal logits for every text): ``1 - cos`` between
     the image embedding and the frozen base model's embedding of the same augmented view;
   - *L2-SP* (option): squared distance of the trainable weights to the base weights.

AdamW, linear warm-up then cosine decay, gradient accumulation, autocast on GPU, a seed,
early stopping on a caller-given ranking of epochs (validation accuracy, control accuracy
within its margin), and a resume state written after every epoch.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from worker.log import get_logger
from worker.model import LoadedModel
from worker.tuning.finetune_data import ClassTexts, ImageDataset

log = get_logger(__name__)
RESUME_FILE = "state.pt"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-5
    replay: bool = True  # replay labelled anchors (the control set) against their heads
    distill: float = 1.0  # weight of feature distillation on anchor images (0: off)
    l2sp: float = 0.0  # weight of the L2-SP penalty (0: off)
    anchor_share: float = 0.5  # anchor images per batch, as a share of batch_size
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    train_text: bool = False
    method: str = "flyp"  # flyp | lp-ft
    lp_epochs: int = 3
    lp_lr: float = 1e-3
    patience: int = 3
    seed: int = 0
    workers: int = 0


@dataclass
class Anchors:
    """Images that hold the base model's behaviour while the domain trains. ``heads`` are
    the anchors' own class heads (labelled control images, replayed); without them the
    anchors serve feature distillation only (unlabelled reference images)."""

    dataset: torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]
    heads: torch.Tensor | None = None


@dataclass
class History:
    steps: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    epochs: list[dict[str, float]] = field(default_factory=list)  # epoch, losses, accuracies
    images_per_s: float = 0.0
    peak_memory_mb: float | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def trainable_names(model: Any, train_text: bool) -> list[str]:
    """Parameters fine-tuning changes: the image tower and the temperature (+ text tower)."""
    names = []
    for name, _ in model.named_parameters():
        if name.startswith("visual.") or name == "logit_scale" or train_text:
            names.append(name)
    return names


def trainable_state(model: Any, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def interpolate(
    zero_shot: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1-α)·zero-shot + α·tuned``, tensor by tensor."""
    return {
        n: torch.lerp(zero_shot[n].float(), tuned[n].float(), alpha).to(zero_shot[n].dtype)
        for n in zero_shot
    }


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _autocast(device: torch.device) -> Any:
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


Rank = Callable[[dict[str, float]], tuple[float, ...]]


def by_val_acc(record: dict[str, float]) -> tuple[float, ...]:
    return (record["val_acc"],)


class Trainer:
    """One fine-tuning run; ``fit`` can be resumed from the state it saves each epoch
    (when it has a ``state_dir``)."""

    def __init__(
        self,
        model: LoadedModel,
        classes: ClassTexts,
        heads: torch.Tensor,
        train_set: ImageDataset,
        evaluate: Callable[[], dict[str, float]],
        config: TrainConfig,
        state_dir: Path | None,
        anchors: Anchors | None = None,
        rank: Rank = by_val_acc,
    ) -> None:
        self.m = model
        self.net = model.model
        self.classes = classes
        self.zero_shot_heads = heads
        self.train_set = train_set
        self.evaluate = evaluate
        self.rank = rank
        self.cfg = config
        self.state_dir = state_dir
        self.anchors = anchors
        self.names = trainable_names(self.net, config.train_text)
        self.history = History()
        self.tokenizer = model.tokenizer
        self.base = trainable_state(self.net, self.names) if config.l2sp > 0 else None
        self.teacher = None
        if anchors is not None and config.distill > 0:  # the frozen base image tower
            self.teacher = copy.deepcopy(self.net.visual).eval().requires_grad_(False)

    # ------------------------------------------------------------------ the loss

    def _heads(self, probe: torch.Tensor | None) -> torch.Tensor:
        if probe is not None:
            return F.normalize(probe, dim=-1)
        if not self.cfg.train_text:
            return self.zero_shot_heads
        texts = [random.choice(group) for group in self.classes.texts]
        tokens = self.tokenizer(texts).to(self.m.device)
        return F.normalize(self.net.encode_text(tokens), dim=-1)

    @staticmethod
    def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def _step_loss(
        self,
        pixels: torch.Tensor,
        target: torch.Tensor,
        probe: torch.Tensor | None,
        anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, int]:
        n = len(pixels)
        batch = pixels if anchor is None else torch.cat([pixels, anchor[0]])
        with _autocast(self.m.device):
            features = F.normalize(self.net.encode_image(batch), dim=-1).float()
        scale = self.net.logit_scale.exp()
        logits = scale * features[:n] @ self._heads(probe).float().T
        loss = self._cross_entropy(logits, target)
        correct = int((target.gather(1, logits.argmax(dim=1, keepdim=True)) > 0).sum())
        if anchor is not None:
            loss = loss + self._anchor_loss(features[n:], *anchor, scale)
        if self.base is not None:
            params = dict(self.net.named_parameters())
            drift = sum(
                torch.sum((params[name].float() - base.float()) ** 2)
                for name, base in self.base.items()
                if params[name].requires_grad
            )
            loss = loss + self.cfg.l2sp * drift
        return loss, correct

    def _anchor_loss(
        self, features: torch.Tensor, pixels: torch.Tensor, target: torch.Tensor, scale: Any
    ) -> torch.Tensor:
        assert self.anchors is not None
        loss = features.new_zeros(())
        if self.cfg.replay and self.anchors.heads is not None:
            logits = scale * features @ self.anchors.heads.float().T
            loss = loss + self._cross_entropy(logits, target)
        if self.teacher is not None:
            with torch.no_grad(), _autocast(self.m.device):
                reference = F.normalize(self.teacher(pixels).float(), dim=-1)
            loss = loss + self.cfg.distill * (1 - (features * reference).sum(-1)).mean()
        return loss

    # ------------------------------------------------------------------ one phase

    def _set_trainable(self, image_tower: bool) -> list[torch.nn.Parameter]:
        params = []
        for name, param in self.net.named_parameters():
            wanted = name in self.names and (image_tower or name == "logit_scale")
            param.requires_grad_(wanted)
            if wanted:
                params.append(param)
        return params

    def _loader(
        self, dataset: Any, epoch: int, batch_size: int
    ) -> torch.utils.data.DataLoader[Any]:
        generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(dataset) > batch_size,
            num_workers=self.cfg.workers,
            generator=generator,
            pin_memory=self.m.device.type == "cuda",
        )

    def _domain_loader(self, epoch: int) -> torch.utils.data.DataLoader[Any]:
        return self._loader(self.train_set, epoch, self.cfg.batch_size)

    def _anchor_stream(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
        """Anchor batches without end (the anchor set is reshuffled each time it runs out)."""
        if self.anchors is None or self.cfg.anchor_share <= 0:
            return None
        if not self.cfg.replay and self.teacher is None:
            return None
        size = max(1, round(self.cfg.batch_size * self.cfg.anchor_share))
        dataset = self.anchors.dataset
        return itertools.chain.from_iterable(
            self._loader(dataset, 10_000 * (epoch + 1) + k, size) for k in itertools.count()
        )

    def linear_probe(self, on_epoch: Callable[[int, float], None] | None = None) -> torch.Tensor:
        """LP stage of LP-FT: fit a head initialised from the zero-shot heads."""
        probe = torch.nn.Parameter(self.zero_shot_heads.clone())
        params = [probe, *self._set_trainable(image_tower=False)]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lp_lr, weight_decay=0.0)
        self.net.train()
        for epoch in range(self.cfg.lp_epochs):
            total, count = 0.0, 0
            for batch, labels in self._domain_loader(1000 + epoch):
                pixels, target = batch.to(self.m.device), labels.to(self.m.device)
                loss, _ = self._step_loss(pixels, target, probe)
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total, count = total + loss.item() * len(pixels), count + len(pixels)
            if on_epoch:
                on_epoch(epoch + 1, total / max(count, 1))
        return probe.detach()

    def _optimizer(
        self, probe: torch.Tensor | None
    ) -> tuple[Any, Any, Any, torch.nn.Parameter | None]:
        cfg = self.cfg
        params = self._set_trainable(image_tower=True)
        probe_param = torch.nn.Parameter(probe.clone()) if probe is not None else None
        if probe_param is not None:
            params.append(probe_param)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = max(len(self._domain_loader(0)) // cfg.grad_accum, 1) * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total, int(total * cfg.warmup_ratio))
        )
        fp16 = self.m.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        return optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=fp16), probe_param

    def _train_epoch(
        self,
        run: _Run,
        epoch: int,
        on_step: Callable[[int, int, float], None] | None,
    ) -> tuple[float, float]:
        """One pass over the training set; returns (mean loss, accuracy)."""
        cfg = self.cfg
        self.net.train()
        running, count, correct = 0.0, 0, 0
        run.optimizer.zero_grad()
        anchors = self._anchor_stream(epoch)
        device = self.m.device
        for index, (batch, labels) in enumerate(self._domain_loader(epoch)):
            pixels = batch.to(device, non_blocking=True)
            target = labels.to(device, non_blocking=True)
            anchor = None
            if anchors is not None:
                a_pixels, a_target = next(anchors)
                anchor = (a_pixels.to(device, non_blocking=True), a_target.to(device))
            loss, hits = self._step_loss(pixels, target, run.probe, anchor)
            run.scaler.scale(loss / cfg.grad_accum).backward()
            if (index + 1) % cfg.grad_accum == 0:
                run.scaler.step(run.optimizer)
                run.scaler.update()
                run.optimizer.zero_grad()
                run.scheduler.step()
                with torch.no_grad():
                    self.net.logit_scale.clamp_(0, math.log(100))
            value = loss.item()
            running, count, correct = (
                running + value * len(pixels),
                count + len(pixels),
                correct + hits,
            )
            run.seen += len(pixels) + (0 if anchor is None else len(anchor[0]))
            self.history.steps.append((len(self.history.steps) + 1, value))
            if on_step:
                on_step(epoch + 1, index + 1, value)
        return running / max(count, 1), correct / max(count, 1)

    def fit(
        self,
        resume: dict[str, Any] | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        probe: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Train; returns the trainable state of the best epoch by ``rank``."""
        optimizer, scheduler, scaler, probe_param = self._optimizer(probe)
        run = _Run(
            optimizer,
            scheduler,
            scaler,
            probe_param,
            best_state=trainable_state(self.net, self.names),
        )
        if resume is not None:
            self._restore(run, resume)
        started = time.perf_counter()
        if self.m.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for epoch in range(run.start_epoch, self.cfg.epochs):
            loss, train_acc = self._train_epoch(run, epoch, on_step)
            self.net.eval()
            record = {
                "epoch": epoch + 1,
                "train_loss": loss,
                "train_acc": train_acc,
                **self.evaluate(),
                "lr": float(scheduler.get_last_lr()[0]),
            }
            self.history.epochs.append(record)
            if run.best_rank is None or self.rank(record) > run.best_rank:
                run.best_rank, run.bad_epochs = self.rank(record), 0
                run.best_epoch = epoch + 1
                run.best_state = trainable_state(self.net, self.names)
            else:
                run.bad_epochs += 1
            self._save(epoch + 1, run)
            if on_epoch:
                on_epoch(record)
            if run.bad_epochs >= self.cfg.patience:
                log.info("finetune.early_stopped", epoch=epoch + 1, best_epoch=run.best_epoch)
                break
        elapsed = time.perf_counter() - started
        if run.seen and elapsed > 0:
            self.history.images_per_s = run.seen / elapsed
        if self.m.device.type == "cuda":
            self.history.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.best_epoch = run.best_epoch
        return run.best_state

    def _restore(self, run: _Run, state: dict[str, Any]) -> None:
        load_trainable(self.net, state["trainable"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.probe is not None and state.get("probe") is not None:
            with torch.no_grad():
                run.probe.copy_(state["probe"])
        run.start_epoch, run.best_rank, run.bad_epochs = (
            state["epoch"],
            state["best_rank"],
            state["bad_epochs"],
        )
        run.best_epoch = state["best_epoch"]
        run.best_state = state["best_state"]
        self.history = state["history"]
        torch.set_rng_state(state["rng"])
        random.setstate(state["py_rng"])
        log.info("finetune.resumed", from_epoch=run.start_epoch + 1)

    def _save(self, epoch: int, run: _Run) -> None:
        record = self.history.epochs[-1] if self.history.epochs else {}
        if self.state_dir is None:
            log.info("finetune.trial_epoch", **record)
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "epoch": epoch,
            "config": {"lr": self.cfg.lr, "epochs": self.cfg.epochs},
            "trainable": trainable_state(self.net, self.names),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "best_rank": run.best_rank,
            "best_epoch": run.best_epoch,
            "bad_epochs": run.bad_epochs,
            "best_state": run.best_state,
            "probe": run.probe.detach().clone() if run.probe is not None else None,
            "history": self.history,
            "rng": torch.get_rng_state(),
            "py_rng": random.getstate(),
        }
        tmp = self.state_dir / (RESUME_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_dir / RESUME_FILE)
        log.info("finetune.epoch_saved", **record)


@dataclass
class _Run:
    """Mutable state of one ``fit``: what the resume file captures."""

    optimizer: Any
    scheduler: Any
    scaler: Any
    probe: torch.nn.Parameter | None
    best_state: dict[str, torch.Tensor]
    start_epoch: int = 0
    best_rank: tuple[float, ...] | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    seen: int = 0


def load_resume(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / RESUME_FILE
    if not path.is_file():
        return None
    loaded: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return loaded
