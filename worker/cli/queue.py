"""Queue commands: `worker serve`, `worker submit`, `worker result`, `worker dlq …`."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.classify import expand_sources
from worker.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    one_line,
    parse_sink_specs,
    require_broker,
    require_redis,
    state,
    stderr,
)
from worker.cli.errors import fail
from worker.documents import ImageRef, Job, SinkConfig
from worker.redact import redact_text as redact

if TYPE_CHECKING:
    pass

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
    from worker.queue.serving import run_worker

    if pool not in {"solo", "threads", "prefork"}:
        fail(f"--pool must be solo, threads or prefork, not {pool!r}")
    settings = state(ctx).settings
    require_redis(settings.broker_url)  # Celery itself would retry connecting for ever
    try:
        run_worker(settings, pool=pool, concurrency=concurrency, name=name)
    except SystemExit as exc:  # the start-up failure was logged (worker.start_failed)
        raise typer.Exit(EXIT_CONFIG) from exc


def _parse_sinks(specs: list[str]) -> list[SinkConfig]:
    return [SinkConfig.model_validate(config) for config in parse_sink_specs(specs)]


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
            "--wait",
            min=0,
            help="Wait up to this many seconds (for all jobs together) and print the results; "
            "exit 1 if a job ended in error or did not finish in time.",
            show_default=False,
        ),
    ] = None,
    per_message: Annotated[
        int,
        typer.Option(
            "--per-message",
            min=1,
            help="Jobs packed into one queue message (task moderation.score_jobs), at most "
            "WORKER_QUEUE__MAX_JOBS_PER_MESSAGE; 1 sends one plain message per job.",
        ),
    ] = 1,
) -> None:
    """Enqueue one job per image and print the job ids (or, with --wait, the results).

    Local paths are sent as absolute paths: the worker must be allowed to read them
    (WORKER_FILE_ROOTS). With --per-message N, up to N jobs travel in one queue message
    (each keeps its own job id, result and dead-letter entry).
    """
    from worker.client import Client

    settings = state(ctx).settings
    uris = [u if "://" in u else os.path.abspath(u) for u in expand_sources(sources)]
    if job_id is not None and len(uris) != 1:
        fail(f"--job-id needs exactly one source, not {len(uris)}")
    if per_message > settings.queue.max_jobs_per_message:
        fail(
            f"--per-message {per_message} is over WORKER_QUEUE__MAX_JOBS_PER_MESSAGE "
            f"({settings.queue.max_jobs_per_message})"
        )
    sinks = _parse_sinks(sink or [])
    named = {"job_id": job_id} if job_id is not None else {}
    jobs = [
        Job(image=ImageRef(uri=uri), policies=policy or None, sinks=sinks, **named) for uri in uris
    ]
    require_redis(settings.broker_url)  # before Celery, which would retry for ever
    client = Client(settings)
    ids = client.submit_many(jobs, per_message)
    if wait_s is None:
        for submitted in ids:
            typer.echo(submitted)
        return
    deadline = time.monotonic() + wait_s
    failed = 0
    for submitted in ids:
        try:
            found = client.wait(submitted, timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            stderr.print(
                f"[red]timeout[/red] no result for job {escape(submitted)} within {wait_s:g} s "
                f"(is a worker running? `worker serve`; `worker result {escape(submitted)}` "
                "reads it later)",
                soft_wrap=True,
            )
            failed += 1
            continue
        typer.echo(found.to_json())
        if found.status == "error":
            code, why = (found.error.code, found.error.message) if found.error else ("?", "")
            stderr.print(
                f"[red]error[/red] job {escape(submitted)} ended in error {escape(code)}: "
                f"{escape(redact(one_line(why)))}",
                soft_wrap=True,
            )
            failed += 1
    if failed:
        raise typer.Exit(EXIT_FAILED)


def result(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job id `worker submit` printed.")],
) -> None:
    """Print the stored result document of a job (kept for WORKER_QUEUE__RESULT_TTL_S)."""
    from worker.client import Client

    found = Client(require_broker(ctx)).result(job_id)
    if found is None:
        stderr.print(f"no result for {escape(job_id)} (not finished, unknown, or expired)")
        raise typer.Exit(EXIT_FAILED)
    typer.echo(found.to_json())


def _dead_letters(ctx: typer.Context):  # type: ignore[no-untyped-def]
    from worker.queue.dead_letters import DeadLetters

    return DeadLetters.from_settings(require_broker(ctx))


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON entry per line, with history and raw body.")
    ] = False,
) -> None:
    """List dead-lettered jobs: id, stage (validate | score | deliver), attempts, how often
    the job failed, sink, last error. Secrets are never shown (see docs/operations.md)."""
    entries = _dead_letters(ctx).entries()
    if as_json:
        for entry in entries:
            typer.echo(entry.to_json())
        return
    table = Table(title=f"{len(entries)} dead-lettered job(s)", title_justify="left")
    for column in ("job_id", "stage", "attempts", "failed", "sink", "error"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(
            e.job_id,
            e.stage,
            str(e.attempts),
            f"{e.count}x",
            (e.sink or {}).get("type", ""),
            e.error[:300],
        )
    from rich.console import Console

    Console(width=max(120, Console().width)).print(table)


@dlq_app.command("requeue")
def dlq_requeue(
    ctx: typer.Context,
    job_ids: Annotated[list[str] | None, typer.Argument(show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Requeue every entry.")] = False,
) -> None:
    """Retry dead-lettered jobs: failed deliveries are delivered again from the stored
    result; other jobs are submitted again. Attempt counters start over.

    Each entry is checked first: one that cannot be retried (a message that was never a
    job, an invalid job, secrets redacted without WORKER_SECRET_KEY) stays in the store and
    the reason is printed; the command then exits 1."""
    from worker.errors import RequeueRefusedError
    from worker.queue.dead_letters import requeue

    if not job_ids and not all_:
        fail("give job ids or --all")
    letters = _dead_letters(ctx)
    targets = [e.job_id for e in letters.entries()] if all_ else list(job_ids or [])
    from worker.client import Client

    client = Client(state(ctx).settings)
    failed = 0
    for job_id in targets:
        try:
            how = requeue(letters, client.jobs, client.submit, job_id)
        except RequeueRefusedError as exc:
            stderr.print(f"{escape(job_id)}: kept, {escape(redact(str(exc)))}", soft_wrap=True)
            failed += 1
            continue
        if how is None:
            stderr.print(f"{escape(job_id)}: not in the dead-letter store")
            failed += 1
        else:
            stderr.print(f"{escape(job_id)}: {escape(how)}")
    if failed:
        raise typer.Exit(EXIT_FAILED)


@dlq_app.command("purge")
def dlq_purge(
    ctx: typer.Context,
    job_ids: Annotated[
        list[str] | None, typer.Argument(show_default=False, help="Only these entries.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete dead-letter entries: the ones named, or every entry."""
    if not yes and sys.stdin.isatty():
        what = f"{len(job_ids)} entries" if job_ids else "every dead-lettered job"
        typer.confirm(f"Delete {what}?", abort=True)
    stderr.print(f"purged {_dead_letters(ctx).purge(list(job_ids or []))} entries")
