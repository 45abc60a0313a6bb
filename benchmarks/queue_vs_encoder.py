"""Queue path img/s vs raw `encode_image` img/s: same model, same images, one run.

    python benchmarks/queue_vs_encoder.py [--arch ViT-B-32 | --model local-dir:DIR]
        [--images 96] [--batch-size 32] [--rounds 3] [--redis-url URL]

Starts a redis-server on 127.0.0.1 (unless --redis-url is given) and one `worker serve`
process (solo pool), submits every image as a job with the client API, and times until the
last result is stored. Raw encoder rounds run in between queue rounds, with the worker
idle, so machine noise hits both alike. Without --model an *untrained* copy of --arch is
built (speed does not depend on weight values).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from worker.bench import (
    machine,
    queue_round,
    raw_encoder,
    redis_server,
    synthetic_photos,
    untrained_checkpoint,
    worker_process,
)
from worker.model import load_model
from worker.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--model", help="a loadable model name; default: untrained --arch")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args()

    name = args.model or untrained_checkpoint(args.arch, args.workdir / f"untrained-{args.arch}")
    paths = synthetic_photos(args.workdir / "photos", args.images)
    policy_dir = Path(__file__).resolve().parents[1] / "policies"
    with redis_server(args.redis_url, args.workdir) as url:
        env = {
            **os.environ,
            "WORKER_MODEL__NAME": name,
            "WORKER_CACHE_DIR": str(args.workdir / "cache"),
            "WORKER_POLICY_DIR": str(policy_dir),
            "WORKER_BROKER_URL": url,
            "WORKER_FILE_ROOTS": f'["{args.workdir.resolve()}"]',
            "WORKER_BATCH__MAX_SIZE": str(args.batch_size),
            "WORKER_LOG_LEVEL": "warning",
        }
        settings = load_settings(broker_url=url, batch={"max_size": args.batch_size})
        model = load_model(name, None, device=settings.device, precision=settings.precision)
        raws, queued = [], []
        with worker_process(env, args.workdir / "worker.log"):
            for round_no in range(args.rounds):
                raws.append(raw_encoder(model, paths, args.batch_size).rate)
                queued.append(queue_round(settings, paths, f"r{round_no}").rate)
                print(
                    f"round {round_no + 1}: raw {raws[-1]:.2f} img/s, queue {queued[-1]:.2f} img/s",
                    file=sys.stderr,
                )
    raw, queue = statistics.median(raws), statistics.median(queued)
    print(f"machine: {machine()}; cores: {os.cpu_count()}")
    print(
        f"model: {args.model or args.arch + ' (untrained weights: speed only)'}, "
        f"batch {args.batch_size}, {len(paths)} JPEG 640x480, policies: moderation, tags"
    )
    print(f"rounds: {args.rounds} (medians)")
    print(f"raw encode_image : {raw:8.2f} img/s")
    print(f"queue end-to-end : {queue:8.2f} img/s  (submit -> result stored, 1 worker)")
    print(f"ratio            : {queue / raw:8.3f}")


if __name__ == "__main__":
    main()
