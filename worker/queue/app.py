"""The Celery app: glue between Redis messages and :class:`worker.queue.processor.QueueProcessor`.

Usable as ``celery -A worker.queue.app worker --pool solo`` or through ``worker serve``.

Reliability settings (see docs/architecture.md, "Queue"):

- json only, both ways: a pickle message is refused, never deserialised;
- every message is vetted before the batch task sees it (``worker/queue/intake.py``): one that
  is not a ``moderation.score`` call with one job object, or a ``moderation.score_jobs``
  call with a list of jobs (a packed message), is dead-lettered with its raw body, never
  raised into the consumer loop;
- ``acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged after its result is
  stored and delivered (or dead-lettered), so a worker that dies mid-batch loses nothing:
  Redis hands its unacknowledged jobs to another worker after the visibility timeout;
- celery-batches acknowledges every request of a batch when the batch function returns,
  whatever happened; :class:`OutcomeBatches` instead acknowledges the jobs that finished
  and requeues the others;
- prefetch = batch size, so a batch can fill; a batch is flushed when it holds
  ``flush_every`` *jobs* (a packed message counts as its jobs), or after the wait;
- ``moderation.rescore_shard`` (`worker rescore --shards N`, ``worker/queue/rescore_shards.py``)
  is a plain task on the same queue: one shard of a re-score over the embedding store.
  Under the solo pool it runs in the consumer's thread, so a worker takes one shard at a
  time and nothing else meanwhile (the score jobs it had buffered are scored first).

Prefork: the parent only consumes, buffers batches and acknowledges; each child loads its
own model in ``worker_process_init``. The parent must never run a torch op before the pool
forks (libgomp's OpenMP pool is not fork-safe: the child would hang in its first parallel
region), and each child uses its share of the cores for torch's intra-op threads.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from celery import Celery, current_app, signals
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from worker.log import configure_logging, get_logger
from worker.queue.rescore_shards import DELIVERY_TAG_HEADER, RESCORE_TASK
from worker.settings import Settings, load_settings

log = get_logger(__name__)
SCORE_TASK = "moderation.score"
#: The packed task: one message, one argument ``jobs``, a list of job documents.
SCORE_JOBS_TASK = "moderation.score_jobs"
#: How long a prefork child may take to send its UP message (it loads the model first).
#: Celery's default of 4 s only applies to children forked after start-up (replacements of
#: a dead child) and would SIGKILL each of them in turn while it loads.
CHILD_START_TIMEOUT_S = 600.0


class OutcomeBatches(Batches):  # type: ignore[misc]
    """Batches whose function returns one bool per request: ack when True, requeue when not.

    A batch function that raises (or a worker that dies) acknowledges nothing: every
    request goes back to the queue, and the per-job attempt counter stops a poison job
    from looping forever.

    ``flush_every`` counts jobs, not messages: celery-batches flushes every
    ``flush_every``-th request, which with packed messages would be up to
    ``flush_every × max_jobs_per_message`` images for the encoder. Here each message adds
    its number of jobs, and the buffer is flushed once it holds ``flush_every`` jobs (so
    a batch holds at most ``flush_every + max_jobs_per_message - 1``), or after
    ``flush_interval`` as before.
    """

    def __init__(self) -> None:
        super().__init__()
        self._jobs_buffered = 0
        self._count = itertools.repeat(1)

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 - Celery's name
        handler = super().Strategy(task, app, consumer)

        def counting_handler(message: Any, *args: Any, **kwargs: Any) -> None:
            try:
                jobs = jobs_in(message.payload)
            except Exception:  # the intake vetted it; whatever it is, it is one request
                jobs = 1
            self._jobs_buffered += jobs
            # celery-batches flushes when next(self._count) % flush_every == 0: never,
            # unless flush_every is 1 (then every message is a batch anyway).
            self._count = itertools.repeat(1)
            handler(message, *args, **kwargs)
            if self._jobs_buffered >= self.flush_every:
                self._do_flush()

        return counting_handler

    def _do_flush(self) -> None:
        self._jobs_buffered = 0  # ETAs are refused at the intake: nothing stays pending
        super()._do_flush()
        self._count = itertools.repeat(1)

    def flush(self, requests: Any) -> Any:
        requests = list(requests)
        serializable = ([SimpleRequest.from_request(r) for r in requests],)

        def on_return(outcomes: Any) -> None:
            # Runs in the process that holds the messages (the parent under prefork).
            ok = isinstance(outcomes, list) and len(outcomes) == len(requests)
            finished = outcomes if ok else []
            for index, request in enumerate(requests):
                if index < len(finished) and finished[index]:
                    request.acknowledge()
                else:
                    request.reject(requeue=True)

        def on_error(_: Any) -> None:
            # A prefork child died mid-batch (WorkerLostError): without this the messages
            # stay unacknowledged in the parent, filling its prefetch window for ever.
            on_return(None)

        return self._pool.apply_async(
            apply_batches_task,
            (self, serializable, 0, None),
            callback=on_return,
            error_callback=on_error,
        )


def jobs_in(payload: Any) -> int:
    """How many jobs a vetted message's decoded body ``[args, kwargs, embed]`` carries."""
    try:
        args, kwargs, _ = payload
        value = args[0] if args else next(iter(kwargs.values()))
    except (TypeError, ValueError, IndexError, StopIteration):
        return 1
    return max(len(value), 1) if isinstance(value, list) else 1


