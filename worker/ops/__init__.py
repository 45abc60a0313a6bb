"""Operating a worker: Prometheus telemetry, the health endpoint, throughput benchmarks.

| module | holds |
|---|---|
| ``telemetry`` | ``Telemetry``: counters, histograms, Redis gauges in a registry of its own |
| ``health`` | ``HealthServer``: ``/metrics``, ``/livez``, ``/readyz`` |
| ``http_server`` | request heads, responses and the connection multiplexer under ``health`` |
| ``bench`` | raw encoder vs classify vs queue measurements (``worker bench``) |
"""
