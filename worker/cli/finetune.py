"""`worker finetune`: adapt the model to labelled domain data; write a servable checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TaskID

from worker.cli.common import DataOption, progress_bar, state, stderr
from worker.cli.errors import exits_on_errors, fail, require_exists
from worker.settings import DEFAULT_BATCH_SIZE

# The template sets of worker/policy/templates.py, named here so that `--help` does not
# import open_clip (a test keeps the two in step).
TEMPLATE_SET_NAMES = ("default", "simple", "scene", "none")


def finetune(
    ctx: typer.Context,
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            "-p",
            help="Map labels to this policy's "
            "categories/tags: their prompts become the class texts.",
        ),
    ] = None,
    templates: Annotated[
        str,
        typer.Option(
            help="Template set for label names without --policy: "
            + ", ".join(TEMPLATE_SET_NAMES)
            + "."
        ),
    ] = "simple",
    method: Annotated[
        str, typer.Option(help="flyp (contrastive against the class prompts) or lp-ft.")
    ] = "flyp",
    lp_epochs: Annotated[
        int, typer.Option(min=1, help="lp-ft: epochs fitting the linear head first.")
    ] = 3,
    lp_lr: Annotated[float, typer.Option(min=0, help="lp-ft: learning rate of the head.")] = 1e-3,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Most epochs of the full run; early stopping on validation picks the "
            "epoch served (--patience). Default: about 240 optimizer steps, at least 10 "
            "epochs. Giving --lr and --epochs skips the learning-rate sweep.",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = DEFAULT_BATCH_SIZE,
    lr: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Peak learning rate (AdamW). Default: chosen by a sweep of short runs over "
            "1e-6…1e-2 scored on the validation split (and the control set); giving it "
            "skips the sweep.",
        ),
    ] = None,
    sweep_epochs: Annotated[
        int | None,
        typer.Option(
            min=1, help="Epochs of each learning-rate trial [default: about 40 optimizer steps]."
        ),
    ] = None,
    weight_decay: Annotated[float, typer.Option(min=0)] = 0.1,
    warmup: Annotated[float, typer.Option(min=0, max=1, help="Share of steps warming up.")] = 0.1,
    grad_accum: Annotated[int, typer.Option(min=1, help="Batches per optimizer step.")] = 1,
    train_text: Annotated[
        bool, typer.Option(help="Also train the text tower (frozen by default).")
    ] = False,
    patience: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Epochs without a better validation score before stopping "
            "[default: a quarter of --epochs, at least 3].",
        ),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    control: Annotated[
        Path | None,
        typer.Option(
            help="A general labelled set whose accuracy must not drop more than --control-margin."
        ),
    ] = None,
    control_margin: Annotated[
        float, typer.Option(min=0, max=1, help="Allowed control accuracy drop (0.02 = 2 points).")
    ] = 0.02,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="A folder of unlabelled everyday images: the model is held to its base "
            "embeddings on them (feature distillation) when no --control is given.",
        ),
    ] = None,
    replay: Annotated[
        bool,
        typer.Option(help="Replay --control training images (their train split) in every batch."),
    ] = True,
    distill: Annotated[
        float,
        typer.Option(
            min=0,
            help="Weight of feature distillation to the base model on control/reference "
            "images (0 turns it off).",
        ),
    ] = 1.0,
    l2sp: Annotated[
        float, typer.Option(min=0, help="Weight of the L2-SP pull towards the base weights.")
    ] = 0.0,
    min_per_class: Annotated[int, typer.Option(min=1, help="Fewest train images per class.")] = 5,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader processes.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Adapt the model to labelled domain data without losing what it knew; write a checkpoint.

    With no flags beyond --data (and --policy), the learning rate is chosen by a sweep of
    short runs over 1e-6…1e-2 scored on the validation split, and the epochs by early
    stopping. Give --control (a labelled everyday set): its train split is replayed in
    every batch, the model is held to the base model's embeddings on it (feature
    distillation), and the learning rate, the epoch and the WiSE-FT α are chosen only
    where its held-out part stays within --control-margin. Without --control, --reference
    (unlabelled everyday images) anchors the distillation.

    The data are checked first (missing files, unreadable images, unknown labels, empty or
    tiny classes) and nothing trains until every problem is fixed. --out then holds an
    open_clip local-dir checkpoint (serve it with WORKER_MODEL__NAME=local-dir:OUT),
    report.md (domain and control accuracy before and after, the recipe chosen and why),
    report.json, training_curve.png and frontier.png. docs/tuning.md explains the recipe.
    """
    # The model stack loads here, not at import: `worker --help` and the light client stay fast.
    from worker.policy import select_policies
    from worker.policy.templates import TEMPLATE_SETS
    from worker.runtime import load_configured_model
    from worker.tuning.finetune import (
        DEFAULT_ALPHAS,
        STATE_DIR,
        SWEEP_FILE,
        FinetuneOptions,
        check_data,
        run_finetune,
    )
    from worker.tuning.finetune_report import write
    from worker.tuning.trainer import TrainConfig

    settings = state(ctx).settings
    if method not in {"flyp", "lp-ft"}:
        fail(f"--method must be flyp or lp-ft, not {method!r}")
    if templates not in TEMPLATE_SETS:
        fail(f"--templates: unknown template set {templates!r} ({', '.join(TEMPLATE_SETS)})")
    require_exists(data, "--data")
    if control is not None:
        require_exists(control, "--control")
    if reference is not None:
        require_exists(reference, "--reference")
        if control is not None:
            fail(
                "give --control or --reference, not both: the control set's images already "
                "anchor the distillation (--reference is for when no labelled set exists)"
            )
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a directory")
    pending = any((out / STATE_DIR / name).is_file() for name in ("state.pt", SWEEP_FILE))
    if resume and not pending:
        fail(f"nothing to resume: {out / STATE_DIR} has no saved state (leave out --resume)")
    if pending and not resume:
        fail(f"{out} holds an interrupted run: add --resume, or choose another --out")
    train = TrainConfig(
        epochs=epochs or 1,
        batch_size=batch_size,
        lr=lr or 0.0,
        replay=replay,
        distill=distill,
        l2sp=l2sp,
        weight_decay=weight_decay,
        warmup_ratio=warmup,
        grad_accum=grad_accum,
        train_text=train_text,
        method=method,
        patience=patience or 1,
        seed=seed,
        workers=workers,
        lp_epochs=lp_epochs,
        lp_lr=lp_lr,
    )
    with exits_on_errors():
        chosen = select_policies([policy], settings.policy_dir)[:1] if policy else []
        opts = FinetuneOptions(
            data=data,
            out=out,
            policy=chosen[0] if chosen else None,
            templates=templates,
            control=control,
            control_margin=control_margin,
            reference=reference,
            alphas=DEFAULT_ALPHAS,
            lr=lr,
            epochs=epochs,
            sweep_epochs=sweep_epochs,
            patience=patience,
            min_per_class=min_per_class,
            resume=resume,
            train=train,
        )
        dataset, control_set, labels = check_data(opts)
        stderr.print(f"data ok: {len(dataset.examples)} images, classes {', '.join(labels)}")
        model = load_configured_model(settings)
        progress = progress_bar(info=True, transient=False)
        with progress:
            report = run_finetune(
                settings,
                model,
                opts,
                dataset,
                control_set,
                labels,
                _progress_hooks(progress),
            )
    paths = write(report, out)
    zs, ft = report["zero_shot"]["held_out_acc"], report["fine_tuned"]["held_out_acc"]
    control_line = ""
    if report["control"]:
        c = report["control"]
        control_line = f"; control {c['zero_shot_acc']:.1%} → {c['chosen_acc']:.1%}"
    stderr.print(
        f"held-out accuracy {zs:.1%} zero-shot → {ft:.1%} fine-tuned{control_line} "
        f"(lr {report['config']['lr']:g}, epoch {report['best_epoch']}, "
        f"α = {report['alpha']:.1f}); wrote {report['checkpoint']} and "
        f"{', '.join(p.name for p in paths)}"
    )


