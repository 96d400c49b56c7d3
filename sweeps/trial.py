"""One sweep trial: the trainer's own code path, reporting each epoch's validation metrics to Tune.

One rank (the usual case, ≤ 1 GPU per trial): `trainer.engine.train(cfg, report=...)` runs inside
the Tune worker. Several ranks (a trial given G > 1 GPUs, or `ranks: 2` on CPUs): the trial starts
`accelerate launch` on its reserved devices (Ray sets CUDA_VISIBLE_DEVICES) and relays the
validation records the ranks append to `metrics.jsonl` — the same trainer, the same run
directory, with Tune's early stopping ending the launcher's whole process tree.

Each trial trains in `<storage>/<sweep>/trials/<trial name>/` (config.yaml, metrics.jsonl,
TensorBoard in tb/, checkpoints). Tune's own checkpoint is a pointer to that directory, so a
restored trial (Tuner.restore after an interruption) resumes from the trainer's latest checkpoint
(run.resume=auto) instead of starting over.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shards.atomic import write_json
from trainer import rundir
from trainer.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
REPORTED = ("auroc_macro", "auroc_chexpert5", "accuracy", "f1", "sensitivity", "specificity", "loss")


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (sent once to the workers with tune.with_parameters)."""

    base: str | None
    overrides: tuple[str, ...]
    trials_dir: str
    metric: str
    cwd: str
    ranks: int = 1
    cpus: int = 1


def trial_overrides(params: dict) -> tuple[str | None, list[str]]:
    """A sampled config → (base config file if sampled, dotted overrides as YAML text)."""
    base = params.get("config")
    return base, [f"{key}={json.dumps(value)}" for key, value in sorted(params.items()) if key != "config"]


def run_trial(params: dict, setup: TrialSetup) -> None:
    from ray import tune  # noqa: PLC0415 - only ever called inside a Tune worker

    os.chdir(setup.cwd)  # Tune starts trials in their own folder; the config's paths are the user's
    context = tune.get_context()
    run_dir = Path(setup.trials_dir) / context.get_trial_name()
    sampled_base, sampled = trial_overrides(params)
    # First the trial's identity: a trial that fails from here on still has its row in the results.
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "trial.json", {"trial_id": context.get_trial_id(), "params": params})
    # Trials select on val; the test split is for the final run of best.yaml, not for the search.
    overrides = [*setup.overrides, *sampled, f"run.dir={run_dir}", "run.resume=auto", "run.test_at_end=false"]
    cfg = load_config(sampled_base or setup.base, overrides)
    _train(cfg, run_dir, setup)


def run_cell(params: dict, setup: TrialSetup) -> None:
    """One run of a study (sweeps.study): a named grid cell and seed, trained to the end, selected on
    val and tested once; its run directory is `<runs>/<cell>-seed<k>/`, whichever Tune trial runs it."""
    from ray import tune  # noqa: PLC0415

    os.chdir(setup.cwd)
    cell = params["cell"]
    run_dir = Path(setup.trials_dir) / cell["run"]
    overrides = [*setup.overrides, *cell["overrides"], f"run.seed={cell['seed']}", f"run.dir={run_dir}",
                 "run.resume=auto", "run.test_at_end=true"]
    cfg = load_config(cell["base"], overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "trial.json", {"trial_id": tune.get_context().get_trial_id(), "params": cell})
    _train(cfg, run_dir, setup)


def _train(cfg: Config, run_dir: Path, setup: TrialSetup) -> None:
    if setup.ranks > 1:
        _run_ranks(cfg, run_dir, setup)
        return
    import torch  # noqa: PLC0415

    torch.set_num_threads(max(1, setup.cpus))
    from trainer.engine import train  # noqa: PLC0415

    train(cfg, report=lambda metrics: _report(metrics, setup.metric, run_dir))


def _report(metrics: dict, metric: str, run_dir: Path) -> None:
    """Scalars for Tune (a missing or NaN metric counts as 0: a diverged trial ranks last) and a
    pointer checkpoint that lets Tune restore the trial's iteration count."""
    from ray import tune  # noqa: PLC0415

    out = {}
    for key in REPORTED:
        value = metrics.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    out[metric] = out.get(metric, 0.0)
    out["step"] = int(metrics.get("step", 0) or 0)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "trial.json").write_text(json.dumps({"run_dir": str(run_dir), "step": out["step"]}))
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(folder))


def _run_ranks(cfg, run_dir: Path, setup: TrialSetup) -> None:
    """Several ranks: accelerate launch in its own session; relay new val records as they land."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "trial-config.yaml"
    cfg.save(config_path)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, setup.cpus // setup.ranks))}
    mode = ["--multi_gpu"]
    if not gpus:
        env["ACCELERATE_USE_CPU"] = "1"  # `--cpu` alone silently runs one process, whatever the count
    command = [
        accelerate,
        "launch",
        *mode,
        "--num_processes",
        str(setup.ranks),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "trainer" / "run.py"),
        "--config",
        str(config_path),
    ]
    log = (run_dir / "launcher.log").open("a")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    seen = _val_records(run_dir)
    try:
        while True:
            done = process.poll() is not None
            records = _val_records(run_dir)
            for record in records[len(seen) :]:
                _report(record, setup.metric, run_dir)
            seen = records
            if done:
                break
            time.sleep(1.0)
        if process.returncode != 0:
            raise RuntimeError(f"trial ranks exited {process.returncode}; see {run_dir / 'launcher.log'}")
    finally:  # stopped early by the scheduler, or failed: no rank may train on
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()


def _val_records(run_dir: Path) -> list[dict]:
    return [r for r in rundir.read_records(run_dir, tolerant=True) if r["split"] == "val"]


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
