"""Re-scoring on the fleet: the shards of `worker rescore --shards N`, run by `worker serve`.

The command (``worker/cli/history.py``) cuts the window into N equal time shards and sends
one ``moderation.rescore_shard`` message per shard (:func:`worker.queue.app.send_rescore_shard`)
on the workers' own queue. Its one argument is a :class:`ShardSpec`; the intake
(``worker/queue/intake.py``) validates it and holds its sinks and ``out`` file to the rules
of a job's sinks (:func:`shard_problem`) before Celery sees it. A worker that takes one
(:func:`execute_shard`) compiles the policy from the YAML text the message carries, with
its own model and prompt cache, re-scores the stored rows of its model's fingerprint in
``[since, until)`` with :func:`worker.history.rescore_window` (what `worker rescore` runs
in-process for each day), writes ``{out}.shard-{k:03d}-of-{n:03d}.jsonl`` atomically
(temp file + rename), hands each document to its sinks through the worker's
:class:`~worker.queue.delivery.Deliverer` (delivery ids are job id + sink, so a shard done
twice replaces its pending deliveries instead of adding to them), and records its figures.

A run's records in Redis, and the lease and heartbeat of a running shard, are
:mod:`worker.queue.rescore_runs`. Once and again:

- A shard recorded done is skipped; a copy of a shard that another worker is running is
  left to it (its lease); a shard whose worker died is done again.
- Each take counts an attempt: a shard taken more than ``WORKER_MAX_ATTEMPTS`` times, or
  one that cannot work (its policy does not load, the store is off), is dead-lettered
  (stage ``rescore``, key ``rescore-{run}-{k:03d}``) and recorded failed, so the command
  stops waiting for it. A transient failure (the store unreachable) puts the message back
  after a backoff.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from worker.documents import SinkConfig
from worker.log import get_logger
from worker.queue.rescore_runs import Heartbeat, LeaseTiming, RescoreRecords, take_lease

if TYPE_CHECKING:
    from worker.documents import Result
    from worker.policy import LoadedPolicy
    from worker.queue.delivery import Deliverer
    from worker.queue.service import Service
    from worker.settings import Settings

log = get_logger(__name__)

RESCORE_TASK = "moderation.rescore_shard"
#: The message header the intake sets to the message's kombu delivery tag (whatever a
#: sender put there is replaced), so the heartbeat can find the message in ``unacked_index``.
DELIVERY_TAG_HEADER = "mw_delivery_tag"
#: Most shards one run may have.
MAX_SHARDS = 10_000
#: Largest shard message body: a policy file at its size limit (1 MiB, escaped as JSON)
#: and the rest.
MAX_SHARD_MESSAGE_BYTES = 6 * (1 << 20) + 256 * 1024
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
#: A policy name (``worker.policy.schema.Ident``; this module is imported by the queue
#: client, which must not import the policy package and, with it, torch).
POLICY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
#: A shard stops handing documents to its sinks while the delivery schedule holds this
#: many (a sink that is down must not fill Redis with a shard's worth of retries).
MAX_PENDING_DELIVERIES = 10_000
PENDING_EVERY = 256


class ShardPolicy(BaseModel):
    """The policy a shard applies, as its file reads."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=POLICY_NAME, max_length=200, description="The policy (a document of the file)."
    )
    yaml: str = Field(description="The policy file's text (at most the size of a policy file).")
    stem: str | None = Field(
        None,
        pattern=POLICY_NAME,
        max_length=200,
        description="The file's stem (the name of a first document without `name:`).",
    )

    @field_validator("yaml")
    @classmethod
    def _bounded(cls, value: str) -> str:
        from worker.policy.loading import MAX_POLICY_BYTES

        if len(value.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
            raise ValueError(f"the policy text is over {MAX_POLICY_BYTES} bytes")
        return value


class ShardSpec(BaseModel):
    """The one argument of a ``moderation.rescore_shard`` message."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(pattern=RUN_ID.pattern, description="The run the shard belongs to.")
    shard: StrictInt = Field(ge=0, description="This shard, 0 .. shards - 1.")
    shards: StrictInt = Field(ge=1, le=MAX_SHARDS)
    since: AwareDatetime
    until: AwareDatetime
    policy: ShardPolicy
    out: str | None = Field(
        None,
        min_length=2,
        max_length=4096,
        description="Absolute path prefix: the shard writes {out}.shard-{k:03d}-of-{n:03d}.jsonl.",
    )
    sinks: list[SinkConfig] = Field(default_factory=list, max_length=8)
    changed_only: StrictBool = False

    @model_validator(mode="after")
    def _consistent(self) -> ShardSpec:
        if self.shard >= self.shards:
            raise ValueError(f"shard {self.shard} of {self.shards}: shards count from 0")
        if self.since >= self.until:
            raise ValueError("since must be before until")
        if self.out is not None and ("\0" in self.out or not PurePosixPath(self.out).is_absolute()):
            raise ValueError("out must be an absolute path")
        return self

    def file(self) -> Path | None:
        """Where this shard writes its documents (None: no ``out``)."""
        if self.out is None:
            return None
        return Path(shard_file_name(self.out, self.shard, self.shards))

    def sink_configs(self) -> list[dict[str, Any]]:
        return [{"type": s.type, **s.options()} for s in self.sinks]

    def dead_letter_key(self) -> str:
        return f"rescore-{self.run_id}-{self.shard:03d}"

    def describe(self) -> dict[str, Any]:
        """The shard without its policy text or sink secrets (dead letters, logs)."""
        from worker.redact import redact_config

        return {
            "run_id": self.run_id,
            "shard": self.shard,
            "shards": self.shards,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "policy": self.policy.name,
            "out": self.out,
            "sinks": [redact_config(c) for c in self.sink_configs()],
            "changed_only": self.changed_only,
        }


def shard_file_name(out: str, shard: int, shards: int) -> str:
    return f"{out}.shard-{shard:03d}-of-{shards:03d}.jsonl"


def shard_problem(spec: ShardSpec, settings: Settings) -> str | None:
    """Why a worker may not run ``spec`` as it is sent, or None: its sinks obey the rules of
    a job's sinks (``WORKER_JOB_SINK_TYPES``, ``WORKER_SINK_ROOTS`` for local files), and
    its ``out`` file the rules of a job's ``local`` sink."""
    from worker.plugins import PluginContext, job_sink_problem

    context = PluginContext(settings=settings, service=True)
    for config in spec.sink_configs():
        problem = job_sink_problem(config, context, settings.job_sink_types)
        if problem is not None:
            return f"sink: {problem}"
    target = spec.file()
    if target is not None:
        local = {"type": "local", "path": str(target)}
        problem = job_sink_problem(local, context, settings.job_sink_types)
        if problem is not None:
            return f"out: {problem}"
    return None


# --------------------------------------------------------------------------- running a shard


class ShardRefused(Exception):  # noqa: N818 - a refusal, not an error of the worker
    """The shard cannot work as sent (its policy, the store off): dead-lettered at once."""


class ShardRetry(Exception):  # noqa: N818 - an instruction to the task: put it back
    """A transient failure: the message goes back to the queue after ``delay`` seconds."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


def worker_name() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


def execute_shard(
    service: Service,
    spec: ShardSpec,
    *,
    delivery_tag: str | None = None,
    unacked_index_key: str = "unacked_index",
) -> str:
    """Run one shard message on this worker; returns what became of it (``done``,
    ``skipped``: done before, ``duplicate``: left to the worker that holds it, ``failed``:
    dead-lettered). Raises :class:`ShardRetry` for a transient failure."""
    settings = service.settings
    records = RescoreRecords(service.jobs.redis, spec.run_id, settings.queue.result_ttl_s)
    context = {"run_id": spec.run_id, "shard": spec.shard, "shards": spec.shards}
    if records.is_done(spec.shard):
        log.info("rescore.shard_skipped", reason="done before", **context)
        return "skipped"
    timing = LeaseTiming.for_visibility(settings.queue.visibility_timeout_s)
    token = f"{worker_name()}/{uuid.uuid4().hex[:8]}"
    taken = take_lease(records, spec.shard, token, timing)
    if taken != "taken":
        log.info("rescore.shard_skipped", reason=taken, **context)
        return "skipped" if taken == "done" else "duplicate"
    try:
        attempt = records.take_attempt(spec.shard)
        if attempt > settings.max_attempts:
            why = (
                f"taken {attempt - 1} times without finishing (the worker crashed or the "
                "shard kept failing)"
            )
            return _give_up(service, records, spec, attempt - 1, why)
        state = {"worker": worker_name(), "started": time.time(), "rows": 0, "attempt": attempt}
        unacked = (unacked_index_key, delivery_tag) if delivery_tag else None
        heartbeat = Heartbeat(records, spec.shard, token, timing, unacked, state)
        try:
            heartbeat.beat()
            heartbeat.start()
            log.info(
                "rescore.shard_started",
                since=spec.since.isoformat(),
                until=spec.until.isoformat(),
                attempt=attempt,
                **context,
            )
            summary = run_shard(service, spec, state)
        except ShardRefused as exc:
            return _give_up(service, records, spec, attempt, str(exc))
        except Exception as exc:
            if attempt >= settings.max_attempts:
                log.exception("rescore.shard_crashed", **context)
                return _give_up(service, records, spec, attempt, f"{type(exc).__name__}: {exc}")
            from worker.queue.delivery import backoff_delay

            delay = backoff_delay(
                attempt, settings.delivery.backoff_base_s, min(settings.delivery.backoff_max_s, 30)
            )
            log.warning(
                "rescore.shard_retry",
                attempt=attempt,
                delay_s=round(delay, 2),
                error=f"{type(exc).__name__}: {exc}"[:300],
                **context,
            )
            raise ShardRetry(f"{type(exc).__name__}: {exc}", delay) from exc
        finally:
            heartbeat.stop()
        records.finish(spec.shard, summary)
        log.info("rescore.shard_done", **context, **summary)
        return "done"
    finally:
        try:
            records.clear_running(spec.shard)
            records.release_lease(spec.shard, token)
        except Exception:  # Redis gone: the lease lapses by itself
            log.exception("rescore.lease_release_failed", **context)


def _give_up(
    service: Service, records: RescoreRecords, spec: ShardSpec, attempts: int, why: str
) -> str:
    """Dead-letter the shard (stage ``rescore``) and record it failed."""
    from worker.queue.dead_letters import DeadLetter

    entry = DeadLetter.of(
        spec.dead_letter_key(),
        {},
        attempts,
        why,
        "rescore",
        raw=json.dumps(spec.describe()),
        sealer=service.dead_letters.sealer,
    )
    service.dead_letters.add(entry)
    records.fail(spec.shard, entry.error)
    log.error(
        "rescore.shard_failed",
        run_id=spec.run_id,
        shard=spec.shard,
        dead_letter=entry.job_id,
        error=entry.error[:300],
    )
    return "failed"


def load_shard_policy(spec: ShardSpec) -> LoadedPolicy:
    """The policy ``spec`` names, loaded from its text as from a file (the same limits and
    checks); ShardRefused when it does not load, or lists images or hash files (their files
    are not sent with the shard, and a message may not make a worker read local files)."""
    from worker.errors import PolicyError
    from worker.policy import load_policy_file

    sent = spec.policy
    with tempfile.TemporaryDirectory(prefix="mw-rescore-") as directory:
        path = Path(directory) / f"{sent.stem or sent.name}.yaml"
        path.write_text(sent.yaml, encoding="utf-8")
        try:
            loaded = load_policy_file(path)
        except PolicyError as exc:
            problems = "; ".join(str(p).replace(str(path), "<policy>") for p in exc.problems[:5])
            raise ShardRefused(f"policy {sent.name!r} does not load: {problems}") from None
    chosen = [p for p in loaded if p.name == sent.name]
    if not chosen:
        names = ", ".join(p.name for p in loaded)
        raise ShardRefused(f"the policy text holds no policy {sent.name!r} (it holds {names})")
    policy = chosen[0].policy
    if policy.image_refs() or policy.hash_refs():
        raise ShardRefused(
            f"policy {sent.name!r} lists images or hash files (exemplars, a blocklist): "
            "a shard carries no files; re-score it in-process (`worker rescore` without --shards)"
        )
    return chosen[0]


def run_shard(service: Service, spec: ShardSpec, state: dict[str, Any]) -> dict[str, Any]:
    """Re-score the shard's window; its figures. ``state["rows"]`` follows the progress."""
    from worker.history import rescore_window
    from worker.runtime import compile_configured
    from worker.store import EmbeddingStore

    started = time.perf_counter()
    settings = service.settings
    model = service.engine.model
    loaded = load_shard_policy(spec)
    store = EmbeddingStore.from_settings(settings)
    if store is None:
        raise ShardRefused("the embedding store is off on this worker (WORKER_STORE__URI=none)")
    policies = compile_configured(settings, model, [loaded])
    deliveries = ShardDeliveries(service.deliverer, spec) if spec.sinks else None
    target = spec.file()
    with atomic_lines(target) as write:

        def emit(result: Result) -> None:
            if write is not None:
                write(result.to_json())
            if deliveries is not None:
                deliveries.deliver(result)

        def advance(rows: int) -> None:
            state["rows"] += rows

        figures = rescore_window(
            store,
            policies,
            loaded.name,
            model,
            spec.since,
            spec.until,
            emit,
            changed_only=spec.changed_only,
            on_rows=advance,
        )
    return {
        "rows": figures.rows,
        "written": figures.written,
        "changed": figures.changed,
        "delivered": deliveries.scheduled if deliveries is not None else 0,
        "seconds": round(time.perf_counter() - started, 3),
        "worker": worker_name(),
        "fingerprint": model.fingerprint,
        "policy_version": policies.compiled[loaded.name].version,
        "file": str(target) if target is not None else None,
    }


@contextlib.contextmanager
def atomic_lines(target: Path | None) -> Iterator[Callable[[str], None] | None]:
    """Write lines to a temp file beside ``target`` and rename it over ``target`` when the
    block ends without an error (a shard done again replaces its file, never adds to it);
    on an error the temp file is removed. Yields None when ``target`` is None."""
    if target is None:
        yield None
        return
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, renamed or removed
        "w",
        encoding="utf-8",
        dir=target.parent,
        prefix=f".{target.name}.",
        suffix=".tmp",
        delete=False,
    )
    try:

        def write(line: str) -> None:
            handle.write(line + "\n")

        yield write
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(handle.name, target)
    finally:
        handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)


