"""External validation: each run's `external/<pack>/` results (`python -m trainer.evaluate`) beside
its internal test, and CNN vs ViT on each external pack.

Per run × external pack and per shared label (named as the run names it): the external AUROC and
the internal test AUROC on the same label, each with its patient-bootstrap interval, and the drop
(internal − external, positive = worse outside). The macro row averages the shared labels defined
(both classes present) in both sets. CNN-vs-ViT pairs are compared on each pack exactly as on the
internal test (analysis.compare: paired patient bootstrap and DeLong on the same images), on the
labels defined in that pack.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from trainer.report import stats
from trainer.report.analysis import Settings, compare, pairs
from trainer.report.runs import RunData
from trainer.rundir import External, Predictions

MACRO = "macro"


def defined(predictions: Predictions) -> list[str]:
    """The labels with both classes among their labelled rows (an AUROC exists)."""
    out = []
    for c, label in enumerate(predictions.labels):
        y = predictions.targets[predictions.masks[:, c] > 0, c]
        if y.size and y.min() != y.max():
            out.append(label)
    return out


def subset(predictions: Predictions, labels: list[str]) -> Predictions:
    """The same rows, only `labels` (in that order)."""
    columns = [predictions.labels.index(label) for label in labels]
    return dataclasses.replace(predictions, labels=tuple(labels), probs=predictions.probs[:, columns],
                               targets=predictions.targets[:, columns], masks=predictions.masks[:, columns])


def _interval(predictions: Predictions, labels: list[str], settings: Settings, offset: int) -> dict:
    """AUROC of one label (or the macro mean of several) with its patient-bootstrap interval."""
    p = subset(predictions, labels)
    columns = list(range(len(labels)))
    result = stats.bootstrap(
        lambda rows: stats.macro_auroc(p.targets[rows], p.probs[rows], p.masks[rows], columns),
        p.patients, settings.resamples, settings.seed + offset)
    return {"value": _num(result.value), "ci_low": _num(result.low), "ci_high": _num(result.high),
            "resamples": result.resamples}


def result_rows(run: RunData, external: External, settings: Settings) -> dict:
    """One run on one pack: per shared label and macro, external vs internal with the drop."""
    info = external.info
    targets = {pair["run"]: pair["target"] for pair in info["labels"]}
    internal_labels = [label for label in external.predictions.labels if label in run.test.labels]
    both = [label for label in defined(external.predictions) if label in defined(run.test)]
    rows = []
    macro = [MACRO] if len(external.predictions.labels) > 1 else []
    for index, label in enumerate([*external.predictions.labels, *macro]):
        labels = both if label == MACRO else [label]
        if not labels:
            continue
        outside = _interval(external.predictions, labels, settings, index)
        inside = (_interval(run.test, labels, settings, index)
                  if set(labels) <= set(internal_labels) else {"value": None})
        drop = (None if outside["value"] is None or inside["value"] is None
                else round(inside["value"] - outside["value"], 6))
        rows.append({"label": label, "target": targets.get(label, ", ".join(targets[x] for x in labels)),
                     "labels": labels, "external": outside, "internal": inside, "drop": drop})
    return {
        "run": run.name, "model": run.model, "family": run.family, "dataset": external.name,
        "pack": info.get("dataset"), "shards": info.get("shards"), "split": info["split"],
        "n": len(external.predictions.keys), "n_patients": len(np.unique(external.predictions.patients)),
        "mapping": info["labels"], "left_out": info.get("left_out", []), "policy": info.get("policy"),
        "best_step": info.get("best_step"), "stale": _stale(info.get("best_step"), run.card.get("step")),
        "rows": rows,
    }


def _stale(scored: object, now: object) -> bool:
    """Whether best/ has changed since it was scored (the run trained on and exported again)."""
    return scored is not None and now is not None and scored != now


def external_validation(runs: list[RunData], settings: Settings) -> dict:
    """summary.json's `external`: results per run × pack, the paired comparisons per pack, and the
    external folders that could not be read (listed, never silently dropped)."""
    results, comparisons = [], []
    for run in runs:
        results += [result_rows(run, external, settings) for external in run.external]
    for name in sorted({external.name for run in runs for external in run.external}):
        scored = []
        for run in runs:
            external = next((e for e in run.external if e.name == name), None)
            if external is not None:
                usable = defined(external.predictions)
                if usable:
                    scored.append(dataclasses.replace(run, test=subset(external.predictions, usable)))
        comparisons += [compare(a, b, settings) | {"dataset": name} for a, b in pairs(scored)]
    skipped = [problem for run in runs for problem in run.external_skipped]
    return {"results": results, "comparisons": comparisons, "skipped": skipped}


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)
