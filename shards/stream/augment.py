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

On the device path nothing per sample is a Python object by the time it reaches the device: the
worker collates the draws into tensors (`batch_params`) that are pinned and copied with the
pixels, `warp` rescales every matrix to the padded canvas in one vectorised step, and
`normalize` keeps its constants on the device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
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
    """Draw one sample's augmentation; `none` is the identity (the whole image, squashed).

    All uniforms come from one `rng.random(n)` call, scaled as numpy's `uniform` scales them
    (low + (high − low)·u), in the order of the earlier one-call-per-draw code: the same values,
    bit for bit, at a seventh of the cost (≈35 µs per sample was a tenth of a worker's decode).
    """
    if config.policy == "none":
        return IDENTITY
    draws = iter(rng.random(_draw_count(config)).tolist())

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * next(draws)

    area = uniform(*config.crop_scale)
    ratio = math.exp(uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])))
    width, height = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
    center_x = uniform(-(1.0 - width), 1.0 - width)
    center_y = uniform(-(1.0 - height), 1.0 - height)
    angle = math.radians(uniform(-config.rotate_deg, config.rotate_deg)) if config.rotate_deg else 0.0
    shift_x = uniform(-config.translate, config.translate) * 2.0
    shift_y = uniform(-config.translate, config.translate) * 2.0
    # The shift moves the crop window but never past the image edge: no black borders.
    shift_x = min(max(center_x + shift_x, -(1.0 - width)), 1.0 - width) - center_x
    shift_y = min(max(center_y + shift_y, -(1.0 - height)), 1.0 - height) - center_y
    flip = -1.0 if config.hflip and next(draws) < 0.5 else 1.0
    cos, sin = math.cos(angle), math.sin(angle)
    # input = crop_scale · rotation · output + crop_center + shift
    theta = np.array(
        [[width * flip * cos, -width * flip * sin, center_x + shift_x],
         [height * sin, height * cos, center_y + shift_y]],
        dtype=np.float32,
    )
    brightness = 1.0 + uniform(-config.brightness, config.brightness)
    contrast = 1.0 + uniform(-config.contrast, config.contrast)
    return WarpParams(theta, brightness, contrast)


def _draw_count(config: AugmentConfig) -> int:
    """Uniforms per sample: crop (4), rotation (if any), shift (2), flip (if on), photometric (2)."""
    return 8 + bool(config.rotate_deg) + bool(config.hflip)


def batch_params(params: Sequence[WarpParams]) -> dict[str, torch.Tensor]:
    """A batch's draws as tensors: theta N×2×3, brightness N, contrast N (float32).

    Built once in the loader worker, so they cross to the device as pinned tensors beside the
    pixels, not as Python objects turned into device tensors on every step.
    """
    return {
        "theta": torch.from_numpy(np.stack([p.theta for p in params]).astype(np.float32, copy=False)),
        "brightness": torch.tensor([p.brightness for p in params], dtype=torch.float32),
        "contrast": torch.tensor([p.contrast for p in params], dtype=torch.float32),
    }


def pad_canvas(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged 1×h×w (or h×w) images → an N×H×W zero-padded canvas (image i in its top-left corner) on
    their device, and their sizes N×2 (h, w) int64 on the host. One copy per image: for images that
    exist only as separate tensors (nvJPEG output); the loader workers build their canvas themselves.
    """
    shapes = [tuple(image.shape[-2:]) for image in images]
    height, width = max(h for h, _ in shapes), max(w for _, w in shapes)
    canvas = images[0].new_zeros(len(images), height, width)
    for index, (image, (h, w)) in enumerate(zip(images, shapes, strict=True)):
        canvas[index, :h, :w] = image.reshape(h, w)
    return canvas, torch.tensor(shapes, dtype=torch.int64)


def canvas_theta(theta: torch.Tensor, sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rescale each image-frame matrix to its image's top-left corner of a height×width canvas.

    Image-frame coords u map to canvas coords (u + 1)·w/W − 1 (align_corners=False): row 0 of θ
    scales by w/W and row 1 by h/H, and the offsets gain w/W − 1, h/H − 1. Vectorised over the
    batch (no per-image loop, no host round trip) on whatever device `theta` and `sizes` are.
    """
    scale = torch.stack((sizes[:, 1] / width, sizes[:, 0] / height), dim=1).to(theta.dtype)  # N×2
    out = theta * scale[:, :, None]
    out[:, :, 2] += scale - 1.0
    return out


def warp(canvas: torch.Tensor, sizes: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Warp a ragged batch into one N×1×size×size float batch (0..255 scale), geometry only.

    `canvas`: N×H×W or N×1×H×W (uint8 or float), image i in its top-left sizes[i] = (h, w) corner
    and zeros elsewhere (`pad_canvas`, or the loader's collate); `theta`: N×2×3 image-frame
    matrices (`batch_params`). Each matrix is rescaled to its corner of the canvas, so one
    `grid_sample` serves a ragged batch: on a GPU one kernel, not N. Outside the image the result
    is 0 (black), as with per-image zero padding. Brightness/contrast: `photometric`.
    """
    height, width = canvas.shape[-2:]
    canvas = canvas.reshape(len(canvas), 1, height, width).float()
    thetas = canvas_theta(theta.float(), sizes, height, width)
    grid = F.affine_grid(thetas, [len(canvas), 1, size, size], align_corners=False)
    return F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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


def photometric(batch: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Brightness scales intensities; contrast stretches them about each image's mean. In place.

    ((x·b − m)·c + m with m = mean(x·b)) folds into one per-image multiply-add: x·bc + m(1 − c).
    `brightness`, `contrast`: N float tensors on the batch's device (`batch_params`). Always
    computes: whether a batch is all identity is the caller's question, best asked on the host
    (`is_identity`), since asking it of device tensors would wait on the device.
    """
    brightness = brightness.to(batch.dtype).view(-1, 1, 1, 1)
    contrast = contrast.to(batch.dtype).view(-1, 1, 1, 1)
    offset = batch.mean(dim=(1, 2, 3), keepdim=True) * brightness * (1.0 - contrast)
    return batch.mul_(brightness * contrast).add_(offset).clamp_(0.0, 255.0)


def is_identity(brightness: torch.Tensor, contrast: torch.Tensor) -> bool:
    """True when no sample of the batch changes intensities (eval, policy none): `photometric` can be
    skipped. Host copies only: `.numpy()` refuses a device tensor, whose answer would cost a sync."""
    return bool(np.all(brightness.numpy() == 1.0) and np.all(contrast.numpy() == 1.0))


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 or 0..255 float N×1×H×W → normalised float with len(mean) channels (gray repeated).

    Kept out of the loader workers: uint8 crosses the process boundary and the host→device copy
    (4× less than float32), and the arithmetic runs where the model runs, as one broadcast
    multiply-add that also repeats the gray channel.
    """
    scale, shift = normalize_constants(tuple(mean), tuple(std), images.device)
    return (images.float() * scale).add_(shift)


@functools.lru_cache(maxsize=32)
def normalize_constants(mean: tuple[float, ...], std: tuple[float, ...],
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`normalize`'s 1×C×1×1 scale and shift, built on the host and moved once per (mean, std,
    device): not a Python list → device tensor (a blocking copy) on every batch."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32)
    scale, shift = scale.to(device), shift.view(1, -1, 1, 1).to(device)
    if device.type == "cuda":  # once per entry: then any stream may read them (staging uses a side one)
        torch.cuda.synchronize(device)
    return scale, shift
