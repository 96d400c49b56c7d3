"""Freeze strategies are one definition over timm's coarse groups, right for every family."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from trainer.config import ConfigError, ModelConfig, load_config
from trainer.models import (
    REFERENCE_DEPTH,
    build_model,
    coarse_groups,
    is_convnet,
    keep_frozen_norms_in_eval,
    layer_scales,
    plan_parameters,
    resolution_kwargs,
)

DEMO_VIT = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "demo_cpu_vit.yaml"

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


# --- layer decay that means the same across families ------------------------------------------

# Coarse groups of the study's architectures, counted from timm's group_matcher regexes (not from the
# code under test): ViT, DeiT and the R50 hybrid: the stem (cls_token, pos_embed, patch_embed: the
# hybrid's ResNet lives inside patch_embed) + one group per block (the final norm joins the last block,
# MATCH_PREV_GROUP) + the head; Swin (coarse): patch_embed + 4 stages + (norm, head); ResNet:
# conv1/bn1 + layer1..4 + fc; DenseNet (coarse): conv0/norm0 + 4 denseblock/transition + (norm5,
# classifier). Per architecture: (groups, the stem's first weight, the classifier's weight).
STUDY_GROUPS = {
    "vit_base_patch16_224": (1 + 12 + 1, "patch_embed.proj.weight", "head.weight"),
    "vit_large_patch16_224": (1 + 24 + 1, "patch_embed.proj.weight", "head.weight"),
    "deit_base_patch16_224": (1 + 12 + 1, "patch_embed.proj.weight", "head.weight"),
    "vit_base_r50_s16_224": (1 + 12 + 1, "patch_embed.backbone.stem.conv.weight", "head.weight"),
    "swin_base_patch4_window7_224": (1 + 4 + 1, "patch_embed.proj.weight", "head.fc.weight"),
    "resnet50": (1 + 4 + 1, "conv1.weight", "fc.weight"),
    "densenet121": (1 + 4 + 1, "features.conv0.weight", "classifier.weight"),
}


def bottom_and_top(model: torch.nn.Module, stem: str, head: str, mode: str) -> tuple[float, float]:
    plan = plan_parameters(model, "layer_decay", 0.75, 0.05, mode=mode)
    scale_of = {id(p): g["lr_scale"] for g in plan.groups for p in g["params"]}
    named = dict(model.named_parameters())
    return scale_of[id(named[stem])], scale_of[id(named[head])]


@pytest.mark.parametrize("name", sorted(STUDY_GROUPS))
def test_layer_decay_stem_and_head_per_mode(name: str) -> None:
    """group: the stem at decay^(groups-1), as timm (a ViT-L stem far below a ResNet's); depth: every
    architecture's stem at decay^13, ViT-B/16's own. The head learns at the full lr in both."""
    groups, stem, head = STUDY_GROUPS[name]
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=5)
    assert len(coarse_groups(model)) == groups, "timm's grouping is the one counted above"
    assert bottom_and_top(model, stem, head, "group") == (pytest.approx(0.75 ** (groups - 1), rel=1e-12), 1.0)
    assert bottom_and_top(model, stem, head, "depth") == (pytest.approx(0.75 ** 13, rel=1e-12), 1.0)


def test_layer_scales_depth_mode_spacing_and_vit_b_unchanged() -> None:
    assert REFERENCE_DEPTH == 13
    vit_b = [0.65 ** (13 - i) for i in range(14)]
    assert layer_scales(14, 0.65, "depth") == layer_scales(14, 0.65, "group") == vit_b, "ViT-B/16 unchanged"
    assert layer_scales(1, 0.5, "depth") == layer_scales(1, 0.5, "group") == [1.0]
    assert layer_scales(2, 0.5, "depth") == [0.5 ** 13, 1.0]
    exponents = [math.log(scale) / math.log(0.8) for scale in layer_scales(6, 0.8, "depth")]
    assert exponents == pytest.approx([13, 10.4, 7.8, 5.2, 2.6, 0], abs=1e-9), "evenly spaced in exponent"
    assert layer_scales(6, 0.8) == layer_scales(6, 0.8, "group"), "group is the default"
    with pytest.raises(ValueError, match="layer decay mode"):
        layer_scales(6, 0.8, "block")


# --- any resolution ---------------------------------------------------------------------------


def save_weights(model: torch.nn.Module, path: Path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_vit_trained_at_320_from_224_weights(tmp_path: Path) -> None:
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000, depth=2)
    weights = save_weights(source, tmp_path / "vit.safetensors")
    config = ModelConfig(name="vit_tiny_patch16_224", pretrained=True, weights=weights, kwargs={"depth": 2})
    model = build_model(config, num_classes=5, image_size=320)
    assert model.pos_embed.shape == (1, 1 + 20 * 20, 192), "position embedding resampled to 20 x 20 patches"
    assert torch.equal(model.pos_embed[:, :1], source.pos_embed[:, :1]), "the class token's own is kept"
    assert torch.equal(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert model(torch.randn(2, 3, 320, 320)).shape == (2, 5)
    assert build_model(config, num_classes=5, image_size=224).pos_embed.shape == (1, 1 + 14 * 14, 192)
    assert resolution_kwargs("vit_base_patch16_224", 224) == {}, "the architecture's own size: nothing"


def test_swin_trained_at_320_from_224_weights_and_a_size_it_cannot_take(tmp_path: Path) -> None:
    kwargs = {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}
    source = timm.create_model("swin_tiny_patch4_window7_224", num_classes=1000, **kwargs)
    weights = save_weights(source, tmp_path / "swin.safetensors")
    config = ModelConfig(name="swin_tiny_patch4_window7_224", pretrained=True, weights=weights, kwargs=kwargs)
    model = build_model(config, num_classes=5, image_size=320)
    attention = model.layers[0].blocks[0].attn
    assert tuple(attention.window_size) == (10, 10), "window = 320 / 32"
    assert attention.relative_position_bias_table.shape == (19 * 19, 1)
    assert torch.equal(model.layers[2].blocks[0].mlp.fc1.weight, source.layers[2].blocks[0].mlp.fc1.weight)
    assert model(torch.randn(2, 3, 320, 320)).shape == (2, 5)
    with pytest.raises(ConfigError) as err:
        build_model(config, num_classes=5, image_size=300)
    assert str(err.value).startswith("data.image_size:") and "multiple of 32" in str(err.value)
    assert "got 300" in str(err.value) and "\n" not in str(err.value)


def test_cnns_take_any_size_as_they_are_and_model_kwargs_win(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    real = timm.create_model

    def recording(name: str, **kwargs: object) -> torch.nn.Module:
        seen.append(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    model = build_model(ModelConfig(name="resnet10t"), num_classes=5, image_size=320)
    assert set(seen[-1]) == {"pretrained", "num_classes", "in_chans"}, "a CNN gets no resolution arguments"
    assert model(torch.randn(1, 3, 320, 320)).shape == (1, 5)
    assert resolution_kwargs("resnet50", 320) == resolution_kwargs("densenet121", 320) == {}
    # The demo ViT sets img_size itself: it wins over what data.image_size implies.
    demo = load_config(DEMO_VIT, environment=False)
    model = build_model(demo.model, num_classes=5, image_size=320)
    assert seen[-1]["img_size"] == 64 and model.pos_embed.shape[1] == 1 + 8 * 8
