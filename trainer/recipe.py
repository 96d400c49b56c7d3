"""A run's recipe as it was trained: the global batch and the learning rate it implies.

`optim.lr` is the learning rate at `optim.lr_ref_batch` images per optimizer step (256 by default,
as in the MAE/BEiT fine-tuning recipes); the run trains at its actual global batch (per-process
batch × processes × gradient accumulation) with the rule `optim.lr_scaling`:

    none    effective lr = lr                               (the default: what every run did before)
    linear  effective lr = lr × global / ref                (Goyal et al. 2017; MAE, BEiT, DeiT)
    sqrt    effective lr = lr × sqrt(global / ref)          (Malladi et al. 2022, for Adam-type updates)

So a preset defined at the reference batch trains with the rule's lr on one GPU or on 64. A recipe
that must train *the same* on any number of GPUs pins `data.global_batch` instead (a sweep's best.yaml
does): the per-process batch is then derived from it, the global batch, the steps and the effective
lr stay what they were.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from trainer.config import Config, ConfigError


@dataclass(frozen=True)
class Resolved:
    """What a launch turns the config into (recorded in config.yaml's `resolved` block and the model
    card, so a reader sees what the run trained with, not only what was asked)."""

    processes: int
    batch_size: int
    """Per process."""
    grad_accum: int
    global_batch: int
    """Images per optimizer step: batch_size × processes × grad_accum."""
    lr: float
    """optim.lr as configured (at lr_ref_batch when a scaling rule is on)."""
    lr_scaling: str
    lr_ref_batch: int
    effective_lr: float
    """The peak learning rate the optimizer uses (before warm-up/cosine and layer-wise scales)."""

    def to_dict(self) -> dict:
        return asdict(self)


def scale_lr(lr: float, global_batch: int, ref_batch: int, rule: str) -> float:
    """The documented rule (module docstring)."""
    ratio = global_batch / ref_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "none":
        return lr
    raise ConfigError(f"optim.lr_scaling: {rule!r} is not one of 'none', 'linear', 'sqrt'")


def per_process_batch(cfg: Config, processes: int) -> int:
    """data.batch_size, or the share of data.global_batch each process takes per micro-step."""
    if cfg.data.global_batch is None:
        return cfg.data.batch_size
    share = processes * cfg.optim.grad_accum
    if cfg.data.global_batch % share:
        raise ConfigError(f"data.global_batch: {cfg.data.global_batch} does not split over {processes} "
                          f"processes × optim.grad_accum {cfg.optim.grad_accum}: "
                          f"expected a multiple of {share}")
    return cfg.data.global_batch // share


def resolve(cfg: Config, processes: int) -> Resolved:
    """The launch's batch and learning rate. Raises ConfigError (one line) before anything is written."""
    batch = per_process_batch(cfg, processes)
    global_batch = batch * processes * cfg.optim.grad_accum
    assert cfg.optim.lr is not None  # resolved by config.validate
    effective = scale_lr(cfg.optim.lr, global_batch, cfg.optim.lr_ref_batch, cfg.optim.lr_scaling)
    return Resolved(processes, batch, cfg.optim.grad_accum, global_batch, cfg.optim.lr,
                    cfg.optim.lr_scaling, cfg.optim.lr_ref_batch, effective)
