"""The `worker` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from worker.cli import evaluate, finetune, history, ops, plugins, policies, queue, store
from worker.cli.classify import classify
from worker.cli.common import EXIT_FAILED, TRACEBACK_ENV, State, one_line, state, stderr
from worker.cli.errors import CliGroup
from worker.documents import json_schemas, write_schemas

LOG_LEVELS = ("debug", "info", "warning", "error")

app = typer.Typer(
    name="worker",
    help="Self-hosted image moderation and tagging: OpenCLIP zero-shot policies in YAML.\n\n"
    "Settings come from WORKER_* environment variables (nested with __, e.g. "
    "WORKER_MODEL__NAME) or a TOML file given with --config / WORKER_CONFIG_FILE.\n\n"
    "Exit codes: 0 done, 1 the work failed, 2 a mistake to fix (setting, option, file, "
    "Redis not reachable), named in one line on stderr. An internal error prints its "
    f"traceback with --log-level debug or {TRACEBACK_ENV}=1.",
    cls=CliGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _print_version(value: bool) -> None:
    """`worker --version`: the package, the model stack and the configured model."""
    if not value:
        return
    import platform

    from worker.about import SERVE_HINT, versions
    from worker.settings import load_settings

    for name, version in versions().items():
        typer.echo(f"{name} {version or f'not installed ({SERVE_HINT})'}")
    typer.echo(f"python {platform.python_version()}")
    try:
        model = load_settings().model
        typer.echo(f"model {model.name} {model.pretrained or ''}".rstrip())
    except Exception as exc:  # a bad setting must not hide the versions above
        typer.echo(f"model unknown (the settings do not load: {one_line(str(exc))})")
    raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML settings file (also WORKER_CONFIG_FILE).", dir_okay=False
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", help="debug | info | warning | error [default: info]"),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the package, torch, open_clip and model versions and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    if log_level is not None and log_level.strip().lower() not in LOG_LEVELS:
        raise typer.BadParameter(
            f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}", param_hint="--log-level"
        )
    ctx.obj = State(config, log_level.strip().lower() if log_level else None)


app.command()(classify)
app.command()(history.rescore)
app.add_typer(policies.app, name="policies")
app.command()(queue.serve)
app.command()(queue.submit)
app.command()(queue.result)
app.add_typer(queue.dlq_app, name="dlq")
app.command()(plugins.plugins)
app.command("eval")(evaluate.eval_command)
app.command()(finetune.finetune)
app.command()(ops.health)
app.command()(ops.bench)
app.add_typer(plugins.webhooks_app, name="webhooks")
app.add_typer(plugins.secrets_app, name="secrets")
app.add_typer(store.app, name="store")
app.command()(store.search)


@app.command()
def schemas(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Directory to write to.")] = Path(
        "docs/schemas"
    ),
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 if the files differ from the code.")
    ] = False,
) -> None:
    """Export the JSON Schemas of the job and result documents."""
    _ = state(ctx).settings  # like every command: a bad setting or --config fails here
    if check:
        import json

        stale = [
            name
            for name, schema in json_schemas().items()
            if not (out / name).is_file()
            or json.loads((out / name).read_text(encoding="utf-8")) != schema
        ]
        if stale:
            stderr.print(f"[red]out of date[/red]: {', '.join(stale)}; run `worker schemas`")
            raise typer.Exit(EXIT_FAILED)
        stderr.print("schemas are up to date")
        return
    for path in write_schemas(out):
        stderr.print(f"wrote {path}")


def main() -> None:
    app()  # errors are handled by CliGroup
