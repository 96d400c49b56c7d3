"""Which images to explain, and the tensors for them, read through each run's own eval stream.

Each run sees the split with its own preprocessing (image size, channels, normalisation: the
stream config the trainer evaluates with) plus the per-label lesion masks at the same geometry.
Pass 1 scores the whole split to rank positives; pass 2 keeps only the chosen samples, so memory
does not grow with the split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from shards.stream import StreamConfig, eval_stream
from trainer.explain.loading import LoadedRun

RANDOM_SHARE = 0.25
"""Of each label's `n` samples, this share is drawn at random (the rest: top-scoring positives)."""


@dataclass
class Scored:
    keys: list[str]
    probs: np.ndarray
    """N × run labels, sigmoid outputs."""
    positive: np.ndarray
    """N × run labels, bool: target 1 where the label is known."""


@dataclass
class Inputs:
    """The chosen samples of one run, in the order asked for."""

    keys: list[str]
    images: torch.Tensor
    """N×C×S×S, normalised as the model expects (CPU)."""
    lesion: torch.Tensor
    """N × run labels × S × S, bool."""
    positive: torch.Tensor
    """N × run labels, bool."""
    mean: float
    std: float
    """Channel-0 normalisation, to show the image again."""

    def gray(self, row: int) -> np.ndarray:
        """The sample as the model saw it, S×S in [0, 1]."""
        return (self.images[row, 0] * self.std + self.mean).clamp(0, 1).numpy()


def explain_stream_config(run: LoadedRun, split: str, batch_size: int, workers: int) -> StreamConfig:
    from trainer.data import stream_config  # noqa: PLC0415 - heavy; also what the trainer evaluates with

    config = stream_config(run.config, run.model, split)
    return replace(config, with_lesion_masks=True, batch_size=batch_size, workers=workers,
                   labels=run.labels, shards=Path(run.config.data.shards))


def score_split(run: LoadedRun, config: StreamConfig, device: torch.device) -> Scored:
    """Pass 1: every sample's probabilities and ground truth (images and masks are dropped)."""
    keys, probs, positive = [], [], []
    with torch.no_grad():
        for batch in eval_stream(config).batches(device):
            keys += batch["key"]
            probs.append(torch.sigmoid(run.model(batch["image"]).float()).cpu().numpy())
            positive.append(((batch["target"] > 0.5) & (batch["mask"] > 0)).cpu().numpy())
    if not keys:
        raise ValueError(f"{config.shards}: split {config.split!r} has no samples for {run.name} "
                         f"(views={config.views})")
    return Scored(keys, np.concatenate(probs), np.concatenate(positive))


def select(labels: list[str], runs: list[LoadedRun], scores: list[Scored], n: int,
           seed: int) -> dict[str, list[str]]:
    """Per label: the top `n − n·RANDOM_SHARE` true positives by mean probability across runs,
    then random samples (positive or not) up to `n`; only keys every run can see."""
    common = set(scores[0].keys).intersection(*(set(s.keys) for s in scores[1:]))
    order = [key for key in scores[0].keys if key in common]
    rows = [{key: i for i, key in enumerate(s.keys)} for s in scores]
    first = rows[0]
    chosen: dict[str, list[str]] = {}
    for label in labels:
        columns = [run.labels.index(label) for run in runs]
        mean_prob = {key: float(np.mean([s.probs[r[key], c] for s, r, c in zip(scores, rows, columns,
                                                                                 strict=True)]))
                     for key in order}
        positives = [key for key in order if scores[0].positive[first[key], columns[0]]]
        top = sorted(positives, key=lambda key: -mean_prob[key])[:n - int(n * RANDOM_SHARE)]
        rest = [key for key in order if key not in set(top)]
        picked = set(random.Random(f"{seed}-{label}").sample(rest, min(len(rest), n - len(top))))
        chosen[label] = top + [key for key in rest if key in picked]
    return chosen


def gather(config: StreamConfig, keys: list[str], device: torch.device) -> Inputs:
    """Pass 2: the tensors of `keys` (in that order) from one run's stream."""
    wanted = set(keys)
    found: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for batch in eval_stream(config).batches(device):
        for row, key in enumerate(batch["key"]):
            if key in wanted:
                positive = (batch["target"][row] > 0.5) & (batch["mask"][row] > 0)
                found[key] = (batch["image"][row].cpu(), batch["lesion"][row].cpu(), positive.cpu())
    missing = [key for key in keys if key not in found]
    if missing:
        raise ValueError(f"sample {missing[0]} vanished between two reads of {config.shards}")
    images, lesion, positive = (torch.stack([found[key][i] for key in keys]) for i in range(3))
    return Inputs(keys, images, lesion, positive, config.mean[0], config.std[0])
