"""`worker policies check|compile`: validate policy YAML and fill the prompt cache."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from worker.cli.common import progress_bar, state
from worker.cli.errors import exits_on_errors, fail
from worker.cli.history import preview
from worker.errors import PolicyError

app = typer.Typer(help="Validate and compile policy files.", no_args_is_help=True)

PathsArg = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Policy files or directories [default: WORKER_POLICY_DIR].", show_default=False
    ),
]


_LINE_BREAKS = re.compile(r"\s*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+\s*")


def problem_line(problem: object) -> str:
    """``FILE:LINE: message`` on one line, as compilers print it (editors and CI problem
    matchers read it): no prefix, no markup, no colour, no line break inside."""
    return _LINE_BREAKS.sub(" ", str(problem)).strip()


def _write(line: str) -> None:
    """One line on stderr as is: never wrapped, highlighted or read as rich markup."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@app.command()
def check(ctx: typer.Context, paths: PathsArg = None) -> None:
    """Validate policy files, and the images and hash files they list (no model needed).
    Prints `file:line: message` per problem on stderr and exits 1 on any; prints
    `ok file:line kind 'name'` per valid policy otherwise."""
    # the model stack: not imported by `--help`
    from worker.materials import resolve_listed
    from worker.policy import load_policies

    settings = state(ctx).settings
    targets = paths or [settings.policy_dir]
    missing = [p for p in targets if not p.exists()]
    if missing:
        fail(f"no such policy file or directory: {', '.join(str(p) for p in missing)}")
    try:
        loaded = load_policies(targets)
        problems = []
        for item in loaded:  # the files each lists: images there, hash files well formed
            try:
                resolve_listed(item)
            except PolicyError as exc:
                problems.extend(exc.problems)
        if problems:
            raise PolicyError(problems)
    except PolicyError as exc:
        for problem in exc.problems:  # nothing else: every line is one problem
            _write(problem_line(problem))
        raise typer.Exit(1) from None
    files = {p.path for p in loaded}
    for item in loaded:
        _write(problem_line(f"ok {item.path}:{item.line} {item.policy.KIND} {item.name!r}"))
    _write(f"{len(loaded)} policies in {len(files)} file(s) are valid")


@app.command()
def compile(ctx: typer.Context, paths: PathsArg = None) -> None:
    """Compile policies into heads, filling the prompt-embedding cache (WORKER_CACHE_DIR).

    Only prompts not already cached for this model are encoded; prints the time per policy.
    """
    from worker.policy import load_policies
    from worker.runtime import compile_configured, load_configured_model

    settings = state(ctx).settings
    targets = paths or [settings.policy_dir]
    missing = [p for p in targets if not p.exists()]
    if missing:
        fail(f"no such policy file or directory: {', '.join(str(p) for p in missing)}")
    with exits_on_errors():
        loaded = load_policies(targets)
        model = load_configured_model(settings)
        progress = progress_bar()
        tasks: dict[str, TaskID] = {}

        def on_progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(f"encoding prompts of {name}", total=total)
            progress.update(tasks[name], completed=done)

        with progress:
            policy_set = compile_configured(settings, model, loaded, on_progress)
    table = Table(title=f"compiled for {model.name} ({model.fingerprint})", title_justify="left")
    for column in ("policy", "kind", "heads", "texts", "encoded", "seconds", "version"):
        table.add_column(column)
    for name, compiled in policy_set.compiled.items():
        stats = policy_set.stats[name]
        kind = compiled.kind
        table.add_row(
            name,
            kind,
            str(compiled.matrix.shape[0]),
            str(stats.texts),
            str(stats.encoded),
            f"{stats.seconds:.2f}",
            compiled.version[:12],
        )
    Console().print(table)


app.command()(preview)
