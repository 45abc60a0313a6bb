"""`worker policies preview` and `worker rescore`: policies over the embedding store."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

import typer
from rich.table import Table

from worker.cli.common import EXIT_FAILED, parse_sink_specs, progress_bar, state, stderr
from worker.cli.errors import exits_on_errors, fail
from worker.errors import ConfigurationError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from worker.documents import Result
    from worker.model import LoadedModel
    from worker.policy import LoadedPolicy
    from worker.settings import Settings
    from worker.store import EmbeddingStore

SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Only rows scored at or after this: RFC 3339 (2026-11-01T00:00:00Z) or a "
        "duration back from now (30d, 12h). Default: every stored row.",
    ),
]


def open_store(settings: Settings) -> EmbeddingStore:
    from worker.store import EmbeddingStore

    store = EmbeddingStore.from_settings(settings)
    if store is None:
        raise ConfigurationError(
            "the embedding store is off (WORKER_STORE__URI=none): nothing was kept to work on"
        )
    return store


def window_note(store: EmbeddingStore, model: LoadedModel, rows: int, where: str) -> None:
    """One line on stderr: the rows used and the rows of other models left out."""
    others = store.count_others(model.fingerprint)
    skipped = f"; {others} rows of other models left out (`worker store stats`)" if others else ""
    stderr.print(f"{rows} stored rows of {model.name} ({model.fingerprint}) {where}{skipped}")


def parse_window(since: str | None, until: str | None = None) -> tuple[Any, Any]:
    from worker.store import parse_time

    now = datetime.now(UTC)
    start = parse_time(since, now) if since else None
    end = parse_time(until, now) if until else None
    if start is not None and end is not None and start >= end:
        raise ConfigurationError(f"--since {since} is not before --until {until}")
    return start, end


def describe_window(start: datetime | None, end: datetime | None) -> str:
    parts = []
    if start is not None:
        parts.append(f"since {start.isoformat(timespec='seconds')}")
    if end is not None:
        parts.append(f"until {end.isoformat(timespec='seconds')}")
    return " ".join(parts) or "(all time)"


# --------------------------------------------------------------------------- preview


def preview(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="The edited policy file (a copy outside WORKER_POLICY_DIR, or the file "
            "itself before it is deployed).",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ],
    since: SinceOption = None,
    sample: Annotated[
        int,
        typer.Option("--sample", min=0, max=1000, help="Sample URIs per category and change."),
    ] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    """What an edited policy file would change over stored traffic, per category.

    Scores the stored embeddings of the loaded model (no image is read or encoded) with
    the deployed policy of the same name (in WORKER_POLICY_DIR) and with the edit, and
    counts per category: flagged now, flagged with the edit, newly flagged, no longer
    flagged (a flag at any action, review band included; for tags, kept in the top_k),
    with sample URIs of each change. Prompts new to the edit are encoded once, through
    the prompt cache.
    """
    from worker.history import preview as run_preview
    from worker.policy import load_policies
    from worker.runtime import compile_configured, load_configured_model

    settings = state(ctx).settings
    start, _ = parse_window(since)
    with exits_on_errors():
        store = open_store(settings)
        edited = load_policies([file])
        deployed: dict[str, Any] = {}
        if settings.policy_dir.is_dir():
            deployed = {p.name: p for p in load_policies([settings.policy_dir])}
        same = [
            p.name
            for p in edited
            if p.name in deployed and deployed[p.name].path.resolve() == file.resolve()
        ]
        if same:
            stderr.print(
                f"[yellow]note[/yellow]: {file} is the deployed file itself: the preview "
                "compares it with itself (edit a copy to see a change)"
            )
        model = load_configured_model(settings)
        edited_set = compile_configured(settings, model, edited)
        live = [deployed[p.name] for p in edited if p.name in deployed]
        live_set = compile_configured(settings, model, live)
        pairs = [(live_set.compiled.get(p.name), edited_set.compiled[p.name]) for p in edited]
        rows = store.count(_where(model, start))
        window_note(store, model, rows, describe_window(start, None))
        progress = progress_bar()
        with progress:
            task = progress.add_task("scoring stored rows", total=rows)
            reports = run_preview(
                store,
                pairs,
                model,
                since=start,
                sample=sample,
                on_rows=lambda n: progress.advance(task, n),
            )
    if as_json:
        document = {
            "file": str(file),
            "model": model.describe(),
            "since": start.isoformat() if start else None,
            "policies": {r.policy: r.to_dict() for r in reports},
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    for report in reports:
        _print_preview(report, sample)


def _where(model: LoadedModel, start: datetime | None, end: datetime | None = None) -> str:
    from worker.store import row_filter

    return row_filter(model.fingerprint, start, end) or ""


def _print_preview(report: Any, sample: int) -> None:
    state_note = "" if report.deployed else " (not deployed: every flag is new)"
    table = Table(
        title=f"{report.policy}: {report.rows} stored rows{state_note}", title_justify="left"
    )
    for column in ("category", "flagged now", "with edit", "newly", "no longer"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name, change in report.categories.items():
        table.add_row(
            name,
            str(change.flagged_now),
            str(change.flagged_with_edit),
            f"+{change.newly_flagged}",
            f"-{change.no_longer_flagged}",
        )
    typer.echo("")
    from rich.console import Console

    Console().print(table)
    if sample:
        for name, change in report.categories.items():
            for key, uris in change.samples.items():
                if uris:
                    label = key.replace("_", " ")
                    typer.echo(f"  {name} {label}: " + ", ".join(uris))
    for note in report.not_previewed:
        typer.echo(f"  not previewed: {note}")


# --------------------------------------------------------------------------- rescore


def rescore(
    ctx: typer.Context,
    policy: Annotated[
        str,
        typer.Option(
            "--policy",
            "-p",
            help="The policy to apply: a name in WORKER_POLICY_DIR or a YAML path.",
            show_default=False,
        ),
    ],
    since: SinceOption = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="Only rows scored before this (same forms as --since)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the JSONL results here.", dir_okay=False),
    ] = None,
    sink: Annotated[
        list[str] | None,
        typer.Option(
            "--sink",
            "-s",
            help="Also deliver each result: TYPE:TARGET[,key=value…], repeatable (the "
            "same specs as `worker classify --sink`).",
        ),
    ] = None,
    changed_only: Annotated[
        bool,
        typer.Option(
            "--changed-only",
            help="Send only results whose flags (or kept tags) differ from the stored "
            "result's for this policy.",
        ),
    ] = False,
    restart: Annotated[
        bool,
        typer.Option("--restart", help="Ignore the progress of an interrupted run; start over."),
    ] = False,
    shards: Annotated[
        int | None,
        typer.Option(
            "--shards",
            min=1,
            help="Run on the serving fleet: cut the window into N equal time shards, one "
            "queue task each (`worker serve` runs them); --out gets one file per shard.",
            show_default=False,
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            help="With --shards: the run's name in Redis [default: a hash of the options, "
            "so the same command again resumes it].",
            show_default=False,
        ),
    ] = None,
    no_wait: Annotated[
        bool,
        typer.Option("--no-wait", help="With --shards: send the shards, print the run id, exit."),
    ] = False,
) -> None:
    """Result documents for stored rows under a policy as it is now: no image is read.

    One document per stored row of the loaded model in the window (with its `job_id` and
    `image`), scored exactly as a fresh image would be. The window is worked through a day
    at a time; an interrupted run (same options) resumes after the last finished day, and
    `--out` is cut back to what that day had written. Without --out and --sink the
    documents go to stdout.

    With --shards N the workers of the queue do the work: the window (from the earliest
    stored row when --since is not given, to now) is cut into N equal time shards, each a
    task that one worker runs with its own model and store, writing
    OUT.shard-K-of-N.jsonl and delivering to the sinks. The command waits, showing the
    shards done; the same command again sends only the shards neither done nor running.
    """
    from worker.plugins import PluginContext
    from worker.queue.delivery import SinkCache
    from worker.runtime import compile_configured, load_configured_model

    settings = state(ctx).settings
    if shards is None and (run_id is not None or no_wait):
        fail("--run-id and --no-wait go with --shards")
    start, end = parse_window(since, until)
    if out is not None and not out.parent.is_dir():
        fail(f"--out {out}: directory {out.parent} does not exist")
    configs = parse_sink_specs(sink or [])
    if shards is not None:
        if out is None and not configs:
            fail("--shards needs --out or --sink: the workers write the documents, not stdout")
        from worker.cli.rescore_fleet import FleetRescore

        with exits_on_errors():
            fleet = FleetRescore(
                settings, _one_policy(policy, settings), since, until, out, configs, changed_only
            )
            failed = fleet.execute(shards, run_id, restart=restart, wait=not no_wait)
        if failed:
            raise typer.Exit(EXIT_FAILED)
        return
    sinks = SinkCache(PluginContext(settings=settings))
    try:
        with exits_on_errors():
            for config in configs:  # bad sink settings fail before the model loads
                sinks.get(config)
            store = open_store(settings)
            loaded = [_one_policy(policy, settings)]
            model = load_configured_model(settings)
            policies = compile_configured(settings, model, loaded)
            run = RescoreRun(
                settings,
                store,
                model,
                policies,
                loaded[0].name,
                (start, end, since, until),
                out,
                configs,
                sinks,
                changed_only,
            )
            failures = run.execute(restart)
    finally:
        sinks.close()
    if failures:
        raise typer.Exit(EXIT_FAILED)


def _one_policy(policy: str, settings: Settings) -> LoadedPolicy:
    """The one policy ``--policy`` names (a file of several: ConfigurationError)."""
    from worker.policy import select_policies

    loaded = select_policies([policy], settings.policy_dir)
    if len(loaded) != 1:
        names = ", ".join(p.name for p in loaded)
        raise ConfigurationError(
            f"--policy {policy} holds {len(loaded)} policies ({names}): name one"
        )
    return loaded[0]


class RescoreRun:
    """One `worker rescore`: its windows, its progress file, its outputs."""

    def __init__(
        self,
        settings: Settings,
        store: EmbeddingStore,
        model: LoadedModel,
        policies: Any,
        name: str,
        window: tuple[datetime | None, datetime | None, str | None, str | None],
        out: Path | None,
        configs: list[dict[str, Any]],
        sinks: Any,
        changed_only: bool,
    ) -> None:
        """``window``: the start and end resolved now, and ``--since`` and ``--until`` as
        given (a run is known by those: `--since 30d` again resumes it, over the window
        the first run resolved)."""
        start, end, since, until = window
        self.settings = settings
        self.store = store
        self.model = model
        self.policies = policies
        self.name = name
        self.start = start
        self.end = end or datetime.now(UTC)
        self.out = out
        self.configs = configs
        self.sinks = sinks
        self.changed_only = changed_only
        key = json.dumps(
            [
                store.uri,
                model.fingerprint,
                policies.compiled[name].version,
                since,
                until,
                str(out.resolve()) if out else None,
                configs,
                changed_only,
            ],
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.progress_file = settings.cache_dir / "rescore" / f"{digest}.json"

    def _state(self, restart: bool) -> dict[str, Any]:
        if restart or not self.progress_file.is_file():
            start = self.start.isoformat() if self.start else None
            return {
                "done": [],
                "offset": 0,
                "written": 0,
                "start": start,
                "end": self.end.isoformat(),
            }
        state_: dict[str, Any] = json.loads(self.progress_file.read_text(encoding="utf-8"))
        # The window as the first run resolved it ("30d" and "now" then, not now)
        self.start = datetime.fromisoformat(state_["start"]) if state_["start"] else None
        self.end = datetime.fromisoformat(state_["end"])
        return state_

    def _save(self, state_: dict[str, Any]) -> None:
        self.progress_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state_), encoding="utf-8")
        tmp.replace(self.progress_file)

    def _emit(self, result: Result, handle: BinaryIO | None, to_stdout: bool) -> list[str]:
        """Write one document and deliver it; returns the sinks that failed."""
        from worker.queue.delivery import deliver_inline

        line = result.to_json() + "\n"
        if handle is not None:
            handle.write(line.encode())
        if to_stdout:
            sys.stdout.write(line)
        return deliver_inline(
            self.sinks,
            self.configs,
            result,
            max_attempts=self.settings.max_attempts,
            backoff_base_s=self.settings.delivery.backoff_base_s,
            backoff_max_s=self.settings.delivery.backoff_max_s,
        )

    def execute(self, restart: bool) -> list[str]:
        from worker.history import day_windows, rescore_window

        state_ = self._state(restart)
        first = self.start or self.store.first_created(self.model.fingerprint)
        windows = day_windows(first, self.end) if first is not None else []
        done = set(state_["done"])
        if done:
            stderr.print(
                f"resuming: {len(done)} of {len(windows)} days done, "
                f"{state_['written']} documents written (--restart to start over)"
            )
        total = self.store.count(_where(self.model, self.start, self.end))
        window_note(self.store, self.model, total, describe_window(self.start, self.end))
        handle = None
        if self.out is not None:
            resuming = bool(done) and self.out.is_file()
            handle = self.out.open("r+b" if resuming else "wb")
            if resuming:  # drop what the interrupted day had written
                handle.truncate(state_["offset"])
                handle.seek(0, 2)
        to_stdout = self.out is None and not self.configs
        failures: list[str] = []
        progress = progress_bar(info=True)
        try:
            with progress:
                task = progress.add_task("re-scoring", total=total, info="")
                for window_start, window_end in windows:
                    label = window_start.isoformat()
                    if label in done:
                        rows = self.store.count(_where(self.model, window_start, window_end))
                        progress.advance(task, rows)
                        continue
                    figures = rescore_window(
                        self.store,
                        self.policies,
                        self.name,
                        self.model,
                        window_start,
                        window_end,
                        lambda result: failures.extend(self._emit(result, handle, to_stdout)),
                        changed_only=self.changed_only,
                        on_rows=functools.partial(_advance, progress, task, label[:10]),
                    )
                    state_["written"] += figures.written
                    if handle is not None:
                        handle.flush()
                        state_["offset"] = handle.tell()
                    done.add(label)
                    state_["done"] = sorted(done)
                    self._save(state_)
        finally:
            if handle is not None:
                handle.close()
        stderr.print(
            f"{state_['written']} result documents written "
            f"({'changed only' if self.changed_only else 'every row'}) for policy {self.name}"
            + (f"; {len(failures)} deliveries failed: {failures[0]}" if failures else "")
        )
        if not failures:
            self.progress_file.unlink(missing_ok=True)
        return failures


def _advance(progress: Progress, task: TaskID, info: str, rows: int) -> None:
    progress.update(task, advance=rows, info=info)
