"""Raw `encode_image` img/s vs `worker classify` end-to-end img/s: same model, same images.

    python benchmarks/classify_vs_encoder.py [worker bench options]

A shortcut for `worker bench --no-queue` (default: `--untrained ViT-B-32`, an untrained
copy of the default architecture, since speed does not depend on weight values). It
prints both rates, their ratio and the per-stage breakdown.
"""

from __future__ import annotations

import sys

from worker.cli import main

if __name__ == "__main__":
    sys.argv = ["worker", "bench", "--no-queue", *(sys.argv[1:] or ["--untrained", "ViT-B-32"])]
    main()
