"""Replicates: runs of one configuration trained with different seeds (`run.seed`), grouped by
their config (never by their names), summarised as mean ± sd over seeds, and CNN-vs-ViT compared
over the seeds both groups trained with (hierarchical bootstrap: seeds, then patients).

A single run says how one seed of a model did; whether a ViT beats a CNN is a question about the
models, which every seed answers a little differently. The seed-to-seed spread is part of the
uncertainty the comparison reports.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce

import numpy as np

from trainer.config import Config
from trainer.report import stats
from trainer.report.analysis import Settings
from trainer.report.runs import RunData
from trainer.rundir import Predictions

OPERATIONAL = (
    "run.dir",
    "run.seed",
    "run.resume",
    "run.checkpoint_every",
    "run.keep_last",
    "run.log_every",
    "run.signal_check_every",
    "run.image_grid",
    "run.test_at_end",
    "run.cpu",
    "data.workers",
)
"""Config fields left out of the group key: where a run was written, how it was restarted, logged
and checkpointed, on which device and with how many loader workers — how a run was carried out,
not what was trained. Everything else (the model with its pretrained tag, freeze strategy, data,
labels, optimiser, precision, the validation metric that picked the checkpoint) must be equal for
two runs to be replicates. (data.workers and run.cpu may change the sample order or the numerics a
little, as a seed does; a study runs its seeds wherever there is room.)"""

TEST = "hierarchical bootstrap (seeds, then patients)"
SEED_SUFFIX = re.compile(r"[-_]seed\d+$")


@dataclass
class Group:
    """Runs that differ only in seed (or in OPERATIONAL fields), in seed order."""

    name: str
    runs: list[RunData]

    @property
    def first(self) -> RunData:
        return self.runs[0]

    @property
    def seeds(self) -> list[int]:
        return [run.config.run.seed for run in self.runs]

    def by_seed(self) -> dict[int, RunData]:
        """Seed → run; a seed trained twice (a repeat) is matched by its first run (by name)."""
        out: dict[int, RunData] = {}
        for run in self.runs:
            out.setdefault(run.config.run.seed, run)
        return out


def group_key(config: Config) -> str:
    """The config without its OPERATIONAL fields, as canonical JSON (equal for replicates)."""
    tree = config.to_dict()
    for dotted in OPERATIONAL:
        section, _, name = dotted.partition(".")
        tree[section].pop(name, None)
    return json.dumps(tree, sort_keys=True, default=str)


def group_runs(runs: list[RunData]) -> list[Group]:
    """Groups in the order their first run appears; runs within a group by (seed, name)."""
    found: dict[str, list[RunData]] = {}
    for run in runs:
        found.setdefault(group_key(run.config), []).append(run)
    members = [sorted(group, key=lambda r: (r.config.run.seed, r.name)) for group in found.values()]
    names = _unique([_name(group) for group in members])
    return [Group(name, group) for name, group in zip(names, members, strict=True)]


def _name(runs: list[RunData]) -> str:
    """The run name without its -seed<k> when every run of the group shares what is left, else
    model/freeze (with the pretrained tag when there is one)."""
    stems = {SEED_SUFFIX.sub("", run.name) for run in runs}
    if len(stems) == 1:
        return stems.pop()
    first = runs[0]
    tag = "" if first.pretrained == "none" else f" ({first.pretrained})"
    return f"{first.model.partition('.')[0]}/{first.freeze}{tag}"


def _unique(names: list[str]) -> list[str]:
    """Names that clash (two configs, one model/freeze) numbered in order: a, a #2, a #3."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def headline(run: RunData, primary: str) -> str:
    """The report's primary metric, or the single label's AUROC for a binary run among
    multi-label ones (which has no macro AUROC)."""
    if len(run.test.labels) > 1 or primary.startswith("auroc/"):
        return primary
    return f"auroc/{run.test.labels[0]}"


def describe(group: Group, summaries: Mapping[str, dict], primary: str) -> dict:
    """One group for summary.json: who it is, and mean ± sd over seeds of the headline metric and
    of each label's AUROC (the runs' point estimates on the test set)."""
    first = group.first
    metric = headline(first, primary)
    names = [metric, *(f"auroc/{label}" for label in first.test.labels if f"auroc/{label}" != metric)]
    metrics = {}
    for name in names:
        values = [(summaries[run.name]["metrics"].get(name) or {}).get("value") for run in group.runs]
        metrics[name] = _spread(values)
    return {
        "name": group.name,
        "model": first.model,
        "pretrained": first.pretrained,
        "freeze": first.freeze,
        "family": first.family,
        "headline": metric,
        "n_seeds": len(group.runs),
        "seeds": group.seeds,
        "runs": [run.name for run in group.runs],
        "metrics": metrics,
    }


def _spread(values: list[float | None]) -> dict:
    """Mean and sample sd (ddof 1) over the seeds whose value is defined; sd null under 2 seeds."""
    defined = np.array([v for v in values if v is not None], dtype=float)
    return {
        "mean": _num(np.mean(defined)) if len(defined) else None,
        "sd": _num(np.std(defined, ddof=1)) if len(defined) > 1 else None,
        "values": values,
    }


def pairs(groups: list[Group]) -> list[tuple[Group, Group]]:
    """(CNN, ViT) group pairs on the same labels that share a seed; every pair of groups sharing a
    seed when there is no such CNN × ViT pair (as analysis.pairs does for runs)."""
    same = [
        (a, b)
        for a, b in itertools.combinations(groups, 2)
        if a.first.test.labels == b.first.test.labels and set(a.seeds) & set(b.seeds)
    ]
    mixed = [
        (a, b) if a.first.family == "cnn" else (b, a)
        for a, b in same
        if {a.first.family, b.first.family} == {"cnn", "vit"}
    ]
    return mixed or same


def compare(a: Group, b: Group, primary: str, settings: Settings) -> dict:
    """b − a over the matched seeds, on the test images every matched run scored (one test split:
    normally all of them): the primary metric per seed, its mean, and the hierarchical bootstrap's
    interval and p-value."""
    left, right = a.by_seed(), b.by_seed()
    matched = sorted(set(left) & set(right))
    shared = reduce(np.intersect1d, [run.test.keys for seed in matched for run in (left[seed], right[seed])])
    stats_a, stats_b = [], []
    for seed in matched:
        scored_a, scored_b = left[seed].test.aligned(shared), right[seed].test.aligned(shared)
        masks = scored_a.masks * scored_b.masks
        stats_a.append(_metric(scored_a, masks))
        stats_b.append(_metric(scored_b, masks))
    patients = scored_a.patients  # the same rows, hence patients, for every seed
    result = stats.hierarchical_bootstrap(stats_a, stats_b, patients, settings.resamples, settings.seed)
    metric = headline(a.first, primary)
    return {
        "a": a.name,
        "b": b.name,
        "model_a": a.first.model,
        "model_b": b.first.model,
        "seeds": matched,
        "n": len(shared),
        "metric": metric,
        "delta": _num(result.delta),
        "per_seed": [_num(d) for d in result.per_seed],
        "ci_low": _num(result.low),
        "ci_high": _num(result.high),
        "p_value": _num(result.p_value),
        "resamples": result.resamples,
        "test": TEST,
    }


def _metric(predictions: Predictions, masks: np.ndarray) -> stats.WeightedMetric:
    """Macro AUROC over the labels (the single AUROC for one label) on the rows both runs of a
    seed have labels for: what analysis.compare tests for one pair of runs."""
    columns = list(range(len(predictions.labels)))
    return stats.weighted_macro_auroc(predictions.targets, predictions.probs, masks, columns)


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)
