"""Crash-safe, resumable checkpoints (the `checkpoints/` part of the run directory).

A checkpoint is `checkpoints/step-NNNNNNNN/`: what `accelerator.save_state` writes (model and
optimizer as safetensors/tensor files, scheduler, per-rank RNG states, or DeepSpeed's own .pt files;
all loaded back with `weights_only=True`) plus `train_state.json`, our own contract (TrainState +
stream position, plain JSON: nothing of ours is ever unpickled), and last `complete.json`, the list
of every file in it with its size. It is written under `.tmp-step-…` and renamed when every rank has
finished, so a directory named `step-…` was complete when written; a disk can still lose or cut
files later (a copy, a restore, a failing file system), so resuming takes the newest checkpoint
that still matches its listing and whose files look whole (`problem`: sizes and headers, no tensor
loaded), and says which ones it passed over. The last `keep_last` and the best one by the
configured metric are kept, so there is an older one to fall back to. A write that fails (a full
disk) stops every rank with one line and leaves the earlier checkpoints as they were
(trainer/storage.py). (`best/`, the exported model, is trainer/rundir.py's.)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from shards.atomic import write_json
from trainer.rundir import CHECKPOINTS, SET_ASIDE, RunDirError
from trainer.storage import EXIT_IOERR, Writes, agree, stop

log = logging.getLogger("trainer")

STEP_DIR = re.compile(r"^step-(\d{8})$")
CANDIDATE = re.compile(r"^(step-|\.tmp-step-)(\d{8})$")
STATE_FILE = "train_state.json"
LISTING = "complete.json"
"""Written last, inside the temporary directory: {"step": N, "files": {relative path: bytes}}."""
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin")
DEEPSPEED_MODEL = "model_states.pt"
TORCH_SUFFIXES = (".bin", ".pt", ".pkl")
"""What accelerate and DeepSpeed write with torch.save (a zip since torch 1.6)."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs, saved as JSON in each checkpoint.

    `step` counts optimizer steps; `epoch` is the epoch in progress (or the next one, once the
    epoch-end evaluation is done); `stream` is the training stream's position (epoch, next batch).
    """

    step: int = 0
    epoch: int = 0
    samples: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    stream: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    """Wall time spent training (evaluation excluded), summed across resumes: the report's x axis."""

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        """A train_state.json; fields an older version saved and this one dropped are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})


# --- is a checkpoint usable? (cheap: sizes and headers, no tensor is loaded) ---------------------


def listing(directory: Path) -> dict[str, int]:
    """Every file under `directory` (every rank's, DeepSpeed's sub-folders included) → its size."""
    return {path.relative_to(directory).as_posix(): path.stat().st_size
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != LISTING}


def problem(directory: Path) -> str | None:
    """Why the checkpoint in `directory` cannot be resumed from, or None. With complete.json (written
    last, just before the rename) every listed file must be there at its size; with or without it,
    train_state.json must parse, safetensors files must hold the bytes their header describes,
    torch zip files must end in their directory, and some model weights must be present."""
    if not directory.is_dir():
        return "not a directory"
    if directory.name.startswith(".tmp-step-"):
        return "incomplete (a save that did not finish; removed by the next save)"
    return _listing_problem(directory) or _state_problem(directory) or _files_problem(directory)


def _listing_problem(directory: Path) -> str | None:
    path = directory / LISTING
    if not path.exists():
        return None  # written before checkpoints carried a listing: the structural checks only
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        expected = {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{LISTING} is not a file listing"
    for name, size in expected.items():
        file = directory / name
        if not file.is_file():
            return f"{name} missing ({LISTING} lists it)"
        found = file.stat().st_size
        if found != size:
            return f"{name} is {found} bytes, {LISTING} says {size}"
    return None


def _state_problem(directory: Path) -> str | None:
    path = directory / STATE_FILE
    if not path.is_file():
        return f"{STATE_FILE} missing"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{STATE_FILE} is not JSON"
    if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
        return f"{STATE_FILE} has no step"
    return None


def _files_problem(directory: Path) -> str | None:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    if not any(p.name in MODEL_FILES or p.name.endswith(DEEPSPEED_MODEL) for p in files):
        return f"no model weights ({', '.join(MODEL_FILES)} or DeepSpeed's *{DEEPSPEED_MODEL})"
    for path in files:
        name = path.relative_to(directory).as_posix()
        if path.suffix == ".safetensors":
            found = safetensors_problem(path)
        elif path.suffix in TORCH_SUFFIXES:
            found = torch_zip_problem(path)
        else:
            continue
        if found:
            return f"{name}: {found}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then exactly the bytes the
    header's offsets span: a truncated or padded file shows in its size."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes: shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"{size} bytes: its header alone would need {8 + length} (truncated?)"
        try:
            header = json.loads(handle.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "unreadable safetensors header"
    if 8 + length + end != size:
        return f"{size} bytes, its header describes {8 + length + end} (truncated?)"
    return None


def torch_zip_problem(path: Path) -> str | None:
    """torch.save writes a zip whose directory is at the end: a file that starts like a zip and has
    no readable directory was cut short. Other formats are not judged (legacy torch pickles)."""
    with path.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"{path.stat().st_size} bytes: a torch file without its end (truncated?)"
    return None


# --- saving and choosing checkpoints --------------------------------------------------------------


class Checkpointer:
    def __init__(self, run_dir: Path, accelerator: Accelerator, keep_last: int) -> None:
        self.root = run_dir / CHECKPOINTS
        self.accelerator, self.keep_last = accelerator, keep_last
        self.last: Path | None = None
        """The checkpoint a failed save leaves the run to continue from (the last saved or loaded)."""

    def save(self, state: TrainState, extra: dict[str, dict[str, torch.Tensor]] | None = None,
             writes: Writes | None = None) -> Path:
        """Collective: every rank calls it at the same step. `extra`: more safetensors files
        (name → tensors, written by the main rank) that belong inside the checkpoint. A write
        that fails on any rank (or one held in `writes` from earlier) stops every rank with one
        line (trainer/storage.py); the half-written directory is removed, the earlier
        checkpoints are untouched."""
        writes = writes or Writes()
        final = self.root / f"step-{state.step:08d}"
        tmp = self.root / f".tmp-step-{state.step:08d}"
        main = self.accelerator.is_main_process
        if main and not writes.skip():
            with writes.guard(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        self._agree(writes, state.step, tmp)
        with writes.guard(tmp):
            self.accelerator.save_state(str(tmp), safe_serialization=True)
            if main:
                for name, tensors in (extra or {}).items():
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
                write_json(tmp / STATE_FILE, asdict(state))
        self._agree(writes, state.step, tmp)  # every rank's files are complete from here
        if main:
            with writes.guard(tmp):
                write_json(tmp / LISTING, {"step": state.step, "files": listing(tmp)})
                shutil.rmtree(final, ignore_errors=True)
                tmp.replace(final)
                self._prune(state)
        self._agree(writes, state.step, tmp)
        self.last = final
        return final

    def _agree(self, writes: Writes, step: int, tmp: Path) -> None:
        """Collective: stop every rank (one line) if any rank's write failed; the main rank first
        removes what the failed save wrote."""
        failure = agree(self.accelerator, writes.failure)
        if failure is None:
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        stop(self.accelerator, f"{failure}; {self.stopped_at(step)}", EXIT_IOERR)

    def stopped_at(self, step: int) -> str:
        """What a run stopping at `step` for a failed write leaves, for its last line."""
        since = "the start (no checkpoint yet)"
        if self.last is not None:
            since = f"{self.last} (step {int(self.last.name[5:])})"
        return (f"the run stopped at step {step} and continues from {since}: free space, then resubmit "
                "with run.resume=auto")

    def _prune(self, state: TrainState) -> None:
        for stale in self.root.glob(".tmp-step-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)))
        keep = set(steps[-self.keep_last:]) | ({state.best_step} if state.best_step is not None else set())
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.root / f"step-{step:08d}", ignore_errors=True)

    def latest(self, refuse_unusable: bool = True) -> Path | None:
        """The newest usable checkpoint (`problem` is None), decided on rank 0 and broadcast. Each
        one passed over is one warning line. None when there is none: a fresh run directory, or
        only unusable ones when `refuse_unusable` is off (run.resume=restart); with it on, every
        rank stops (exit 2, one line, nothing written) rather than silently start over."""
        found: list[str | None] = [None, None]
        if self.accelerator.is_main_process:
            found = self._choose()
        if self.accelerator.num_processes > 1:
            broadcast_object_list(found)
        chosen, unusable = found
        if chosen is None and unusable and refuse_unusable:
            stop(self.accelerator, f"run.resume=auto: {unusable}; run.resume=restart trains from scratch "
                 f"here, moving them into {self.root.parent / SET_ASIDE}/ (nothing is deleted), or "
                 "run.resume=PATH continues from a checkpoint of your choice", 2)
        return Path(chosen) if chosen else None

    def _choose(self) -> list[str | None]:
        """[newest usable checkpoint, why none is] on the main rank, warning for each one skipped."""
        if not self.root.is_dir():
            return [None, None]
        # Newest first; at the same step an unfinished re-save (.tmp-step-N) is newer than step-N.
        found = [(int(m.group(2)), p) for p in self.root.iterdir() if (m := CANDIDATE.match(p.name))]
        candidates = sorted(found, key=lambda c: (c[0], c[1].name.startswith(".")))
        complete = 0
        for _, path in reversed(candidates):
            reason = problem(path)
            if reason is None:
                return [str(path), None]
            log.warning("checkpoint %s skipped: %s", path, reason)
            complete += path.name.startswith("step-")
        if not complete:
            return [None, None]  # at most a save interrupted before the first checkpoint existed
        return [None, f"none of the {complete} checkpoint(s) in {self.root} is usable (each one is "
                      "skipped above)"]

    def load(self, directory: Path) -> TrainState:
        """Load a checkpoint on every rank; one that passed the checks but still fails to load is
        one line naming it (exit 2), not a traceback."""
        try:
            self.accelerator.load_state(str(directory))
            state = TrainState.from_saved(json.loads((directory / STATE_FILE).read_text(encoding="utf-8")))
        except Exception as err:  # torch, safetensors and DeepSpeed raise their own kinds
            first = (str(err).strip().splitlines() or [""])[0]
            raise RunDirError(f"checkpoint {directory} could not be loaded ({type(err).__name__}: {first}): "
                              "run.resume=PATH continues from an older one, run.resume=restart starts "
                              "over") from None
        self.last = directory
        return state
