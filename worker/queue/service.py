"""One worker process's long-lived parts: engine, job state, deliveries, policy watcher.

Built once per process (``worker_process_init`` under prefork, ``worker_init`` under the
solo and threads pools), never at import time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.engine import Engine
from worker.log import get_logger
from worker.ops.health import HealthServer
from worker.ops.telemetry import Telemetry
from worker.plugins import PluginContext, parse_sink_spec
from worker.policy import LoadedPolicy
from worker.policy.policyset import PolicySet
from worker.queue.dead_letters import DeadLetters
from worker.queue.delivery import Deliverer, DeliveryLoop, SinkCache
from worker.queue.jobs import JobStore, RedisPluginState
from worker.queue.processor import QueueProcessor
from worker.queue.reload import PolicyWatcher
from worker.runtime import (
    build_engine,
    compile_configured,
    record_embeddings,
    resolve_batch_size,
)
from worker.settings import DEFAULT_BATCH_SIZE, Settings

if TYPE_CHECKING:
    from worker.store import StoreWriter

log = get_logger(__name__)


def default_sink_configs(settings: Settings) -> list[dict[str, Any]]:
    """``WORKER_SINKS`` specs parsed, validated and built once (PluginError names the
    problem: unknown type, bad option, missing secret)."""
    configs = [parse_sink_spec(spec) for spec in settings.sinks]
    probe = SinkCache(PluginContext(settings=settings, service=True))
    try:
        for config in configs:
            probe.get(config)
    finally:
        probe.close()
    return configs


@dataclass
class Service:
    settings: Settings
    engine: Engine
    jobs: JobStore
    dead_letters: DeadLetters
    deliverer: Deliverer
    processor: QueueProcessor
    watcher: PolicyWatcher
    loop: DeliveryLoop
    telemetry: Telemetry
    batch_size: int = DEFAULT_BATCH_SIZE
    health: HealthServer | None = None
    store_writer: StoreWriter | None = None

    @classmethod
    def start(cls, settings: Settings, resubmit: Callable[[dict[str, Any]], None]) -> Service:
        defaults = default_sink_configs(settings)  # bad sink settings fail before the model loads
        engine = build_engine(settings, service=True)
        jobs = JobStore.from_settings(settings)
        jobs.redis.ping()
        dead_letters = DeadLetters(jobs.redis, jobs.sealer)
        telemetry = Telemetry()
        telemetry.set_model({**engine.model.describe(), "device": str(engine.model.device)})
        telemetry.set_policies(engine.policies.versions())
        telemetry.watch_redis(
            lambda: {
                "queue_depth": float(jobs.redis.llen(settings.queue.name)),
                "dead_letters": float(dead_letters.count()),
                "pending_retries": float(jobs.pending_deliveries()),
            },
            settings.queue.name,
        )
        deliverer = Deliverer(
            jobs,
            dead_letters,
            SinkCache(
                PluginContext(settings=settings, service=True, state=RedisPluginState(jobs.redis))
            ),
            defaults,
            max_attempts=settings.max_attempts,
            backoff_base_s=settings.delivery.backoff_base_s,
            backoff_max_s=settings.delivery.backoff_max_s,
            lease_s=settings.delivery.lease_s,
            concurrency=settings.delivery.concurrency,
            job_sink_types=settings.job_sink_types,
            resubmit=resubmit,
            telemetry=telemetry,
        )

        def recompile(loaded: list[LoadedPolicy]) -> PolicySet:
            return compile_configured(settings, engine.model, loaded)

        watcher = PolicyWatcher(
            engine,
            settings.policy_dir,
            recompile,
            on_reload=lambda policies: telemetry.set_policies(policies.versions()),
        )
        loop = DeliveryLoop(deliverer, settings.delivery.poll_interval_s)
        service = cls(
            settings,
            engine,
            jobs,
            dead_letters,
            deliverer,
            QueueProcessor(engine, jobs, dead_letters, deliverer, settings.max_attempts, telemetry),
            watcher,
            loop,
            telemetry,
        )
        service.batch_size = resolve_batch_size(settings, engine.model)
        service.store_writer = record_embeddings(engine, settings, telemetry.observe_store)
        if settings.metrics.port:
            service.health = HealthServer(
                settings.metrics.host,
                settings.metrics.port,
                telemetry,
                service.readiness,
                timeout_s=settings.metrics.timeout_s,
                max_connections=settings.metrics.max_connections,
            )
            service.health.start()
        watcher.start()
        loop.start()
        log.info(
            "worker.ready",
            pid=os.getpid(),
            model=engine.model.name,
            pretrained=engine.model.pretrained,
            fingerprint=engine.model.fingerprint,
            device=str(engine.model.device),
            policies=engine.policies.versions(),
            sinks=[c["type"] for c in defaults],
            batch_max_size=service.batch_size,
            batch_max_wait_ms=settings.batch.max_wait_ms,
        )
        return service

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """What /readyz reports: model loaded, Redis reachable, policies in service."""
        try:
            redis_ok = bool(self.jobs.redis.ping())
            redis_detail = "ok"
        except Exception as exc:  # any connection problem makes the worker unready
            redis_ok, redis_detail = False, f"{type(exc).__name__}: {exc}"
        policies = self.engine.policies.versions()
        checks: dict[str, Any] = {
            "model": {"loaded": True, **self.engine.model.describe()},
            "redis": {"reachable": redis_ok, "detail": redis_detail},
            "policies": {
                "valid": bool(policies) and not self.watcher.rejected,
                "versions": {k: v[:16] for k, v in policies.items()},
                "rejected_edit": self.watcher.rejected,
            },
        }
        return redis_ok and bool(policies), checks

    def stop(self) -> None:
        if self.health is not None:
            self.health.stop()
        self.watcher.stop()
        self.loop.stop()
        self.deliverer.close()
        self.deliverer.sinks.close()
        self.engine.close()
        if self.store_writer is not None:
            self.store_writer.close()
        log.info("worker.stopped")


_lock = threading.Lock()
_service: Service | None = None


def start_service(settings: Settings, resubmit: Callable[[dict[str, Any]], None]) -> Service:
    """Start this process's service once; later calls return the same one."""
    global _service  # noqa: PLW0603 - one service per process by design
    with _lock:
        if _service is None:
            _service = Service.start(settings, resubmit)
        return _service


def current_service() -> Service | None:
    return _service


def stop_service() -> None:
    global _service  # noqa: PLW0603
    with _lock:
        if _service is not None:
            _service.stop()
            _service = None
