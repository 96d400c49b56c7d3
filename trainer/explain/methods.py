"""The explainers, registered by name: each maps (model, images, class index) → N×H×W in [0, 1].

Grad-CAM and Grad-CAM++ are pytorch-grad-cam's, on the layer `cam_layers.cam_target` derives;
rollout is ours (`rollout.py`). A method that does not apply to an architecture (rollout on a CNN
or a Swin) says so through `supports`, and the job skips that pair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from trainer.explain.cam_layers import cam_target
from trainer.explain.rollout import normalize_maps, rollout, supports_rollout

Explain = Callable[[nn.Module, torch.Tensor, int], np.ndarray]
"""(model, images, class index) → N×H×W maps; a class-agnostic method ignores the index."""


@dataclass(frozen=True)
class Method:
    name: str
    explain: Explain
    supports: Callable[[nn.Module], bool]
    class_specific: bool
    """False: one map per image whatever the label (rollout), so the job computes it once per
    sample and every label reuses it."""


METHODS: dict[str, Method] = {}


def register(name: str, explain: Explain, supports: Callable[[nn.Module], bool] = lambda _: True,
             class_specific: bool = True) -> None:
    METHODS[name] = Method(name, explain, supports, class_specific)


@contextlib.contextmanager
def activation_gradients_only(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient for a CAM: freezing them (the input carries the graph instead)
    skips every weight-gradient kernel, the larger half of the backward pass."""
    saved = [parameter.requires_grad for parameter in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(model.parameters(), saved, strict=True):
            parameter.requires_grad_(flag)


def grad_cam(cam_class: type, model: nn.Module, images: torch.Tensor, index: int) -> np.ndarray:
    """pytorch-grad-cam on the derived target layer; its maps come back at the input size."""
    target = cam_target(model, images.shape[-2], images.shape[-1])
    with activation_gradients_only(model), cam_class(model=model, target_layers=[target.layer],
                                                     reshape_transform=target.reshape) as cam:
        maps = cam(input_tensor=images.detach().requires_grad_(True),
                   targets=[ClassifierOutputTarget(index)] * len(images))
    return normalize_maps(np.asarray(maps))


register("gradcam", partial(grad_cam, GradCAM))
register("gradcam++", partial(grad_cam, GradCAMPlusPlus))
for fusion, name in (("mean", "rollout"), ("max", "rollout-max")):
    register(name, partial(lambda fusion, model, images, _index: rollout(model, images, fusion), fusion),
             supports_rollout, class_specific=False)


def resolve_methods(names: list[str]) -> list[Method]:
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r} (expected some of {', '.join(METHODS)})")
    return [METHODS[name] for name in names]
