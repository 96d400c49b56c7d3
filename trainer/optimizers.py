"""The optimizer, by name, through timm's factory (`timm.optim.create_optimizer_v2`): the same
parameter groups for every choice, so weight-decay exclusions, layer-wise lr scales and the freeze
strategies (frozen tensors are in no group: no optimizer state) hold for each of them."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2

from trainer.config import OptimConfig

DEFAULT_LR = {"adamw": 1e-4, "sgd": 1e-2, "lamb": 1e-3, "lion": 1e-5}
"""Starting points for fine-tuning when a config gives no optim.lr: AdamW as before; SGD needs a
learning rate one to two orders of magnitude larger than AdamW's (timm's SGD recipes), LAMB's
trust ratio sits between, Lion's sign update wants 3-10x less than AdamW (Chen et al., 2023)."""


def build_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    """`groups` from trainer.models.plan_parameters (each with its own weight_decay and lr_scale)."""
    extra: dict = {"momentum": optim.momentum} if optim.name == "sgd" else {}
    if optim.betas is not None and optim.name != "sgd":
        extra["betas"] = tuple(optim.betas)
    return create_optimizer_v2(groups, opt=optim.name, lr=optim.lr, weight_decay=optim.weight_decay, **extra)
