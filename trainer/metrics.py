"""Evaluation metrics from de-duplicated predictions (scikit-learn does the AUROC).

Multi-label: per-label AUROC over the samples whose label is not masked (U-Ignore), the macro
mean over labels that have both classes, and the CheXpert competition-5 mean when all five are
present. Binary (Kaggle pneumonia): AUROC plus accuracy, sensitivity, specificity, F1 and the
confusion matrix at a threshold chosen on validation (Youden's J), then applied unchanged to test.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from shards.labels import COMPETITION5
from trainer.rundir import Predictions


def label_auroc(probs: np.ndarray, targets: np.ndarray, masks: np.ndarray) -> float:
    """AUROC of one label over unmasked samples; NaN when only one class is present."""
    keep = masks > 0
    y = targets[keep]
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, probs[keep]))


def multilabel_metrics(names: tuple[str, ...], predictions: Predictions) -> dict:
    p = predictions
    per_label = {name: label_auroc(p.probs[:, i], p.targets[:, i], p.masks[:, i])
                 for i, name in enumerate(names)}
    defined = [v for v in per_label.values() if not math.isnan(v)]
    metrics = {
        "samples": len(predictions.keys),
        "gathered": predictions.gathered,
        "auroc": {k: (None if math.isnan(v) else round(v, 6)) for k, v in per_label.items()},
        "auroc_macro": float(np.mean(defined)) if defined else None,
        "auroc_labels": len(defined),
    }
    if all(name in per_label and not math.isnan(per_label[name]) for name in COMPETITION5):
        metrics["auroc_chexpert5"] = float(np.mean([per_label[name] for name in COMPETITION5]))
    return metrics


def youden_threshold(targets: np.ndarray, probs: np.ndarray) -> float | None:
    """Youden's J: the threshold of the ROC point furthest above the diagonal (maximal
    sensitivity + specificity − 1). None without both classes: there is no such point, and a
    caller that needs a number anyway says which one it falls back to."""
    if len(np.unique(targets)) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(targets, probs)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thresholds[best]))


def binary_metrics(predictions: Predictions, threshold: float) -> dict:
    probs, targets = predictions.probs[:, 0], predictions.targets[:, 0]
    predicted = (probs >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(targets.astype(int), predicted, labels=[0, 1]).ravel().tolist()
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    precision = tp / (tp + fp) if tp + fp else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    auroc = label_auroc(probs, targets, predictions.masks[:, 0])
    return {
        "samples": len(predictions.keys),
        "gathered": predictions.gathered,
        "auroc_macro": None if math.isnan(auroc) else auroc,
        "auroc": {"Pneumonia": None if math.isnan(auroc) else round(auroc, 6)},
        "threshold": threshold,
        "accuracy": (tp + tn) / max(1, tp + tn + fp + fn),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "f1": f1,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def format_metric(value: float | None, spec: str = ".4f", missing: str = "n/a") -> str:
    """A metric for a log line or a table cell (`spec` as in `format`), `missing` for None or NaN:
    the one formatter of the trainer's log, the demo's table, sweep tables and the report."""
    if value is None or not math.isfinite(value):
        return missing
    return format(value, spec)
