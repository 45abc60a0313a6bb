"""What every command shares: settings from the root options, consoles, error exits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.errors import ConfigurationError, ModelLoadError, PolicyError, WorkerError
from worker.log import configure_logging
from worker.settings import Settings, load_settings

stderr = Console(stderr=True, highlight=False)

#: Exit codes: 0 done, 1 the work itself failed (no image readable, checks failed),
#: 2 bad configuration, policy or model (nothing was attempted).
EXIT_FAILED = 1
EXIT_CONFIG = 2


class State:
    """Root options, turned into settings once, on first use."""

    def __init__(self, config: Path | None, log_level: str | None) -> None:
        self.config = config
        self.log_level = log_level
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            overrides = {"log_level": self.log_level} if self.log_level else {}
            self._settings = load_settings(self.config, **overrides)
            configure_logging(self._settings.log_level, self._settings.log_format)
        return self._settings


def state(ctx: typer.Context) -> State:
    found = ctx.find_object(State)
    if found is None:  # called outside the root app (tests invoking a sub-app)
        found = State(None, None)
        ctx.obj = found
    return found


@contextmanager
def exits_on_errors() -> Iterator[None]:
    """Turn the project's own errors into a message on stderr and a non-zero exit."""
    try:
        yield
    except PolicyError as exc:
        for problem in exc.problems:
            stderr.print(f"[red]error[/red] {problem}", soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except (ConfigurationError, ModelLoadError) as exc:
        stderr.print(f"[red]error[/red] {exc}", soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except WorkerError as exc:
        stderr.print(f"[red]error[/red] {exc}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED) from None


#: ``--data`` of `worker eval` and `worker finetune`: the same labelled-data layouts.
DataOption = Annotated[
    Path,
    typer.Option(
        "--data",
        "-d",
        help="Labelled images: a folder per class (a 'none' folder for negatives), or CSV/JSONL "
        "with image,label[,split] (labels ';'-separated; empty = none).",
    ),
]


def progress_bar(info: bool = False, transient: bool = True) -> Progress:
    """The project's progress bar on stderr: description, bar, n/total, [info field], time."""
    extra = [TextColumn("{task.fields[info]}")] if info else []
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        console=stderr,
        transient=transient,
    )
