"""One worker process's long-lived parts: engine, store, deliveries, policy watcher.

Built once per process (``worker_process_init`` under prefork, ``worker_init`` under the
solo and threads pools), never at import time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.delivery import Deliverer, DeliveryLoop, SinkCache
from worker.engine import Engine
from worker.log import get_logger
from worker.plugins import PluginContext, parse_sink_spec
from worker.policy import LoadedPolicy
from worker.policyset import PolicySet
from worker.queue import QueueProcessor
from worker.reload import PolicyWatcher
from worker.runtime import build_engine, compile_configured
from worker.settings import Settings
from worker.store import Store

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
    store: Store
    deliverer: Deliverer
    processor: QueueProcessor
    watcher: PolicyWatcher
    loop: DeliveryLoop

    @classmethod
    def start(cls, settings: Settings, resubmit: Callable[[dict[str, Any]], None]) -> Service:
        defaults = default_sink_configs(settings)  # bad sink settings fail before the model loads
        engine = build_engine(settings, service=True)
        store = Store.from_url(settings.broker_url, settings.queue.result_ttl_s)
        store.redis.ping()
        deliverer = Deliverer(
            store,
            SinkCache(PluginContext(settings=settings, service=True, extras={"store": store})),
            defaults,
            max_attempts=settings.max_attempts,
            backoff_base_s=settings.delivery.backoff_base_s,
            backoff_max_s=settings.delivery.backoff_max_s,
            lease_s=settings.delivery.lease_s,
            resubmit=resubmit,
        )

        def recompile(loaded: list[LoadedPolicy]) -> PolicySet:
            return compile_configured(settings, engine.model, loaded)

        watcher = PolicyWatcher(engine, settings.policy_dir, recompile)
        loop = DeliveryLoop(deliverer, settings.delivery.poll_interval_s)
        service = cls(
            settings,
            engine,
            store,
            deliverer,
            QueueProcessor(engine, store, deliverer, settings.max_attempts),
            watcher,
            loop,
        )
        watcher.start()
        loop.start()
        log.info(
            "worker.ready",
            model=engine.model.name,
            pretrained=engine.model.pretrained,
            fingerprint=engine.model.fingerprint,
            device=str(engine.model.device),
            policies=engine.policies.versions(),
            sinks=[c["type"] for c in defaults],
            batch_max_size=settings.batch.max_size,
            batch_max_wait_ms=settings.batch.max_wait_ms,
        )
        return service

    def stop(self) -> None:
        self.watcher.stop()
        self.loop.stop()
        self.deliverer.sinks.close()
        self.engine.close()
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
