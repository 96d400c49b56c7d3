"""timm models, and freeze strategies defined once for every architecture family.

timm already knows each family's block structure: `model.group_matcher(coarse=True)` groups
parameters into stem, blocks/stages and head (ViT/DeiT/hybrid: one group per block, the final norm
with the last block; Swin: one per stage, norm + head last; ResNet: layer1..4 and fc;
DenseNet: denseblocks, norm5 + classifier last). The strategies below are written once against
those ordered groups, so a new timm architecture gets them for free.

Layer-wise lr decay (freeze=layer_decay) scales each group's learning rate by `decay ** exponent`,
the head's exponent 0, in one of two modes (`layer_scales`):

- `group` (the default, timm's): the exponent counts groups down from the head, so the stem gets
  decay^(G-1). With G groups differing by family (ViT-B/16 14, ViT-L/16 26, Swin 6, ResNet 6,
  DenseNet 6) the same decay means different things: at 0.75 ViT-B/16's patch embedding learns at
  0.75^13 ≈ 0.024 of the head's lr, a ResNet-50 stem at 0.75^5 ≈ 0.24.
- `depth` (depth-normalised): the exponents are spread evenly from REFERENCE_DEPTH at the stem to 0
  at the head, so every architecture's stem gets decay^13 and the head 1. ViT-B/16 is unchanged,
  and the usual ViT values (0.65-0.75, BEiT/MAE recipes) mean the same for a CNN or a Swin.

Resolution: `build_model` trains any timm model at `data.image_size`; `resolution_kwargs` says
which architecture arguments that takes (position embeddings and windows) and why.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
from timm.models import get_pretrained_cfg, group_parameters, is_model_in_modules
from torch import nn

from trainer.config import ConfigError, ModelConfig

log = logging.getLogger("trainer.models")

Groups = list[list[str]]
"""Parameter names per coarse group, from the stem (first) to the head (last)."""
FreezeStrategy = Callable[[Groups], set[str]]
FREEZE: dict[str, FreezeStrategy] = {}


def register(name: str) -> Callable[[FreezeStrategy], FreezeStrategy]:
    def add(strategy: FreezeStrategy) -> FreezeStrategy:
        FREEZE[name] = strategy
        return strategy
    return add


@register("head")
def _head(groups: Groups) -> set[str]:
    """Linear probe: the classifier (and, where timm groups it there, the final norm)."""
    return set(groups[-1])


@register("head+last_block")
def _head_last_block(groups: Groups) -> set[str]:
    return set(groups[-1]) | set(groups[-2])


@register("full")
@register("layer_decay")
def _everything(groups: Groups) -> set[str]:
    return {name for group in groups for name in group}


VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit", "eva", "vision_transformer_relpos")
"""timm modules of ViTs built for one input size (`img_size`): their pretrained checkpoint filters
resample the position embedding (absolute, or the relative tables) to the size built."""
SWIN_MODULES = ("swin_transformer",)
"""timm modules of Swin (v1): `img_size` and `window_size`; the checkpoint filter resizes the
relative-position bias tables to the window built."""
SWIN_STRIDE = 32
"""Swin's total downsampling (patch 4, then three 2× merges): the last stage's feature map is
image_size / 32, and every stage's map must be a whole number of pixels."""


