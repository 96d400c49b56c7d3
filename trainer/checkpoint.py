"""Crash-safe, resumable checkpoints (the `checkpoints/` part of the run directory).

A checkpoint is `checkpoints/step-NNNNNNNN/`: what `accelerator.save_state` writes (model and
optimizer as safetensors/tensor files, scheduler, per-rank RNG states; all loaded back with
`weights_only=True`) plus `train_state.json`, our own contract (TrainState + stream position, plain
JSON: nothing of ours is ever unpickled). It is written under `.tmp-step-…` and renamed when every
rank has finished, so a directory named `step-…` is always complete. The last `keep_last` and the
best one by the configured metric are kept. (`best/`, the exported model, is trainer/rundir.py's.)
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from shards.atomic import write_json
from trainer.rundir import CHECKPOINTS

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "train_state.json"


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


class Checkpointer:
    def __init__(self, run_dir: Path, accelerator: Accelerator, keep_last: int) -> None:
        self.root = run_dir / CHECKPOINTS
        self.accelerator, self.keep_last = accelerator, keep_last

    def save(self, state: TrainState, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Collective: every rank calls it at the same step. `extra`: more safetensors files
        (name → tensors, written by the main rank) that belong inside the checkpoint."""
        final = self.root / f"step-{state.step:08d}"
        tmp = self.root / f".tmp-step-{state.step:08d}"
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        if main:
            for name, tensors in (extra or {}).items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
            write_json(tmp / STATE_FILE, asdict(state))
        self.accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
            self._prune(state)
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self, state: TrainState) -> None:
        for stale in self.root.glob(".tmp-step-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)))
        keep = set(steps[-self.keep_last:]) | ({state.best_step} if state.best_step is not None else set())
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.root / f"step-{step:08d}", ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, decided on rank 0 and broadcast to all ranks."""
        found: list[str | None] = [None]
        if self.accelerator.is_main_process and self.root.is_dir():
            steps = sorted(p.name for p in self.root.iterdir() if STEP_DIR.match(p.name))
            found[0] = str(self.root / steps[-1]) if steps else None
        if self.accelerator.num_processes > 1:
            broadcast_object_list(found)
        return Path(found[0]) if found[0] else None

    def load(self, directory: Path) -> TrainState:
        self.accelerator.load_state(str(directory))
        return TrainState.from_saved(json.loads((directory / STATE_FILE).read_text(encoding="utf-8")))
