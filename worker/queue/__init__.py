"""The queue side: Celery on Redis, from a message to an acknowledged, delivered result.

| module | holds |
|---|---|
| ``app`` | the Celery app (``create_app``), the batch task, process signals |
| ``intake`` | vetting every message before the batch task sees it |
| ``processor`` | ``QueueProcessor``: payloads in, per-message outcomes out (no Celery) |
| ``delivery`` | ``Deliverer``: leased deliveries, retries, the delivery pool |
| ``jobs`` | ``JobStore``: results, attempts and the delivery schedule; ``RedisPluginState`` |
| ``dead_letters`` | ``DeadLetters``: what could not be completed, and requeueing it |
| ``reload`` | ``PolicyWatcher``: hot policy reload |
| ``service`` | ``Service``: one process's long-lived parts |
| ``serving`` | ``worker serve``: checks before consuming, then Celery's worker loop |
| ``rescore_shards`` | ``moderation.rescore_shard``: one time shard of `worker rescore --shards N` |
| ``rescore_runs`` | a shard run's records in Redis: done shards, leases, the heartbeat |

It may import the engine, the policy package, plugins and ``ops``; nothing outside
``worker.cli`` and ``worker.client`` imports it.
"""
