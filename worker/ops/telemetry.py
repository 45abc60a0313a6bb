"""Prometheus metrics of a worker process, in a registry of its own.

| metric | type | labels | meaning |
|---|---|---|---|
| ``moderation_jobs_total`` | counter | status, code | jobs finished (ok, or error with its code) |
| ``moderation_policy_jobs_total`` | counter | policy | jobs scored by each policy |
| ``moderation_flags_total`` | counter | policy, category, action | flags raised (live policies) |
| ``moderation_shadow_flags_total`` | counter | policy, category, action | shadow flags |
| ``moderation_store_rows_total`` | counter | outcome | embedding-store rows (below) |
| ``moderation_stage_seconds`` | histogram | stage | per-image time of fetch, decode, ... sink |
| ``moderation_batch_size`` | histogram | | jobs per batch |
| ``moderation_deliveries_total`` | counter | sink, outcome | delivered, retry_scheduled, ... |
| ``moderation_queue_depth`` | gauge | queue | jobs waiting in Redis (read at scrape time) |
| ``moderation_dead_letters`` | gauge | | entries in the dead-letter store |
| ``moderation_pending_retries`` | gauge | | scheduled deliveries and resubmissions |
| ``moderation_model_info`` | info | name, pretrained, fingerprint, device | the model |
| ``moderation_policy_info`` | gauge (=1) | policy, version | the policies in service |

and prometheus_client's standard collectors for this process: ``process_*`` (resident and
virtual memory, CPU seconds, open and maximum file descriptors, start time; Linux only),
``python_info`` and ``python_gc_*``. Under prefork each child serves its own.

Shadow flags are those of ``mode: shadow`` policies (reported, never acted on). Store rows
are ``written``, ``skipped`` (the job id was there already), ``failed`` (the store could
not be written after retries) or ``dropped`` (too many rows waiting for a store that is
down).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.documents import BlocklistResult, ModerationResult, Result

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STAGES = ("fetch", "decode", "preprocess", "encode", "score")


class _RedisGauges(Collector):
    """Gauges read from Redis when Prometheus scrapes (never stale)."""

    def __init__(self, read: Callable[[], dict[str, float]], queue: str) -> None:
        self.read = read
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            values = self.read()
        except Exception:  # Redis down: report nothing rather than fail the scrape
            return
        depth = GaugeMetricFamily(
            "moderation_queue_depth", "Jobs waiting in Redis.", labels=["queue"]
        )
        depth.add_metric([self.queue], values["queue_depth"])
        yield depth
        yield GaugeMetricFamily(
            "moderation_dead_letters",
            "Entries in the dead-letter store.",
            value=values["dead_letters"],
        )
        yield GaugeMetricFamily(
            "moderation_pending_retries",
            "Scheduled deliveries and resubmissions.",
            value=values["pending_retries"],
        )


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_*: memory, CPU, file descriptors (read per scrape)
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        self.jobs = Counter("moderation_jobs", "Jobs finished.", ["status", "code"], registry=r)
        self.policy_jobs = Counter(
            "moderation_policy_jobs", "Jobs scored per policy.", ["policy"], registry=r
        )
        self.flags = Counter(
            "moderation_flags", "Flags raised.", ["policy", "category", "action"], registry=r
        )
        self.shadow_flags = Counter(
            "moderation_shadow_flags",
            "Flags of shadow policies (reported, never acted on).",
            ["policy", "category", "action"],
            registry=r,
        )
        self.store_rows = Counter(
            "moderation_store_rows",
            "Embedding-store rows by outcome (written, skipped, failed, dropped).",
            ["outcome"],
            registry=r,
        )
        self.stages = Histogram(
            "moderation_stage_seconds",
            "Per-image time per stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "moderation_batch_size", "Jobs per batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.deliveries = Counter(
            "moderation_deliveries",
            "Delivery attempts by outcome.",
            ["sink", "outcome"],
            registry=r,
        )
        self.model = Info("moderation_model", "The loaded model.", registry=r)
        self.policies = Gauge(
            "moderation_policy_info",
            "Policies in service (value 1).",
            ["policy", "version"],
            registry=r,
        )
        self._lock = threading.Lock()

    def watch_redis(self, read: Callable[[], dict[str, float]], queue: str) -> None:
        self.registry.register(_RedisGauges(read, queue))

    def observe_result(self, result: Result) -> None:
        self.jobs.labels(result.status, result.error.code if result.error else "").inc()
        for name in result.policies:
            self.policy_jobs.labels(name).inc()
        for flag in result.flags:
            self.flags.labels(flag.policy, flag.category, flag.action).inc()
        for section in result.policies.values():
            if section.mode == "shadow":
                shadow = section.matches if isinstance(section, BlocklistResult) else []
                shadow = section.flags if isinstance(section, ModerationResult) else shadow
                for flag in shadow:
                    self.shadow_flags.labels(flag.policy, flag.category, flag.action).inc()
        for stage in STAGES:
            if stage in result.timings_ms:
                self.stages.labels(stage).observe(result.timings_ms[stage] / 1000)

    def observe_store(self, outcome: str, rows: int) -> None:
        self.store_rows.labels(outcome).inc(rows)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def observe_delivery(self, sink: str, outcome: str, seconds: float | None = None) -> None:
        self.deliveries.labels(sink, outcome).inc()
        if seconds is not None:
            self.stages.labels("sink").observe(seconds)

    def set_model(self, info: dict[str, Any]) -> None:
        self.model.info({k: str(v) for k, v in info.items()})

    def set_policies(self, versions: dict[str, str]) -> None:
        with self._lock:
            self.policies.clear()
            for name, version in versions.items():
                self.policies.labels(name, version[:16]).set(1)
