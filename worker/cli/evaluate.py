"""`worker eval`: metrics, plots and suggested thresholds for a policy on labelled data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.common import DataOption, progress_bar, state, stderr
from worker.cli.errors import exits_on_errors, fail, require_exists


def eval_command(  # noqa: PLR0915 - the lazy imports of the model stack count as statements
    ctx: typer.Context,
    data: DataOption,
    policy: Annotated[str, typer.Option("--policy", "-p", help="Policy name or YAML path.")],
    target_precision: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1,
            help="Suggest the threshold with the most recall at this precision [default: 0.9].",
        ),
    ] = None,
    target_recall: Annotated[
        float | None,
        typer.Option(
            min=0, max=1, help="Suggest the threshold with the most precision at this recall."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where reports and plots go.")] = Path(
        "eval-out"
    ),
    write_thresholds: Annotated[
        bool, typer.Option("--write-thresholds", help="Write suggestions into the policy YAML.")
    ] = False,
    split: Annotated[
        str | None, typer.Option(help="Only this split (train | val | test) [default: all].")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder batch.")] = 64,
) -> None:
    """Measure a policy on labelled data and suggest thresholds for a target precision or recall.

    Writes metrics.json, report.md, pr_curves.png, histograms.png and scores.jsonl (one
    line per image: its path, labels and each class's score, the numbers `worker classify`
    gives) to --out. Images are decoded as the worker serves them (WORKER_IMAGE__*: JPEG
    draft mode, an animation's frames pooled). Image embeddings are cached per model and
    decode, so re-running after a policy edit encodes no image.
    """
    # The model stack loads here, not at import: `worker --help` and the light client stay fast.
    import numpy as np

    from worker.embedding_cache import EmbeddingCache
    from worker.policy import select_policies
    from worker.policy.policyset import CACHE_FILE
    from worker.runtime import compile_configured, load_configured_model
    from worker.tuning.datasets import SPLITS, read_labelled, validate
    from worker.tuning.embedder import embed_files
    from worker.tuning.eval_report import write_report, write_scores
    from worker.tuning.evaluation import EvalReport, evaluate, policy_scores, summarise

    settings = state(ctx).settings
    if target_precision is not None and target_recall is not None:
        fail("give --target-precision or --target-recall, not both")
    require_exists(data, "--data")
    if split is not None and split not in SPLITS:
        fail(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    started = time.perf_counter()
    with exits_on_errors():
        chosen = select_policies([policy], settings.policy_dir)
        if len(chosen) != 1:
            names = ", ".join(p.name for p in chosen)
            fail(f"{policy} holds several policies ({names}); name one with --policy")
        loaded = chosen[0]
        if write_thresholds and not loaded.policy.HAS_THRESHOLDS:
            kind = loaded.policy.KIND
            fail(f"--write-thresholds needs a policy with thresholds; {loaded.name!r} is {kind}")
        dataset = read_labelled(data)
        if split is not None:
            dataset.examples = dataset.split(split)
            if not dataset.examples:
                fail(f"{data} has no images in split {split!r} (leave out --split for all)")
        classes = loaded.policy.class_ids()
        validate(dataset, classes=classes, min_per_class=0, splits=())  # before the model loads
        model = load_configured_model(settings)
        compiled = compile_configured(settings, model, [loaded]).compiled[loaded.name]
        cache = EmbeddingCache(settings.cache_dir / CACHE_FILE, model.fingerprint, kind="image")
        progress = progress_bar()
        with progress:
            task = progress.add_task("embedding", total=len(dataset.examples))
            embedded = embed_files(
                model,
                [e.path for e in dataset.examples],
                cache,
                max_pixels=settings.image.max_pixels,
                allowed_formats=settings.image.allowed_formats,
                max_side=settings.image.max_side,
                max_aspect_ratio=settings.image.max_aspect_ratio,
                jpeg_draft=settings.image.jpeg_draft,
                max_frames=settings.image.max_frames,
                batch_size=batch_size,
                workers=settings.decode_workers,
                on_progress=lambda n: progress.advance(task, n),
            )
        cache.close()
    scores = policy_scores(compiled, embedded, model.logit_scale)
    truth = np.array([[c in e.labels for c in classes] for e in dataset.examples], dtype=bool)
    target = (
        {"recall": target_recall}
        if target_recall is not None
        else {"precision": target_precision or 0.9}
    )
    categories = evaluate(
        compiled,
        truth,
        scores,
        target_precision=target.get("precision"),
        target_recall=target.get("recall"),
    )
    macro, micro = summarise(categories, truth, scores)
    seconds = time.perf_counter() - started
    report = EvalReport(
        policy=loaded.name,
        kind=compiled.kind,
        version=compiled.version,
        model=model.describe(),
        images=len(dataset.examples),
        target={k: float(v) for k, v in target.items() if v is not None},
        categories=categories,
        macro=macro,
        micro=micro,
        timings={
            "seconds": round(seconds, 2),
            "encoded": embedded.encoded,
            "cached": embedded.cached,
        },
    )
    written = write_report(report, truth, scores, out)
    written.append(write_scores(dataset.examples, classes, scores, out))
    _print_table(f"{loaded.name} on {len(dataset.examples)} images", categories)
    stderr.print(
        f"embedded {len(dataset.examples)} images ({embedded.encoded} encoded, {embedded.cached} "
        f"from the cache); eval took {seconds:.1f} s; wrote {', '.join(str(p) for p in written)}"
    )
    if write_thresholds:
        _write_back(loaded.path, loaded.name, categories)


def _print_table(title: str, categories: list) -> None:  # type: ignore[type-arg]
    from worker.tuning.eval_report import category_table_rows

    table = Table(title=title, title_justify="left")
    columns = ("category", "positives", "AP", "ROC-AUC", "threshold", "precision", "recall")
    for column in (*columns, "FPR", "suggested"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for row in category_table_rows(categories):
        table.add_row(*row)
    Console(width=120).print(table)


def _write_back(path: Path, name: str, categories: list) -> None:  # type: ignore[type-arg]
    from worker.tuning.thresholds import update_thresholds, write_atomically

    suggestions = {
        c.id: c.suggested_threshold for c in categories if c.suggested_threshold is not None
    }
    if not suggestions:
        stderr.print("no threshold to write: no category reached the target")
        return
    with exits_on_errors():
        text, diff = update_thresholds(path, name, suggestions)
    if not diff:
        stderr.print(f"{path}: thresholds already at the suggestions")
        return
    write_atomically(path, text)
    typer.echo(diff, nl=False)
    stderr.print(f"wrote {len(suggestions)} threshold(s) into {path}")
