"""Replicates in the report: runs grouped by config over seeds, mean ± sd, and CNN vs ViT over
matched seeds by the hierarchical bootstrap. Synthetic predictions with known answers; nothing is
trained (RunData built directly, configs read without their shards)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from shards.labels import COMPETITION5
from tests.trainer_helpers import DEMO, DEMO_VIT
from trainer.config import load_config
from trainer.report import seeds, stats
from trainer.report.__main__ import build
from trainer.report.analysis import Settings, run_metrics
from trainer.report.render import render_markdown
from trainer.report.runs import RunData
from trainer.rundir import Predictions

LABELS = COMPETITION5


def scores(targets: np.ndarray, separation: float, seed: int) -> np.ndarray:
    """One model's probabilities: sigmoid(separation × label + image noise). Positive and negative
    images are independent, so the population AUROC is Φ(separation / √2) per label."""
    noise = np.random.default_rng(seed).normal(size=targets.shape)
    return 1 / (1 + np.exp(-(separation * targets + noise)))


def images(patients: int, labels: tuple[str, ...] = LABELS, seed: int = 0) -> Predictions:
    """Two images per patient, patient-level labels (prevalence 0.3), probabilities to be filled in."""
    label = np.random.default_rng(seed).random((patients, len(labels))) < 0.3
    targets = np.repeat(label, 2, axis=0).astype(float)
    rows = len(targets)
    keys = np.array([f"img{i:05d}" for i in range(rows)])
    ids = np.array([f"p{i // 2:05d}" for i in range(rows)])
    return Predictions(keys, ids, labels, np.zeros_like(targets), targets, np.ones_like(targets), rows)


def make_run(
    name: str, base: Predictions, separation: float, noise: int, vit: bool = False, *overrides: str
) -> RunData:
    config = load_config(DEMO_VIT if vit else DEMO, list(overrides), environment=False)
    probs = scores(base.targets, separation, noise)
    test = Predictions(base.keys, base.patients, base.labels, probs, base.targets, base.masks, len(base.keys))
    return RunData(name, Path(name), config, [], test, None, {}, "vit" if vit else "cnn")


def replicates(
    base: Predictions, family: str, separations: list[float], noise: int, *overrides: str
) -> list[RunData]:
    """One run per seed (run.seed = k, named <family>-seed<k>), separation[k] for seed k."""
    return [
        make_run(f"{family}-seed{k}", base, s, noise + k, family == "vit", f"run.seed={k}",
                 f"run.dir=runs/{family}-seed{k}", *overrides)
        for k, s in enumerate(separations)
    ]


def test_groups_by_config_over_seeds_not_by_name() -> None:
    base = images(20)
    full = replicates(base, "cnn", [1.0, 1.0, 1.0], noise=0)
    full[2].config.run.log_every = 3  # how it was logged: still a replicate
    head = make_run("cnn-seed9", base, 1.0, 9, False, "run.seed=9", "model.freeze=head")
    groups = seeds.group_runs([full[2], head, full[0], full[1]])
    assert [(g.name, g.seeds, [r.name for r in g.runs]) for g in groups] == [
        ("cnn", [0, 1, 2], ["cnn-seed0", "cnn-seed1", "cnn-seed2"]),
        ("cnn #2", [9], ["cnn-seed9"]),  # named like the others, another config: a group of its own
    ]
    assert seeds.group_key(full[0].config) == seeds.group_key(full[1].config)
    for override in ("model.freeze=head", "model.pretrained=true", "optim.lr=0.01", "data.augment=none"):
        other = load_config(DEMO, [override], environment=False)
        assert seeds.group_key(other) != seeds.group_key(full[0].config), override
    # Names that do not share a stem: model/freeze (with the pretrained tag when there is one).
    renamed = make_run("first-try", base, 1.0, 5, False, "run.seed=5")
    (group,) = seeds.group_runs([full[0], renamed])
    assert group.name == "resnet10t/full" and group.seeds == [0, 5]


def test_pretrained_tag_is_timms_tag_default_or_none() -> None:
    base = images(5)

    def tag(*overrides: str) -> str:
        return make_run("r", base, 1.0, 0, False, *overrides).pretrained

    assert tag("model.name=vit_base_patch16_224.augreg_in21k_ft_in1k", "model.pretrained=true") == (
        "augreg_in21k_ft_in1k"
    )
    assert tag("model.name=resnet50.a1_in1k", "model.pretrained=true") == "a1_in1k"
    assert tag("model.name=resnet50", "model.pretrained=true") == "default"
    assert tag("model.name=resnet50.a1_in1k", "model.pretrained=false") == "none"
    run = make_run("r", base, 1.0, 0, False, "model.name=resnet50.a1_in1k", "model.pretrained=true")
    assert run_metrics(run, Settings(resamples=10))["pretrained"] == "a1_in1k"


def test_mean_and_sd_over_seeds_are_numpys() -> None:
    base = images(60)
    runs = replicates(base, "cnn", [0.5, 1.0, 2.0], noise=0)
    summaries = {r.name: run_metrics(r, Settings(resamples=10)) for r in runs}
    (group,) = seeds.group_runs(runs)
    described = seeds.describe(group, summaries, "auroc_macro")
    assert described["n_seeds"] == 3 and described["seeds"] == [0, 1, 2]
    assert described["runs"] == ["cnn-seed0", "cnn-seed1", "cnn-seed2"] and described["family"] == "cnn"
    assert described["headline"] == "auroc_macro" and described["pretrained"] == "none"
    for name in ["auroc_macro", *(f"auroc/{label}" for label in LABELS)]:
        by_hand = [summaries[r.name]["metrics"][name]["value"] for r in runs]
        cell = described["metrics"][name]
        assert cell["values"] == by_hand
        assert cell["mean"] == pytest.approx(sum(by_hand) / 3, abs=1e-6)
        mean = sum(by_hand) / 3
        assert cell["sd"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in by_hand) / 2), abs=1e-6)
    first = stats.auroc(base.targets[:, 0], runs[0].test.probs[:, 0])
    assert described["metrics"][f"auroc/{LABELS[0]}"]["values"][0] == pytest.approx(first, abs=1e-6)
    (single,) = seeds.group_runs(runs[:1])
    assert seeds.describe(single, summaries, "auroc_macro")["metrics"]["auroc_macro"]["sd"] is None


def macro(predictions: Predictions) -> stats.Metric:
    columns = list(range(len(predictions.labels)))
    return lambda rows: stats.macro_auroc(
        predictions.targets[rows], predictions.probs[rows], predictions.masks[rows], columns
    )


def weighted(predictions: Predictions) -> stats.WeightedMetric:
    columns = list(range(len(predictions.labels)))
    return stats.weighted_macro_auroc(predictions.targets, predictions.probs, predictions.masks, columns)


def test_weighted_auroc_is_auroc_on_the_repeated_rows() -> None:
    """Ties, masks, patients drawn twice or not at all, a resample with one class only."""
    rng = np.random.default_rng(0)
    targets = (rng.random(200) < 0.3).astype(float)
    probs = np.round(rng.random(200) + 0.4 * targets, 1)  # many ties
    masks = (rng.random(200) < 0.8).astype(float)
    resamples = [rng.integers(0, 200, 200) for _ in range(20)] + [np.flatnonzero(targets == 0)]
    weights = np.stack([np.bincount(rows, minlength=200) for rows in resamples]).astype(float)
    by_rows = [stats.auroc(targets[rows], probs[rows], masks[rows]) for rows in resamples]
    np.testing.assert_allclose(stats.weighted_auroc(targets, probs, masks)(weights), by_rows, atol=1e-12)
    assert np.isnan(by_rows[-1])


def test_hierarchical_interval_holds_the_seed_spread() -> None:
    """Both families' seed effects come from one distribution (true Δ = 0), and these four draws
    disagree a lot. On 1500 patients the patient-only bootstrap of the seed-averaged Δ is narrow
    and excludes 0 (it takes these four seeds for the models themselves); resampling the seeds as
    well widens the interval several times, and it covers the truth."""
    base = images(1500, LABELS[:2])
    cnn = replicates(base, "cnn", [1.0 + e for e in (-0.3, 0.3, -0.4, 0.4)], noise=0)
    vit = replicates(base, "vit", [1.0 + e for e in (0.6, -0.2, 0.5, -0.5)], noise=100)
    stats_a, stats_b = [macro(r.test) for r in cnn], [macro(r.test) for r in vit]
    hierarchical = stats.hierarchical_bootstrap(
        [weighted(r.test) for r in cnn], [weighted(r.test) for r in vit], base.patients, n=300
    )
    patients_only = stats.paired_bootstrap(
        lambda rows: np.mean([s(rows) for s in stats_a]),
        lambda rows: np.mean([s(rows) for s in stats_b]),
        base.patients,
        n=200,
    )
    assert hierarchical.delta == pytest.approx(patients_only.delta)
    assert hierarchical.delta == pytest.approx(np.mean(hierarchical.per_seed))
    assert not patients_only.low <= 0 <= patients_only.high, patients_only
    assert hierarchical.low <= 0 <= hierarchical.high, hierarchical
    assert hierarchical.high - hierarchical.low > 3 * (patients_only.high - patients_only.low)
    assert hierarchical.p_value > 0.05


def test_one_matched_seed_is_the_paired_patient_bootstrap() -> None:
    base = images(80, LABELS[:2])
    (cnn,), (vit,) = replicates(base, "cnn", [0.8], 0), replicates(base, "vit", [1.2], 1)
    one = stats.hierarchical_bootstrap(
        [weighted(cnn.test)], [weighted(vit.test)], base.patients, n=100, seed=4
    )
    paired = stats.paired_bootstrap(macro(cnn.test), macro(vit.test), base.patients, n=100, seed=4)
    expected = (paired.delta, paired.low, paired.high)
    assert (one.delta, one.low, one.high) == pytest.approx(expected, abs=1e-12)
    assert one.p_value == paired.p_value and one.per_seed == pytest.approx((paired.delta,), abs=1e-12)


def test_a_planted_vit_advantage_is_found_and_identical_models_differ_by_nothing() -> None:
    base = images(300)
    cnn = replicates(base, "cnn", [0.8, 0.9, 0.7], noise=0)
    vit = replicates(base, "vit", [1.6, 1.5, 1.7, 1.6], noise=50)  # seed 3: no CNN to match
    groups = seeds.group_runs([*vit, *cnn])
    (pair,) = seeds.pairs(groups)
    result = seeds.compare(*pair, "auroc_macro", Settings(resamples=200))
    assert (result["a"], result["b"], result["seeds"]) == ("cnn", "vit", [0, 1, 2])  # a: the CNN
    assert result["test"] == seeds.TEST and result["n"] == len(base.keys)
    per_seed = [
        macro(vit[k].test)(np.arange(len(base.keys))) - macro(cnn[k].test)(np.arange(len(base.keys)))
        for k in range(3)
    ]
    assert result["per_seed"] == pytest.approx(per_seed, abs=1e-6)
    assert result["delta"] == pytest.approx(np.mean(per_seed), abs=1e-6)
    assert result["delta"] > 0.1 and result["ci_low"] > 0 and result["p_value"] < 0.05

    twins = [make_run(f"vit-seed{k}", base, 0, 0, True, f"run.seed={k}") for k in range(3)]
    for twin, run in zip(twins, cnn, strict=True):
        twin.test = run.test  # the same scores: a ViT that is the CNN
    (pair,) = seeds.pairs(seeds.group_runs([*cnn, *twins]))
    same = seeds.compare(*pair, "auroc_macro", Settings(resamples=100))
    assert same["delta"] == 0 and same["per_seed"] == [0, 0, 0] and same["p_value"] == 1.0


def test_summary_and_markdown_carry_the_replicates(tmp_path: Path) -> None:
    base = images(40, LABELS[:2], seed=3)
    runs = [*replicates(base, "cnn", [0.8, 0.9], 0), *replicates(base, "vit", [1.4, 1.5], 9)]
    summary = build(runs, [], [], tmp_path, Settings(resamples=30))
    assert [(g["name"], g["n_seeds"], g["family"]) for g in summary["seed_groups"]] == [
        ("cnn", 2, "cnn"),
        ("vit", 2, "vit"),
    ]
    (comparison,) = summary["seed_comparisons"]
    assert comparison["seeds"] == [0, 1] and comparison["metric"] == "auroc_macro"
    assert {r["pretrained"] for r in summary["runs"]} == {"none"}
    markdown = render_markdown(summary)
    assert "## Replicates (mean ± sd over seeds)" in markdown
    assert "## CNN vs ViT over matched seeds" in markdown and seeds.TEST in markdown
    mean, sd = (summary["seed_groups"][0]["metrics"]["auroc_macro"][k] for k in ("mean", "sd"))
    assert f"| cnn | resnet10t | none | full | 2 | auroc_macro | {mean:.3f} ± {sd:.3f} |" in markdown
    assert "| run | model | pretrained | freeze |" in markdown
    one_seed_each = build([runs[0], runs[2]], [], [], tmp_path, Settings(resamples=30))
    assert [g["n_seeds"] for g in one_seed_each["seed_groups"]] == [1, 1]
    assert len(one_seed_each["seed_comparisons"]) == 1  # in summary.json, not as its own section
    alone = render_markdown(one_seed_each)
    assert "Replicates" not in alone and "matched seeds" not in alone