def _settings_of(app: Celery) -> Settings:
    settings: Settings = app.conf.moderation_settings
    return settings


def create_app(settings: Settings, *, worker: bool = False) -> Celery:
    """A Celery app configured from ``settings``; the model is not loaded here.

    ``worker=True`` (``worker serve``, ``celery -A worker.queue.app``) makes it Celery's
    current app, which is how a prefork child finds it after the fork."""
    app = Celery("moderation_worker", broker=settings.broker_url, set_as_current=worker)
    if settings.broker_url.split("://", 1)[0] in {"redis", "rediss"}:
        app.conf.broker_transport = "worker.queue.intake:GuardedRedisTransport"
    app.conf.update(
        moderation_settings=settings,
        moderation_pool_processes=1,  # prefork children sharing the cores (worker_init)
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,  # results live in mw:result:{job_id}
        task_default_queue=settings.queue.name,
        worker_prefetch_multiplier=settings.batch.batch_size,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        worker_proc_alive_timeout=CHILD_START_TIMEOUT_S,
        # Bad messages are dead-lettered, never raised into the consumer loop (intake);
        # each job gets its own Celery task events (events).
        worker_consumer="worker.queue.events:TaskEventsConsumer",
        broker_transport_options={
            "visibility_timeout": settings.queue.visibility_timeout_s,
            "unacked_restore_interval": settings.queue.restore_interval_s,
            "unacked_restore_throttle": 1,
        },
    )
    for name in (SCORE_TASK, SCORE_JOBS_TASK):
        app.task(
            base=OutcomeBatches,
            bind=True,
            name=name,
            acks_late=True,
            flush_every=settings.batch.batch_size,
            flush_interval=max(settings.batch.max_wait_ms, 1) / 1000,
        )(score_batch)
    app.task(
        bind=True,
        name=RESCORE_TASK,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        typing=False,
    )(rescore_shard)
    return app


def send_job(app: Celery, job: dict[str, Any]) -> None:
    """Put one job (a JSON-ready job document) on the queue."""
    settings = _settings_of(app)
    app.send_task(SCORE_TASK, args=[job], queue=settings.queue.name)


def send_jobs(app: Celery, jobs: list[Any]) -> None:
    """Put jobs on the queue as one message: a packed ``moderation.score_jobs`` message,
    or a plain ``moderation.score`` one for a single job document. With :func:`send_job`,
    the only places tasks are sent."""
    if len(jobs) == 1 and isinstance(jobs[0], dict):
        send_job(app, jobs[0])
        return
    settings = _settings_of(app)
    app.send_task(SCORE_JOBS_TASK, args=[list(jobs)], queue=settings.queue.name)


def send_rescore_shard(app: Celery, shard: dict[str, Any], message_id: str) -> None:
    """Put one shard of a `worker rescore --shards N` run (a JSON-ready
    :class:`~worker.queue.rescore_shards.ShardSpec`) on the queue, as message
    ``message_id``; with :func:`send_job` and :func:`send_jobs`, the only places tasks are
    sent."""
    settings = _settings_of(app)
    app.send_task(RESCORE_TASK, args=[shard], queue=settings.queue.name, task_id=message_id)


def score_batch(task: Any, requests: list[SimpleRequest]) -> list[bool]:
    """The batch task (both task names): one outcome per request (True = acknowledge).

    The jobs of a packed request are scored in the batch like any other, each on its own;
    ``BatchOutcome.jobs`` says what became of each job id."""
    from worker.queue.processor import Message
    from worker.queue.service import current_service

    service = current_service() or start(task.app)
    packed = task.name == SCORE_JOBS_TASK
    messages = [Message(getattr(r, "id", None), _payloads(r, packed), packed) for r in requests]
    outcome = service.processor.process_messages(messages, lambda jobs: send_jobs(task.app, jobs))
    for request in requests:  # what the per-job task events report (worker/queue/events.py)
        request.job_results = {}
    for job in outcome.jobs:
        if job.result is not None:
            requests[job.message].job_results[job.job_id] = job.result
    return outcome.acks


def _payloads(request: SimpleRequest, packed: bool) -> list[Any]:
    """The jobs one request carries (the intake vetted the shapes)."""
    if not packed:
        return [request.args[0] if request.args else request.kwargs.get("job")]
    jobs = request.args[0] if request.args else request.kwargs.get("jobs")
    return list(jobs) if isinstance(jobs, list) else [jobs]


