"""Cold vs incremental policy compile: the prompt-embedding cache at work.

    python benchmarks/compile_cache.py [--arch ViT-B-32 | --model local-dir:DIR]

Compiles the shipped moderation policy into an empty cache (cold), then the same policy
with one more category (incremental: only the new prompts are encoded), then unchanged
(warm). Without --model an *untrained* copy of --arch is built (speed only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

from worker.model import load_model
from worker.ops.bench import untrained_checkpoint
from worker.policy import load_policy_file
from worker.policy.policyset import compile_policies, open_prompt_cache
from worker.settings import SHIPPED_POLICY_DIR

POLICY = SHIPPED_POLICY_DIR / "moderation.yaml"
EXTRA = {"id": "extra_category", "prompts": ["a counterfeit banknote", "a fake passport"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--model", help="a loadable model name; default: untrained --arch")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args()
    name = args.model or untrained_checkpoint(args.arch, args.workdir / f"untrained-{args.arch}")
    model = load_model(name, None, device="auto")
    with tempfile.TemporaryDirectory() as tmp:
        grown_path = Path(tmp) / "moderation.yaml"
        yaml = YAML()
        doc = yaml.load(POLICY.read_text())
        doc["categories"].append(EXTRA)
        with grown_path.open("w") as handle:
            yaml.dump(doc, handle)
        base, grown = load_policy_file(POLICY), load_policy_file(grown_path)
        cache = open_prompt_cache(Path(tmp) / "cache", model)
        rows = []
        for label, policies in (
            ("cold", base),
            ("incremental (+1 category)", grown),
            ("warm", grown),
        ):
            before = model.texts_encoded
            started = time.perf_counter()
            compile_policies(policies, model, cache)
            rows.append((label, time.perf_counter() - started, model.texts_encoded - before))
    print(
        f"model: {args.model or args.arch + ' (untrained weights: speed only)'} on {model.device}"
    )
    print(f"policy: {POLICY.name}, {len(base[0].policy.template_list())} templates")
    for label, seconds, encoded in rows:
        print(f"{label:28s} {seconds:8.2f} s  {encoded:5d} prompts encoded")
    print(f"cold / incremental: {rows[0][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    main()