def resolution_kwargs(name: str, image_size: int | None) -> dict:
    """timm.create_model arguments that make architecture `name` take `image_size` px inputs.

    A CNN takes any size: nothing. ViT-family models are built for one size (the position
    embedding has one token per patch): `img_size`, and timm resamples the 224 px position
    embedding when it loads the pretrained weights (from the hub cache or a local file alike).
    Swin: `img_size` and `window_size = image_size // 32` (the last stage's feature map, as the
    original 224 px / window 7), since a window must tile every stage; timm resizes the
    relative-position tables on load. Nothing either when the size is the architecture's own
    (timm's pretrained cfg `input_size`), so a 224 px preset builds exactly as before."""
    if image_size is None:
        return {}
    is_vit = is_model_in_modules(name, VIT_MODULES)
    is_swin = is_model_in_modules(name, SWIN_MODULES)
    if not (is_vit or is_swin):
        return {}
    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is not None and tuple(pretrained_cfg.input_size[-2:]) == (image_size, image_size):
        return {}
    if is_vit:
        return {"img_size": image_size}
    if image_size % SWIN_STRIDE:
        raise ConfigError(f"data.image_size: {name} needs a multiple of {SWIN_STRIDE} (its window is "
                          f"image_size / {SWIN_STRIDE}), got {image_size}")
    return {"img_size": image_size, "window_size": image_size // SWIN_STRIDE}


def build_model(config: ModelConfig, num_classes: int, image_size: int | None = None) -> nn.Module:
    """timm.create_model with grayscale handling and offline pretrained weights, at `image_size`
    px (`resolution_kwargs`; None: the architecture's own size). model.kwargs always win."""
    kwargs = {**resolution_kwargs(config.name, image_size), **config.kwargs}
    if config.drop_path:
        kwargs["drop_path_rate"] = config.drop_path
    if not config.pretrained:
        return timm.create_model(config.name, pretrained=False, num_classes=num_classes,
                                 in_chans=config.in_chans, **kwargs)
    if config.weights:
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(config.weights).resolve())}
    try:
        with _hub_offline():
            return timm.create_model(config.name, pretrained=True, num_classes=num_classes,
                                     in_chans=config.in_chans, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:  # LocalEntryNotFoundError is an OSError
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        where = config.weights or f"the Hugging Face cache ({cache}) for timm/{config.name}"
        raise ConfigError(f"model.pretrained: no usable weights in {where} ({type(err).__name__}); set "
                          "model.weights=FILE or fill the cache where there is internet (python -m "
                          "trainer.weights fetch --config CONFIG)") from None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Weights come from a file or the local HF cache: never wait on a network a compute node
    does not have (HF_HUB_OFFLINE=0 in the environment allows downloads)."""
    import huggingface_hub.constants as hub  # noqa: PLC0415

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = os.environ.get("HF_HUB_OFFLINE", "1") != "0"
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def coarse_groups(model: nn.Module) -> Groups:
    """timm's coarse parameter groups in order, stem first, head last."""
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    return [grouped[key] for key in sorted(grouped)]


@dataclass(frozen=True)
class ParamPlan:
    groups: list[dict]
    """Optimizer param groups (params, weight_decay, lr_scale), trainable parameters only."""
    trainable: int
    total: int


REFERENCE_DEPTH = 13
"""The exponent of the bottom group in layer_decay_mode=depth: the one ViT-B/16's patch embedding
gets in group mode (12 blocks + 1; 14 groups counting the head), so ViT-B/16 trains the same in
both modes and the usual ViT layer-decay values (BEiT/MAE recipes, 0.65-0.75) keep their meaning,
while every other architecture's stem gets the same decay^13 and its head 1."""

LayerDecayMode = Literal["group", "depth"]


def layer_scales(groups_count: int, decay: float, mode: LayerDecayMode = "group") -> list[float]:
    """The lr scale of each of `groups_count` coarse groups (stem first, head last) under
    layer-wise decay `decay`: `group` decay^(G-1-i) (timm's, one step per group); `depth`
    decay^(REFERENCE_DEPTH × (G-1-i)/(G-1)), the stem at decay^13 whatever the depth (see the
    module docstring). A model of one group gets 1."""
    if groups_count < 1:
        raise ValueError(f"groups_count: expected ≥ 1, got {groups_count}")
    last = groups_count - 1
    if mode == "group":
        return [decay ** (last - index) for index in range(groups_count)]
    if mode == "depth":
        if last == 0:
            return [1.0]
        return [decay ** (REFERENCE_DEPTH * (last - index) / last) for index in range(groups_count)]
    raise ValueError(f"layer decay mode: expected group or depth, got {mode!r}")


def plan_parameters(model: nn.Module, freeze: str, layer_decay: float, weight_decay: float,
                    mode: LayerDecayMode = "group") -> ParamPlan:
    """Freeze what the strategy leaves out (requires_grad=False: no grads, no optimizer state,
    no DDP reduction) and group the rest by decay and learning-rate scale (freeze=layer_decay:
    `layer_scales` in `mode`, group or depth)."""
    groups = coarse_groups(model)
    trainable = FREEZE[freeze](groups)
    layer_of = {name: index for index, group in enumerate(groups) for name in group}
    scales = layer_scales(len(groups), layer_decay, mode) if freeze == "layer_decay" else [1.0] * len(groups)
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    total = count = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        parameter.requires_grad_(name in trainable)
        if name not in trainable:
            continue
        count += parameter.numel()
        decay = 0.0 if parameter.ndim <= 1 or name in no_decay or name.split(".")[-1] in no_decay \
            else weight_decay
        buckets.setdefault((decay, scales[layer_of[name]]), []).append(parameter)
    optimizer_groups = [{"params": params, "weight_decay": decay, "lr_scale": scale}
                        for (decay, scale), params in buckets.items()]
    return ParamPlan(optimizer_groups, count, total)


def keep_frozen_norms_in_eval(model: nn.Module) -> None:
    """A frozen BatchNorm must not update its running statistics in train mode: call after
    `model.train()`, so frozen layers stay bit-identical."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)):
            module.eval()


def model_family(model: nn.Module) -> str:
    """cnn, vit or swin, from the module's structure (not its name), so a timm architecture the
    project has never listed is classified too. `vit`: anything with transformer blocks, a patch
    embedding and prefix tokens (ViT, DeiT and its distilled variant, ViT-ResNet hybrids); `swin`:
    timm models whose stages are channels-last (`output_fmt == "NHWC"`); everything else `cnn`.
    Grad-CAM picks its target layer by it; the report sides each run with it."""
    if all(hasattr(model, name) for name in ("blocks", "patch_embed", "num_prefix_tokens")):
        return "vit"
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return "swin"
    return "cnn"


def model_family_by_name(name: str) -> str:
    """`model_family` of a timm architecture, built on the meta device (no memory, no weights):
    for run directories whose model card predates the family field."""
    with torch.device("meta"):
        return model_family(timm.create_model(name, pretrained=False))


def is_convnet(model: nn.Module) -> bool:
    """Most parameters in 2-D convolutions: worth channels_last."""
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    return conv > 0.5 * sum(p.numel() for p in model.parameters())


def to_memory_format(model: nn.Module, channels_last: bool) -> torch.memory_format:
    memory_format = torch.channels_last if channels_last and is_convnet(model) else torch.contiguous_format
    model.to(memory_format=memory_format)
    return memory_format
