"""timm models, and freeze strategies defined once for every architecture family.

timm already knows each family's block structure: `model.group_matcher(coarse=True)` groups
parameters into stem, blocks/stages and head (ViT/DeiT/hybrid: one group per block, the final norm
with the last block; Swin: one per stage, norm + head last; ResNet: layer1..4 and fc;
DenseNet: denseblocks, norm5 + classifier last). The strategies below are written once against
those ordered groups, so a new timm architecture gets them for free.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
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


def build_model(config: ModelConfig, num_classes: int) -> nn.Module:
    """timm.create_model with grayscale handling and offline pretrained weights."""
    kwargs = dict(config.kwargs)
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


def plan_parameters(model: nn.Module, freeze: str, layer_decay: float, weight_decay: float) -> ParamPlan:
    """Freeze what the strategy leaves out (requires_grad=False: no grads, no optimizer state,
    no DDP reduction) and group the rest by decay and learning-rate scale."""
    groups = coarse_groups(model)
    trainable = FREEZE[freeze](groups)
    layer_of = {name: index for index, group in enumerate(groups) for name in group}
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
        scale = layer_decay ** (len(groups) - 1 - layer_of[name]) if freeze == "layer_decay" else 1.0
        buckets.setdefault((decay, scale), []).append(parameter)
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
