"""Which fine-tune objective keeps the base model while it adapts: measured, not assumed.

    python benchmarks/finetune_recipes.py [--seeds 3] [--out DIR]

On the test suite's hard case (tests/synthetic.py ``write_night_world``: a night camera's
false colours, where the daylight-trained tiny CLIP is near chance and the domain's colour
cues contradict daylight), each variant runs `worker finetune` with the defaults plus its
flags, and the checkpoint is served through `worker classify` on held-out night and
daylight images. Printed: per variant and seed, night (domain) and daylight (control)
accuracy before → after, the learning rate the sweep chose and the seconds it took; then
the mean gain and drop over seeds. Takes about 3 minutes per seed on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.synthetic import pretrain_tiny_clip, write_night_world  # noqa: E402

POLICY = (
    "name: colours\nkind: tags\ntemplates: simple\ntop_k: 1\n"
    "tags: [red, green, blue, yellow, purple]\n"
)
VARIANTS = {
    "plain (domain loss only)": ["--no-replay", "--distill", "0"],
    "L2-SP 0.1": ["--no-replay", "--distill", "0", "--l2sp", "0.1"],
    "L2-SP 1": ["--no-replay", "--distill", "0", "--l2sp", "1"],
    "replay only": ["--distill", "0"],
    "distillation only": ["--no-replay"],
    "replay + distillation (default)": [],
}


def accuracy(env: dict[str, str], model: str, labels: Path) -> float:
    proc = subprocess.run(
        ["worker", "classify", str(labels.parent / "images")],
        env={**env, "WORKER_MODEL__NAME": model},
        capture_output=True,
        text=True,
        check=True,
    )
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    hits = [Path(d["image"]["uri"]).name.split("-")[1] == d["labels"][0] for d in docs]
    return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="finetune-recipes-"))
    model = pretrain_tiny_clip(root / "tiny")
    env = {
        **os.environ,
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
        "WORKER_CACHE_DIR": str(root / "cache"),
    }
    gains: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for seed in range(args.seeds):
        world = write_night_world(root / f"world-{seed}", POLICY, seed=seed)
        env["WORKER_POLICY_DIR"] = str(world["policies"])
        night0 = accuracy(env, model, world["held_night"])
        day0 = accuracy(env, model, world["held_day"])
        print(f"seed {seed}: base model night {night0:.1%}, daylight {day0:.1%}", flush=True)
        for variant, flags in VARIANTS.items():
            out = root / f"seed{seed}-{variant.split()[0]}-{len(flags)}-{'-'.join(flags)}"
            started = time.perf_counter()
            data = ["--data", str(world["data"]), "--control", str(world["control"])]
            subprocess.run(
                ["worker", "finetune", *data, "--policy", "colours", "--out", str(out), *flags],
                env={**env, "WORKER_MODEL__NAME": model},
                capture_output=True,
                check=True,
            )
            seconds = time.perf_counter() - started
            report = json.loads((out / "report.json").read_text())
            night = accuracy(env, f"local-dir:{out}", world["held_night"])
            day = accuracy(env, f"local-dir:{out}", world["held_day"])
            gains[variant].append((night - night0, day0 - day))
            print(
                f"  {variant:32s} night {night0:6.1%} → {night:6.1%}  daylight {day0:6.1%} → "
                f"{day:6.1%}  lr {report['config']['lr']:<8g} α {report['alpha']:.1f}  "
                f"{seconds:5.0f} s",
                flush=True,
            )
    print("\nmean over seeds: night gain / daylight drop (points); passes = gain ≥ 15, drop ≤ 2")
    for variant, values in gains.items():
        gain = statistics.mean(100 * g for g, _ in values)
        drop = statistics.mean(100 * d for _, d in values)
        passes = sum(g >= 0.15 and d <= 0.02 for g, d in values)
        print(f"  {variant:32s} {gain:+6.1f} / {drop:+5.1f}   passes {passes}/{len(values)}")


if __name__ == "__main__":
    main()
