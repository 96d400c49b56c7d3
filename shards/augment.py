"""Augmentation policies as one affine warp plus brightness/contrast, on CPU or GPU alike.

Every geometric op (random resized crop, rotation, translation, optional flip, and the final
resize to a square) composes into one 2×3 matrix per sample. Parameters are drawn in the loader
worker from a numpy Generator seeded by the stream position, so a sample's augmentation is a pure
function of that position and a resumed stream repeats it exactly. Two executors share the matrix:
`warp` (one `grid_sample` over a padded batch: the device path, one kernel on a GPU) and
`warp_cpu` (in the loader worker: the CPU path, where `grid_sample` costs more than the JPEG
decode itself; an axis-aligned crop becomes a crop view and one antialiased resize). They
agree up to interpolation differences. Horizontal flip is off by default: chest X-rays are not
mirror-symmetric (heart on the left, situs inversus is a finding). Rotation is in `strong` only:
it turns the cheap box resize into a general affine resample, twice the cost on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Policy = Literal["none", "light", "strong"]
POLICIES: tuple[str, ...] = ("none", "light", "strong")


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random ops; `preset()` fills them for a named policy."""

    policy: Policy = "none"
    crop_scale: tuple[float, float] = (1.0, 1.0)
    """Random resized crop: fraction of the image area kept."""
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    """Random resized crop: aspect-ratio range of the crop (relative to the image)."""
    rotate_deg: float = 0.0
    translate: float = 0.0
    """Largest shift, as a fraction of the output side."""
    brightness: float = 0.0
    contrast: float = 0.0
    hflip: bool = False

    @staticmethod
    def preset(policy: str, **overrides: object) -> AugmentConfig:
        if policy not in POLICIES:
            raise ValueError(f"augment policy {policy!r}: expected one of {POLICIES}")
        base = {
            "none": AugmentConfig(),
            "light": AugmentConfig("light", (0.80, 1.0), (0.9, 1.1), 0.0, 0.03, 0.10, 0.10),
            "strong": AugmentConfig("strong", (0.60, 1.0), (0.8, 1.25), 10.0, 0.06, 0.25, 0.25),
        }[policy]
        return replace(base, **overrides)


@dataclass(frozen=True)
class WarpParams:
    """One sample's draw: the output→input affine matrix and photometric factors."""

    theta: np.ndarray
    """2×3, maps output coordinates in [-1, 1] to input coordinates in [-1, 1]."""
    brightness: float = 1.0
    contrast: float = 1.0


IDENTITY = WarpParams(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32))


def sample_params(config: AugmentConfig, rng: np.random.Generator) -> WarpParams:
    """Draw one sample's augmentation; `none` is the identity (the whole image, squashed)."""
    if config.policy == "none":
        return IDENTITY
    area = rng.uniform(*config.crop_scale)
    ratio = math.exp(rng.uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])))
    width, height = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
    center_x = rng.uniform(-(1.0 - width), 1.0 - width)
    center_y = rng.uniform(-(1.0 - height), 1.0 - height)
    angle = math.radians(rng.uniform(-config.rotate_deg, config.rotate_deg)) if config.rotate_deg else 0.0
    shift_x, shift_y = rng.uniform(-config.translate, config.translate, size=2) * 2.0
    # The shift moves the crop window but never past the image edge: no black borders.
    shift_x = float(np.clip(center_x + shift_x, -(1.0 - width), 1.0 - width)) - center_x
    shift_y = float(np.clip(center_y + shift_y, -(1.0 - height), 1.0 - height)) - center_y
    flip = -1.0 if config.hflip and rng.random() < 0.5 else 1.0
    cos, sin = math.cos(angle), math.sin(angle)
    # input = crop_scale · rotation · output + crop_center + shift
    theta = np.array(
        [[width * flip * cos, -width * flip * sin, center_x + shift_x],
         [height * sin, height * cos, center_y + shift_y]],
        dtype=np.float32,
    )
    brightness = 1.0 + rng.uniform(-config.brightness, config.brightness)
    contrast = 1.0 + rng.uniform(-config.contrast, config.contrast)
    return WarpParams(theta, float(brightness), float(contrast))


