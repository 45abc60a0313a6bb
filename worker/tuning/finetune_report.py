"""`worker finetune` outputs besides the checkpoint: report.json, report.md (the answer
first), training_curve.png and frontier.png (domain against control accuracy for every
candidate tried)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%"


def _points(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "n/a"
    return f"{100 * (after - before):+.1f} points"


def _answer(report: dict[str, Any]) -> list[str]:
    """The lines a customer reads first: what changed, on what, at what cost."""
    zs, ft, c = report["zero_shot"], report["fine_tuned"], report["control"]
    data = report["data"]
    rows = [
        "| | before (base model) | after (this checkpoint) | change |",
        "|---|---:|---:|---:|",
        f"| **domain** ({data['held_out']} held-out images, {data['held_out_split']} split) "
        f"| {_pct(zs['held_out_acc'])} | {_pct(ft['held_out_acc'])} "
        f"| {_points(zs['held_out_acc'], ft['held_out_acc'])} |",
    ]
    if c:
        rows.append(
            f"| **control** ({c['judged']} images of `{c['source']}` never trained on) "
            f"| {_pct(c['zero_shot_acc'])} | {_pct(c['chosen_acc'])} "
            f"| {_points(c['zero_shot_acc'], c['chosen_acc'])} |"
        )
    verdict = []
    if c:
        kept = "within" if c["within_margin"] else "OUTSIDE"
        verdict.append(
            f"Control accuracy stays **{kept}** the allowed drop of {100 * c['margin']:.1f} points."
        )
    else:
        verdict.append(
            "No `--control` set was given, so nothing measured what the model may have "
            "forgotten outside this domain: give one (see docs/tuning.md)."
        )
    return ["# Fine-tuning report", "", *rows, "", *verdict, ""]


def _recipe(report: dict[str, Any]) -> list[str]:
    cfg, recipe, sched = report["config"], report["recipe"], report["schedule"]
    lines = [
        "## The recipe chosen, and why",
        "",
        "- **objective**: domain loss against the class prompts + "
        + "; ".join(recipe["objective"]),
        f"- **learning rate** {cfg['lr']:g} ({recipe['lr']})",
        f"- **epochs**: best epoch {report['best_epoch']} of at most {cfg['epochs']}: "
        + sched["why"],
        f"- **WiSE-FT α = {report['alpha']:.1f}** (0 = base model, 1 = fine-tuned): the "
        "best validation accuracy"
        + (" among α whose control accuracy stays within the margin" if report["control"] else "")
        + "",
        f"- method {cfg['method']}, batch {cfg['batch_size']}, seed {cfg['seed']}",
        "",
    ]
    trials = report["sweep"]
    if trials:
        lines += [
            "### Learning-rate sweep",
            "",
            "| lr | epochs | val acc | control acc | seconds |",
            "|---:|---:|---:|---:|---:|",
        ]
        for t in trials:
            mark = " ←" if t["lr"] == cfg["lr"] else ""
            lines.append(
                f"| {t['lr']:g}{mark} | {t['epochs']} | {_pct(t['val_acc'])} "
                f"| {_pct(t.get('control_acc'))} | {t['seconds']:.1f} |"
            )
        lines.append("")
    lines += [
        "The frontier (`frontier.png`) plots domain against control accuracy for every "
        "candidate tried: the sweep's trials, each epoch of the full run and each α.",
        "",
        "![frontier](frontier.png)",
        "",
    ]
    return lines


def markdown(report: dict[str, Any]) -> str:
    zs, ft = report["zero_shot"], report["fine_tuned"]
    data = report["data"]
    lines = [
        *_answer(report),
        *_recipe(report),
        "## Per class (held-out domain)",
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
        "## Details",
        "",
        f"- base model `{report['base_model']['name']}` (fingerprint "
        f"`{report['base_model']['fingerprint']}`) → checkpoint `{report['checkpoint']}` "
        f"(fingerprint `{report['fingerprint']}`)",
        f"- data `{data['source']}`: {data['train']} train, {data['val']} val, {data['held_out']} "
        f"held out; classes: {', '.join(report['classes'])}",
        f"- validation accuracy {_pct(zs['val_acc'])} → {_pct(ft['val_acc'])}",
        f"- training ran at {t['train_images_per_s']:.1f} images/s on {t['device']}{memory}; "
        f"the whole run took {t.get('seconds', 0):.0f} s",
        "",
        "Serve it: `WORKER_MODEL__NAME=local-dir:"
        + report["checkpoint"].removeprefix("local-dir:")
        + "`.",
        "",
    ]
    return "\n".join(lines)


def frontier_points(report: dict[str, Any]) -> dict[str, list[tuple[float, float | None, str]]]:
    """Every candidate tried as (domain val acc, control acc, label), by kind."""
    sweep = [
        (
            e["val_acc"],
            e.get("control_acc"),
            f"lr {t['lr']:g}" if e["epoch"] == t["best_epoch"] else "",
        )
        for t in report["sweep"]
        for e in t.get("history") or [{"epoch": t["best_epoch"], **t}]
    ]
    epochs = [
        (e["val_acc"], e.get("control_acc"), f"epoch {e['epoch']:.0f}")
        for e in report["history"]["epochs"]
    ]
    alphas = [
        (p["val_acc"], p.get("control_acc"), f"α {p['alpha']:.1f}") for p in report["alpha_curve"]
    ]
    return {
        "learning-rate trials (each epoch)": sweep,
        "epochs of the full run": epochs,
        "WiSE-FT α": alphas,
    }


def plot_frontier(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5))
    has_control = report["control"] is not None
    markers = {
        "learning-rate trials (each epoch)": "o",
        "epochs of the full run": "s",
        "WiSE-FT α": "^",
    }
    for kind, points in frontier_points(report).items():
        if not points:
            continue
        xs = [x for x, _, _ in points]
        ys = [y if has_control and y is not None else i for i, (_, y, _) in enumerate(points)]
        ax.scatter(xs, ys, marker=markers[kind], label=kind, alpha=0.75)
        if kind != "epochs of the full run":
            for x, y, (_, _, text) in zip(xs, ys, points, strict=True):
                if text:
                    ax.annotate(text, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    chosen = next(p for p in report["alpha_curve"] if p["alpha"] == report["alpha"])
    if has_control:
        c = report["control"]
        ax.axhline(
            c["zero_shot_acc"] - c["margin"],
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"control floor (base − {100 * c['margin']:.0f} points)",
        )
        ax.scatter(
            [chosen["val_acc"]],
            [chosen["control_acc"]],
            s=160,
            facecolors="none",
            edgecolors="black",
            label="served",
        )
        ax.set_ylabel("control accuracy")
    else:
        ax.set_ylabel("candidate (no --control: control accuracy unknown)")
    ax.axvline(report["zero_shot"]["val_acc"], color="gray", linestyle=":", label="base, domain")
    ax.set_xlabel("domain validation accuracy")
    ax.set_title("every candidate tried")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
    paths = [out / n for n in ("report.json", "report.md", "training_curve.png", "frontier.png")]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report), encoding="utf-8")
    plot(report, paths[2])
    plot_frontier(report, paths[3])
    return paths
