"""Metrics: masked per-label AUROC, de-duplication by key, binary metrics at a val threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from shards.labels import COMPETITION5
from trainer.metrics import binary_metrics, format_metric, label_auroc, multilabel_metrics, youden_threshold
from trainer.rundir import Predictions


def scored(keys: list[str], probs: np.ndarray, targets: np.ndarray, masks: np.ndarray) -> Predictions:
    """Predictions of one patient per image (the metrics here do not group by patient)."""
    labels = tuple(f"L{i}" for i in range(probs.shape[1]))
    return Predictions(np.array(keys), np.array(keys), labels, probs, targets, masks, len(keys))


def test_masked_auroc_ignores_masked_samples() -> None:
    probs = np.array([0.9, 0.8, 0.1, 0.2, 0.95])
    targets = np.array([1, 1, 0, 0, 0])
    masks = np.array([1, 1, 1, 1, 0])  # the confident false positive is U-Ignore'd
    assert label_auroc(probs, targets, masks) == 1.0
    assert label_auroc(probs, targets, np.ones(5)) == roc_auc_score(targets, probs)
    assert math.isnan(label_auroc(probs, np.zeros(5), np.ones(5)))


def test_merge_keeps_each_key_once_and_counts_what_was_gathered() -> None:
    parts = [(["b", "a"], ["p2", "p1"], np.array([[0.2], [0.1]]), np.array([[0], [1]]), np.ones((2, 1))),
             (["a", "c"], ["p1", "p3"], np.array([[0.9], [0.3]]), np.array([[1], [0]]), np.ones((2, 1)))]
    merged = Predictions.merge(("Edema",), parts)
    assert merged.keys.tolist() == ["a", "b", "c"] and merged.gathered == 4
    assert merged.patients.tolist() == ["p1", "p2", "p3"], "each row keeps its own patient"
    assert merged.probs[:, 0].tolist() == [0.1, 0.2, 0.3], "first occurrence wins"
    nothing = np.zeros((0, 2))
    empty = Predictions.merge(("Edema", "Effusion"), [([], [], nothing, nothing, nothing)])
    assert empty.probs.shape == (0, 2) and empty.patients.shape == (0,)


def test_multilabel_macro_and_chexpert5() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (200, 5)).astype(np.float32)
    probs = np.clip(targets * 0.6 + rng.random((200, 5)) * 0.5, 0, 1)
    masks, keys = np.ones_like(targets), [str(i) for i in range(200)]
    metrics = multilabel_metrics(COMPETITION5, scored(keys, probs, targets, masks))
    expected = [roc_auc_score(targets[:, i], probs[:, i]) for i in range(5)]
    assert metrics["auroc_macro"] == pytest.approx(np.mean(expected))
    assert metrics["auroc_chexpert5"] == pytest.approx(np.mean(expected))
    targets[:, 0] = 0  # one label without positives: undefined, left out of the macro
    metrics = multilabel_metrics(COMPETITION5, scored(keys, probs, targets, masks))
    assert metrics["auroc"]["Atelectasis"] is None and metrics["auroc_labels"] == 4
    assert "auroc_chexpert5" not in metrics and metrics["auroc_macro"] == pytest.approx(np.mean(expected[1:]))


def youden_by_hand(probs: list[float], targets: list[int]) -> tuple[float, float]:
    """Every cut `prob >= t` at an observed prob, counted with plain loops: (t, J) with the largest
    J = sensitivity + specificity - 1 (the first such t from the top)."""
    positives, negatives = sum(targets), len(targets) - sum(targets)
    best = (math.nan, -1.0)
    for cut in sorted(set(probs), reverse=True):
        tp = sum(1 for p, y in zip(probs, targets, strict=True) if p >= cut and y == 1)
        fp = sum(1 for p, y in zip(probs, targets, strict=True) if p >= cut and y == 0)
        j = tp / positives - fp / negatives
        if j > best[1]:
            best = (cut, j)
    return best


def test_binary_metrics_at_the_validation_threshold() -> None:
    """Youden's J picks exactly one observed probability, and the binary metrics are counted at
    that threshold (a sample equal to it counts as positive)."""
    targets = np.array([0, 0, 0, 1, 1, 1, 1, 0], dtype=np.float32)
    probs = np.array([0.1, 0.2, 0.45, 0.4, 0.7, 0.8, 0.9, 0.6], dtype=np.float32)
    # prob >= 0.9: J = 1/4; 0.8: 2/4; 0.7: 3/4 (3 of 4 positives, no negative); 0.6: 3/4 - 1/4; ...
    cut, j = youden_by_hand(probs.tolist(), targets.astype(int).tolist())
    assert (cut, j) == (float(np.float32(0.7)), 0.75)
    threshold = youden_threshold(targets, probs)
    assert threshold == cut
    assert youden_threshold(np.zeros(8), probs) is None, "no ROC point without both classes"
    metrics = binary_metrics(scored(list("abcdefgh"), probs[:, None], targets[:, None], np.ones((8, 1))),
                             threshold)
    assert metrics["threshold"] == cut
    # At 0.7: 0.7, 0.8, 0.9 positive (tp 3), 0.4 missed (fn 1), all four negatives below (tn 4).
    assert metrics["confusion"] == {"tn": 4, "fp": 0, "fn": 1, "tp": 3}
    assert metrics["accuracy"] == 7 / 8 and metrics["sensitivity"] == 0.75 and metrics["specificity"] == 1.0
    assert metrics["precision"] == 1.0 and metrics["f1"] == pytest.approx(6 / 7)
    assert metrics["auroc_macro"] == roc_auc_score(targets, probs)
    # The same predictions at 0.5 (a threshold Youden would not pick) count differently.
    at_half = binary_metrics(scored(list("abcdefgh"), probs[:, None], targets[:, None], np.ones((8, 1))), 0.5)
    assert at_half["confusion"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}


def test_format_metric() -> None:
    assert format_metric(0.81234) == "0.8123" and format_metric(0.81234, ".3f") == "0.812"
    assert format_metric(0.01, "+.3f") == "+0.010"
    assert format_metric(None) == "n/a" and format_metric(math.nan) == "n/a"
    assert format_metric(None, missing="") == ""
