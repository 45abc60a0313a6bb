"""`worker plugins` and `worker webhooks`: what is installed, and disabled endpoints."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker.cli.common import EXIT_FAILED, require_broker, stderr
from worker.plugins import available_sinks, available_sources, sink_class, source_class

webhooks_app = typer.Typer(help="Webhook endpoints disabled by 410 Gone.", no_args_is_help=True)
secrets_app = typer.Typer(
    help="The key that seals job secrets kept in Redis.", no_args_is_help=True
)


def plugins() -> None:
    """List installed sink and source plugins (entry points) with their options."""
    table = Table(title="installed plugins", title_justify="left")
    for column in ("kind", "name", "provides", "from"):
        table.add_column(column, overflow="fold")
    for name, ep in sorted(available_sinks().items()):
        try:
            cls = sink_class(name)
            target = f"TARGET={cls.target_option}" if cls.target_option else ""
            options = ", ".join(cls.Options.model_fields)
            provides = f"{target}; options: {options}" if target else f"options: {options}"
        except Exception as exc:  # a broken third-party plugin is listed, not fatal
            provides = f"[red]failed to load: {exc}[/red]"
        table.add_row("sink", name, provides, ep.value)
    for name, ep in sorted(available_sources().items()):
        try:
            schemes = ", ".join(f"{s}://" if s else "paths" for s in source_class(name).schemes)
        except Exception as exc:
            schemes = f"[red]failed to load: {exc}[/red]"
        table.add_row("source", name, schemes, ep.value)
    Console(width=max(Console().width, 110)).print(table)


@webhooks_app.command("enable")
def webhooks_enable(
    ctx: typer.Context, url: Annotated[str, typer.Argument(help="The receiver URL.")]
) -> None:
    """Turn a webhook endpoint that answered 410 Gone back on."""
    from worker.queue.jobs import RedisPluginState, redis_client

    settings = require_broker(ctx)
    webhook: Any = sink_class("webhook")  # through the registry, like any plugin
    if not webhook.reenable(RedisPluginState(redis_client(settings)), url):
        stderr.print(f"{escape(url)} is not disabled")
        raise typer.Exit(EXIT_FAILED)
    stderr.print(f"{escape(url)} enabled; `worker dlq requeue --all` retries its dead letters")


@secrets_app.command("keygen")
def secrets_keygen() -> None:
    """Print a new WORKER_SECRET_KEY (a Fernet key). Give every worker and every
    `worker dlq` caller the same one; see docs/operations.md, "Secrets"."""
    from worker.sealing import generate_key

    typer.echo(generate_key())
