"""Queue commands: `worker serve`, `worker submit`, `worker result`, `worker dlq …`."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.table import Table

from worker.cli.classify import expand_sources
from worker.cli.common import EXIT_FAILED, exits_on_errors, state, stderr
from worker.documents import ImageRef, Job, SinkConfig

dlq_app = typer.Typer(help="Inspect and retry jobs in the dead-letter store.", no_args_is_help=True)


def serve(
    ctx: typer.Context,
    pool: Annotated[
        str,
        typer.Option(help="solo (one model, one process: the default), threads or prefork."),
    ] = "solo",
    concurrency: Annotated[
        int, typer.Option(min=1, help="Processes (prefork) or threads; solo ignores it.")
    ] = 1,
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="Celery node name [default: moderation-PID@host]."),
    ] = None,
) -> None:
    """Run a Celery worker that scores queued jobs (Ctrl-C / SIGTERM drains the batch in hand).

    The model and policies load before any job is taken; a setting that cannot work stops
    the worker at once. Batches take up to WORKER_BATCH__MAX_SIZE jobs or whatever arrived
    within WORKER_BATCH__MAX_WAIT_MS. Policy files are reloaded on change without restart.
    """
    from worker.celery_app import _start, create_app
    from worker.policy import select_policies
    from worker.service import default_sink_configs

    settings = state(ctx).settings
    if pool not in {"solo", "threads", "prefork"}:
        stderr.print(f"[red]error[/red] --pool must be solo, threads or prefork, not {pool!r}")
        raise typer.Exit(2)
    app = create_app(settings)
    with exits_on_errors():
        default_sink_configs(settings)
        select_policies([], settings.policy_dir)
        if pool == "prefork":  # children load their own model; check it loads at all
            from worker.runtime import load_configured_model

            load_configured_model(settings)  # dropped at once: each child loads its own
    if pool != "prefork":
        try:
            _start(app)
        except SystemExit:
            raise typer.Exit(2) from None
    node = name or f"moderation-{os.getpid()}@%h"
    app.worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--queues={settings.queue.name}",
            f"--hostname={node}",
            f"--loglevel={settings.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _parse_sinks(specs: list[str]) -> list[SinkConfig]:
    from worker.plugins import parse_sink_spec

    return [SinkConfig.model_validate(parse_sink_spec(s)) for s in specs]


def submit(
    ctx: typer.Context,
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Image paths, directories, globs or URIs (s3://, https://).", show_default=False
        ),
    ],
    policy: Annotated[
        list[str] | None, typer.Option("--policy", "-p", help="Policy name; repeat for several.")
    ] = None,
    sink: Annotated[
        list[str] | None,
        typer.Option("--sink", "-s", help="TYPE:TARGET[,key=value…], e.g. local:results/; repeat."),
    ] = None,
    job_id: Annotated[
        str | None, typer.Option("--job-id", help="Job id (idempotency key); one source only.")
    ] = None,
    wait_s: Annotated[
        float | None,
        typer.Option(
            "--wait", help="Wait up to this many seconds and print the results.", show_default=False
        ),
    ] = None,
) -> None:
    """Enqueue one job per image and print the job ids (or, with --wait, the results).

    Local paths are sent as absolute paths: the worker must be allowed to read them
    (WORKER_FILE_ROOTS).
    """
    from worker.client import Client

    settings = state(ctx).settings
    uris = [u if "://" in u else os.path.abspath(u) for u in expand_sources(sources)]
    if job_id is not None and len(uris) != 1:
        stderr.print("[red]error[/red] --job-id needs exactly one source")
        raise typer.Exit(2)
    with exits_on_errors():
        sinks = _parse_sinks(sink or [])
        client = Client(settings)
        ids = []
        for uri in uris:
            job = Job(image=ImageRef(uri=uri), policies=policy or None, sinks=sinks)
            if job_id is not None:
                job = job.model_copy(update={"job_id": job_id})
            ids.append(client.submit(job))
    if wait_s is None:
        for submitted in ids:
            typer.echo(submitted)
        return
    failed = 0
    for submitted in ids:
        try:
            typer.echo(client.wait(submitted, timeout=wait_s).to_json())
        except TimeoutError as exc:
            stderr.print(f"[red]timeout[/red] {exc}")
            failed += 1
    if failed:
        raise typer.Exit(EXIT_FAILED)


def result(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job id `worker submit` printed.")],
) -> None:
    """Print the stored result document of a job (kept for WORKER_QUEUE__RESULT_TTL_S)."""
    from worker.client import Client

    found = Client(state(ctx).settings).result(job_id)
    if found is None:
        stderr.print(f"no result for {job_id} (not finished, unknown, or expired)")
        raise typer.Exit(EXIT_FAILED)
    typer.echo(found.to_json())


def _store(ctx: typer.Context):  # type: ignore[no-untyped-def]
    from worker.store import Store

    settings = state(ctx).settings
    return Store.from_url(settings.broker_url, settings.queue.result_ttl_s)


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON entry per line.")] = False,
) -> None:
    """List dead-lettered jobs: id, stage, attempts, sink, error."""
    entries = _store(ctx).dead_letters()
    if as_json:
        for entry in entries:
            typer.echo(entry.to_json())
        return
    table = Table(title=f"{len(entries)} dead-lettered job(s)", title_justify="left")
    for column in ("job_id", "stage", "attempts", "sink", "error"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(e.job_id, e.stage, str(e.attempts), (e.sink or {}).get("type", ""), e.error)
    from rich.console import Console

    Console(width=max(120, Console().width)).print(table)


@dlq_app.command("requeue")
def dlq_requeue(
    ctx: typer.Context,
    job_ids: Annotated[list[str] | None, typer.Argument(show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Requeue every entry.")] = False,
) -> None:
    """Retry dead-lettered jobs: failed deliveries are delivered again from the stored
    result; other jobs are submitted again. Attempt counters start over."""
    from worker.requeue import requeue

    if not job_ids and not all_:
        stderr.print("[red]error[/red] give job ids or --all")
        raise typer.Exit(2)
    store = _store(ctx)
    targets = [e.job_id for e in store.dead_letters()] if all_ else list(job_ids or [])
    from worker.client import Client

    client = Client(state(ctx).settings)
    missing = 0
    for job_id in targets:
        how = requeue(store, client, job_id)
        if how is None:
            stderr.print(f"{job_id}: not in the dead-letter store")
            missing += 1
        else:
            stderr.print(f"{job_id}: {how}")
    if missing:
        raise typer.Exit(EXIT_FAILED)


@dlq_app.command("purge")
def dlq_purge(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete every dead-letter entry."""
    if not yes and sys.stdin.isatty():
        typer.confirm("Delete every dead-lettered job?", abort=True)
    stderr.print(f"purged {_store(ctx).purge_dead_letters()} entries")
