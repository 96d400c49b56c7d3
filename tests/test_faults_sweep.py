"""Faults in a sweep on a real local Ray, the real trainer in every trial, `python -m sweeps.run` as
a user runs it: a trial whose worker dies mid-run, a trial that can never run, and the dashboard
a user watches it with. Nothing is mocked.

The crash needs no hook in the trainer: the test kills the trial's Ray worker (SIGKILL, as the
kernel's OOM killer or a segfault would), found by the shard files it has open (its pack is its
own: the other trial reads another). The trial that always fails trains on a pack whose training
shards were overwritten after packing: the trainer's pack check (sha256 against manifest.json)
refuses it on every attempt.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.test_sweeps import sweep_command, write_space
from tests.trainer_helpers import ROOT, kill_group, records, wait_for

pytestmark = pytest.mark.slow


def broken_copy(shards: Path, out: Path) -> Path:
    """The pack with every training shard overwritten by bytes that are no tar: its manifest still
    checks out, so the sweep's config checks pass and the trial fails only when it starts."""
    shutil.copytree(shards, out)
    for shard in out.glob("train-*.tar"):
        shard.write_bytes(b"\x07" * shard.stat().st_size)
    return out


def trial_dirs(trials: Path) -> dict[str, Path]:
    """Run directories by the shards their trial was given (from trial.json, written first)."""
    found = {}
    for run_dir in trials.glob("*") if trials.is_dir() else []:
        try:
            params = json.loads((run_dir / "trial.json").read_text())["params"]
        except (OSError, ValueError, KeyError):
            continue
        found[params["data.shards"]] = run_dir
    return found


def holder(root: psutil.Process, folder: Path) -> psutil.Process | None:
    """The process under `root` that has a file in `folder` open (a trial reading its shards)."""
    for process in root.children(recursive=True):
        try:
            if any(Path(f.path).parent == folder for f in process.open_files()):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def trial_id(run_dir: Path) -> str:
    return json.loads((run_dir / "trial.json").read_text())["trial_id"]


def tune_folder(sweep_dir: Path, trial_id: str) -> Path:
    """Tune's result folder of a trial: `<trainable>_<trial id>_<index>_<params>_<date>`."""
    (folder,) = [p for p in sweep_dir.iterdir() if p.is_dir() and f"_{trial_id}_" in p.name]
    return folder


def test_a_killed_trial_resumes_and_a_broken_one_is_reported(chexpert_shards: Path, tmp_path: Path) -> None:
    broken = broken_copy(chexpert_shards, tmp_path / "broken-shards")
    space = write_space(
        tmp_path / "faults.yaml",
        search="grid",
        scheduler={"type": "none"},
        resources={"cpu": 1},
        fixed={"optim.epochs": 3, "data.workers": 0, "data.batch_size": 4, "run.log_every": 1,
               "data.samples_per_epoch": 48},
        params={"data.shards": {"grid": [str(chexpert_shards), str(broken)]}},
    )
    storage = tmp_path / "sweeps"
    sweep_dir, trials = storage / "faults", storage / "faults" / "trials"
    log = (tmp_path / "sweep.out").open("w+")
    errors = (tmp_path / "sweep.err").open("w+")
    command = sweep_command(space, storage, "faults", "--max-failures", "2", f"data.shards={chexpert_shards}")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=errors, text=True,
                               start_new_session=True)
    try:
        # The good trial's first epoch is done and saved, by the trainer and by Tune: then its
        # worker dies, as an out-of-memory kill would end it.
        def saved() -> bool:
            assert process.poll() is None, "the sweep ended before its trial was killed"
            run_dir = trial_dirs(trials).get(str(chexpert_shards))
            return (run_dir is not None and len(records(run_dir, "val", running=True)) >= 1
                    and any((run_dir / "checkpoints").glob("step-*"))
                    and any(sweep_dir.glob("*/checkpoint_000000")))

        wait_for(saved, timeout=240)
        run_dir = trial_dirs(trials)[str(chexpert_shards)]
        victim: psutil.Process | None = None

        def reading() -> bool:  # between two shards the trial may have none open
            nonlocal victim
            victim = holder(psutil.Process(process.pid), chexpert_shards)
            return victim is not None

        wait_for(reading, timeout=60, poll=0.05)
        assert victim is not None
        before = len(records(run_dir, "val", running=True))
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert before < 3, "killed mid-run: epochs still to train"
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            kill_group(process)
    log.seek(0)
    errors.seek(0)
    stdout, stderr = log.read(), errors.read()

    # Some trials failed but there is a best: a sweep that ran is a success, with a warning.
    assert process.returncode == 0, stderr[-4000:] + stdout[-2000:]
    assert "2 trials, 0 stopped early by ASHA, 1 failed" in stdout, stdout[-2000:]
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: trial ")]
    assert len(warnings) == 1 and "sha256 does not match manifest.json" in warnings[0], stderr[-3000:]

    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["data.shards"] for r in rows] == [str(chexpert_shards), str(broken)], "the failed trial last"
    good, bad = rows
    assert (good["status"], good["epochs"], good["reason"]) == ("finished", "3", "")
    assert bad["status"] == "error" and bad["val_auroc_macro"] == ""
    assert bad["reason"].startswith(f"shards.errors.DataError: {broken}/train-000000.tar: sha256 does not")
    assert str(broken) in bad["reason"]
    assert "| error | shards.errors.DataError: " in (sweep_dir / "results.md").read_text()
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["data"]["shards"] == str(chexpert_shards)

    # The broken trial ran 1 + --max-failures times, every time to the same error.
    bad_tune = tune_folder(sweep_dir, trial_id(Path(bad["run_dir"])))
    text = (bad_tune / "error.txt").read_text()
    assert text.count("Failure # ") == 3
    assert text.count("sha256 does not match manifest.json") >= 3

    # The killed trial was retried once and went on from its checkpoint instead of starting over:
    # every epoch and step appears once (a fresh start would log epoch 0 again), ...
    assert Path(good["run_dir"]) == run_dir
    assert [r["epoch"] for r in records(run_dir, "val")] == [0, 1, 2]
    steps = [r["step"] for r in records(run_dir, "train")]
    assert steps == sorted(set(steps)) and len(steps) == 3 * 48 // 4
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2, "two attempts wrote TensorBoard"
    good_tune = tune_folder(sweep_dir, trial_id(run_dir))
    assert (good_tune / "error.txt").read_text().count("Failure # ") == 1
    # ... and Tune restored its own checkpoint too: its iteration count went on to 3 (restarted
    # without it, Tune would have counted the two remaining epochs as iterations 1 and 2).
    last = json.loads((good_tune / "result.json").read_text().splitlines()[-1])
    assert last["training_iteration"] == 3
    assert last["step"] == steps[-1]


