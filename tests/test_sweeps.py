"""Sweeps on a real local Ray (2 CPUs), the real trainer in every trial, `python -m sweeps.run`
as a user runs it. Nothing is mocked."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sweeps import study_tuning
from sweeps.run import check_space
from sweeps.space import SpaceError, load_space
from tests.trainer_helpers import DEMO, ROOT, kill_group, records, train, wait_for
from trainer import rundir
from trainer.config import load_config

pytestmark = pytest.mark.slow
DEMO_SPACE = ROOT / "sweeps" / "spaces" / "demo_cpu.yaml"


def sweep_command(space: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sweeps.run",
        "--space",
        str(space),
        "--address",
        "local",
        "--name",
        name,
        "--storage",
        str(storage),
        *extra,
    ]


def run_sweep(
    space: Path, storage: Path, name: str, *extra: str, timeout: int = 420
) -> subprocess.CompletedProcess:
    return subprocess.run(
        sweep_command(space, storage, name, *extra),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def results(storage: Path, name: str) -> list[dict]:
    with (storage / name / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def write_space(path: Path, **fields: object) -> Path:
    path.write_text(yaml.safe_dump({"base": DEMO, "metric": "auroc_macro", **fields}))
    return path


def test_demo_space_four_trials_write_table_and_best_config(chexpert_shards: Path, tmp_path: Path) -> None:
    result = run_sweep(
        DEMO_SPACE, tmp_path, "demo", "--trials", "4", f"data.shards={chexpert_shards}", "data.batch_size=8",
        "optim.lr_scaling=linear",
    )
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    rows = results(tmp_path, "demo")
    assert len(rows) == 4
    values = [float(r["val_auroc_macro"]) for r in rows]
    assert values == sorted(values, reverse=True), "sorted by the metric"
    assert {r["model.freeze"] for r in rows} <= {"full", "head+last_block"}
    for row in rows:
        assert 3e-4 <= float(row["optim.lr"]) <= 1e-2
        run_dir = Path(row["run_dir"])
        assert list((run_dir / "tb").glob("events.out.tfevents.*")), "per-trial TensorBoard logs"
        assert not records(run_dir, "test"), "a sweep never evaluates on the test split"
    markdown = (tmp_path / "demo" / "results.md").read_text()
    assert markdown.count("\n| ") == 5 and rows[0]["trial"] in markdown
    # best.yaml is a trainer config the trainer accepts, with the winning trial's settings.
    best = load_config(tmp_path / "demo" / "best.yaml")
    assert best.optim.lr == pytest.approx(float(rows[0]["optim.lr"]))
    assert best.model.freeze == rows[0]["model.freeze"] and best.data.shards == str(chexpert_shards)
    assert best.run.resume == "never" and best.run.test_at_end
    assert best.data.global_batch == 8 and best.run.tuning["trials"] == 4
    trial = rundir.read_resolved(Path(rows[0]["run_dir"]))
    assert trial["effective_lr"] == pytest.approx(best.optim.lr * 8 / 256), "one rank × 8 at ref 256"

    # The best.yaml on two ranks trains with the trial's global batch, so with its effective lr.
    run_dir = tmp_path / "best-on-two-ranks"
    again = train(str(tmp_path / "demo" / "best.yaml"), [
        f"run.dir={run_dir}", "optim.epochs=1", "data.samples_per_epoch=48", "data.workers=0",
        "run.log_every=1", "run.test_at_end=false"], processes=2)
    assert again.returncode == 0, again.stderr[-4000:]
    resolved = rundir.read_resolved(run_dir)
    assert (resolved["processes"], resolved["batch_size"], resolved["global_batch"]) == (2, 4, 8)
    assert resolved["effective_lr"] == pytest.approx(trial["effective_lr"], rel=1e-12)
    # ... and the optimizer used it: its saved lr is the logged one at the last step.
    last = records(run_dir, "train")[-1]
    (checkpoint,) = sorted((run_dir / rundir.CHECKPOINTS).glob("step-*"))[-1:]
    saved = torch.load(checkpoint / "optimizer.bin", weights_only=True)["param_groups"]
    assert saved and all(group["lr"] == pytest.approx(last["lr"], rel=1e-9) for group in saved)
    assert last["lr"] <= resolved["effective_lr"] < best.optim.lr


def test_asha_stops_a_hopeless_trial_early(learn_shards: Path, tmp_path: Path) -> None:
    # Grid order with two trials at a time: the two good trials reach each rung first, so the
    # trials with an absurdly small learning rate (an untrained model) are judged against them.
    space = write_space(
        tmp_path / "asha.yaml",
        search="grid",
        resources={"cpu": 1},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        fixed={"optim.epochs": 3, "data.workers": 0, "run.log_every": 50, "data.samples_per_epoch": 320},
        params={"optim.lr": {"grid": [3e-3, 2e-3, 1e-9, 1e-9]}},
    )
    result = run_sweep(space, tmp_path / "sweeps", "asha", f"data.shards={learn_shards}")
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    rows = {float(r["optim.lr"]): r for r in results(tmp_path / "sweeps", "asha")}
    hopeless = [r for r in results(tmp_path / "sweeps", "asha") if float(r["optim.lr"]) < 1e-6]
    assert len(hopeless) == 2 and all(r["status"] == "stopped early" for r in hopeless), hopeless
    assert all(int(r["epochs"]) < 3 for r in hopeless)
    # One good trial may stop the other at a rung (the later arrival, if it trails): at least
    # one of them trains to the end.
    assert max(int(rows[lr]["epochs"]) for lr in (3e-3, 2e-3)) == 3
    # The trials named by their settings, not the first row of a table the sweep sorted itself:
    # each row's value is its own run's best validation AUROC, and both good trials beat both
    # hopeless ones.
    for row in [*rows.values(), *hopeless]:
        own = max(line["auroc_macro"] for line in records(Path(row["run_dir"]), "val"))
        assert float(row["val_auroc_macro"]) == pytest.approx(own, abs=5e-5), row  # the table keeps 4 digits
    hopeless_best = max(float(r["val_auroc_macro"]) for r in hopeless)
    for lr in (3e-3, 2e-3):
        assert float(rows[lr]["val_auroc_macro"]) > hopeless_best, (rows[lr], hopeless)


def test_killed_sweep_resumes_without_rerunning_finished_trials(
    chexpert_shards: Path, tmp_path: Path
) -> None:
    space = write_space(
        tmp_path / "grid.yaml",
        search="grid",
        scheduler={"type": "none"},
        resources={"cpu": 1},
        fixed={"optim.epochs": 3, "data.workers": 0, "data.batch_size": 4, "run.log_every": 1,
               "data.samples_per_epoch": 32},
        params={"optim.lr": {"grid": [1e-3, 2e-3, 3e-3, 4e-3]}},
    )
    storage = tmp_path / "sweeps"
    process = subprocess.Popen(
        sweep_command(space, storage, "grid", f"data.shards={chexpert_shards}"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    trials = storage / "grid" / "trials"

    def finished() -> list[Path]:
        running = trials.glob("*") if trials.is_dir() else []
        return [p for p in running if len(records(p, "val", running=True)) == 3]

    try:
        wait_for(lambda: len(finished()) >= 1, timeout=300)
        time.sleep(4)  # the driver snapshots its state every 2 s
        assert len(finished()) < 4, "killed mid-way: some trials still to run"
    finally:
        kill_group(process)  # the driver, Ray's daemons and its workers: the whole tree
    done = {p.name: (p / "metrics.jsonl").read_bytes() for p in finished()}

    result = run_sweep(space, storage, "grid", "--resume", f"data.shards={chexpert_shards}")
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    rows = results(storage, "grid")
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows), rows
    for name, before in done.items():
        assert (trials / name / "metrics.jsonl").read_bytes() == before, f"{name} was trained again"
    for row in rows:
        steps = [r["step"] for r in records(Path(row["run_dir"]), "train")]
        assert steps == sorted(set(steps)), "a resumed trial trains no step twice"

    again = run_sweep(space, storage, "grid", f"data.shards={chexpert_shards}")
    assert again.returncode == 2 and "--resume" in again.stderr


def test_a_trial_on_two_ranks(chexpert_shards: Path, tmp_path: Path) -> None:
    """resources.ranks (or gpu > 1): the trial runs accelerate launch on that many processes and
    relays their validation records to Tune; on CPUs, two ranks on gloo."""
    space = write_space(
        tmp_path / "ranks.yaml",
        search="grid",
        scheduler={"type": "none"},
        resources={"cpu": 2, "ranks": 2},
        fixed={"optim.epochs": 2, "data.workers": 0, "data.batch_size": 4},
        params={"optim.lr": {"grid": [2e-3]}},
    )
    result = run_sweep(space, tmp_path / "sweeps", "ranks", f"data.shards={chexpert_shards}")
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    (row,) = results(tmp_path / "sweeps", "ranks")
    assert row["status"] == "finished" and row["epochs"] == "2"
    run_dir = Path(row["run_dir"])
    one_rank = load_config(DEMO, [f"data.shards={chexpert_shards}", "data.batch_size=4"])
    manifest = json.loads((chexpert_shards / "manifest.json").read_text())
    steps = records(run_dir, "val")[0]["step"]
    per_rank = manifest["splits"]["train"]["samples"] // (2 * one_rank.data.batch_size)
    assert steps <= per_rank, "two ranks split each epoch"
    assert "launcher.log" in {p.name for p in run_dir.iterdir()}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"params": {"optim.lrate": {"loguniform": [1e-4, 1e-2]}}},
            "'optim.lrate' is not a trainer config key",
        ),
        ({"params": {"optim.lr": {"loguniform": [1e-2, 1e-4]}}}, "expected [low, high] with low < high"),
        ({"params": {"optim.lr": {"lognormal": [1, 2]}}}, "unknown kind 'lognormal'"),
        ({"params": {"optim.lr": {"grid": [1e-3]}}}, "a grid param needs search: grid"),
        ({"search": "random", "params": {"optim.lr": {"choice": [1e-3]}}}, "search: 'random' is not one of"),
        ({"params": {"model.freeze": {"choice": ["full", "bogus"]}}}, "model.freeze = 'bogus'"),
        ({"params": {}}, "params: expected a mapping"),
        ({"trails": 3, "params": {"optim.lr": {"choice": [1e-3]}}}, "unknown key 'trails'"),
    ],
)
def test_bad_space_is_one_line(chexpert_shards: Path, tmp_path: Path, fields: dict, message: str) -> None:
    space = write_space(tmp_path / "bad.yaml", **fields)
    result = run_sweep(space, tmp_path, "bad", f"data.shards={chexpert_shards}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "bad").exists(), "nothing written"


def test_shipped_spaces_pass_the_sweeps_own_checks(chexpert_shards: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shipped space (the GPU ones included) through `check_space`, as `python -m sweeps.run`
    does before starting Ray: its config files exist and every listed value and range bound of
    every parameter passes the trainer's validation on each of them."""
    monkeypatch.chdir(ROOT)  # spaces name their configs from the checkout (trainer/configs/...)
    spaces = sorted((ROOT / "sweeps" / "spaces").glob("*.yaml"))
    assert len(spaces) >= 5
    for path in spaces:
        space = load_space(path)
        assert space.params
        fixed = [f"{key}={json.dumps(value)}" for key, value in space.fixed.items()]
        assert check_space(space, [*fixed, f"data.shards={chexpert_shards}"]) >= 1, path
        if space.tune is not None:  # a study's tuning stage: every search's trials, both bounds
            study_tuning.check(space, [*fixed, f"data.shards={chexpert_shards}"])
    assert sum(load_space(path).tune is not None for path in spaces) >= 2
    with pytest.raises(SpaceError, match="no such file"):
        load_space(ROOT / "sweeps" / "spaces" / "missing.yaml")