def rescore_shard(task: Any, shard: dict[str, Any]) -> str:
    """The shard task: what became of the shard (``done``, ``skipped``, ``duplicate``,
    ``failed``); a transient failure puts the message back after a backoff. The intake
    validated ``shard`` and held its sinks to the rules of a job's."""
    from celery.exceptions import Reject

    from worker.queue.rescore_shards import ShardRetry, ShardSpec, execute_shard
    from worker.queue.service import current_service

    service = current_service() or start(task.app)
    _flush_buffered_batches(task.app)
    spec = ShardSpec.model_validate(shard)
    options = task.app.conf.broker_transport_options or {}
    index_key = str(options.get("global_keyprefix", "")) + str(
        options.get("unacked_index_key", "unacked_index")
    )
    tag = getattr(task.request, DELIVERY_TAG_HEADER, None)
    try:
        return execute_shard(
            service,
            spec,
            delivery_tag=tag if isinstance(tag, str) else None,
            unacked_index_key=index_key,
        )
    except ShardRetry as exc:
        time.sleep(exc.delay)
        raise Reject(str(exc), requeue=True) from None
    except Exception as exc:  # Redis gone while recording: the message goes back
        log.exception("rescore.shard_crashed", run_id=spec.run_id, shard=spec.shard)
        time.sleep(1.0)
        raise Reject(repr(exc), requeue=True) from None


def _flush_buffered_batches(app: Celery) -> None:
    """Under the solo pool a shard runs in the consumer's thread, where the batches' flush
    timer runs too: the score jobs buffered before the shard came are scored now, not after
    it. (Prefork and threads pools run tasks elsewhere, and the timer keeps running.)"""
    from celery.concurrency.solo import TaskPool as SoloPool

    for name in (SCORE_TASK, SCORE_JOBS_TASK):
        task = app.tasks.get(name)
        if not isinstance(getattr(task, "_pool", None), SoloPool):
            continue
        try:
            if task._buffer.qsize() or task._pending.qsize():
                task._do_flush()
        except Exception:  # never keep the shard from running
            log.exception("rescore.flush_failed", task=name)


def start(app: Celery) -> Any:
    """Start this process's service. A bad model, policy or sink setting ends the process
    with exit code 2 (SystemExit passes through Celery's signal dispatch, which swallows
    ordinary exceptions) instead of leaving a worker up that cannot score."""
    from worker.errors import WorkerError
    from worker.queue.service import start_service

    try:
        service = start_service(_settings_of(app), lambda job: send_job(app, job))
    except WorkerError as exc:
        log.error("worker.start_failed", error=str(exc))
        raise SystemExit(2) from exc
    # The batch size may have been measured on the GPU: batches and prefetch follow it.
    for name in (SCORE_TASK, SCORE_JOBS_TASK):
        app.tasks[name].flush_every = service.batch_size
    app.conf.worker_prefetch_multiplier = service.batch_size
    service.processor.max_batch = service.batch_size
    return service


def _uses_main_process(worker: Any) -> bool:
    pool = str(getattr(worker, "pool_cls", "")).lower()
    return "solo" in pool or "thread" in pool


def _share_cores(processes: int) -> None:
    """Give this prefork child its share of the cores for torch's intra-op threads, so N
    children do not each start one OpenMP thread per core (unless OMP_NUM_THREADS says)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // max(processes, 1)))


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or "moderation_settings" not in app.conf:
        return
    configure_logging(_settings_of(app).log_level, _settings_of(app).log_format)
    if _uses_main_process(sender):
        start(app)
    else:  # prefork: nothing that touches torch here, the pool forks after this signal
        app.conf.moderation_pool_processes = int(getattr(sender, "concurrency", None) or 1)


def _child_settings(settings: Settings) -> Settings:
    """Prefork child i (0..N-1, kept by its replacements) serves /metrics on PORT + i: the
    children cannot all listen on one port, and a child that fails to is respawned for ever."""
    from billiard.process import current_process  # type: ignore[import-untyped]

    index = int(getattr(current_process(), "index", 0) or 0)
    if not settings.metrics.port or not index:
        return settings
    metrics = settings.metrics.model_copy(update={"port": settings.metrics.port + index})
    return settings.model_copy(update={"metrics": metrics})


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _on_worker_process_init(**_: Any) -> None:
    app = current_app._get_current_object()
    if "moderation_settings" in app.conf:  # a prefork child: load the model here, once
        app.conf.moderation_settings = _child_settings(_settings_of(app))
        _share_cores(int(app.conf.moderation_pool_processes))
        start(app)


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    log.info("worker.consuming", node=getattr(sender, "hostname", None))


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
def _on_worker_shutdown(**_: Any) -> None:
    from worker.queue.service import stop_service

    stop_service()


@signals.worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _on_worker_process_shutdown(**_: Any) -> None:
    """A prefork child stopping: its service (and the embedding-store rows it still has
    queued) is its own; only the parent gets ``worker_shutdown``."""
    from worker.queue.service import stop_service

    stop_service()


def __getattr__(name: str) -> Any:
    """``celery -A worker.queue.app`` looks for ``app``: build it from the environment."""
    if name in {"app", "celery"}:
        built = create_app(load_settings(), worker=True)
        globals()["app"] = globals()["celery"] = built  # later lookups skip __getattr__
        return built
    raise AttributeError(name)
