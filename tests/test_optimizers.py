"""The optimizer factory: AdamW exactly as before the choice existed, and every choice built from
the trainer's own parameter groups (weight decay and lr scale per group)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from trainer.config import OptimConfig
from trainer.models import plan_parameters
from trainer.optimizers import DEFAULT_LR, build_optimizer


def test_adamw_is_todays_optimizer_bit_for_bit() -> None:
    torch.manual_seed(0)
    ours = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    before = copy.deepcopy(ours)
    reference = torch.optim.AdamW(plan_parameters(before, "full", 0.75, 0.01).groups, lr=2e-3,
                                  betas=(0.9, 0.999))  # what trainer/build.py built until optim.name existed
    optimizer = build_optimizer(plan_parameters(ours, "full", 0.75, 0.01).groups, OptimConfig(lr=2e-3))
    images = torch.randn(4, 1, 64, 64)
    for _ in range(3):
        for model, opt in ((before, reference), (ours, optimizer)):
            opt.zero_grad()
            model(images).sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), ours.state_dict().values(),
                                                 strict=True))


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb", "lion"])
def test_every_optimizer_keeps_the_plans_groups(name: str) -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    plan = plan_parameters(model, "layer_decay", 0.5, 0.05)
    optimizer = build_optimizer(plan.groups, OptimConfig(name=name, lr=DEFAULT_LR[name]))
    got = sorted((g["weight_decay"], g["lr_scale"], len(g["params"])) for g in optimizer.param_groups)
    assert got == sorted((g["weight_decay"], g["lr_scale"], len(g["params"])) for g in plan.groups)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}, "norms and biases undecayed"
    assert all(g["lr"] == DEFAULT_LR[name] for g in optimizer.param_groups)
