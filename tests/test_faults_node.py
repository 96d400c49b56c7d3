"""A node lost mid-run, a frozen peer, and a requeue loop, on the real local SLURM (two nodes in
their own network namespaces, tests/slurm_cluster.py) with CPU ranks on gloo.

What is injected and how: SIGKILL to every process of node 2's job step (the launcher and its
ranks; SLURM's own slurmd/slurmstepd stay, as on a node whose processes were OOM-killed or whose
GPU fell off the bus), SIGSTOP to one rank (a frozen peer: its sockets stay open, so only the
collective timeout can end the wait), and SIGUSR1 again and again (preemption) under MAX_REQUEUES=1.
Nothing is mocked; the decision table of `cxr_after_training` is also run directly, through bash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.slurm_cluster import Job, LocalSlurm
from tests.test_launch import CPU_ALLOCATION, DEMO, EXTRA, LAUNCH, ROOT, _stepd_alive, job_env, wait_for_state
from tests.trainer_helpers import assert_same_evaluations, kill_group, records, start, wait_for

pytestmark = pytest.mark.slow

TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gres=none", "--cpus-per-task=1", "--mem=4G"]
# 4 ranks share ~70 training images: 3 optimizer steps per epoch, a checkpoint every 2 steps (and at
# each epoch end: steps 2, 3, 4, 6, 8, 9).
NODE_EXTRA = f"{EXTRA} data.workers=0 run.checkpoint_every=2"
COLLECTIVE_TIMEOUT = 30


def release(cluster: LocalSlurm, job: Job) -> None:
    """A requeued job waits ~2 minutes (BeginTime) before SLURM starts it again: start it now,
    once the old attempt's processes are gone (as test_launch does; the scripts are unchanged)."""
    wait_for(lambda: cluster.node_idle() and not _stepd_alive(job), timeout=120)
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"],
                   env=cluster.env, check=True, capture_output=True)


def step_processes(cluster: LocalSlurm, node: int, job: Job) -> list[int]:
    """PIDs of the job's own processes on node `node` (its network namespace), SLURM's excluded."""
    listed = subprocess.run(["ip", "netns", "pids", cluster._netns(node)],
                            capture_output=True, text=True, check=True).stdout.split()
    found = []
    for pid in map(int, listed):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone already
        if comm not in ("slurmd", "slurmstepd") and f"SLURM_JOB_ID={job.job_id}".encode() in environ:
            found.append(pid)
    return found


@pytest.fixture(scope="module")
def two_node_reference(two_nodes: LocalSlurm, chexpert_shards: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("node-reference") / "run"
    job = two_nodes.sbatch([*TWO_NODES, str(LAUNCH / "multinode.sh")],
                           env=job_env(DEMO, run_dir, chexpert_shards, NODE_EXTRA), cwd=ROOT)
    info = two_nodes.wait(job, timeout=420)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), LocalSlurm.log(job)[-4000:]
    return run_dir


