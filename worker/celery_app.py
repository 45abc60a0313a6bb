"""The Celery app: glue between Redis messages and :class:`worker.queue.QueueProcessor`.

Usable as ``celery -A worker.celery_app worker --pool solo`` or through ``worker serve``.

Reliability settings (see docs/architecture.md, "Queue"):

- json only, both ways: a pickle message is refused, never deserialised;
- ``acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged after its result is
  stored and delivered (or dead-lettered), so a worker that dies mid-batch loses nothing:
  Redis hands its unacknowledged jobs to another worker after the visibility timeout;
- celery-batches acknowledges every request of a batch when the batch function returns,
  whatever happened; :class:`OutcomeBatches` instead acknowledges the jobs that finished
  and requeues the others;
- prefetch = batch size, so a batch can fill.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from worker.log import configure_logging, get_logger
from worker.settings import Settings, load_settings

log = get_logger(__name__)
SCORE_TASK = "moderation.score"
DEFAULT_BATCH = 32  # until a WORKER_BATCH__MAX_SIZE=0 worker has measured its GPU
_created: list[Celery] = []  # apps made in this process, for the prefork child signal


class OutcomeBatches(Batches):  # type: ignore[misc]
    """Batches whose function returns one bool per request: ack when True, requeue when not.

    A batch function that raises (or a worker that dies) acknowledges nothing: every
    request goes back to the queue, and the per-job attempt counter stops a poison job
    from looping forever.
    """

    def flush(self, requests: Any) -> Any:
        requests = list(requests)
        serializable = ([SimpleRequest.from_request(r) for r in requests],)

        def on_return(outcomes: list[bool] | None) -> None:
            finished = outcomes if outcomes and len(outcomes) == len(requests) else []
            for index, request in enumerate(requests):
                if index < len(finished) and finished[index]:
                    request.acknowledge()
                else:
                    request.reject(requeue=True)

        return self._pool.apply_async(
            apply_batches_task, (self, serializable, 0, None), callback=on_return
        )


def _settings_of(app: Celery) -> Settings:
    settings: Settings = app.conf.moderation_settings
    return settings


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``; the model is not loaded here."""
    app = Celery("moderation_worker", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        moderation_settings=settings,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,  # results live in mw:result:{job_id}
        task_default_queue=settings.queue.name,
        worker_prefetch_multiplier=settings.batch.max_size or DEFAULT_BATCH,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.queue.visibility_timeout_s,
            "unacked_restore_interval": settings.queue.restore_interval_s,
            "unacked_restore_throttle": 1,
        },
    )

    @app.task(  # type: ignore[untyped-decorator]
        base=OutcomeBatches,
        name=SCORE_TASK,
        acks_late=True,
        flush_every=settings.batch.max_size or DEFAULT_BATCH,
        flush_interval=max(settings.batch.max_wait_ms, 1) / 1000,
    )
    def score(requests: list[SimpleRequest]) -> list[bool]:
        from worker.service import current_service

        service = current_service() or _start(app)
        return service.processor.process([_payload(r) for r in requests])

    _created.append(app)
    return app


def _payload(request: SimpleRequest) -> Any:
    return request.args[0] if request.args else request.kwargs.get("job")


def _start(app: Celery) -> Any:
    """Start this process's service. A bad model, policy or sink setting ends the process
    with exit code 2 (SystemExit passes through Celery's signal dispatch, which swallows
    ordinary exceptions) instead of leaving a worker up that cannot score."""
    from worker.errors import WorkerError
    from worker.service import start_service

    settings = _settings_of(app)

    def resubmit(job: dict[str, Any]) -> None:
        app.send_task(SCORE_TASK, args=[job], queue=settings.queue.name)

    try:
        service = start_service(settings, resubmit)
    except WorkerError as exc:
        log.error("worker.start_failed", error=str(exc))
        raise SystemExit(2) from exc
    # The batch size may have been measured on the GPU: batches and prefetch follow it.
    app.tasks[SCORE_TASK].flush_every = service.batch_size
    app.conf.worker_prefetch_multiplier = service.batch_size
    return service


def _uses_main_process(worker: Any) -> bool:
    pool = str(getattr(worker, "pool_cls", "")).lower()
    return "solo" in pool or "thread" in pool


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None and "moderation_settings" in app.conf and _uses_main_process(sender):
        configure_logging(_settings_of(app).log_level, _settings_of(app).log_format)
        _start(app)


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _on_worker_process_init(**_: Any) -> None:
    if _created:  # a prefork child: load the model here, once per process
        _start(_created[-1])


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    log.info("worker.consuming", node=getattr(sender, "hostname", None))


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
def _on_worker_shutdown(**_: Any) -> None:
    from worker.service import stop_service

    stop_service()


def __getattr__(name: str) -> Any:
    """``celery -A worker.celery_app`` looks for ``app``: build it from the environment."""
    if name in {"app", "celery"}:
        built = create_app(load_settings())
        globals()["app"] = globals()["celery"] = built  # later lookups skip __getattr__
        return built
    raise AttributeError(name)
