"""Queue path img/s vs raw `encode_image` img/s (and `worker classify`): one run.

    python benchmarks/queue_vs_encoder.py [worker bench options]

A shortcut for `worker bench` (default: `--untrained ViT-B-32`). It starts a redis-server
on 127.0.0.1 and one `worker serve`, submits every image as a job with the client API, and
times until the last result is stored.
"""

from __future__ import annotations

import sys

from worker.cli import main

if __name__ == "__main__":
    sys.argv = ["worker", "bench", *(sys.argv[1:] or ["--untrained", "ViT-B-32"])]
    main()
