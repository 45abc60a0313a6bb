"""`worker eval`: metrics, plots and suggested thresholds for a policy on labelled data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.common import DataOption, progress_bar, state, stderr
from worker.cli.errors import exits_on_errors, fail, require_exists

if TYPE_CHECKING:  # the model stack loads in the command, not at import
    from worker.tuning.evaluation import CategoryMetrics, EvalReport


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
            min=0,
            max=1,
            help="Suggest the threshold with the most precision at this recall; with "
            "--target-precision, suggest review_at instead: the highest score with this recall.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where reports and plots go.")] = Path(
        "eval-out"
    ),
    write_thresholds: Annotated[
        bool,
        typer.Option(
            "--write-thresholds",
            help="Write the suggestions (threshold, and review_at with both targets) into the "
            "policy YAML, unrounded, if the policy loader accepts the result.",
        ),
    ] = False,
    split: Annotated[
        str | None, typer.Option(help="Only this split (train | val | test) [default: all].")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder batch.")] = 64,
) -> None:
    """Measure a policy on labelled data and suggest thresholds for a target precision or recall.

    Give both --target-precision P and --target-recall R to get a review band per category:
    threshold for precision P, review_at (scores from there up to the threshold go to a
    person) for recall R, and the share of images that would land in between.

    Writes metrics.json, report.md, pr_curves.png, histograms.png and scores.jsonl (one
    line per image: its path, labels and each class's score, the numbers `worker classify`
    gives) to --out. Images are decoded as the worker serves them (WORKER_IMAGE__*: JPEG
    draft mode, an animation's frames pooled). Image embeddings are cached per model and
    decode, so re-running after a policy edit encodes no image.
    """
    # The model stack loads here, not at import: `worker --help` and the light client stay fast.
    import numpy as np

    from worker.embedding_cache import EmbeddingCache
    from worker.engine import DecodeOptions
    from worker.policy import select_policies
    from worker.policy.policyset import CACHE_FILE
    from worker.runtime import compile_configured, load_configured_model
    from worker.tuning.datasets import SPLITS, read_labelled, validate
    from worker.tuning.embedder import embed_files
    from worker.tuning.eval_report import write_report, write_scores
    from worker.tuning.evaluation import (
        DEFAULT_PRECISION,
        EvalReport,
        evaluate,
        policy_scores,
        review_load,
        summarise,
    )

    settings = state(ctx).settings
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
                DecodeOptions.from_settings(settings.image, model),
                batch_size=batch_size,
                workers=settings.decode_workers,
                on_progress=lambda n: progress.advance(task, n),
            )
        cache.close()
    scores = policy_scores(compiled, embedded, model.logit_scale)
    truth = np.array([[c in e.labels for c in classes] for e in dataset.examples], dtype=bool)
    if target_precision is None and target_recall is None:
        target_precision = DEFAULT_PRECISION
    target = {
        name: float(value)
        for name, value in (("precision", target_precision), ("recall", target_recall))
        if value is not None
    }
    two_targets = len(target) == 2
    categories = evaluate(
        compiled, truth, scores, target_precision=target_precision, target_recall=target_recall
    )
    macro, micro = summarise(categories, truth, scores)
    seconds = time.perf_counter() - started
    report = EvalReport(
        policy=loaded.name,
        kind=compiled.kind,
        version=compiled.version,
        model=model.describe(),
        images=len(dataset.examples),
        target=target,
        categories=categories,
        macro=macro,
        micro=micro,
        review_load=review_load(categories, scores) if two_targets else None,
        timings={
            "seconds": round(seconds, 2),
            "encoded": embedded.encoded,
            "cached": embedded.cached,
        },
    )
    written = write_report(report, truth, scores, out)
    written.append(write_scores(dataset.examples, classes, scores, out))
    _print_table(f"{loaded.name} on {len(dataset.examples)} images", categories)
    if report.two_targets:
        _print_review_table(report)
    stderr.print(
        f"embedded {len(dataset.examples)} images ({embedded.encoded} encoded, {embedded.cached} "
        f"from the cache); eval took {seconds:.1f} s; wrote {', '.join(str(p) for p in written)}"
    )
    if write_thresholds:
        _write_back(loaded.path, loaded.name, categories, two_targets)


def _print_table(title: str, categories: list[CategoryMetrics]) -> None:
    from worker.tuning.eval_report import category_table_rows

    table = Table(title=title, title_justify="left")
    columns = ("category", "positives", "AP", "ROC-AUC", "threshold", "precision", "recall")
    for column in (*columns, "FPR", "suggested"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for row in category_table_rows(categories):
        table.add_row(*row)
    Console(width=120).print(table)


def _print_review_table(report: EvalReport) -> None:
    from worker.tuning.eval_report import REVIEW_COLUMNS, review_rows

    precision, recall = report.target["precision"], report.target["recall"]
    table = Table(
        title=f"review bands: threshold at precision ≥ {precision:g}, review_at at recall "
        f"≥ {recall:g}; images in between go to a person",
        title_justify="left",
    )
    for column in REVIEW_COLUMNS:
        table.add_column(column, justify="left" if column in ("category", "note") else "right")
    for row in review_rows(report.categories):
        table.add_row(*row)
    Console(width=140).print(table)
    load = report.review_load or {"images": 0, "share": 0.0}
    stderr.print(
        f"review load: {load['images']} of {report.images} images ({load['share']:.1%}) "
        "fall in at least one category's review band",
        soft_wrap=True,
    )


def _write_back(
    path: Path, name: str, categories: list[CategoryMetrics], two_targets: bool
) -> None:
    from worker.errors import PolicyError
    from worker.tuning.thresholds import edit_thresholds, write_checked

    suggestions = {
        c.id: c.suggested_threshold for c in categories if c.suggested_threshold is not None
    }
    if not suggestions:
        stderr.print("no threshold to write: no category reached the target")
        return
    # Two targets: each category with a threshold gets its review_at, or None for no band
    # (an existing review_at then stays if still below the new threshold). One target: an
    # existing review_at is removed only where the new threshold would leave it invalid.
    review_at = (
        {c.id: c.suggested_review_at for c in categories if c.id in suggestions}
        if two_targets
        else None
    )
    with exits_on_errors():
        edit = edit_thresholds(path, name, suggestions, review_at)
    if not edit.diff:
        what = "thresholds and review_at" if two_targets else "thresholds"
        stderr.print(f"{path}: {what} already at the suggestions")
        for note in edit.notes:
            stderr.print(f"note: {note}", soft_wrap=True)
        return
    try:
        write_checked(edit)
    except PolicyError as exc:
        problems = "; ".join(str(p) for p in exc.problems[:5])
        fail(f"{path} not written: the policy loader refuses the updated file: {problems}")
    typer.echo(edit.diff, nl=False)
    for note in edit.notes:
        stderr.print(f"note: {note}", soft_wrap=True)
    written = sum(1 for v in (review_at or {}).values() if v is not None)
    extra = f" and {written} review_at" if two_targets else ""
    stderr.print(f"wrote {len(suggestions)} threshold(s){extra} into {path}")
