"""Running the real trainer from tests: plain python (one process) or accelerate launch (two, gloo)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from trainer import rundir

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "trainer" / "run.py")
DEMO = str(ROOT / "trainer" / "configs" / "demo_cpu.yaml")
DEMO_VIT = str(ROOT / "trainer" / "configs" / "demo_cpu_vit.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(config: str, overrides: list[str], processes: int,
            accelerate_config: str | None = None) -> list[str]:
    if processes == 1:
        return [sys.executable, RUN, "--config", config, *overrides]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    mode = ["--config_file", accelerate_config] if accelerate_config else ["--multi_gpu"]
    return [accelerate, "launch", *mode, "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            RUN, "--config", config, *overrides]


def environment(deepspeed: bool = False) -> dict[str, str]:
    # ACCELERATE_USE_CPU: `--cpu` alone would silently run one process, whatever the count; it
    # would also silently turn DeepSpeed off, which finds the CPU by itself.
    # DeepSpeed on the CPU on purpose says so (CXR_EXPECT_GPUS=0, as launch/node.sh does for
    # GPUS_PER_NODE=0): otherwise a DeepSpeed launch expects GPUs and stops where there are none.
    extra = {"CXR_EXPECT_GPUS": "0"} if deepspeed else {"ACCELERATE_USE_CPU": "1"}
    return os.environ | extra | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train(config: str, overrides: list[str], processes: int = 1, timeout: int = 600,
          accelerate_config: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(config, overrides, processes, accelerate_config), capture_output=True,
                          text=True, timeout=timeout, env=environment(accelerate_config is not None),
                          cwd=ROOT, check=False)


def start(config: str, overrides: list[str], processes: int = 1) -> subprocess.Popen:
    """A run in its own process group, so a test can signal or kill all of it."""
    return subprocess.Popen(command(config, overrides, processes), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=environment(), cwd=ROOT,
                            start_new_session=True)


def wait_for(predicate, timeout: float = 300, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(poll)


def kill_group(process: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    """Signal the run and every descendant: torch's elastic launcher starts its workers in their
    own process groups, so killing the launcher's group alone would leave orphans training on."""
    family = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    process.wait(timeout=60)
    psutil.wait_procs([p for p in map(_process, family) if p is not None], timeout=60)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def records(run_dir: Path, split: str | None = None, running: bool = False) -> list[dict]:
    """The run's metrics records (of one split). A finished run's file must read strictly; one
    still `running` may not exist yet or end in a line being written."""
    lines = rundir.read_records(run_dir, tolerant=running)
    return [line for line in lines if split is None or line["split"] == split]


def best_val(run_dir: Path) -> float:
    return max(line["auroc_macro"] for line in records(run_dir, "val"))


def assert_same_evaluations(resumed: Path, straight: Path) -> None:
    """A resumed run evaluated at the same steps, with the same AUROCs, as the uninterrupted one."""
    for split in ("val", "test"):
        expected, got = records(straight, split), records(resumed, split)
        assert [line["step"] for line in got] == [line["step"] for line in expected]
        for a, b in zip(got, expected, strict=True):
            assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-5)
