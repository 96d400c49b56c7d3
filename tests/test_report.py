"""The report: its statistics on data with known answers, and `python -m trainer.report` end to
end on real run directories written by the trainer (plus broken ones)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from tests.trainer_helpers import DEMO, DEMO_VIT, ROOT, train
from trainer.report import stats


def synthetic(patients: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two images per patient, a patient-level label, scores = signal × label + noise."""
    rng = np.random.default_rng(seed)
    label = rng.random(patients) < 0.3
    ids = np.repeat(np.arange(patients), 2).astype(str)
    targets = np.repeat(label, 2).astype(float)
    scores = signal * targets + rng.normal(size=len(targets))
    return ids, targets, scores


def test_auroc_matches_scikit_learn_with_ties_and_masks() -> None:
    rng = np.random.default_rng(0)
    targets = (rng.random(300) < 0.4).astype(float)
    probs = np.round(rng.random(300) + 0.3 * targets, 1)  # many ties
    masks = (rng.random(300) < 0.8).astype(float)
    keep = masks > 0
    assert stats.auroc(targets, probs, masks) == pytest.approx(roc_auc_score(targets[keep], probs[keep]))
    assert np.isnan(stats.auroc(np.zeros(10), rng.random(10)))


def clustered(
    rng: np.random.Generator, patients: int, images: int, separation: float, shared: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`images` per patient with a patient-level label (prevalence 0.3); score = separation × label
    + a patient effect (variance `shared`) + image noise (variance 1 − shared). A positive and a
    negative image always belong to different patients, hence are independent: the population
    AUROC is P(N(separation, 1) > N(0, 1)) = Φ(separation / √2)."""
    label = rng.random(patients) < 0.3
    effect = rng.normal(scale=math.sqrt(shared), size=patients)
    noise = rng.normal(scale=math.sqrt(1 - shared), size=patients * images)
    ids = np.repeat(np.arange(patients), images).astype(str)
    targets = np.repeat(label, images).astype(float)
    return ids, targets, separation * targets + np.repeat(effect, images) + noise


def test_patient_bootstrap_ci_covers_the_true_auroc_95_percent_of_the_time() -> None:
    """300 datasets drawn from a population with a known AUROC (0.760), four strongly correlated
    images per patient: the 95% interval must cover the truth 90–99% of the time (here 94.7%).
    Resampling images instead of patients covers 72%; an interval twice as wide 99.3%. (100
    resamples per interval keep it fast: coarse percentiles, still ~94% in expectation; seeds
    fixed, so the result is the same on every run.)"""
    separation, draws = 1.0, 300
    truth = float(norm.cdf(separation / math.sqrt(2)))
    rng = np.random.default_rng(2)
    covered = 0
    for draw in range(draws):
        ids, targets, scores = clustered(rng, patients=100, images=4, separation=separation, shared=0.8)
        interval = stats.bootstrap(
            lambda rows, t=targets, s=scores: stats.auroc(t[rows], s[rows]), ids, n=100, seed=draw
        )
        covered += interval.low <= truth <= interval.high
    assert 0.90 <= covered / draws <= 0.99, covered / draws


def test_ci_is_the_percentile_interval_even_when_it_excludes_the_estimate() -> None:
    """A statistic whose resamples never reach its full-data value (the share of distinct patients:
    1 on the data, ~1 − 1/e ≈ 0.63 on a resample): the interval is the resamples' 2.5–97.5%
    percentiles, not stretched to include the estimate (that would hide the bias)."""
    ids = np.arange(200).astype(str)
    interval = stats.bootstrap(lambda rows: len(set(ids[rows].tolist())) / len(ids), ids, n=200)
    assert interval.value == 1.0
    assert 0.55 < interval.low < 0.63 < interval.high < 0.70, interval


def test_ci_shrinks_with_more_patients() -> None:
    widths = []
    for patients in (100, 1600):
        ids, targets, scores = synthetic(patients, 1.0, seed=1)
        interval = stats.bootstrap(
            lambda rows, t=targets, s=scores: stats.auroc(t[rows], s[rows]), ids, n=400
        )
        widths.append(interval.high - interval.low)
    assert widths[1] < widths[0] / 2, widths  # ~1/sqrt(16) = a quarter in theory


def test_paired_tests_find_a_planted_difference_and_none_against_itself() -> None:
    ids, targets, good = synthetic(400, 1.5, seed=2)
    weak = good + np.random.default_rng(3).normal(scale=2.0, size=len(good))  # the same model, plus noise

    def metric(scores: np.ndarray) -> stats.Metric:
        return lambda rows: stats.auroc(targets[rows], scores[rows])

    planted = stats.paired_bootstrap(metric(good), metric(weak), ids, n=500)
    assert planted.delta < -0.05 and planted.high < 0 and planted.p_value < 0.01
    same = stats.paired_bootstrap(metric(good), metric(good), ids, n=200)
    assert same.delta == 0 and same.p_value == 1.0

    delong = stats.delong(targets, good, weak)
    assert delong.auc_a == pytest.approx(roc_auc_score(targets, good))
    assert delong.auc_b == pytest.approx(roc_auc_score(targets, weak))
    assert delong.p_value < 0.01 and delong.z < 0
    assert stats.delong(targets, good, good).p_value == 1.0
    # Two equally good models, independent noise: no difference (a fixed seed keeps this at p ≈ 0.5+).
    equal = 1.5 * targets + np.random.default_rng(4).normal(size=len(good))
    assert stats.delong(targets, good, equal).p_value > 0.05


def test_ece_is_zero_for_calibrated_and_large_for_overconfident() -> None:
    rng = np.random.default_rng(5)
    probs = rng.random(20000)
    calibrated = (rng.random(20000) < probs).astype(float)
    assert stats.expected_calibration_error(calibrated, probs)[0] < 0.02
    assert stats.expected_calibration_error(calibrated, np.where(probs > 0.5, 0.99, 0.01))[0] > 0.2


@pytest.fixture(scope="module")
def run_folder(
    chexpert_shards: Path, pneumonia_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Real runs by the trainer (one process, one epoch): a CNN and a ViT on CheXpert labels, a CNN
    on pneumonia; and two broken run directories the report must skip."""
    root = tmp_path_factory.mktemp("runs")
    common = ["optim.epochs=2", "data.workers=0", "data.batch_size=8"]
    for name, config, extra in (
        ("cnn", DEMO, [f"data.shards={chexpert_shards}"]),
        ("vit", DEMO_VIT, [f"data.shards={chexpert_shards}"]),
        ("pneumonia-cnn", DEMO, [f"data.shards={pneumonia_shards}", "data.labels=pneumonia"]),
    ):
        result = train(config, [*common, *extra, f"run.dir={root / name}"])
        assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(root / "cnn", root / "corrupt")
    (root / "corrupt" / "metrics.jsonl").write_text('{"split": "val"\nnot json\n')
    shutil.copytree(root / "cnn", root / "unfinished")
    (root / "unfinished" / "predictions_test.npz").unlink()
    shutil.copytree(root / "cnn", root / "no-patients")  # as written before predictions carried them
    old = root / "no-patients" / "predictions_test.npz"
    with np.load(old, allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files if name != "patients"}
    np.savez_compressed(old, **arrays)
    return root


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.report", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def test_report_end_to_end(run_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = report("--runs", str(run_folder), "--out", str(out), "--resamples", "200")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    runs = {r["name"]: r for r in summary["runs"]}
    assert set(runs) == {"cnn", "vit", "pneumonia-cnn"}
    for name in ("cnn", "vit"):
        macro = runs[name]["metrics"]["auroc_macro"]
        assert 0 <= macro["ci_low"] < macro["ci_high"] <= 1 and 0 <= macro["value"] <= 1  # may lie outside
        assert runs[name]["trainable_parameters"] > 0 and runs[name]["train_seconds"] > 0
    pneumonia = runs["pneumonia-cnn"]["metrics"]
    for name in ("auroc/Pneumonia", "accuracy", "sensitivity", "specificity", "f1"):
        assert 0 <= pneumonia[name]["ci_low"] <= pneumonia[name]["ci_high"] <= 1, name

    (pair,) = summary["pairs"]  # the one CNN × ViT pair on the same labels
    assert (pair["a"], pair["b"]) == ("cnn", "vit") and pair["n"] == runs["cnn"]["n_test"]
    assert pair["delta"] is not None and 0 <= pair["p_value"] <= 1 and set(pair["delong"]) >= {"Edema"}

    skipped = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert skipped == {
        "corrupt": "metrics.jsonl line 1: not JSON",
        "unfinished": "predictions_test.npz missing",
        "no-patients": "predictions_test.npz: no patients array (written before predictions carried "
                       "patients): re-evaluate the run to score it by patient",
    }

    assert len(summary["figures"]) >= 10
    for figure in summary["figures"]:
        data = (out / figure["file"]).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000, figure["file"]
    markdown = (out / "index.md").read_text()
    html = (out / "index.html").read_text()
    for text in (
        "Test AUROC per model and freeze strategy",
        "Pneumonia: test metrics",
        "Paired comparisons",
        "Published anchors",
        "0.906",
        "Skipped runs",
    ):
        assert text in markdown
    assert "<table>" in html and all(f'src="{f["file"]}"' in html for f in summary["figures"])


def test_no_usable_run_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty" / "run").mkdir(parents=True)
    (tmp_path / "empty" / "run" / "config.yaml").write_text("model: {}\n")
    result = report("--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "error: no usable run"
    )
    assert not (tmp_path / "out").exists()


def test_sweep_by_name_or_path_and_a_missing_one(run_folder: Path, tmp_path: Path) -> None:
    """--sweep NAME is looked up under the --runs folders (and their sweeps/); a sweep's
    results.csv (as sweeps.run writes it) feeds the sweep figures."""
    runs = tmp_path / "runs"
    shutil.copytree(run_folder / "cnn", runs / "cnn")
    sweep = tmp_path / "elsewhere" / "sweeps" / "lr"
    (sweep / "trials").mkdir(parents=True)
    rows = ["rank,trial,optim.lr,val_auroc_macro,status,run_dir"]
    rows += [
        f"{i},t{i},{lr},{0.6 + i / 10},finished,{run_folder / 'cnn'}" for i, lr in enumerate((1e-3, 1e-2))
    ]
    (sweep / "results.csv").write_text("\n".join(rows) + "\n")
    ok = report(
        "--runs",
        str(runs),
        "--runs",
        str(tmp_path / "elsewhere"),
        "--sweep",
        "lr",
        "--out",
        str(tmp_path / "out"),
        "--resamples",
        "50",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sweeps"] == [{"path": str(sweep.resolve()), "trials": 2}]
    bad = report("--runs", str(runs), "--sweep", "nope", "--out", str(tmp_path / "out2"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: --sweep nope: no sweep there")


def test_optimizer_tradeoff_draws_each_models_best_run_per_optimizer(tmp_path: Path) -> None:
    from PIL import Image

    from trainer.report.figures import best_per_optimizer, optimizer_tradeoff

    def curve(model: str, optimizer: str, values: list[float], timed: bool = True) -> dict:
        return {"model": model, "optimizer": optimizer, "label": f"{model} {optimizer} {values}",
                "epochs": list(range(1, len(values) + 1)), "values": values,
                "minutes": [0.5 * (i + 1) if timed else None for i in range(len(values))]}

    one = [curve("resnet", "adamw", [0.6, 0.7]), curve("resnet", "adamw", [0.65, 0.8])]
    assert best_per_optimizer(one) == {} and optimizer_tradeoff(one, "auroc_macro", tmp_path) is None
    curves = [*one, curve("resnet", "sgd", [0.5, 0.9], timed=False), curve("vit", "sgd", [0.5, 0.55]),
              curve("vit", "lion", [0.7]), curve("deit", "lamb", [0.7])]
    chosen = best_per_optimizer(curves)
    assert list(chosen) == ["resnet", "vit"], "deit met one optimizer only"
    assert chosen["resnet"]["adamw"]["values"] == [0.65, 0.8], "the better adamw run"
    assert set(chosen["vit"]) == {"sgd", "lion"}
    path = optimizer_tradeoff(curves, "auroc_macro", tmp_path)
    assert path is not None and path.name == "optimizer_tradeoff.png"
    width, height = Image.open(path).size
    assert height > 1.5 * width / 11 * 3.6, "one row of two panels per model: two rows"


def test_recipe_cards_show_how_each_run_was_trained_and_flag_unequal_budgets(
        run_folder: Path, tmp_path: Path) -> None:
    """Each run's card from its config.yaml, its `resolved` block and its records (by hand below);
    a comparison whose sides differ in tuning trials is flagged, an equal one says so."""
    runs = tmp_path / "runs"
    for name in ("cnn", "vit"):
        shutil.copytree(run_folder / name, runs / name)
    shutil.copytree(run_folder / "vit", runs / "vit-tuned")
    config = (runs / "vit-tuned" / "config.yaml").read_text()
    tuning = 'tuning: {trials: 6, search: demo_cpu_vit, trial_epochs: 12, images: 960}'
    (runs / "vit-tuned" / "config.yaml").write_text(config.replace("tuning: {}", tuning))
    out = tmp_path / "report"
    result = report("--runs", str(runs), "--out", str(out), "--resamples", "50")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    cards = {r["name"]: r["recipe"] for r in summary["runs"]}

    cnn_records = [json.loads(line) for line in (runs / "cnn" / "metrics.jsonl").read_text().splitlines()]
    last_step = max(r["step"] for r in cnn_records if r["split"] in ("val", "test"))
    cnn = cards["cnn"]
    assert (cnn["image_size"], cnn["global_batch"], cnn["epochs"], cnn["freeze"]) == (64, 8, 2, "full")
    assert cnn["steps"] == last_step and cnn["images_seen"] == last_step * 8, "one process × 8 per step"
    assert cnn["lr_top"] == cnn["lr_bottom"] == pytest.approx(2e-3), "demo lr, no scaling, no layer decay"
    assert (cnn["pretrained"], cnn["optimizer"], cnn["tuning_trials"]) == ("none", "adamw", 0)
    assert cnn["labels"] == "uncertain ignore, blank zeros" and cnn["trainable_parameters"] > 0
    assert cards["vit-tuned"]["tuning_trials"] == 6

    budgets = {(p["a"], p["b"]): p["budget"] for p in summary["pairs"]}
    assert budgets[("cnn", "vit")] == []
    assert budgets[("cnn", "vit-tuned")] == ["tuning trials 0 vs 6"]
    budget = {row["family"]: row for row in summary["tuning_budget"]}
    assert budget["cnn"]["trials"] == 0 and budget["vit"]["trials"] == 6
    assert budget["vit"]["untuned_runs"] == 1 and budget["vit"]["searches"] == ["demo_cpu_vit"]
    markdown = (out / "index.md").read_text()
    assert "## Recipe cards" in markdown and "⚠ tuning trials 0 vs 6" in markdown
    assert "**Unequal tuning**" in markdown
