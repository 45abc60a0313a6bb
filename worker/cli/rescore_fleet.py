"""`worker rescore --shards N`: a re-score sent to the workers of the queue, then watched.

The window is cut into N equal time shards (recorded in Redis the first time, so the same
command again means the same run); each shard not done (nor running) goes out as one
``moderation.rescore_shard`` message (``worker/queue/rescore_shards.py`` runs it), and the
command waits for every shard to be done, failed or refused, and reports their figures.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.common import progress_bar, require_redis, stderr
from worker.cli.history import describe_window, open_store, parse_window
from worker.errors import ConfigurationError

if TYPE_CHECKING:
    from worker.policy import LoadedPolicy
    from worker.queue.rescore_runs import RescoreRecords
    from worker.settings import Settings

#: How often the command reads the shards' records while it waits.
POLL_S = 0.5


class FleetRescore:
    """`worker rescore --shards N`: the run's shards sent to the queue, then watched."""

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedPolicy,
        since: str | None,
        until: str | None,
        out: Path | None,
        configs: list[dict[str, Any]],
        changed_only: bool,
    ) -> None:
        policy = loaded.policy
        if policy.image_refs() or policy.hash_refs():
            raise ConfigurationError(
                f"policy {loaded.name!r} lists images or hash files (exemplars, a "
                "blocklist): a shard carries no files; re-score it without --shards"
            )
        self.settings = settings
        self.loaded = loaded
        self.text = loaded.path.read_text(encoding="utf-8")
        self.since, self.until = since, until
        self.out = str(out.resolve()) if out is not None else None
        self.configs = configs
        self.changed_only = changed_only

    def default_run_id(self, shards: int) -> str:
        """A hash of the options as given (``--since 30d`` included, not the time it
        meant): the same command again names the same run."""
        from worker.store import store_uri

        key = json.dumps(
            [
                self.settings.broker_url,
                store_uri(self.settings),
                self.loaded.name,
                hashlib.sha256(self.text.encode()).hexdigest(),
                self.since,
                self.until,
                self.out,
                self.configs,
                self.changed_only,
                shards,
            ],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def execute(self, shards: int, run_id: str | None, *, restart: bool, wait: bool) -> bool:
        """Send the shards not done, then (``wait``) wait for all; True if any failed."""
        from worker.queue.jobs import redis_client
        from worker.queue.rescore_runs import RescoreRecords
        from worker.queue.rescore_shards import MAX_SHARDS, RUN_ID

        if shards > MAX_SHARDS:
            raise ConfigurationError(f"--shards {shards} is over the limit of {MAX_SHARDS}")
        run_id = run_id or self.default_run_id(shards)
        if not RUN_ID.fullmatch(run_id):
            raise ConfigurationError(
                f"--run-id {run_id[:80]!r}: letters, digits, '_', '.' and '-', at most 64"
            )
        require_redis(self.settings.broker_url)
        records = RescoreRecords(
            redis_client(self.settings), run_id, self.settings.queue.result_ttl_s
        )
        if restart:
            records.reset()
        run = records.run() or self._new_run(records, shards)
        if run is None:
            return False
        if run["shards"] != shards:
            raise ConfigurationError(
                f"run {run_id} has {run['shards']} shards, not {shards} (another --run-id, "
                "or --restart to start it over)"
            )
        if run.get("policy_sha256") != hashlib.sha256(self.text.encode()).hexdigest():
            raise ConfigurationError(
                f"run {run_id} was started with another version of {self.loaded.path} "
                "(another --run-id, or --restart to start it over)"
            )
        windows = _windows(run)
        done = records.done()
        running = records.leased([k for k in range(shards) if k not in done])
        todo = [k for k in range(shards) if k not in done and k not in running]
        self._send(records, windows, todo)
        stderr.print(
            f"run {run_id}: {len(todo)} of {shards} shards sent to the queue ({len(done)} done "
            f"already, {len(running)} running), {describe_window(windows[0][0], windows[-1][1])}"
        )
        if not wait:
            typer.echo(run_id)
            return False
        failures = self._wait(records, shards)
        return self._report(records, windows, failures)

    def _new_run(self, records: RescoreRecords, shards: int) -> dict[str, Any] | None:
        """The window cut into shards, recorded; None when the store holds no row."""
        start, end = parse_window(self.since, self.until)
        end = end or datetime.now(UTC)
        if start is None:
            start = open_store(self.settings).first_created()
            if start is None:
                stderr.print("the embedding store holds no rows: nothing to re-score")
                return None
        if start >= end:
            raise ConfigurationError(
                f"the window {describe_window(start, end)} is empty (the earliest stored "
                "row is not before --until)"
            )
        if (end - start).total_seconds() * 1e6 < shards:
            raise ConfigurationError(f"the window is too short for {shards} shards")
        return records.start_run(
            {
                "since": start.isoformat(),
                "until": end.isoformat(),
                "shards": shards,
                "policy": self.loaded.name,
                "policy_sha256": hashlib.sha256(self.text.encode()).hexdigest(),
                "created_at": datetime.now(UTC).isoformat(),
            }
        )

    def _send(
        self, records: RescoreRecords, windows: list[tuple[datetime, datetime]], todo: list[int]
    ) -> None:
        """One message for each shard of ``todo``."""
        from worker.documents import SinkConfig
        from worker.queue.app import create_app, send_rescore_shard
        from worker.queue.rescore_shards import POLICY_NAME, ShardPolicy, ShardSpec

        if not todo:
            return
        stem = self.loaded.path.stem
        policy = ShardPolicy(
            name=self.loaded.name,
            yaml=self.text,
            stem=stem if re.fullmatch(POLICY_NAME, stem) else None,
        )
        sinks = [SinkConfig.model_validate(c) for c in self.configs]
        app = create_app(self.settings)
        for shard in todo:
            since, until = windows[shard]
            spec = ShardSpec(
                run_id=records.run_id,
                shard=shard,
                shards=len(windows),
                since=since,
                until=until,
                policy=policy,
                out=self.out,
                sinks=sinks,
                changed_only=self.changed_only,
            )
            message_id = f"rescore-{records.run_id}-{shard:03d}-{uuid.uuid4().hex[:8]}"
            records.sending(shard, message_id)
            send_rescore_shard(app, spec.model_dump(mode="json"), message_id)

    def _wait(self, records: RescoreRecords, shards: int) -> dict[int, str]:
        """Until every shard is done, failed or refused by the workers' intake; the
        failures (shard -> why)."""
        progress = progress_bar(info=True, transient=False)
        try:
            with progress:
                task = progress.add_task("shards done", total=shards, info="")
                while True:
                    done = records.done()
                    failures = {**_refused(records), **records.failed()}
                    failures = {k: v for k, v in failures.items() if k not in done}
                    running = records.running()
                    rows = sum(int(r.get("rows", 0)) for r in running.values())
                    info = f"{len(running)} running ({rows} rows)" if running else ""
                    if failures:
                        info += f" [red]{len(failures)} failed[/red]"
                    progress.update(task, completed=len(done), info=info)
                    if len(done) + len(failures) >= shards:
                        return failures
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            stderr.print(
                f"stopped waiting: the shards go on on the workers; run the same command "
                f"again (or with --run-id {records.run_id}) to wait for them"
            )
            raise typer.Exit(130) from None

    def _report(
        self,
        records: RescoreRecords,
        windows: list[tuple[datetime, datetime]],
        failures: dict[int, str],
    ) -> bool:
        """Per-shard figures on stderr; True if any shard failed or models differ."""
        done = records.done()
        table = Table(title=f"run {records.run_id}", title_justify="left")
        for column in ("shard", "from", "rows", "written", "changed", "seconds", "worker"):
            table.add_column(column, justify="left" if column in {"from", "worker"} else "right")
        for shard, (since, _) in enumerate(windows):
            figures = done.get(shard)
            if figures is None:
                dashes = ["-"] * 4
                table.add_row(
                    str(shard), since.isoformat(timespec="seconds"), *dashes, "[red]failed[/red]"
                )
                continue
            table.add_row(
                str(shard),
                since.isoformat(timespec="seconds"),
                str(figures["rows"]),
                str(figures["written"]),
                str(figures["changed"]),
                f"{figures['seconds']:.2f}",
                escape(str(figures["worker"])),
            )
        stderr.print(table)
        total = {k: sum(int(f[k]) for f in done.values()) for k in ("rows", "written", "changed")}
        stderr.print(
            f"{total['written']} result documents written "
            f"({'changed only' if self.changed_only else 'every row'}) for policy "
            f"{self.loaded.name} from {total['rows']} stored rows ({total['changed']} changed)"
        )
        for shard, why in sorted(failures.items()):
            stderr.print(f"[red]shard {shard} failed[/red]: {escape(why)}")
        models = sorted({str(f.get("fingerprint")) for f in done.values()})
        if len(models) > 1:
            stderr.print(
                f"[red]the shards were scored by different models[/red] ({', '.join(models)}): "
                "each used its worker's model; run again with --restart once the fleet "
                "serves one"
            )
        return bool(failures) or len(models) > 1


def _windows(run: dict[str, Any]) -> list[tuple[datetime, datetime]]:
    from worker.queue.rescore_runs import split_window

    since = datetime.fromisoformat(run["since"])
    until = datetime.fromisoformat(run["until"])
    return split_window(since, until, int(run["shards"]))


def _refused(records: RescoreRecords) -> dict[int, str]:
    """Shards whose last message the workers' intake refused (a dead letter under the
    message id): shard -> the reason."""
    from worker.queue.dead_letters import KEY, DeadLetter, refused_id

    sent = records.sent()
    if not sent:
        return {}
    shards = sorted(sent)
    found = records.redis.hmget(KEY, [refused_id(sent[k]) for k in shards])
    return {
        shard: f"refused by the workers: {DeadLetter.from_json(text).error}"
        for shard, text in zip(shards, found, strict=True)
        if text
    }