# --- the dashboard ---------------------------------------------------------------------------------


def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def lines_of(process: subprocess.Popen) -> queue.Queue:
    """The process's output lines, read on a thread so that waiting for one can time out."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise TimeoutError(f"no line matching {pattern!r} in {timeout} s: {''.join(seen)[-3000:]}")


def test_dashboard_serves_loopback_only_and_asks_for_the_token(chexpert_shards: Path, tmp_path: Path) -> None:
    """`--dashboard`: bound to 127.0.0.1 (read from the socket table: this test sends nothing to the
    machine's other addresses), the jobs and tasks APIs answer while trials run, but only to a
    client holding Ray's token, which lives where the start-up line says."""
    if importlib.util.find_spec("aiohttp") is None:  # part of the dev extra: missing is a broken install
        pytest.fail("the dashboard needs ray[default] (the dev extra has it): bash launch/setup_env.sh dev")
    space = write_space(
        tmp_path / "watched.yaml",
        search="grid",
        scheduler={"type": "none"},
        resources={"cpu": 1},
        fixed={"optim.epochs": 30, "data.workers": 0, "data.batch_size": 4, "data.samples_per_epoch": 16},
        params={"optim.lr": {"grid": [1e-3]}},
    )
    home = tmp_path / "home"  # Ray keeps its token in ~/.ray/auth_token: a fresh one, not the user's
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(home)}
    shards = f"data.shards={chexpert_shards}"
    command = sweep_command(space, tmp_path / "sweeps", "watched", "--dashboard", shards)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        lines = lines_of(process)
        found = wait_for_line(lines, r"Ray dashboard: http://([^:]+):(\d+) (.*)", timeout=120)
        host, port, access = found.group(1), int(found.group(2)), found.group(3)
        token_file = home / ".ray" / "auth_token"
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token_file.stat().st_mode & 0o777 == 0o600, "readable by its owner only"
        ray = str(Path(sys.executable).with_name("ray"))
        printed = subprocess.run([ray, "get-auth-token"], env=env, text=True, capture_output=True, timeout=60,
                                 check=False)
        assert printed.stdout.strip() == token, printed.stderr[-2000:]

        # Listening on the loopback address only, and by this sweep's Ray.
        family = {p.pid for p in psutil.Process(process.pid).children(recursive=True)} | {process.pid}
        listening = [c for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening
        assert {c.pid for c in listening} <= family
        # ... and the start-up line says so, with the tunnel to it and where the token is.
        assert host == "127.0.0.1", found.group(0)
        assert f"ssh -L {port}:127.0.0.1:{port} " in access and "from ~/.ray/auth_token" in access, access
        assert "'Authorization: Bearer <token>'" in access, access

        base = f"http://127.0.0.1:{port}"
        assert get(f"{base}/api/jobs/")[0] == 401, "no token, no answer"
        assert get(f"{base}/api/v0/tasks")[0] == 401
        assert get(f"{base}/api/jobs/", "0" * len(token))[0] == 403, "a wrong token is refused"
        status, body = get(f"{base}/api/jobs/", token)
        assert status == 200 and isinstance(json.loads(body), list), body[:500]

        # The state API lists the running trial: Tune runs the trainable (sweeps.trial.run_trial)
        # as an actor whose `train` task runs the whole trial.
        def trial_listed() -> bool:
            status, body = get(f"{base}/api/v0/tasks?detail=1&limit=100", token)
            assert status == 200, body[:500]
            tasks = json.loads(body)["data"]["result"]["result"]
            return any(t.get("name") == "run_trial.train" and t.get("state") == "RUNNING" for t in tasks)

        wait_for(trial_listed, timeout=120, poll=2)
        assert process.poll() is None, "asked while the sweep runs"
    finally:
        kill_group(process)
