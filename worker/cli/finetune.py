"""`worker finetune`: adapt the model to labelled domain data; write a servable checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1)] = DEFAULT_BATCH_SIZE,
    lr: Annotated[float, typer.Option(min=0, help="Peak learning rate (AdamW).")] = 1e-5,
    weight_decay: Annotated[float, typer.Option(min=0)] = 0.1,
    warmup: Annotated[float, typer.Option(min=0, max=1, help="Share of steps warming up.")] = 0.1,
    grad_accum: Annotated[int, typer.Option(min=1, help="Batches per optimizer step.")] = 1,
    train_text: Annotated[
        bool, typer.Option(help="Also train the text tower (frozen by default).")
    ] = False,
    patience: Annotated[
        int, typer.Option(min=1, help="Epochs without val gain before stopping.")
    ] = 3,
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
    min_per_class: Annotated[int, typer.Option(min=1, help="Fewest train images per class.")] = 5,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader processes.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Fine-tune the image tower on labelled domain data, pick a WiSE-FT α, write a checkpoint.

    The data are checked first (missing files, unreadable images, unknown labels, empty or
    tiny classes) and nothing trains until every problem is fixed. The output directory
    then holds an open_clip local-dir checkpoint (serve it with
    WORKER_MODEL__NAME=local-dir:OUT), report.json, report.md and training_curve.png.
    """
    # The model stack loads here, not at import: `worker --help` and the light client stay fast.
    from worker.policy import select_policies
    from worker.policy.templates import TEMPLATE_SETS
    from worker.runtime import load_configured_model
    from worker.tuning.finetune import (
        DEFAULT_ALPHAS,
        STATE_DIR,
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
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a directory")
    pending = (out / STATE_DIR / "state.pt").is_file()
    if resume and not pending:
        fail(f"nothing to resume: {out / STATE_DIR} has no saved state (leave out --resume)")
    if pending and not resume:
        fail(f"{out} holds an interrupted run: add --resume, or choose another --out")
    train = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_ratio=warmup,
        grad_accum=grad_accum,
        train_text=train_text,
        method=method,
        patience=patience,
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
            alphas=DEFAULT_ALPHAS,
            min_per_class=min_per_class,
            resume=resume,
            train=train,
        )
        dataset, control_set, labels = check_data(opts)
        stderr.print(f"data ok: {len(dataset.examples)} images, classes {', '.join(labels)}")
        model = load_configured_model(settings)
        progress = progress_bar(info=True, transient=False)
        task = progress.add_task("epochs", total=epochs, info="")

        def on_epoch(record: dict[str, float]) -> None:
            progress.update(
                task,
                completed=record["epoch"],
                info=f"loss {record['train_loss']:.3f} train {record['train_acc']:.1%} "
                f"val {record['val_acc']:.1%}",
            )

        def on_step(epoch: int, batch: int, loss: float) -> None:
            progress.update(task, info=f"epoch {epoch} batch {batch} loss {loss:.3f}")

        with progress:
            report = run_finetune(
                settings,
                model,
                opts,
                dataset,
                control_set,
                labels,
                {"epoch": on_epoch, "step": on_step},
            )
    paths = write(report, out)
    zs, ft = report["zero_shot"]["held_out_acc"], report["fine_tuned"]["held_out_acc"]
    stderr.print(
        f"held-out accuracy {zs:.1%} zero-shot → {ft:.1%} fine-tuned (α = {report['alpha']:.1f}); "
        f"wrote {report['checkpoint']} and {', '.join(p.name for p in paths)}"
    )