class ShardDeliveries:
    """A shard's documents to its sinks through the worker's deliverer: each is in Redis
    (leased, retried, dead-lettered like any job's delivery) before its first attempt. The
    shard waits while the deliverer has no room or the schedule is long, so a slow or
    failing sink slows the shard instead of piling its documents up in Redis."""

    def __init__(self, deliverer: Deliverer, spec: ShardSpec) -> None:
        self.deliverer = deliverer
        self.sinks = list(spec.sinks)
        #: Names the run in each delivery's job document (and so in its dead letter).
        self.metadata = {"rescore": {"run_id": spec.run_id, "shard": spec.shard}}
        self.policy = spec.policy.name
        self.scheduled = 0

    def deliver(self, result: Result) -> None:
        from worker.documents import ImageRef, Job

        self._wait_for_room()
        image = ImageRef.model_construct(uri=result.image.uri or f"store:{result.job_id}")
        job = Job.model_construct(
            job_id=result.job_id,
            image=image,
            policies=[self.policy],
            sinks=self.sinks,
            metadata=self.metadata,
        )
        self.deliverer.deliver_all(job, result)
        self.scheduled += 1

    def _wait_for_room(self) -> None:
        """Until the deliverer's pool has room and (asked every ``PENDING_EVERY``
        documents) the delivery schedule is shorter than ``MAX_PENDING_DELIVERIES``."""
        check = self.scheduled % PENDING_EVERY == 0
        waited = 0.0
        while self.deliverer.room() == 0 or (
            check and self.deliverer.jobs.pending_deliveries() >= MAX_PENDING_DELIVERIES
        ):
            time.sleep(0.05)
            waited += 0.05
            if waited >= 60:
                log.warning("rescore.waiting_for_sinks", limit=MAX_PENDING_DELIVERIES)
                waited = 0.0
