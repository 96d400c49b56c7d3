"""The report's figures (matplotlib, Agg: no display needed). Each function writes one PNG and
returns its path, or None when the runs hold nothing to draw (the report then says what is
missing instead of drawing an empty axis)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from shards.atomic import replacing
from trainer.report.runs import RunData

DPI = 110


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    with replacing(path, suffix=".png") as temp:
        fig.savefig(temp, dpi=DPI)
    plt.close(fig)
    return path


def _grid(count: int) -> tuple[plt.Figure, np.ndarray]:
    cols = min(count, 5)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, axes.flat


def roc_curves(run: RunData, out: Path) -> Path:
    test = run.test
    fig, axes = _grid(len(test.labels))
    for ax, (c, label) in zip(axes, enumerate(test.labels), strict=False):
        keep = test.masks[:, c] > 0
        y, p = test.targets[keep, c], test.probs[keep, c]
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, lw=1.5)
        else:
            ax.text(0.5, 0.5, "one class only", ha="center")
        ax.plot([0, 1], [0, 1], ls=":", c="gray")
        ax.set(title=label, xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1))
    fig.suptitle(f"ROC (test): {run.name}")
    return _save(fig, out / f"roc_{run.name}.png")


def reliability(run: RunData, calibration: dict, out: Path) -> Path:
    labels = list(calibration)
    fig, axes = _grid(len(labels))
    for ax, label in zip(axes, labels, strict=False):
        bins = calibration[label]["bins"]
        ax.plot([0, 1], [0, 1], ls=":", c="gray")
        ax.plot([b["confidence"] for b in bins], [b["frequency"] for b in bins], marker="o")
        ece = calibration[label]["ece"]
        ax.set(
            title=f"{label}\nECE {ece:.3f}" if ece is not None else label,
            xlabel="predicted",
            ylabel="observed",
            xlim=(0, 1),
            ylim=(0, 1),
        )
    fig.suptitle(f"Reliability (test): {run.name}")
    return _save(fig, out / f"reliability_{run.name}.png")


def confusion(run: RunData, at_threshold: dict, out: Path) -> Path | None:
    labels = [label for label in run.test.labels if label in at_threshold]
    if not labels:
        return None
    fig, axes = _grid(len(labels))
    for ax, label in zip(axes, labels, strict=False):
        cell = at_threshold[label]
        matrix = np.array([[cell["tn"], cell["fp"]], [cell["fn"], cell["tp"]]])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{int(value)}", ha="center", va="center")
        ax.set(
            title=label,
            xticks=[0, 1],
            yticks=[0, 1],
            xticklabels=["pred −", "pred +"],
            yticklabels=["true −", "true +"],
        )
    fig.suptitle(f"Confusion at the val-chosen threshold (test): {run.name}")
    return _save(fig, out / f"confusion_{run.name}.png")


def learning_curves(runs: list[RunData], metric: str, out: Path) -> Path | None:
    if not any(r.split("val") for r in runs):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        val = [r for r in run.split("val") if isinstance(r.get(metric), int | float)]
        left.plot([r["epoch"] + 1 for r in val], [r[metric] for r in val], marker="o", label=run.name)
        train = [r for r in run.split("train") if isinstance(r.get("loss"), int | float)]
        right.plot([r["step"] for r in train], [r["loss"] for r in train], label=run.name)
    left.set(title=f"val {metric} per epoch", xlabel="epoch", ylabel=metric)
    right.set(title="training loss", xlabel="optimizer step", ylabel="masked BCE")
    left.legend(fontsize=7)
    return _save(fig, out / "learning_curves.png")


def metric_vs_time(runs: list[RunData], metric: str, out: Path, top: int = 6) -> Path | None:
    timed = [r for r in runs if any("train_seconds" in v for v in r.split("val"))]
    if not timed:
        return None
    best = sorted(timed, key=lambda r: -max((v.get(metric) or 0) for v in r.split("val")))[:top]
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in best:
        val = [v for v in run.split("val") if isinstance(v.get(metric), int | float)]
        ax.plot([v["train_seconds"] / 60 for v in val], [v[metric] for v in val], marker="o", label=run.name)
    ax.set(title=f"val {metric} vs training time (top {len(best)})", xlabel="training minutes", ylabel=metric)
    ax.legend(fontsize=7)
    return _save(fig, out / "val_vs_time.png")


def comparison(summaries: list[dict], metric: str, out: Path) -> Path | None:
    """Test metric with 95% CI per run, grouped by model, one bar per freeze strategy."""
    rows = [s for s in summaries if (s["metrics"].get(metric) or {}).get("value") is not None]
    if not rows:
        return None
    rows.sort(key=lambda s: (s["model"], s["freeze"]))
    values = [s["metrics"][metric]["value"] for s in rows]
    # The interval drawn as it is, centred on its own middle: a percentile interval may exclude the
    # value (bar height), which an error bar measured from the value cannot show.
    low = [s["metrics"][metric]["ci_low"] for s in rows]
    high = [s["metrics"][metric]["ci_high"] for s in rows]
    with_ci = [i for i in range(len(rows)) if low[i] is not None and high[i] is not None]
    freezes = sorted({s["freeze"] for s in rows})
    colors = {f: plt.cm.tab10(i) for i, f in enumerate(freezes)}
    fig, ax = plt.subplots(figsize=(max(5, 1.0 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), values, color=[colors[s["freeze"]] for s in rows])
    middle, half = [(low[i] + high[i]) / 2 for i in with_ci], [(high[i] - low[i]) / 2 for i in with_ci]
    ax.errorbar(with_ci, middle, yerr=half, fmt="none", ecolor="black", capsize=4)
    ax.set_xticks(range(len(rows)), [f"{s['name']}\n{s['model']}\n{s['freeze']}" for s in rows], fontsize=7)
    ax.set(
        title=f"test {metric}, 95% CI, by model and freeze strategy",
        ylabel=metric,
        ylim=(max(0.0, min(values) - 0.15), 1.0),
    )
    ax.legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color=colors[f]) for f in freezes], labels=freezes, fontsize=7
    )
    return _save(fig, out / "freeze_comparison.png")


def by_setting(
    points: list[dict], key: str, title: str, xlabel: str, out: Path, name: str, log_x: bool = False
) -> Path | None:
    """Metric against one setting (patient fraction, augmentation, learning rate), a line per model."""
    usable = [p for p in points if p.get(key) is not None and p.get("value") is not None]
    grouped: dict[str, list[dict]] = defaultdict(list)
    for point in usable:
        grouped[f"{point['model']} / {point['freeze']}"].append(point)
    if not any(len({str(p[key]) for p in group}) > 1 for group in grouped.values()):
        return None  # no model was run at two settings: nothing to compare within a model
    fig, ax = plt.subplots(figsize=(6, 4))
    categorical = not all(isinstance(p[key], int | float) for p in usable)
    order = sorted({str(p[key]) for p in usable}) if categorical else None
    for label, group in sorted(grouped.items()):
        group.sort(key=lambda p: order.index(str(p[key])) if categorical else p[key])
        xs = [order.index(str(p[key])) for p in group] if categorical else [p[key] for p in group]
        ax.plot(xs, [p["value"] for p in group], marker="o", ls="-" if not categorical else "--", label=label)
    if categorical:
        ax.set_xticks(range(len(order)), order)
    if log_x:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=points[0].get("metric", "metric"))
    ax.legend(fontsize=7)
    return _save(fig, out / name)


def best_per_optimizer(curves: list[dict]) -> dict[str, dict[str, dict]]:
    """model → optimizer → its best curve (by best val value), for models trained with two
    optimizers or more. `curves` items: {model, optimizer, label, epochs, minutes, values}."""
    by_model: dict[str, dict[str, dict]] = {}
    for curve in curves:
        if not curve["values"]:
            continue
        best = by_model.setdefault(curve["model"], {}).get(curve["optimizer"])
        if best is None or max(curve["values"]) > max(best["values"]):
            by_model[curve["model"]][curve["optimizer"]] = curve
    return {model: found for model, found in sorted(by_model.items()) if len(found) >= 2}


def optimizer_tradeoff(curves: list[dict], metric: str, out: Path) -> Path | None:
    """Per model, the val metric against training time and against epochs, one line per optimizer
    (its best run): the optimizer trade-off. None unless some model met two optimizers."""
    chosen = best_per_optimizer(curves)
    if not chosen:
        return None
    fig, axes = plt.subplots(len(chosen), 2, figsize=(11, 3.6 * len(chosen)), squeeze=False)
    for row, (model, optimizers) in zip(axes, chosen.items(), strict=True):
        for _, curve in sorted(optimizers.items()):
            pairs = zip(curve["minutes"], curve["values"], strict=True)
            timed = [(minutes, value) for minutes, value in pairs if minutes is not None]
            if timed:
                row[0].plot(*zip(*timed, strict=True), marker="o", label=curve["label"])
            row[1].plot(curve["epochs"], curve["values"], marker="o", label=curve["label"])
        row[0].set(title=f"{model}: val {metric} vs training time", xlabel="training minutes", ylabel=metric)
        row[1].set(title=f"{model}: val {metric} per epoch", xlabel="epoch", ylabel=metric)
        row[1].legend(fontsize=7)
    return _save(fig, out / "optimizer_tradeoff.png")
