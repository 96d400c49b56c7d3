"""Checkpoint validation and full-disk handling, in process and fast: real checkpoints written by
`Checkpointer.save` (accelerate save_state on one CPU process), damaged the ways disks damage them,
and real full file systems (a small tmpfs; needs root, as the SLURM tests do). Nothing is mocked.
The end-to-end cases (trainer runs, two ranks, SLURM) are in tests/test_faults_checkpoint.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from trainer import rundir
from trainer.checkpoint import Checkpointer, TrainState
from trainer.config import Config
from trainer.report.runs import find_runs
from trainer.storage import EXIT_IOERR, Stopped, Writes
from trainer.tracking import Tracker

WIDTH = 256
"""Linear(256, 256): 256 KiB of weights, 512 KiB of AdamW moments: a checkpoint of ~0.8 MB."""


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def trained(accelerator: Accelerator) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and optimizer after one step, so the optimizer has state to save."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(4, WIDTH)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture
def two(accelerator: Accelerator, tmp_path: Path) -> tuple[Checkpointer, Path, Path]:
    """A run directory with checkpoints at steps 1 and 2 (each with an EMA file, as the trainer saves)."""
    accelerator._models.clear()
    accelerator._optimizers.clear()
    model, _ = trained(accelerator)
    checkpointer = Checkpointer(tmp_path / "run", accelerator, keep_last=2)
    ema = {"ema.safetensors": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    older = checkpointer.save(TrainState(step=1), ema)
    newer = checkpointer.save(TrainState(step=2), ema)
    return checkpointer, older, newer


def sizes(directory: Path) -> dict[str, int]:
    found = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = Path(folder, name)
            found[path.relative_to(directory).as_posix()] = path.stat().st_size
    return found


def test_a_checkpoint_lists_every_file_with_its_size(two: tuple) -> None:
    _, _, newer = two
    on_disk = sizes(newer)
    listed = json.loads((newer / "complete.json").read_text())
    assert listed["step"] == 2
    assert listed["files"] == {name: size for name, size in on_disk.items() if name != "complete.json"}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "train_state.json",
            "ema.safetensors"} <= set(listed["files"])


def truncate(path: Path, keep: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(keep)


def unlist(checkpoint: Path) -> None:
    """What a checkpoint written before checkpoints carried a listing looks like."""
    (checkpoint / "complete.json").unlink()


# (name, damage to the newer checkpoint, the reason expected, given the file sizes before damage)
DAMAGES = [
    ("truncated weights", lambda c: truncate(c / "model.safetensors", 1000),
     lambda s: f"model.safetensors is 1000 bytes, complete.json says {s['model.safetensors']}"),
    ("missing train_state.json", lambda c: (c / "train_state.json").unlink(),
     lambda s: "train_state.json missing (complete.json lists it)"),
    ("train_state.json overwritten, same size", lambda c: overwrite(c / "train_state.json"),
     lambda s: "train_state.json is not JSON"),
    ("listing damaged", lambda c: (c / "complete.json").write_text("{"),
     lambda s: "complete.json is not a file listing"),
    ("unlisted, truncated weights", lambda c: (unlist(c), truncate(c / "model.safetensors", 5000)),
     lambda s: "model.safetensors: 5000 bytes, its header describes "
               f"{s['model.safetensors']} (truncated?)"),
    ("unlisted, weights cut inside the header", lambda c: (unlist(c), truncate(c / "model.safetensors", 20)),
     lambda s: "model.safetensors: 20 bytes: its header alone would need"),
    ("unlisted, truncated optimizer", lambda c: (unlist(c), truncate(c / "optimizer.bin", 4096)),
     lambda s: "optimizer.bin: 4096 bytes: a torch file without its end (truncated?)"),
    ("unlisted, truncated EMA", lambda c: (unlist(c), truncate(c / "ema.safetensors", 30_000)),
     lambda s: "ema.safetensors: 30000 bytes, its header describes"),
    ("unlisted, no weights", lambda c: (unlist(c), (c / "model.safetensors").unlink()),
     lambda s: "no model weights"),
    ("unlisted, no train_state.json", lambda c: (unlist(c), (c / "train_state.json").unlink()),
     lambda s: "train_state.json missing"),
]


def overwrite(path: Path) -> None:
    """Same size, other bytes: the listing still matches; the file no longer parses."""
    path.write_text("x" * path.stat().st_size)


@pytest.mark.parametrize(("damage", "reason"), [(d, r) for _, d, r in DAMAGES],
                         ids=[name for name, _, _ in DAMAGES])
def test_each_damage_is_passed_over_with_one_warning_and_the_older_one_taken(
        two: tuple, damage, reason, caplog: pytest.LogCaptureFixture) -> None:
    checkpointer, older, newer = two
    before = sizes(newer)
    damage(newer)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert checkpointer.latest() == older
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"checkpoint {newer} skipped: {reason(before)}"), lines[0]


def test_an_interrupted_save_is_named_and_passed_over(two: tuple, caplog: pytest.LogCaptureFixture) -> None:
    checkpointer, _, newer = two
    left = checkpointer.root / ".tmp-step-00000003"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"\0" * 100)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert checkpointer.latest() == newer
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {left} skipped: incomplete (a save that did not finish; removed by the next save)"]


def test_whole_checkpoints_with_or_without_a_listing_are_taken_silently(
        two: tuple, caplog: pytest.LogCaptureFixture) -> None:
    checkpointer, _, newer = two
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert checkpointer.latest() == newer
        unlist(newer)  # written by an older version: structural checks only
        assert checkpointer.latest() == newer
    assert not caplog.records
    state = checkpointer.load(newer)
    assert state.step == 2


def test_no_usable_checkpoint_stops_in_one_line_naming_restart(
        two: tuple, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    checkpointer, older, newer = two
    truncate(older / "optimizer.bin", 10)
    truncate(newer / "model.safetensors", 10)
    with caplog.at_level(logging.WARNING, logger="trainer"), pytest.raises(Stopped) as stopped:
        checkpointer.latest()
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: run.resume=auto: none of the 2 checkpoint(s) in {checkpointer.root} "
                                "is usable")
    assert "run.resume=restart trains from scratch" in errors[0]
    assert [r.getMessage().split(" skipped")[0] for r in caplog.records] == [f"checkpoint {newer}",
                                                                           f"checkpoint {older}"]
    assert checkpointer.latest(refuse_unusable=False) is None  # run.resume=restart


def test_an_interrupted_first_save_alone_is_no_checkpoint(accelerator: Accelerator, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    checkpointer = Checkpointer(tmp_path / "run", accelerator, keep_last=2)
    (checkpointer.root / ".tmp-step-00000005").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert checkpointer.latest() is None
    assert len(caplog.records) == 1


def test_set_aside_moves_what_a_run_wrote_and_keeps_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("checkpoints/step-00000001/x", "best/model.safetensors", "tb/events", "metrics.jsonl",
                 "predictions_val.npz", "config.yaml", ".launch-abc"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    folder = rundir.set_aside(run)
    assert folder is not None and folder.parent == run / "set-aside"
    assert sorted(p.name for p in run.iterdir()) == [".launch-abc", "config.yaml", "set-aside"]
    assert (folder / "checkpoints/step-00000001/x").read_text() == "checkpoints/step-00000001/x"
    assert sorted(p.name for p in folder.iterdir()) == ["best", "checkpoints", "metrics.jsonl",
                                                        "predictions_val.npz", "tb"]
    assert rundir.set_aside(run) is None, "nothing left to move"
    assert find_runs([tmp_path]) == ([run], []), "the report does not take set-aside/ for a run"


# --- a full disk -----------------------------------------------------------------------------------


@contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A real, small file system (tmpfs of `size`), unmounted afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True,
                   capture_output=True, timeout=30)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True, timeout=30)


def fill(directory: Path) -> None:
    """Write until the file system is full."""
    with (directory / "filler").open("wb", buffering=0) as handle:
        try:
            while handle.write(b"\0" * 4096):
                pass
        except OSError:
            pass


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_stops_in_one_line(
        accelerator: Accelerator, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    accelerator._models.clear()
    accelerator._optimizers.clear()
    model, _ = trained(accelerator)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with tmpfs(tmp_path / "disk", "1300k") as disk:  # one ~0.8 MB checkpoint fits, two do not
        checkpointer = Checkpointer(disk / "run", accelerator, keep_last=2)
        first = checkpointer.save(TrainState(step=1))
        with pytest.raises(Stopped) as stopped:
            checkpointer.save(TrainState(step=2))
        assert stopped.value.code == EXIT_IOERR
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        temp = checkpointer.root / ".tmp-step-00000002"
        assert errors == [f"error: no space left on device writing {temp}; "
                          f"the run stopped at step 2 and continues from {first} (step 1): free space, then "
                          "resubmit with run.resume=auto"]
        assert sorted(p.name for p in checkpointer.root.iterdir()) == ["step-00000001"], "temp removed"
        weights = load_file(str(first / "model.safetensors"))
        assert all(torch.equal(weights[k], v) for k, v in expected.items())
        assert torch.load(first / "optimizer.bin", weights_only=True)["state"]
        assert checkpointer.latest() == first


def test_disk_full_during_the_best_export_keeps_the_old_best(tmp_path: Path) -> None:
    """The new weights fit, the model card after them does not: best/ must not end up half new."""
    old = {"w": torch.arange(40_000, dtype=torch.float32)}  # 160 kB
    new = {"w": torch.zeros(50_000)}  # 200 kB: fits beside the old one
    with tmpfs(tmp_path / "disk", "600k") as disk:
        run = disk / "run"
        rundir.export_best(run, old, Config(), {"step": 1})
        writes = Writes()
        with writes.guard(run / rundir.BEST):
            rundir.export_best(run, new, Config(), {"step": 2, "notes": "x" * 300_000})
        assert writes.failure == f"no space left on device writing {run / rundir.BEST}"
        assert torch.equal(load_file(str(run / "best" / "model.safetensors"))["w"], old["w"])
        assert json.loads((run / "best" / "model_card.json").read_text()) == {"step": 1}
        assert sorted(p.name for p in run.iterdir()) == ["best"], "no temporary directory left"


# Under pytest a thread's uncaught error becomes this warning instead of a traceback on stderr.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_tensorboard_on_a_full_disk_is_held_without_a_traceback(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture) -> None:
    """TensorBoard writes from its own thread, which prints the error as a traceback, and raises it
    again at a later call from ours: held as the run's failure, printed nowhere."""
    with tmpfs(tmp_path / "disk", "256k") as disk:
        run = disk / "run"
        run.mkdir()
        writes = Writes()
        tracker = Tracker(run, True, None, writes)
        fill(disk)
        for step in range(1, 2000):
            tracker.text("notes", "x" * 4000, step)
            if writes.failure:
                break
            time.sleep(0.001)
        tracker.close()
        assert writes.failure == f"no space left on device writing {run / 'tb'}"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_metrics_and_tensorboard_on_a_full_disk_are_held_without_a_traceback(
        tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    with tmpfs(tmp_path / "disk", "256k") as disk:
        run = disk / "run"
        run.mkdir()
        writes = Writes()
        tracker = Tracker(run, True, None, writes)
        tracker.log({"split": "train", "step": 1, "loss": 1.0})
        fill(disk)
        for step in range(2, 400):  # TensorBoard writes from a thread: its error surfaces at a later call
            tracker.log({"split": "train", "step": step, "loss": 1.0, "pad": "x" * 2000})
            if writes.failure:
                break
        tracker.close()
        assert writes.failure in (f"no space left on device writing {run / 'metrics.jsonl'}",
                                  f"no space left on device writing {run / 'tb'}")
        assert not tracker.writing, "nothing more is written after a failure"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
