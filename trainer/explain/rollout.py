"""Attention rollout (Abnar & Zuidema 2020) for ViT-family models; pytorch-grad-cam has none.

Each block's attention (heads fused by mean, max or min) gets the residual connection as an
identity term, A' = ½(A + I), rows renormalised; the product over blocks says how much each input
token reaches the class token at the top. timm computes attention with a fused kernel that never
materialises the weights, so rollout turns `fused_attn` off for its forward pass and reads the
softmax output where it enters `attn_drop`. The map is class-agnostic: one per image, whatever
the label.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.explain.cam_layers import token_grid
from trainer.models import model_family

HEAD_FUSIONS = ("mean", "max", "min")


def supports_rollout(model: nn.Module) -> bool:
    """Global self-attention blocks with a visible softmax (Swin's windows do not compose)."""
    return model_family(model) == "vit" and all(
        hasattr(block, "attn") and hasattr(block.attn, "attn_drop") and hasattr(block.attn, "fused_attn")
        for block in model.blocks)


@contextlib.contextmanager
def recorded_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect each block's attention weights (N×heads×T×T) during a forward pass."""
    maps: list[torch.Tensor] = []
    saved = [block.attn.fused_attn for block in model.blocks]
    hooks = []
    try:
        for block in model.blocks:
            block.attn.fused_attn = False
            hooks.append(block.attn.attn_drop.register_forward_hook(
                lambda _module, _inputs, output: maps.append(output.detach())))
        yield maps
    finally:
        for hook in hooks:
            hook.remove()
        for block, fused in zip(model.blocks, saved, strict=True):
            block.attn.fused_attn = fused


def fuse_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head fusion {head_fusion!r}: expected one of {HEAD_FUSIONS}")


def rollout(model: nn.Module, images: torch.Tensor, head_fusion: str = "mean") -> np.ndarray:
    """N×H×W maps in [0, 1] (float32): how much each image region reaches the class token."""
    with torch.no_grad(), recorded_attention(model) as maps:
        model(images)
    if len(maps) != len(model.blocks):
        raise RuntimeError(f"rollout saw {len(maps)} attention maps for {len(model.blocks)} blocks")
    tokens = maps[0].shape[-1]
    identity = torch.eye(tokens, device=images.device)
    joint = identity.expand(images.shape[0], tokens, tokens)
    for attention in maps:
        fused = 0.5 * fuse_heads(attention.float(), head_fusion) + 0.5 * identity
        fused = fused / fused.sum(dim=-1, keepdim=True)
        joint = fused @ joint
    prefix = int(model.num_prefix_tokens)
    # With a class token its row is the answer; without one (global average pooling) every patch
    # token feeds the head, so their rows are averaged.
    reach = joint[:, 0, prefix:] if prefix else joint.mean(dim=1)
    height, width = images.shape[-2:]
    rows, cols = token_grid(model, height, width, reach.shape[1])
    grid = reach.reshape(-1, 1, rows, cols)
    upsampled = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return normalize_maps(upsampled.cpu().numpy())


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Min-max each map to [0, 1] (a flat map becomes all zeros), non-finite values zeroed."""
    maps = np.nan_to_num(maps.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)
