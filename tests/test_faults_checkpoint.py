"""Faults at cluster scale, checkpoint side, end to end: a damaged checkpoint and a disk that fills,
through the real trainer (one process, or two gloo ranks under accelerate launch) and through the
real local SLURM (`sbatch launch/h100_8gpu.sh`, GPUS_PER_NODE=0: two ranks on gloo). The full
disk is a real tmpfs mounted as the run directory (root needed, as for SLURM), remounted larger
to free space. Nothing is mocked. Each test prints the figures the docs quote (time to detect,
steps lost); `pytest -s` shows them."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.slurm_cluster import Job, LocalSlurm
from tests.test_checkpoint import fill, tmpfs
from tests.test_launch import CPU_ALLOCATION, EXTRA, LAUNCH, job_env
from tests.trainer_helpers import DEMO, ROOT, kill_group, records, start, train, wait_for
from trainer import rundir

pytestmark = pytest.mark.slow
TRACEBACK_FROM_US = f'File "{ROOT / "trainer"}'
"""A frame of our code in the log: a traceback where one line was promised. (accelerate launch
prints its own traceback for any failed rank, preemption included: that one is not ours.)"""
FULL = "error: no space left on device writing "


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` → (size, mtime_ns): to show that nothing was written."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_unusable_checkpoints_stop_before_anything_is_written_and_restart_sets_them_aside(
        chexpert_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"data.shards={chexpert_shards}", f"run.dir={run_dir}", "data.batch_size=4",
                 "data.workers=0", "run.log_every=1", "optim.warmup_epochs=0", "run.resume=auto"]
    first = train(DEMO, [*overrides, "optim.epochs=2"], timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    older, newer = (run_dir / "checkpoints" / name for name in step_dirs(run_dir))
    with (newer / "model.safetensors").open("r+b") as handle:
        handle.truncate(4096)
    (older / "train_state.json").unlink()
    before = snapshot(run_dir)

    refused = train(DEMO, [*overrides, "optim.epochs=2"], timeout=120)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: run.resume=auto: none of the 2 checkpoint(s) in {run_dir / 'checkpoints'} "
                      "is usable (each one is skipped above); run.resume=restart trains from scratch here, "
                      f"moving them into {run_dir / 'set-aside'}/ (nothing is deleted), or run.resume=PATH "
                      "continues from a checkpoint of your choice"]
    size = before[str(newer.relative_to(run_dir) / "model.safetensors")][0]
    with (newer / "complete.json").open() as handle:
        listed = json.load(handle)["files"]["model.safetensors"]
    skipped = [line for line in refused.stderr.splitlines() if " skipped: " in line]
    assert skipped == [
        f"WARNING trainer: checkpoint {newer} skipped: model.safetensors is {size} bytes, complete.json says "
        f"{listed}",
        f"WARNING trainer: checkpoint {older} skipped: train_state.json missing (complete.json lists it)"]
    assert snapshot(run_dir) == before, "nothing written, not even config.yaml"
    assert TRACEBACK_FROM_US not in refused.stderr

    again = train(DEMO, [*overrides[:-1], "run.resume=restart", "optim.epochs=1"], timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    moved = re.search(r"the earlier attempt's files are in (\S+); training from scratch", again.stdout)
    assert moved, again.stdout
    aside = Path(moved.group(1))
    assert aside.parent == run_dir / "set-aside"
    assert (aside / "checkpoints" / newer.name / "model.safetensors").stat().st_size == 4096, "kept as found"
    assert (aside / rundir.METRICS).is_file() and (aside / "best" / "model.safetensors").is_file()
    train_steps = [r["step"] for r in records(run_dir, "train")]
    assert train_steps == list(range(1, len(train_steps) + 1)), "a fresh log from step 1"
    assert len(records(run_dir, "val")) == 1 and records(run_dir, "test")
    assert "resumed from" not in again.stdout


def test_disk_filling_mid_epoch_stops_both_ranks_in_one_line_and_a_resubmission_finishes(
        chexpert_shards: Path, tmp_path: Path) -> None:
    """The disk fills while the ranks train (metrics, TensorBoard, predictions or a checkpoint:
    whichever write comes first): both ranks stop within seconds, one line, no traceback of ours,
    no hang; with space freed, run.resume=auto finishes the run with a clean log."""
    with tmpfs(tmp_path / "disk", "300M") as disk:
        run_dir = disk / "run"
        overrides = [f"data.shards={chexpert_shards}", f"run.dir={run_dir}", "data.batch_size=4",
                     "data.workers=1", "run.log_every=1", "optim.warmup_epochs=0", "optim.epochs=2",
                     "run.resume=auto"]
        process = start(DEMO, overrides, processes=2)
        try:
            wait_for(lambda: len(records(run_dir, "train", running=True)) >= 2 or process.poll() is not None,
                     timeout=180)
            fill(disk)
            filled = time.monotonic()
            output, _ = process.communicate(timeout=120)
            detected = time.monotonic() - filled
        finally:
            if process.poll() is None:
                kill_group(process)
        assert process.returncode != 0
        lines = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(FULL), output[-3000:]
        assert TRACEBACK_FROM_US not in output and "Exception in thread" not in output, output[-3000:]
        assert not (run_dir / rundir.PREEMPTED).exists(), "a full disk is not a preemption"
        assert not list(run_dir.glob("checkpoints/.tmp-*")), "the half-written checkpoint is removed"
        stopped_at = max(r["step"] for r in records(run_dir, "train", running=True))
        (disk / "filler").unlink()
        resumed = train(DEMO, overrides, processes=2, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        steps = [r["step"] for r in records(run_dir, "train")]
        assert steps == list(range(1, len(steps) + 1)), "no step logged twice, none missing"
        assert len(records(run_dir, "val")) == 2 and records(run_dir, "test")
        print(f"\n[figures] disk filled mid-epoch: stopped {detected:.1f} s after the disk was full, at step "
              f"{stopped_at}; {lines[0]}")


# --- through SLURM ---------------------------------------------------------------------------------


def submit(slurm: LocalSlurm, run_dir: Path, shards: Path, extra: str) -> Job:
    return slurm.sbatch([*CPU_ALLOCATION, str(LAUNCH / "h100_8gpu.sh")],
                        env=job_env(DEMO, run_dir, shards, extra), cwd=ROOT)


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def watch(slurm: LocalSlurm, job: Job, marker: str, timeout: float = 300) -> tuple[dict, float | None]:
    """Wait for the job to end; also when `marker` first appeared in its log, to the poll's 0.2 s."""
    seen: float | None = None
    deadline = time.monotonic() + timeout
    while True:
        info = slurm.show(job)
        if seen is None and marker in LocalSlurm.log(job):
            seen = time.monotonic()
        if info.get("JobState") in ENDED:
            return info, (time.monotonic() - seen) if seen is not None else None
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still {info.get('JobState')}:\n"
                               f"{LocalSlurm.log(job)[-3000:]}")
        time.sleep(0.2)