def test_node_killed_mid_run_is_requeued_and_resumes_to_the_uninterrupted_result(
        two_nodes: LocalSlurm, two_node_reference: Path, chexpert_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = job_env(DEMO, run_dir, chexpert_shards, NODE_EXTRA) | {
        "COLLECTIVE_TIMEOUT": str(COLLECTIVE_TIMEOUT)}
    job = two_nodes.sbatch([*TWO_NODES, str(LAUNCH / "multinode.sh")], env=env, cwd=ROOT)
    # Mid-epoch 2 (step 5 logged), after the checkpoint at step 4.
    wait_for(lambda: len(records(run_dir, "train", running=True)) >= 5, timeout=300)
    victims = step_processes(two_nodes, 2, job)
    assert victims, "node 2 runs the job's processes"
    last_step = max(line["step"] for line in records(run_dir, "train", running=True))
    killed = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    requeued = wait_for_state(two_nodes, job, lambda s: s.get("JobState") != "RUNNING", timeout=240)
    detected = time.monotonic() - killed
    assert requeued.get("Restarts") == "1", LocalSlurm.log(job)[-4000:]
    if requeued["JobState"] == "PENDING":
        release(two_nodes, job)
    info = two_nodes.wait(job, timeout=420)
    log = LocalSlurm.log(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert "a node or process of the job was lost" in log and "requeueing job" in log
    resumed_at = int(log.split(f"resumed from {run_dir / 'checkpoints'}/step-")[1][:8])
    print(f"\nnode loss: job left RUNNING {detected:.1f} s after the kill (COLLECTIVE_TIMEOUT="
          f"{COLLECTIVE_TIMEOUT}); last step logged {last_step}, resumed from step {resumed_at}: "
          f"{last_step - resumed_at} steps trained again")
    assert detected < COLLECTIVE_TIMEOUT + 30, "the job ended within the bound the scripts set"
    assert 0 <= last_step - resumed_at <= 2, "lost at most the steps since the last checkpoint (every 2)"
    assert_same_evaluations(run_dir, two_node_reference)
    steps = [line["step"] for line in records(run_dir, "train")]
    assert steps == sorted(set(steps)), "no training step logged twice"
    assert steps == [line["step"] for line in records(two_node_reference, "train")]


def test_requeue_loop_stops_after_max_requeues(slurm: LocalSlurm, chexpert_shards: Path,
                                               tmp_path: Path) -> None:
    """Preempted, requeued once (MAX_REQUEUES=1), preempted again: the job stops with a line."""
    run_dir = tmp_path / "run"
    env = job_env(DEMO, run_dir, chexpert_shards, EXTRA + " optim.epochs=6") | {"MAX_REQUEUES": "1"}
    job = slurm.sbatch([*CPU_ALLOCATION, str(LAUNCH / "h100_8gpu.sh")], env=env, cwd=ROOT)
    for attempt in range(2):
        seen = len(records(run_dir, "train", running=True))
        wait_for(lambda seen=seen: len(records(run_dir, "train", running=True)) >= seen + 2, timeout=300)
        slurm.signal(job, "USR1")
        if attempt == 0:
            pending = wait_for_state(slurm, job,
                                     lambda s: s.get("Restarts") == "1" and s["JobState"] != "RUNNING")
            if pending["JobState"] == "PENDING":
                release(slurm, job)
            wait_for_state(slurm, job, lambda s: s["JobState"] == "RUNNING")
    info = slurm.wait(job, timeout=300)
    log = LocalSlurm.log(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "1"), log[-3000:]
    assert "NOT requeued: job" in log and "(MAX_REQUEUES=1)" in log
    assert (run_dir / "preempted.json").is_file(), "the last checkpoint is there to resume by hand"


def test_a_frozen_peer_fails_the_run_within_the_collective_timeout(
        chexpert_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One rank stopped (SIGSTOP: alive, sockets open, silent): the other's next collective fails
    after run.collective_timeout, it records "peer-lost" for the job script, and the launch ends."""
    timeout = 15
    failures = tmp_path / "failures"
    failures.mkdir()
    monkeypatch.setenv("CXR_FAILURE_DIR", str(failures))
    run_dir = tmp_path / "run"
    rank1: list[psutil.Process] = []
    launcher = start(DEMO, [f"run.dir={run_dir}", f"data.shards={chexpert_shards}",
                            f"run.collective_timeout={timeout}", *EXTRA.split()], processes=2)
    try:
        wait_for(lambda: len(records(run_dir, "train", running=True)) >= 2 or launcher.poll() is not None,
                 timeout=240)
        rank1 = processes_of_rank(launcher.pid, "1")  # the rank and its loader worker
        assert rank1 and launcher.poll() is None
        for process in rank1:
            process.suspend()  # SIGSTOP
        frozen = time.monotonic()
        wait_for((failures / "rank-0.json").is_file, timeout=timeout + 60)
        detected = time.monotonic() - frozen
        output, _ = launcher.communicate(timeout=120)
    finally:
        for process in rank1:  # stopped: if the launcher left it behind, it would stay forever
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if launcher.poll() is None:
            kill_group(launcher)
    record = json.loads((failures / "rank-0.json").read_text())
    print(f"\nfrozen peer: rank 0 failed {detected:.1f} s after rank 1 froze "
          f"(run.collective_timeout={timeout})")
    assert record["kind"] == "peer-lost", record
    assert timeout - 2 <= detected <= timeout + 30, detected
    assert launcher.returncode != 0 and "lost contact with another rank" in output


def processes_of_rank(launcher: int, rank: str) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(launcher).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if process.environ().get("RANK") == rank:
                found.append(process)
    return found


@pytest.mark.parametrize(("status", "record", "requeued"), [
    (143, None, True),          # a node's tasks killed, srun ended the rest: lost node
    (1, "peer-lost", True),     # a survivor saw its peer vanish before srun ended it
    (143, "error", False),      # a rank crashed, srun ended the rest (--kill-on-bad-exit): no requeue
    (1, "error", False),        # a crash, a bad config, a full disk
    (1, None, False),           # nothing recorded, no signal: not known to be a lost node
])
def test_after_training_tells_a_lost_node_from_a_failed_run(tmp_path: Path, status: int, record: str | None,
                                                            requeued: bool) -> None:
    """launch/common.sh's decision, run by bash on the markers trainer/failures.py writes (outside
    SLURM: a requeue prints how to resume instead of calling scontrol)."""
    failures = tmp_path / "failures"
    failures.mkdir()
    if record:
        (failures / "rank-3.json").write_text(json.dumps(
            {"kind": record, "rank": 3, "host": "n2", "error": "RuntimeError: boom"}, indent=2) + "\n")
    stamp = tmp_path / "stamp"
    stamp.touch()
    script = (f'source {LAUNCH / "common.sh"}; RUN_DIR={tmp_path}; CXR_STAMP={stamp}; '
              f'CXR_FAILURE_DIR={failures}; cxr_after_training {status}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30,
                            check=False)
    output = result.stdout + result.stderr
    if requeued:
        assert result.returncode == 75 and "was lost" in output and "resume with RUN_DIR" in output, output
    else:
        assert (result.returncode == status and "not requeued" in output) or "see the log above" in output
        assert result.returncode == status and "lost" not in output, output
        if record == "error":
            assert "RuntimeError: boom" in output
