"""A real one-node SLURM on loopback for the launch tests: munged, slurmctld and slurmd from
Debian's `slurm-wlm` and `munge`, each on its own socket/ports under one folder, so a system
SLURM (if any) is left alone. Needs root (slurmd starts jobs as the submitting user).

    cluster = LocalSlurm(tmp_dir); cluster.start(); job = cluster.sbatch([...]); cluster.stop()

Also usable by hand: `python -m tests.slurm_cluster DIR` starts one and prints the environment
to export (SLURM_CONF), then waits for Ctrl-C or SIGTERM and stops the daemons.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


@dataclass
class Job:
    job_id: int
    output: Path


@dataclass
class LocalSlurm:
    """`namespaces=0`: this host as the one node, on loopback. `namespaces=N`: N nodes n1..nN,
    each slurmd in its own network namespace (10.77.S.i on a private bridge, the controller at
    .254, S from the tag so that two clusters on one machine do not share a subnet), so a job's
    tasks on different nodes talk over a real network path with their own addresses (slurmd
    starts under nsenter, not `ip netns exec`, which remounts /sys and leaves it without
    cgroups)."""

    root: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: list[subprocess.Popen] = field(default_factory=list)
    namespaces: int = 0
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000:04d}")
    network_up: bool = False

    @property
    def nodes(self) -> list[tuple[str, str]]:
        """(node name, address) of every node."""
        if not self.namespaces:
            return [(self.node, "127.0.0.1")]
        return [(f"n{i}", f"{self.subnet}.{i}") for i in range(1, self.namespaces + 1)]

    @property
    def subnet(self) -> str:
        return f"10.77.{int(self.tag) % 250}"

    def _netns(self, i: int) -> str:
        return f"cxr{self.tag}h{i}"

    def _network(self) -> None:
        """A bridge with the controller's address and one veth into each node's namespace."""
        bridge = f"cxr{self.tag}br"
        commands = [
            ["ip", "link", "add", bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{self.subnet}.254/24", "dev", bridge],
            ["ip", "link", "set", bridge, "up"],
        ]
        for i in range(1, self.namespaces + 1):
            ns, host_end, ns_end = self._netns(i), f"cxr{self.tag}v{i}", f"cxr{self.tag}p{i}"
            commands += [
                ["ip", "netns", "add", ns],
                ["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end],
                ["ip", "link", "set", ns_end, "netns", ns],
                ["ip", "link", "set", host_end, "master", bridge, "up"],
                ["ip", "-n", ns, "addr", "add", f"{self.subnet}.{i}/24", "dev", ns_end],
                ["ip", "-n", ns, "link", "set", ns_end, "up"],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
            ]
        self.network_up = True
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)

    def _network_down(self) -> None:
        for i in range(1, self.namespaces + 1):
            subprocess.run(["ip", "netns", "del", self._netns(i)], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", f"cxr{self.tag}br"], capture_output=True, check=False)
        self.network_up = False

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return os.environ | {"SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        cpus = max(2, os.cpu_count() or 2)
        memory = max(8192, _memory_mb() - 1024)  # the tests ask for --mem=8G
        lines = [
            "ClusterName=cxrbench-test",
            f"SlurmctldHost={self.node}({f'{self.subnet}.254' if self.namespaces else '127.0.0.1'})",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"AuthInfo=socket={self.root / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` (no accounting here)
            "KillWait=10",
            "SchedulerParameters=sched_interval=1",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            *(
                f"NodeName={name} NodeAddr={address} CPUs={cpus} RealMemory={memory} State=UNKNOWN"
                for name, address in self.nodes
            ),
            f"PartitionName=debug Nodes={','.join(name for name, _ in self.nodes)} Default=YES "
            "MaxTime=INFINITE State=UP",
        ]
        for name, _ in self.nodes:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> None:
        """Write the config, start the three daemons and wait until the node is idle."""
        self.write_config()
        munge = self.root / "munge"
        key = munge / "munge.key"
        if not key.exists():
            subprocess.run(
                [_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True
            )
        key.chmod(0o600)
        self._spawn(
            [
                _binary("munged"),
                "--foreground",
                "--force",
                f"--socket={munge / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            "munged",
        )
        self._wait((munge / "munge.socket").exists, 20, "munged did not open its socket")
        self._spawn([_binary("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)], "slurmctld")
        if self.namespaces:
            self._network()
        for i, (name, _) in enumerate(self.nodes, 1):
            enter = ["nsenter", f"--net=/var/run/netns/{self._netns(i)}"] if self.namespaces else []
            self._spawn([*enter, _binary("slurmd"), "-D", "-f", str(self.conf), "-N", name], f"slurmd-{name}")
        self._wait(self.node_idle, timeout, "the SLURM node did not become idle")

    def _spawn(self, argv: list[str], name: str) -> None:
        log = (self.root / "log" / f"{name}.stdout").open("w")
        self.processes.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        )

    def _wait(self, predicate, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for process in self.processes:
                if process.poll() is not None:
                    name = Path(process.args[0]).name
                    raise RuntimeError(
                        f"{message}: {name} exited {process.returncode}; logs in {self.root / 'log'}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{message} within {timeout:.0f} s; logs in {self.root / 'log'}")
            time.sleep(0.3)

    def node_idle(self) -> bool:
        """Every node idle."""
        result = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env, check=False
        )
        states = result.stdout.split()
        return result.returncode == 0 and len(states) == len(self.nodes) and all(s == "idle" for s in states)

    def stop(self) -> None:
        """Cancel what is left, stop the daemons by PID, and any job process they left behind."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["scancel", "--user", "root", "--full"],
                env=self.env,
                timeout=10,
                capture_output=True,
                check=False,
            )
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self.processes.clear()
        if self.network_up:
            self._network_down()

    # --- jobs ---------------------------------------------------------------------------------

    def sbatch(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Job:
        """Submit; `argv` is what follows `sbatch` (options, then the script)."""
        output = self.root / "jobs" / f"job-{time.monotonic_ns()}.out"
        output.parent.mkdir(exist_ok=True)
        result = subprocess.run(
            ["sbatch", "--parsable", f"--output={output}", *argv],
            capture_output=True,
            text=True,
            env=self.env | (env or {}),
            cwd=cwd,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return Job(int(result.stdout.strip().split(";")[0]), output)

    def show(self, job: Job) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        result = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", str(job.job_id)],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
        )
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait(
        self,
        job: Job,
        timeout: float = 600,
        states: tuple[str, ...] = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
        ),
    ) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.show(job)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job.job_id} still {info.get('JobState')} after {timeout:.0f} s:\n"
                    + self.log(job)[-3000:]
                )
            time.sleep(0.5)

    def signal(self, job: Job, name: str = "USR1") -> None:
        """What SLURM does at `--signal=USR1@grace`: signal the job's steps (not the batch shell)."""
        subprocess.run(
            ["scancel", f"--signal={name}", str(job.job_id)], env=self.env, check=True, capture_output=True
        )

    @staticmethod
    def log(job: Job) -> str:
        return job.output.read_text(errors="replace") if job.output.exists() else "(no output yet)"


def main() -> None:  # pragma: no cover - a manual aid
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on kill, too
    cluster = LocalSlurm(Path(sys.argv[1]).resolve())
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()


if __name__ == "__main__":
    main()