def _progress_hooks(progress: Progress) -> dict[str, Callable[..., None]]:
    """Progress of the sweep (one row per trial) and of the full run (one per epoch)."""
    tasks: dict[str, TaskID] = {}

    def on_plan(stage: str, total: int) -> None:
        label = {"sweep": "learning-rate trials", "train": "epochs"}[stage]
        tasks[stage] = progress.add_task(label, total=total, info="")

    def on_trial(trial: dict[str, float]) -> None:
        control = trial.get("control_acc")
        progress.update(
            tasks["sweep"],
            advance=1,
            info=f"lr {trial['lr']:g}: val {trial['val_acc']:.1%}"
            + (f", control {control:.1%}" if control is not None else ""),
        )

    def on_epoch(record: dict[str, float]) -> None:
        control = record.get("control_acc")
        progress.update(
            tasks["train"],
            completed=record["epoch"],
            info=f"loss {record['train_loss']:.3f} val {record['val_acc']:.1%}"
            + (f" control {control:.1%}" if control is not None else ""),
        )

    def on_step(epoch: int, batch: int, loss: float) -> None:
        progress.update(tasks["train"], info=f"epoch {epoch} batch {batch} loss {loss:.3f}")

    return {"plan": on_plan, "epoch": on_epoch, "step": on_step, "trial": on_trial}
