"""Freeze strategies are one definition over timm's coarse groups, right for every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from trainer.config import ConfigError, ModelConfig
from trainer.models import build_model, coarse_groups, is_convnet, keep_frozen_norms_in_eval, plan_parameters

FAMILIES = {
    # name: (timm kwargs for a small instance, prefixes of the last block, prefixes of the head group)
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 3}, ("blocks.2.", "norm."),
                             ("head.",)),
    "deit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, ("blocks.1.", "norm."),
                              ("head.",)),
    "vit_tiny_r_s16_p8_224": ({"img_size": 64, "depth": 2}, ("blocks.1.", "norm."), ("head.",)),
    "swin_tiny_patch4_window7_224": ({"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1)},
                                     ("layers.3.",), ("norm.", "head.")),
    "resnet10t": ({}, ("layer4.",), ("fc.",)),
    "densenet121": ({"growth_rate": 8, "block_config": (1, 1, 1, 1)}, ("features.denseblock4.",),
                    ("features.norm5.", "classifier.")),
}


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_strategies_per_family(name: str) -> None:
    kwargs, last_block, head = FAMILIES[name]
    model = timm.create_model(name, num_classes=5, in_chans=1, **kwargs)
    everything = {n for n, _ in model.named_parameters()}

    plan = plan_parameters(model, "head", 0.75, 0.01)
    assert trainable_names(model) == {n for n in everything if n.startswith(head)}
    assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < plan.total

    plan_parameters(model, "head+last_block", 0.75, 0.01)
    assert trainable_names(model) == {n for n in everything if n.startswith(head + last_block)}, name

    for strategy in ("full", "layer_decay"):
        plan = plan_parameters(model, strategy, 0.75, 0.01)
        assert trainable_names(model) == everything and plan.trainable == plan.total


def test_layer_decay_scales_fall_from_head_to_stem() -> None:
    model = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32, patch_size=8, depth=3)
    groups = coarse_groups(model)
    plan = plan_parameters(model, "layer_decay", 0.5, 0.05)
    scale_of = {id(p): g["lr_scale"] for g in plan.groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["head.weight"])] == 1.0
    assert scale_of[id(named["blocks.2.attn.qkv.weight"])] == 0.5
    assert scale_of[id(named["patch_embed.proj.weight"])] == 0.5 ** (len(groups) - 1)
    decay_of = {id(p): g["weight_decay"] for g in plan.groups for p in g["params"]}
    assert decay_of[id(named["head.bias"])] == 0.0 and decay_of[id(named["pos_embed"])] == 0.0
    assert decay_of[id(named["head.weight"])] == 0.05


def test_frozen_batchnorm_keeps_its_statistics() -> None:
    model = timm.create_model("resnet10t", num_classes=2, in_chans=1)
    plan_parameters(model, "head", 0.75, 0.0)
    model.train()
    keep_frozen_norms_in_eval(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(4, 1, 32, 32))
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert is_convnet(model) and not is_convnet(timm.create_model("vit_tiny_patch16_224"))


def test_pretrained_weights_from_a_local_file_and_a_clear_error_when_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = timm.create_model("resnet10t", num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    weights = str(tmp_path / "w.safetensors")
    config = ModelConfig(name="resnet10t", pretrained=True, weights=weights, in_chans=1)
    model = build_model(config, num_classes=5)
    expected = source.conv1[0].weight.sum(dim=1, keepdim=True)  # timm folds RGB filters into one channel
    assert torch.allclose(model.conv1[0].weight, expected) and model.fc.out_features == 5
    assert torch.equal(model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline by default: never wait on a network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match=r"model.pretrained: no usable weights in the Hugging Face cache"):
        build_model(ModelConfig(name="resnet10t", pretrained=True), num_classes=5)
