"""The statistics a reviewer asks for: patient-level bootstrap CIs, paired comparisons of two
models on the same test images (paired bootstrap and DeLong's test), calibration (ECE).

Bootstrap resamples *patients* (all of a patient's images together): images of one patient are
correlated, and resampling images would make the intervals too narrow. AUROC is the rank
(Mann-Whitney) formula, checked against scikit-learn; DeLong's variance (no maintained
implementation in scikit-learn, scipy or torchmetrics) is the fast algorithm of Sun & Xu (2014),
checked against the paired bootstrap in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

Metric = Callable[[np.ndarray], float]
"""A statistic of a resample, given the row indices of the resample."""


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    resamples: int
    """Resamples on which the statistic was defined (e.g. both classes present)."""


def patient_groups(patients: np.ndarray) -> list[np.ndarray]:
    """Row indices of each patient, in a stable order."""
    order = np.argsort(patients, kind="stable")
    _, starts = np.unique(patients[order], return_index=True)
    return np.split(order, starts[1:])


def _resample(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    picks = rng.integers(0, len(groups), len(groups))
    return np.concatenate([groups[i] for i in picks])


def bootstrap(
    statistic: Metric, patients: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Percentile interval of `statistic` over patient resamples (undefined resamples skipped).

    Reported as it is, even when it excludes `value`: a percentile interval need not contain the
    point estimate, and one that does not shows a biased or skewed statistic (stretching the
    interval to include the estimate would hide that, and would no longer be this interval)."""
    rows = np.arange(len(patients))
    value = statistic(rows)
    groups = patient_groups(patients)
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(_resample(groups, rng)) for _ in range(n)])
    draws = draws[np.isfinite(draws)]
    if not math.isfinite(value) or len(draws) < max(10, n // 10):
        return Interval(value, math.nan, math.nan, len(draws))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high), len(draws))


@dataclass(frozen=True)
class PairedResult:
    delta: float
    """statistic(b) − statistic(a) on the same rows."""
    low: float
    high: float
    p_value: float
    resamples: int


def paired_bootstrap(
    stat_a: Metric, stat_b: Metric, patients: np.ndarray, n: int = 1000, seed: int = 0
) -> PairedResult:
    """Both models scored on the same patient resample each time; two-sided p-value from the
    bootstrap distribution of the difference (the share of resamples on the other side of 0)."""
    rows = np.arange(len(patients))
    delta = stat_b(rows) - stat_a(rows)
    groups = patient_groups(patients)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        sample = _resample(groups, rng)
        draws.append(stat_b(sample) - stat_a(sample))
    diffs = np.array(draws)
    diffs = diffs[np.isfinite(diffs)]
    if not math.isfinite(delta) or len(diffs) < max(10, n // 10):
        return PairedResult(delta, math.nan, math.nan, math.nan, len(diffs))
    low, high = np.percentile(diffs, [2.5, 97.5])
    if np.all(diffs == 0):
        p_value = 1.0
    else:
        below, above = np.mean(diffs <= 0), np.mean(diffs >= 0)
        p_value = float(min(1.0, 2 * min(below, above)))
    return PairedResult(float(delta), float(low), float(high), p_value, len(diffs))


# --- DeLong ------------------------------------------------------------------------------------


def _midrank(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    ranks = np.zeros(len(values))
    i = 0
    while i < len(values):
        j = i
        while j < len(values) and ordered[j] == ordered[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    out = np.empty(len(values))
    out[order] = ranks
    return out


@dataclass(frozen=True)
class DelongResult:
    auc_a: float
    auc_b: float
    delta: float
    z: float
    p_value: float


def delong(targets: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray) -> DelongResult:
    """DeLong's test for two correlated ROC AUCs (same cases, two models); Sun & Xu's O(n log n)."""
    targets = np.asarray(targets).astype(bool)
    positives, negatives = int(targets.sum()), int((~targets).sum())
    if positives == 0 or negatives == 0:
        return DelongResult(math.nan, math.nan, math.nan, math.nan, math.nan)
    scores = np.vstack([probs_a, probs_b])[
        :, np.concatenate([np.flatnonzero(targets), np.flatnonzero(~targets)])
    ]
    aucs, v01, v10 = [], [], []
    for row in scores:
        pos, neg = row[:positives], row[positives:]
        tx, ty, tz = _midrank(pos), _midrank(neg), _midrank(row)
        aucs.append(tz[:positives].sum() / positives / negatives - (positives + 1.0) / 2.0 / negatives)
        v01.append((tz[:positives] - tx) / negatives)
        v10.append(1.0 - (tz[positives:] - ty) / positives)
    s01, s10 = np.cov(np.array(v01)), np.cov(np.array(v10))
    covariance = s01 / positives + s10 / negatives
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    delta = aucs[1] - aucs[0]
    if variance <= 1e-18:
        return DelongResult(aucs[0], aucs[1], delta, 0.0, 1.0 if abs(delta) < 1e-12 else 0.0)
    z = delta / math.sqrt(variance)
    return DelongResult(
        float(aucs[0]), float(aucs[1]), float(delta), float(z), float(2 * stats.norm.sf(abs(z)))
    )


# --- per-task statistics --------------------------------------------------------------------------


def auroc(targets: np.ndarray, probs: np.ndarray, masks: np.ndarray | None = None) -> float:
    """AUROC over the labelled rows (mask 1); NaN when a class is missing. The Mann-Whitney form
    (mid-ranks, so ties count half): equal to scikit-learn's roc_auc_score (tested) and ~20x
    faster, which matters inside thousands of bootstrap resamples."""
    keep = np.ones(len(targets), bool) if masks is None else masks > 0
    y, p = targets[keep] > 0.5, probs[keep]
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = stats.rankdata(p)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def macro_auroc(targets: np.ndarray, probs: np.ndarray, masks: np.ndarray, columns: list[int]) -> float:
    values = [auroc(targets[:, c], probs[:, c], masks[:, c]) for c in columns]
    defined = [v for v in values if math.isfinite(v)]
    return float(np.mean(defined)) if len(defined) == len(columns) else math.nan


def expected_calibration_error(
    targets: np.ndarray, probs: np.ndarray, bins: int = 10
) -> tuple[float, list[dict]]:
    """ECE with equal-width bins, and the bins themselves (for the reliability diagram)."""
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        if not inside.any():
            continue
        confidence, frequency = float(probs[inside].mean()), float(targets[inside].mean())
        ece += inside.mean() * abs(confidence - frequency)
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": int(inside.sum()),
                "confidence": confidence,
                "frequency": frequency,
            }
        )
    return float(ece), table


def binary_at_threshold(targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = probs >= threshold
    truth = targets > 0.5
    tp, tn = float(np.sum(predicted & truth)), float(np.sum(~predicted & ~truth))
    fp, fn = float(np.sum(predicted & ~truth)), float(np.sum(~predicted & truth))

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": ratio(tp + tn, len(truth)),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * precision * sensitivity, precision + sensitivity),
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }
