"""The queue path's own ceiling (no encoder) for several worker source trees, in one run.

    git worktree add /tmp/mw-before a34085e          # the queue code before packing
    python benchmarks/queue_ceiling.py --tree before=/tmp/mw-before --tree after=. \\
        --jobs-per-message 1 --jobs-per-message 32 --rounds 3

Every worker is a real `worker serve` (solo pool) from its tree whose GPU part (batch
normalisation and encoder) is the zero-cost stand-in of `worker/ops/bench.py`; the client
(this checkout's `submit_many`) and the images are the same for all. A tree that does not
know packed messages is measured at 1 job per message only. Rounds rotate the trees, so
drift on the machine favours none. `worker bench --encoder none` is the same measurement
for this checkout alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from worker.ops.bench import (
    ceiling_round,
    input_side,
    input_size_images,
    machine,
    redis_server,
    untrained_checkpoint,
    worker_process,
)
from worker.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="LABEL=PATH; repeat")
    parser.add_argument("--jobs-per-message", type=int, action="append", default=[])
    parser.add_argument("--jobs", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--untrained", default="tiny", help="architecture (tiny, ViT-B-32, …)")
    parser.add_argument("--task-events", action="store_true", help="default: off in all")
    parser.add_argument("--files", action="store_true", help="image paths, not inline data")
    parser.add_argument("--workdir", type=Path, default=Path(".bench-ceiling"))
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this checkout": "."}
    sizes = args.jobs_per_message or [1, 32]
    workdir: Path = args.workdir
    name = untrained_checkpoint(args.untrained, workdir / f"untrained-{args.untrained}")
    side = input_side(name)
    images = input_size_images(workdir / "input-images", side)
    settings = load_settings()
    env = {
        **os.environ,
        "WORKER_MODEL__NAME": name,
        "WORKER_MODEL__PRETRAINED": "",
        "WORKER_CACHE_DIR": str(workdir / "cache"),
        "WORKER_POLICY_DIR": str(settings.policy_dir),
        "WORKER_FILE_ROOTS": json.dumps([str(workdir.resolve())]),
        "WORKER_BATCH__MAX_SIZE": str(args.batch_size),
        "WORKER_METRICS__PORT": "0",
        "WORKER_TASK_EVENTS": "true" if args.task_events else "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    rates: dict[tuple[str, int], list[float]] = {}
    with redis_server(None, workdir) as url:
        env["WORKER_BROKER_URL"] = url
        run_settings = settings.model_copy(update={"broker_url": url})
        labels = list(trees)
        for number in range(args.rounds):
            for label in labels[number % len(labels) :] + labels[: number % len(labels)]:
                tree = Path(trees[label])
                packs = tree.joinpath("worker/queue/app.py").read_text().count("score_jobs")
                log = workdir / f"worker-{label.replace('/', '_')}.log"
                with worker_process(env, log, encoder=False, tree=tree) as proc:
                    for size in sizes:
                        if size > 1 and not packs:
                            continue
                        tag = f"r{number}-{label}-{size}".replace(" ", "_")
                        found = ceiling_round(
                            run_settings,
                            proc.pid,
                            images,
                            args.jobs,
                            size,
                            tag,
                            inline=not args.files,
                        )
                        rates.setdefault((label, size), []).append(found.rate)
                        print(
                            f"round {number + 1} {label} {size}/msg: {found.rate:.0f} jobs/s",
                            file=sys.stderr,
                        )
    print(f"machine: {machine()}; cores: {os.cpu_count()}")
    print(
        f"{args.untrained} (untrained) preprocessing and policies, {side}x{side} JPEG "
        f"{'files' if args.files else 'inline'}, batch {args.batch_size}, {args.jobs} jobs "
        f"per round, task events {'on' if args.task_events else 'off'}"
    )
    print(f"{'tree':<16}{'jobs/message':>14}{'jobs/s (median)':>18}  rounds")
    for (label, size), values in rates.items():
        rounds = " / ".join(f"{v:.0f}" for v in values)
        print(f"{label:<16}{size:>14}{statistics.median(values):>18.0f}  {rounds}")


if __name__ == "__main__":
    main()