def warp(images: list[torch.Tensor], params: list[WarpParams], size: int) -> torch.Tensor:
    """Warp 1×H×W images of any sizes into one N×1×size×size float batch (0..255 scale).

    Images are padded into one canvas and each matrix is rescaled to its image's corner of the
    canvas, so a single `grid_sample` serves a ragged batch: on a GPU that is one kernel, not N.
    Outside the image the result is 0 (black), as with per-image zero padding.
    """
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    device = images[0].device
    canvas = torch.zeros(len(images), 1, height, width, dtype=torch.float32, device=device)
    thetas = torch.empty(len(images), 2, 3, dtype=torch.float32)
    for i, (image, param) in enumerate(zip(images, params, strict=True)):
        h, w = image.shape[-2:]
        canvas[i, :, :h, :w] = image
        theta = torch.from_numpy(param.theta)
        # Image-frame coords u map to canvas coords (u + 1) · w / W - 1 (align_corners=False).
        scale = torch.tensor([[w / width], [h / height]], dtype=torch.float32)
        thetas[i] = theta * scale
        thetas[i, :, 2] += scale[:, 0] - 1.0
    grid = F.affine_grid(thetas.to(device), [len(images), 1, size, size], align_corners=False)
    out = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return photometric(out, params)


def warp_cpu(pixels: np.ndarray, params: WarpParams, size: int) -> torch.Tensor:
    """The CPU executor of the geometry: H×W uint8 → 1×size×size uint8 (then `photometric` on the batch).

    An axis-aligned matrix (crop + scale + shift) is a crop view and one antialiased bilinear
    resize (torch's uint8 kernel: 0.75× Pillow's time); rotation or flip falls back to Pillow's
    affine resample (about twice the cost), with black outside the image as in `warp`.
    """
    height, width = pixels.shape
    (a, b, c), (d, e, f) = params.theta.tolist()
    left, right = round((c - a + 1) * width / 2), round((c + a + 1) * width / 2)
    top, bottom = round((f - e + 1) * height / 2), round((f + e + 1) * height / 2)
    if b == 0 and d == 0 and 0 <= left < right <= width and 0 <= top < bottom <= height:
        crop = torch.from_numpy(pixels)[None, None, top:bottom, left:right]
        return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
    # Pillow maps output pixel centres (x + ½, y + ½) through (a x + b y + c, d x + e y + f) in
    # input pixels; compose that with the normalised [-1, 1] matrix (align_corners=False).
    sx, sy = width / 2, height / 2
    data = (sx * a * 2 / size, sx * b * 2 / size, sx * (c - a - b + 1),
            sy * d * 2 / size, sy * e * 2 / size, sy * (f - d - e + 1))
    out = Image.fromarray(pixels).transform((size, size), Image.Transform.AFFINE, data,
                                            resample=Image.Resampling.BILINEAR, fillcolor=0)
    return torch.from_numpy(np.array(out))[None]


def photometric(batch: torch.Tensor, params: list[WarpParams]) -> torch.Tensor:
    """Brightness scales intensities; contrast stretches them about each image's mean. In place.

    ((x·b − m)·c + m with m = mean(x·b)) folds into one per-image multiply-add: x·bc + m(1 − c).
    """
    if all(p.brightness == 1.0 and p.contrast == 1.0 for p in params):
        return batch
    brightness = torch.tensor([p.brightness for p in params], device=batch.device).view(-1, 1, 1, 1)
    contrast = torch.tensor([p.contrast for p in params], device=batch.device).view(-1, 1, 1, 1)
    offset = batch.mean(dim=(1, 2, 3), keepdim=True) * brightness * (1.0 - contrast)
    return batch.mul_(brightness * contrast).add_(offset).clamp_(0.0, 255.0)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 or 0..255 float N×1×H×W → normalised float with len(mean) channels (gray repeated).

    Kept out of the loader workers: uint8 crosses the process boundary and the host→device copy
    (4× less than float32), and the arithmetic runs where the model runs, as one broadcast
    multiply-add that also repeats the gray channel.
    """
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=images.device)
    return (images.float() * scale).add_(shift.view(1, -1, 1, 1))
