"""The whole study in one command (`python -m sweeps.study`): the grid × seeds on a real local Ray,
the real trainer in every run, a driver killed mid-study and resumed, the report at the end."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeps.study import main
from tests.trainer_helpers import DEMO, ROOT, kill_group, records, wait_for

SPACE = ROOT / "sweeps" / "spaces" / "study_demo_cpu.yaml"
# Short runs: the study's bookkeeping is under test here, not learning (tests/test_trainer.py).
FAST = ["optim.epochs=2", "data.samples_per_epoch=32", "data.batch_size=8"]


def study_command(storage: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sweeps.study", "--space", str(SPACE), "--seeds", "2", "--address",
            "local", "--name", "demo", "--storage", str(storage), "--resamples", "100", *extra,
            f"data.shards={shards}", *FAST]


@pytest.mark.slow
def test_killed_study_resumes_without_retraining_and_ends_in_the_seed_aware_report(
        chexpert_shards: Path, tmp_path: Path) -> None:
    storage = tmp_path / "studies"
    runs = storage / "demo" / "runs"
    process = subprocess.Popen(study_command(storage, chexpert_shards), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)

    def tested() -> list[Path]:
        found = runs.glob("*") if runs.is_dir() else []
        return [p for p in found if records(p, "test", running=True)]

    try:
        wait_for(lambda: len(tested()) >= 1, timeout=300)
    finally:
        kill_group(process)  # the driver, Ray's daemons and its workers: the whole tree
    done = {p.name: (p / "metrics.jsonl").read_bytes() for p in tested()}
    assert 1 <= len(done) < 8, "killed mid-study"

    result = subprocess.run(study_command(storage, chexpert_shards, "--resume"), cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    names = sorted(p.name for p in runs.iterdir())
    cells = ("demo_cpu-full", "demo_cpu-head+last_block", "demo_cpu_vit-full", "demo_cpu_vit-head+last_block")
    assert names == sorted(f"{cell}-seed{seed}" for cell in cells for seed in (0, 1))
    for name, before in done.items():
        assert (runs / name / "metrics.jsonl").read_bytes() == before, f"{name} was trained again"
    for run in runs.iterdir():
        assert len(records(run, "test")) == 1, f"{run.name}: tested exactly once"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["run"]["seed"] == int(run.name[-1]) and config["run"]["test_at_end"]
    assert f"{len(done)} already finished, {8 - len(done)} to run" in result.stdout
    progress = [line for line in result.stdout.splitlines() if line.startswith("finished ")]
    assert len(progress) == 8 - len(done) and all(" done, " in line and "left" in line for line in progress)
    status = json.loads((storage / "demo" / "status.json").read_text())
    assert status["counts"]["finished"] == 8 and status["counts"]["failed"] == 0

    summary = json.loads((storage / "demo" / "report" / "summary.json").read_text())
    assert len(summary["runs"]) == 8
    groups = summary["seed_groups"]
    assert len(groups) == 4 and all(g["n_seeds"] == 2 and g["seeds"] == [0, 1] for g in groups)
    assert {g["family"] for g in groups} == {"cnn", "vit"}
    comparisons = summary["seed_comparisons"]
    assert len(comparisons) == 4 and all(c["seeds"] == [0, 1] for c in comparisons)
    markdown = (storage / "demo" / "report" / "index.md").read_text()
    assert "mean ± sd over seeds" in markdown and "matched seeds" in markdown

    again = subprocess.run(study_command(storage, chexpert_shards), cwd=ROOT, capture_output=True, text=True,
                           timeout=120, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr and again.stderr.count("\n") == 1


def test_dry_run_lists_the_runs_and_the_compute_from_the_table(chexpert_shards: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--space", str(SPACE), "--seeds", "3", "--dry-run", "--storage", str(tmp_path),
                 f"data.shards={chexpert_shards}", "optim.epochs=1000000"])
    assert code == 0
    out = capsys.readouterr().out
    assert "study: 12 runs" in out and "demo_cpu_vit-head+last_block-seed2" in out
    assert not (tmp_path / "study_demo_cpu").exists(), "a dry run writes nothing"
    # By hand from sweeps/throughput.yaml: resnet10t 4669.46 img/s at 176 px, vit_tiny 2293.54 at
    # 224 px, both run at 64 px; evaluation at 3x; an H100 = 3 RTX 3090s.
    manifest = json.loads((chexpert_shards / "manifest.json").read_text())
    splits = {name: split["samples"] for name, split in manifest["splits"].items()}
    seconds = 0.0
    for rate, size in ((4669.46, 176), (2293.54, 224)):
        fast = rate * (size / 64) ** 2
        train, evaluated = 1_000_000 * splits["train"], 1_000_000 * splits["val"] + splits["test"]
        seconds += 2 * 3 * (train / fast + evaluated / (3 * fast))  # 2 strategies x 3 seeds
    minutes = float(re.search(r"H100-hours \((\d+) H100-minutes\) in all", out).group(1))
    assert minutes == pytest.approx(seconds / 3 / 60, abs=1)


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "0"], "--seeds: expected ≥ 1"),
    (["--resume"], "no study to continue"),
    (["--space-file", "loguniform"], "a study runs a full grid"),
])
def test_bad_study_input_is_one_line(chexpert_shards: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], args: list[str],
                                     message: str) -> None:
    space = SPACE
    if args[0] == "--space-file":
        space = tmp_path / "range.yaml"
        space.write_text(yaml.safe_dump({"base": DEMO, "search": "optuna",
                                         "params": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}))
        args = []
    code = main(["--space", str(space), "--storage", str(tmp_path / "s"), *args,
                 f"data.shards={chexpert_shards}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s").exists(), "nothing written"


TUNED = ROOT / "sweeps" / "spaces" / "study_demo_tuned.yaml"


@pytest.mark.slow
def test_equal_budget_tuning_per_architecture_then_the_grid_with_each_winner(
        chexpert_shards: Path, tmp_path: Path) -> None:
    """The protocol: one search per architecture with the same trials and epochs, on val only; the
    final runs train with their own architecture's winning values and say where they came from."""
    storage = tmp_path / "studies"
    command = [sys.executable, "-m", "sweeps.study", "--space", str(TUNED), "--seeds", "1", "--address",
               "local", "--name", "tuned", "--storage", str(storage), "--resamples", "50",
               f"data.shards={chexpert_shards}", "data.samples_per_epoch=32", "data.batch_size=8",
               "optim.epochs=1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    out = storage / "tuned"
    tuned_values, candidates = {}, {}
    for arch in ("demo_cpu", "demo_cpu_vit"):
        assert f"tuning {arch}: 4 trials (optuna) on val" in result.stdout
        with (out / "tuning" / arch / "results.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 4 and all(row["status"] == "finished" for row in rows), "no early stopping"
        for row in rows:
            trial = Path(row["run_dir"])
            assert yaml.safe_load((trial / "config.yaml").read_text())["optim"]["epochs"] == 2, "tune.fixed"
            assert not records(trial, "test"), "the search never sees the test split"
        best = max(rows, key=lambda row: float(row["val_auroc_macro"]))
        tuned_values[arch] = (float(best["optim.lr"]), float(best["optim.weight_decay"]))
        candidates[arch] = sorted((float(row["optim.lr"]), float(row["optim.weight_decay"])) for row in rows)
    # The same sampler seed: TPE's random start proposes the same candidates to every architecture.
    assert candidates["demo_cpu"] == candidates["demo_cpu_vit"]

    for arch in ("demo_cpu", "demo_cpu_vit"):
        run = out / "runs" / f"{arch}-full-seed0"
        config = yaml.safe_load((run / "config.yaml").read_text())
        lr, weight_decay = tuned_values[arch]
        assert config["optim"]["lr"] == pytest.approx(lr), f"{arch} trained with its own search's winner"
        assert config["optim"]["weight_decay"] == pytest.approx(weight_decay)
        assert config["optim"]["epochs"] == 1, "the search's fixed settings are the search's only"
        assert config["run"]["tuning"]["trials"] == 4 and config["run"]["tuning"]["search"] == arch
        assert len(records(run, "test")) == 1

    summary = json.loads((out / "report" / "summary.json").read_text())
    budget = {row["family"]: row for row in summary["tuning_budget"]}
    assert budget["cnn"]["trials"] == budget["vit"]["trials"] == 4
    assert budget["cnn"]["trial_epochs"] == budget["vit"]["trial_epochs"] == 4 * 2
    assert "Tuning budget" in (out / "report" / "index.md").read_text()

    # --resume keeps both finished searches (and the finished runs).
    again = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 already finished, 0 to run" in again.stdout


@pytest.mark.parametrize(("tune", "message"), [
    ({"per": ["model.name"], "params": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}},
     "tune.per: expected a list of the grid's params"),
    ({"params": {"model.freeze": {"choice": ["full"]}}}, "tune.params.model.freeze: already a grid param"),
    ({"params": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "trails": 2}, "tune: unknown key 'trails'"),
    ({"search": "grid", "params": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}, "tune.search grid takes grid"),
    ({"params": {"optim.lr": {"uniform": [-1.0, 1e-2]}}}, "params.optim.lr = -1.0"),  # the trainer refuses it
])
def test_bad_tuning_section_is_one_line(chexpert_shards: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], tune: dict, message: str) -> None:
    raw = yaml.safe_load(SPACE.read_text())
    raw["tune"] = tune
    space = tmp_path / "tuned.yaml"
    space.write_text(yaml.safe_dump(raw))
    code = main(["--space", str(space), "--storage", str(tmp_path / "s"), "--seeds", "1",
                 f"data.shards={chexpert_shards}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s").exists(), "nothing written"
