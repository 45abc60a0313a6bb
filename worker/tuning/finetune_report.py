"""`worker finetune` outputs besides the checkpoint: report.json, report.md, training_curve.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    zs, ft = report["zero_shot"], report["fine_tuned"]
    gain = 100 * (ft["held_out_acc"] - zs["held_out_acc"])
    data = report["data"]
    lines = [
        "# Fine-tuning report",
        "",
        f"- base model `{report['base_model']['name']}` (fingerprint "
        f"`{report['base_model']['fingerprint']}`) → checkpoint `{report['checkpoint']}` "
        f"(fingerprint `{report['fingerprint']}`)",
        f"- data `{data['source']}`: {data['train']} train, {data['val']} val, {data['held_out']} "
        f"held out ({data['held_out_split']} split); classes: {', '.join(report['classes'])}",
        f"- method {report['config']['method']}, {len(report['history']['epochs'])} epoch(s), "
        f"lr {report['config']['lr']}, batch {report['config']['batch_size']}, "
        f"seed {report['config']['seed']}",
        "",
        "## Accuracy",
        "",
        "| | zero-shot | fine-tuned (WiSE-FT α = {:.1f}) |".format(report["alpha"]),
        "|---|---:|---:|",
        f"| held-out | {_pct(zs['held_out_acc'])} | {_pct(ft['held_out_acc'])} |",
        f"| validation | {_pct(zs['val_acc'])} | {_pct(ft['val_acc'])} |",
    ]
    if report["control"]:
        c = report["control"]
        lines.append(
            f"| control (`{c['source']}`) | {_pct(c['zero_shot_acc'])} | {_pct(c['chosen_acc'])} |"
        )
    lines += ["", f"Held-out accuracy changed by **{gain:+.1f} points**.", ""]
    if report["control"]:
        c = report["control"]
        verdict = "within" if c["within_margin"] else "OUTSIDE"
        lines += [
            f"Control accuracy stays {verdict} the allowed drop of {100 * c['margin']:.1f} points.",
            "",
        ]
    lines += [
        "## Per class (held-out)",
        "",
        "| class | support | precision before | recall before | precision after | recall after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for cls in report["classes"]:
        b, a = zs["per_class"].get(cls, {}), ft["per_class"].get(cls, {})
        lines.append(
            f"| {cls} | {a.get('support', 0)} | {_pct(b.get('precision'))} "
            f"| {_pct(b.get('recall'))} "
            f"| {_pct(a.get('precision'))} | {_pct(a.get('recall'))} |"
        )
    lines += ["", "## WiSE-FT α curve", "", "| α | val acc | control acc |", "|---:|---:|---:|"]
    for point in report["alpha_curve"]:
        mark = " ←" if point["alpha"] == report["alpha"] else ""
        lines.append(
            f"| {point['alpha']:.1f}{mark} | {_pct(point['val_acc'])} "
            f"| {_pct(point.get('control_acc'))} |"
        )
    t = report["throughput"]
    memory = f", peak GPU memory {t['peak_memory_mb']:.0f} MiB" if t.get("peak_memory_mb") else ""
    lines += [
        "",
        f"Training ran at {t['train_images_per_s']:.1f} images/s on {t['device']}{memory}.",
        "",
        "Serve it: `WORKER_MODEL__NAME=local-dir:"
        + report["checkpoint"].removeprefix("local-dir:")
        + "`.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax, alpha_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    steps = report["history"]["steps"]
    if steps:
        xs = list(range(1, len(steps) + 1))
        ys = [loss for _, loss in steps]
        loss_ax.plot(xs, ys, color="tab:blue", alpha=0.4, linewidth=0.8)
        window = max(len(ys) // 20, 1)
        smooth = [
            sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1])
            for i in range(len(ys))
        ]
        loss_ax.plot(xs, smooth, color="tab:blue")
    loss_ax.set_title("training loss")
    loss_ax.set_xlabel("batch")
    epochs = report["history"]["epochs"]
    acc_ax.plot([e["epoch"] for e in epochs], [e["train_acc"] for e in epochs], "o-", label="train")
    acc_ax.plot([e["epoch"] for e in epochs], [e["val_acc"] for e in epochs], "s-", label="val")
    acc_ax.axhline(
        report["zero_shot"]["val_acc"], color="gray", linestyle="--", label="val, zero-shot"
    )
    acc_ax.set_title("accuracy per epoch")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.legend(fontsize=8)
    curve = report["alpha_curve"]
    alpha_ax.plot([p["alpha"] for p in curve], [p["val_acc"] for p in curve], "o-", label="val")
    if curve and "control_acc" in curve[0]:
        alpha_ax.plot(
            [p["alpha"] for p in curve], [p["control_acc"] for p in curve], "s-", label="control"
        )
    alpha_ax.axvline(
        report["alpha"], color="tab:green", linestyle="--", label=f"chosen α={report['alpha']:.1f}"
    )
    alpha_ax.set_title("WiSE-FT interpolation")
    alpha_ax.set_xlabel("α (0 = zero-shot, 1 = fine-tuned)")
    alpha_ax.set_ylim(0, 1.02)
    alpha_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(report: dict[str, Any], out: Path) -> list[Path]:
    paths = [out / "report.json", out / "report.md", out / "training_curve.png"]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report), encoding="utf-8")
    plot(report, paths[2])
    return paths