def loadable(checkpoint: Path) -> None:
    """The tensors of a checkpoint read back (safetensors; the optimizer tensors-only)."""
    assert load_file(str(checkpoint / "model.safetensors"))
    assert torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]


# Measured (2 ranks, resnet10t, 5 labels): a checkpoint is 59.2 MB (weights 19.7, AdamW moments 39.4,
# RNG states 2 × 14 kB), best/ 19.7 MB. 110 MiB holds config, logs, best/, the first checkpoint and
# room to swap best/ once; the second checkpoint does not fit.
SMALL, LARGE = "110M", "400M"


def test_disk_full_during_a_checkpoint_fails_once_without_requeue_then_resumes(
        slurm: LocalSlurm, chexpert_shards: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "run", SMALL) as run_dir:
        job = submit(slurm, run_dir, chexpert_shards, EXTRA)
        info, detect = watch(slurm, job, FULL)
        log = LocalSlurm.log(job)
        assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), log[-4000:]
        lines = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(FULL), log[-4000:]
        kept = step_dirs(run_dir)
        assert len(kept) == 1 and kept[0].startswith("step-"), f"the first checkpoint only, no temp: {kept}"
        first = int(kept[0][5:])
        failed = int(re.search(r"\.tmp-step-(\d{8})", lines[0]).group(1))
        continues = run_dir / "checkpoints" / kept[0]
        assert f"the run stopped at step {failed} and continues from {continues} (step {first})" in lines[0]
        assert TRACEBACK_FROM_US not in log and "Exception in thread" not in log
        assert not (run_dir / rundir.PREEMPTED).exists() and "requeueing" not in log
        loadable(run_dir / "checkpoints" / kept[0])
        assert load_file(str(run_dir / "best" / "model.safetensors"))
        last_logged = max(r["step"] for r in records(run_dir, "train", running=True))

        subprocess.run(["mount", "-o", f"remount,size={LARGE}", str(run_dir)], check=True, timeout=30)
        again = submit(slurm, run_dir, chexpert_shards, EXTRA)
        info = slurm.wait(again, timeout=300)
        log = LocalSlurm.log(again)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
        assert f"resumed from {run_dir / 'checkpoints' / kept[0]} (step {first}, epoch 1)" in log
        steps = [r["step"] for r in records(run_dir, "train")]
        assert steps == list(range(1, len(steps) + 1)) and len(records(run_dir, "val")) == 3
        print(f"\n[figures] disk full during the checkpoint of step {failed}: job FAILED, Restarts=0, "
              f"{detect:.1f} s from the line to the job's end; resumed from step {first}: "
              f"{last_logged - first} steps lost")


def test_truncated_newest_checkpoint_resubmission_resumes_from_the_older_one(
        slurm: LocalSlurm, chexpert_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    extra = EXTRA.replace("optim.epochs=3", "optim.epochs=2")
    job = submit(slurm, run_dir, chexpert_shards, extra)
    info = slurm.wait(job, timeout=300)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), LocalSlurm.log(job)[-4000:]
    older, newer = (run_dir / "checkpoints" / name for name in step_dirs(run_dir))
    size = (newer / "model.safetensors").stat().st_size
    with (newer / "model.safetensors").open("r+b") as handle:  # a copy cut short
        handle.truncate(size // 2)
    step = int(older.name[5:])

    again = submit(slurm, run_dir, chexpert_shards, extra)
    info = slurm.wait(again, timeout=300)
    log = LocalSlurm.log(again)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    warnings = [line for line in log.splitlines() if " skipped: " in line]
    assert warnings == [f"WARNING trainer: checkpoint {newer} skipped: model.safetensors is {size // 2} "
                        f"bytes, complete.json says {size}"], log[-4000:]
    assert f"resumed from {older} (step {step}, epoch 1)" in log
    assert [r["step"] for r in records(run_dir, "val")] == [step, int(newer.name[5:])]
    loadable(newer)  # written again by the resumed run
    print(f"\n[figures] truncated newest checkpoint: passed over with one warning; resumed from step {step}: "
          f"{int(newer.name[5:]) - step} steps redone")

