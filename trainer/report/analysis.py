"""From loaded runs to the numbers in the report: per-run metrics with CIs, calibration, the
val-chosen thresholds applied to test, and every CNN-vs-ViT pair compared on the same images."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from shards.labels import COMPETITION5
from trainer.metrics import youden_threshold
from trainer.report import stats
from trainer.report.runs import RunData
from trainer.rundir import Predictions

ANCHORS = [
    {
        "dataset": "CheXpert (Irvin et al., AAAI 2019)",
        "metric": "mean AUROC, competition-5 labels, validation",
        "value": 0.906,
        "model": "DenseNet121, 320 px",
    },
    {
        "dataset": "Kaggle pneumonia (Kermany et al., Cell 2018)",
        "metric": "accuracy / AUROC, official test",
        "value": "92.8% / 0.968",
        "model": "InceptionV3 transfer learning",
    },
]
"""Published numbers: other people's data and protocols, shown beside ours, never mixed in."""


@dataclass
class Settings:
    resamples: int = 1000
    seed: int = 0


def _columns(predictions: Predictions, names: list[str]) -> list[int]:
    return [predictions.labels.index(n) for n in names if n in predictions.labels]


def _interval(value: stats.Interval) -> dict:
    return {
        "value": _num(value.value),
        "ci_low": _num(value.low),
        "ci_high": _num(value.high),
        "resamples": value.resamples,
    }


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def run_metrics(run: RunData, settings: Settings) -> dict:
    """Everything per run: per-label AUROC [CI], macro / CheXpert-5 [CI], calibration, thresholds."""
    test, patients = run.test, run.test.patients
    out: dict = {
        "name": run.name,
        "path": str(run.path),
        "model": run.model,
        "pretrained": run.pretrained,
        "optimizer": run.config.optim.name,
        "freeze": run.freeze,
        "family": run.family,
        "task": "binary" if run.binary else "multilabel",
        "n_test": len(test.keys),
        "n_patients": len(np.unique(patients)),
        "trainable_parameters": run.trainable_parameters,
        "train_seconds": run.train_seconds,
        "img_per_s": run.images_per_second,
        "metrics": {},
    }

    def boot(statistic: stats.Metric, offset: int) -> dict:
        return _interval(stats.bootstrap(statistic, patients, settings.resamples, settings.seed + offset))

    for i, label in enumerate(test.labels):
        out["metrics"][f"auroc/{label}"] = boot(
            lambda rows, c=i: stats.auroc(test.targets[rows, c], test.probs[rows, c], test.masks[rows, c]), i
        )
    every = list(range(len(test.labels)))
    if len(every) > 1:
        out["metrics"]["auroc_macro"] = boot(
            lambda rows: stats.macro_auroc(test.targets[rows], test.probs[rows], test.masks[rows], every), 100
        )
        five = _columns(test, list(COMPETITION5))
        if len(five) == len(COMPETITION5):
            out["metrics"]["auroc_chexpert5"] = boot(
                lambda rows: stats.macro_auroc(test.targets[rows], test.probs[rows], test.masks[rows], five),
                101,
            )
    out["thresholds"] = thresholds(run)
    for i, label in enumerate(test.labels):
        threshold = out["thresholds"].get(label)
        if threshold is None:
            continue
        keep = test.masks[:, i] > 0
        at = stats.binary_at_threshold(test.targets[keep, i], test.probs[keep, i], threshold)
        out.setdefault("at_threshold", {})[label] = {k: _num(v) for k, v in at.items()}
        if run.binary:
            for name in ("accuracy", "sensitivity", "specificity", "f1"):
                out["metrics"][name] = boot(
                    lambda rows, n=name, c=i, t=threshold: _binary_stat(test, rows, c, t, n), 200 + len(name)
                )
    out["calibration"] = {}
    for i, label in enumerate(test.labels):
        keep = test.masks[:, i] > 0
        ece, bins = stats.expected_calibration_error(test.targets[keep, i], test.probs[keep, i])
        out["calibration"][label] = {"ece": _num(ece), "bins": bins}
    return out


def _binary_stat(test: Predictions, rows: np.ndarray, column: int, threshold: float, name: str) -> float:
    keep = rows[test.masks[rows, column] > 0]
    return stats.binary_at_threshold(test.targets[keep, column], test.probs[keep, column], threshold)[name]


def thresholds(run: RunData) -> dict[str, float | None]:
    """Per label, chosen on val (Youden); for pneumonia the one the trainer chose and stored."""
    if run.binary and run.threshold is not None:
        return {run.test.labels[0]: run.threshold}
    if run.val is None:
        return {}
    out = {}
    for i, label in enumerate(run.val.labels):
        keep = run.val.masks[:, i] > 0
        out[label] = youden_threshold(run.val.targets[keep, i], run.val.probs[keep, i])
    return out


def pairs(runs: list[RunData]) -> list[tuple[RunData, RunData]]:
    """Every CNN × ViT pair on the same labels; every pair when the runs hold no such pair."""
    same = [(a, b) for a, b in itertools.combinations(runs, 2) if a.test.labels == b.test.labels]
    mixed = [
        (a, b) if a.family == "cnn" else (b, a) for a, b in same if {a.family, b.family} == {"cnn", "vit"}
    ]
    return mixed or same


def compare(a: RunData, b: RunData, settings: Settings) -> dict:
    """b − a on the test images both scored: paired patient bootstrap of the macro (or the single)
    AUROC, and DeLong's test per label."""
    shared = np.array(sorted(set(a.test.keys.tolist()) & set(b.test.keys.tolist())))
    left, right = a.test.aligned(shared), b.test.aligned(shared)
    columns = list(range(len(left.labels)))
    masks = left.masks * right.masks

    def statistic(predictions: Predictions):
        if len(columns) == 1:
            return lambda rows: stats.auroc(
                predictions.targets[rows, 0], predictions.probs[rows, 0], masks[rows, 0]
            )
        return lambda rows: stats.macro_auroc(
            predictions.targets[rows], predictions.probs[rows], masks[rows], columns
        )

    paired = stats.paired_bootstrap(
        statistic(left), statistic(right), left.patients, settings.resamples, settings.seed
    )
    per_label = {}
    for c, label in enumerate(left.labels):
        keep = masks[:, c] > 0
        result = stats.delong(left.targets[keep, c], left.probs[keep, c], right.probs[keep, c])
        per_label[label] = {
            "auc_a": _num(result.auc_a),
            "auc_b": _num(result.auc_b),
            "delta": _num(result.delta),
            "z": _num(result.z),
            "p_value": _num(result.p_value),
        }
    return {
        "a": a.name,
        "b": b.name,
        "model_a": a.model,
        "model_b": b.model,
        "n": len(shared),
        "metric": "auroc" if len(columns) == 1 else "auroc_macro",
        "delta": _num(paired.delta),
        "ci_low": _num(paired.low),
        "ci_high": _num(paired.high),
        "p_value": _num(paired.p_value),
        "test": "paired patient bootstrap",
        "delong": per_label,
    }
