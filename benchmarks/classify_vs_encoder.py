"""Raw `encode_image` img/s vs `worker classify` end-to-end img/s: same model, same images.

    python benchmarks/classify_vs_encoder.py [--arch ViT-B-32 | --model local-dir:DIR]
        [--images 96] [--batch-size 32]

Without --model an *untrained* copy of --arch is built (speed does not depend on weight
values). Prints both rates and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from worker.bench import (
    classify_pipeline,
    machine,
    raw_encoder,
    synthetic_photos,
    untrained_checkpoint,
)
from worker.model import load_model
from worker.runtime import build_engine
from worker.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--model", help="a loadable model name; default: untrained --arch")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args()

    name = args.model or untrained_checkpoint(args.arch, args.workdir / f"untrained-{args.arch}")
    paths = synthetic_photos(args.workdir / "photos", args.images)
    settings = load_settings(
        model={"name": name, "pretrained": ""},
        cache_dir=args.workdir / "cache",
        policy_dir=Path(__file__).resolve().parents[1] / "policies",
    )
    model = load_model(name, None, device=settings.device, precision=settings.precision)
    engine = build_engine(settings, model=model)
    raws, e2es = [], []
    for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
        raws.append(raw_encoder(model, paths, args.batch_size).rate)
        e2es.append(classify_pipeline(engine, paths, args.batch_size).rate)
    engine.close()
    raw, e2e = statistics.median(raws), statistics.median(e2es)
    print(f"machine: {machine()}; cores: {os.cpu_count()}")
    print(
        f"model: {args.model or args.arch + ' (untrained weights: speed only)'}, "
        f"device {model.device}, batch {args.batch_size}, {len(paths)} JPEG 640x480"
    )
    print(f"policies: {', '.join(engine.policies.names())}")
    print(f"rounds: {args.rounds} (medians; per round raw {_fmt(raws)}, e2e {_fmt(e2es)})")
    print(f"raw encode_image : {raw:8.2f} img/s")
    print(f"classify e2e     : {e2e:8.2f} img/s")
    print(f"ratio            : {e2e / raw:8.3f}")


def _fmt(rates: list[float]) -> str:
    return "/".join(f"{r:.1f}" for r in rates)


if __name__ == "__main__":
    main()
