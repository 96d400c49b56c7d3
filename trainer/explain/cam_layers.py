"""Where Grad-CAM looks, derived from the model: no layer names or grid sizes are hard-coded.

Three families (`trainer.models.model_family`) cover the presets (and most of timm):
- `cnn`: the last feature stage timm names in `feature_info` (ResNet `layer4`, DenseNet
  `features.norm5`, EfficientNet's last block, ...), already N×C×H×W. At small inputs that stage
  can be 2×2 (64 px / stride 32), whose upsampled map only names a quadrant: the deepest stage
  with at least MIN_GRID cells per side at the actual input size is used instead (at 224 px
  the last one: 7×7).
- `vit` (ViT, DeiT and its distilled variant, ViT-ResNet hybrids, anything with `blocks`,
  `patch_embed` and prefix tokens): the last block's `norm1`, whose N×T×C tokens are reshaped to
  the patch grid after dropping the class/register/distillation tokens. The grid comes from the
  patch embedding at the actual input size, so any size the model accepts works.
- `swin` (timm models whose stages are channels-last, `output_fmt == "NHWC"`): the last stage,
  permuted to N×C×H×W.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainer.explain.loading import ExplainError
from trainer.models import model_family

Reshape = Callable[[torch.Tensor], torch.Tensor]
MIN_GRID = 4
"""Fewest feature-map cells per side for a CNN target stage (when the model has such a stage)."""


@dataclass(frozen=True)
class CamTarget:
    family: str
    layer: nn.Module
    reshape: Reshape | None
    """Activation → N×C×H×W for pytorch-grad-cam (None: already so)."""


def token_grid(model: nn.Module, height: int, width: int, patch_tokens: int) -> tuple[int, int]:
    """The patch grid (rows, cols) of an input of height × width holding `patch_tokens` tokens."""
    embed = model.patch_embed
    if hasattr(embed, "dynamic_feat_size"):
        rows, cols = (int(v) for v in embed.dynamic_feat_size((height, width)))
    else:
        rows, cols = (int(v) for v in embed.grid_size)
    if rows * cols != patch_tokens:  # a patch embedding that pads or resamples: trust the aspect
        rows = max(1, round(math.sqrt(patch_tokens * height / width)))
        cols = patch_tokens // rows
    if rows * cols != patch_tokens:
        raise ExplainError(f"cannot lay {patch_tokens} patch tokens on a grid for a {height}×{width} input")
    return rows, cols


def tokens_to_grid(model: nn.Module, height: int, width: int) -> Reshape:
    """N×T×C tokens → N×C×rows×cols, class/register/distillation tokens dropped."""
    prefix = int(model.num_prefix_tokens)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        rows, cols = token_grid(model, height, width, patches.shape[1])
        return patches.reshape(patches.shape[0], rows, cols, patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def channels_last_to_first(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


def feature_stage(model: nn.Module, height: int, width: int, min_grid: int = 0) -> nn.Module:
    """The deepest stage in timm's `feature_info` whose map has ≥ min_grid cells per side."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ExplainError(f"{type(model).__name__}: no timm feature_info to find its last feature stage")
    stages = [stage for stage in info if min(height, width) // int(stage.get("reduction", 1)) >= min_grid]
    return model.get_submodule((stages or info)[-1]["module"])


def cam_target(model: nn.Module, height: int, width: int) -> CamTarget:
    """The Grad-CAM target layer and reshape for this model at this input size."""
    family = model_family(model)
    if family == "vit":
        return CamTarget(family, model.blocks[-1].norm1, tokens_to_grid(model, height, width))
    if family == "swin":
        return CamTarget(family, feature_stage(model, height, width), channels_last_to_first)
    return CamTarget(family, feature_stage(model, height, width, MIN_GRID), None)
