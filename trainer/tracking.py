"""Metrics to `metrics.jsonl` and TensorBoard, on the main process only.

On resume both are cut back to the checkpoint's step first (`purge_step` for TensorBoard, a
rewrite for the JSON lines), so no step appears twice however often a run is interrupted. A write
that fails (a full disk) is held by the run's `Writes` and stops the run at the next agreement
point (trainer/storage.py); after one, nothing more is written.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_curve
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from trainer import rundir
from trainer.storage import Writes, quiet_writer_threads


class Tracker:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None,
                 writes: Writes | None = None) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.writes = writes or Writes()
        self.writer: SummaryWriter | None = None
        if not enabled:
            return
        quiet_writer_threads()
        with self.writes.guard(run_dir / rundir.METRICS):
            if resume_step is not None:
                rundir.truncate_records(run_dir, resume_step)
        with self.writes.guard(run_dir / rundir.TENSORBOARD):
            self.writer = SummaryWriter(str(run_dir / rundir.TENSORBOARD),
                                        purge_step=None if resume_step is None else resume_step + 1)

    @property
    def writing(self) -> bool:
        return self.enabled and self.writer is not None and not self.writes.skip()

    def log(self, record: dict) -> None:
        """One JSON line; numbers (and the `auroc` dict) also go to TensorBoard as scalars."""
        if not self.writing:
            return
        with self.writes.guard(self.run_dir / rundir.METRICS):
            rundir.append_record(self.run_dir, record)
        with self.writes.guard(self.run_dir / rundir.TENSORBOARD):
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        assert self.writer is not None
        split, step = record["split"], record["step"]
        for key, value in record.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if key in ("split", "step", "epoch") or not numeric:
                continue
            if not math.isnan(value):
                self.writer.add_scalar(f"{split}/{key}", value, step)
        for label, value in (record.get("auroc") or {}).items():
            if value is not None:
                self.writer.add_scalar(f"{split}/auroc/{label}", value, step)
        if "confusion" in record:
            for cell, value in record["confusion"].items():
                self.writer.add_scalar(f"{split}/confusion/{cell}", value, step)

    def roc_curves(self, split: str, names: tuple[str, ...], probs: np.ndarray, targets: np.ndarray,
                   masks: np.ndarray, step: int) -> None:
        """ROC curves as images (TensorBoard has no ROC plugin): one small plot per label."""
        if not self.writing:
            return
        with self.writes.guard(self.run_dir / rundir.TENSORBOARD):
            self._roc_curves(split, names, probs, targets, masks, step)

    def _roc_curves(self, split: str, names: tuple[str, ...], probs: np.ndarray, targets: np.ndarray,
                    masks: np.ndarray, step: int) -> None:
        assert self.writer is not None
        for index, name in enumerate(names):
            keep = masks[:, index] > 0
            y = targets[keep, index]
            if y.size == 0 or y.min() == y.max():
                continue
            fpr, tpr, _ = roc_curve(y, probs[keep, index])
            self.writer.add_image(f"{split}_roc/{name}", _plot_curve(fpr, tpr), step, dataformats="HW")

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.writing:
            assert self.writer is not None
            grid = make_grid(images[:16, :1].float(), nrow=4, normalize=True)
            with self.writes.guard(self.run_dir / rundir.TENSORBOARD):
                self.writer.add_image(tag, grid, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writing:
            assert self.writer is not None
            with self.writes.guard(self.run_dir / rundir.TENSORBOARD):
                self.writer.add_text(tag, text, step)

    def close(self) -> None:
        """Flush and close; a failure is held like any other write (the caller checks)."""
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        with self.writes.guard(self.run_dir / rundir.TENSORBOARD):
            writer.close()  # flushes first


def _plot_curve(x: np.ndarray, y: np.ndarray, size: int = 128) -> np.ndarray:
    """A minimal line plot (white background, diagonal in grey, curve in black), uint8 H×W."""
    canvas = np.full((size, size), 255, dtype=np.uint8)
    diagonal = np.arange(size)
    canvas[size - 1 - diagonal, diagonal] = 180
    xs = np.linspace(0, 1, 4 * size)
    ys = np.interp(xs, x, y)
    canvas[(size - 1 - np.round(ys * (size - 1))).astype(int), np.round(xs * (size - 1)).astype(int)] = 0
    return canvas
