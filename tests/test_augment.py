"""Augmentation: one matrix per sample, two executors (worker CPU, batched device) that agree."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shards.stream.augment import (
    IDENTITY,
    POLICIES,
    AugmentConfig,
    WarpParams,
    batch_params,
    is_identity,
    normalize,
    normalize_constants,
    pad_canvas,
    photometric,
    sample_params,
    warp,
    warp_cpu,
)


def smooth_image(height: int = 130, width: int = 100) -> np.ndarray:
    """A smooth, non-symmetric uint8 image: interpolation differences stay small, geometry shows."""
    y, x = np.mgrid[0:height, 0:width]
    return (110 + 80 * np.sin(x / 9.0) * np.cos(y / 11.0) + 0.2 * x).clip(0, 255).astype(np.uint8)


def noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def matrix(rows: list[list[float]]) -> WarpParams:
    return WarpParams(np.array(rows, dtype=np.float32))


def geometric(params: WarpParams) -> WarpParams:
    return replace(params, brightness=1.0, contrast=1.0)


def device_path(images: list[torch.Tensor], params: list[WarpParams], size: int) -> torch.Tensor:
    """The device executor as the stream runs it: one padded canvas, the batch's parameters as
    tensors, one `warp`, then `photometric` unless every draw is the identity."""
    canvas, sizes = pad_canvas(images)
    tensors = batch_params(params)
    out = warp(canvas, sizes, tensors["theta"], size)
    if is_identity(tensors["brightness"], tensors["contrast"]):
        return out
    return photometric(out, tensors["brightness"], tensors["contrast"])


def draws(policy: str, seed: int, count: int = 20) -> list[WarpParams]:
    rng = np.random.default_rng(seed)
    return [sample_params(AugmentConfig.preset(policy), rng) for _ in range(count)]


# --- preset "none": the identity, i.e. a plain resize -------------------------------------------------

def test_none_is_a_plain_resize() -> None:
    pixels = smooth_image()
    reference = F.interpolate(torch.from_numpy(pixels)[None, None].float(), size=(64, 64),
                              mode="bilinear", antialias=True, align_corners=False)[0]
    params = sample_params(AugmentConfig.preset("none"), np.random.default_rng(0))
    assert params is IDENTITY and params.brightness == params.contrast == 1.0
    cpu = warp_cpu(pixels, params, 64)
    assert cpu.shape == (1, 64, 64) and cpu.dtype == torch.uint8
    assert (cpu.float() - reference).abs().max() <= 1.0, "uint8 rounding only"
    device = device_path([torch.from_numpy(pixels)[None]], [params], 64)[0]
    # grid_sample does not antialias its 2× downscale: close on average, not per pixel
    assert device.shape == (1, 64, 64) and (device - reference).abs().mean() < 1.5


def test_identity_at_the_stored_size_returns_the_input() -> None:
    pixels = noise_image(40, 40)
    assert torch.equal(warp_cpu(pixels, IDENTITY, 40)[0], torch.from_numpy(pixels))
    device = device_path([torch.from_numpy(pixels)[None]], [IDENTITY], 40)[0, 0]
    assert torch.allclose(device, torch.from_numpy(pixels).float(), atol=1e-2), "sampling at pixel centres"


@pytest.mark.parametrize(("name", "theta", "expected"), [
    ("mirror", [[-1, 0, 0], [0, 1, 0]], lambda t: t.flip(-1)),
    ("rotate 90°", [[0, -1, 0], [1, 0, 0]], lambda t: torch.rot90(t, 1, (0, 1))),
    ("top-left quarter", [[0.5, 0, -0.5], [0, 0.5, -0.5]], lambda t: t[:20, :20]),
])
def test_both_executors_apply_the_matrix_geometry(
        name: str, theta: list, expected: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exact pixel permutations / crops: any error in the normalised-coordinate conventions shows."""
    pixels = noise_image(40, 40, seed=1)
    want = expected(torch.from_numpy(pixels)).float()
    size = want.shape[-1]
    params = matrix(theta)
    assert torch.equal(warp_cpu(pixels, params, size)[0].float(), want), name
    device = device_path([torch.from_numpy(pixels)[None]], [params], size)[0, 0]
    assert torch.allclose(device, want, atol=1e-2), name


# --- light / strong ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["light", "strong"])
def test_augmentation_changes_pixels_keeps_shape_and_executors_agree(policy: str) -> None:
    pixels, rng = smooth_image(), np.random.default_rng(1)
    plain = warp_cpu(pixels, IDENTITY, 64).float()
    for _ in range(10):
        params = geometric(sample_params(AugmentConfig.preset(policy), rng))
        cpu = warp_cpu(pixels, params, 64).float()
        device = device_path([torch.from_numpy(pixels)[None]], [params], 64)[0]
        assert cpu.shape == device.shape == (1, 64, 64)
        assert torch.isfinite(device).all() and device.min() >= 0 and device.max() <= 255
        # Executors differ by ≤ ~1.6 gray levels on average (the CPU path rounds its crop to whole
        # pixels and antialiases); the augmentation itself moves pixels by ≥ 3.5.
        assert (cpu - device).abs().mean() < 2.0, "same geometry, up to interpolation"
        assert (cpu - plain).abs().mean() > 3.0, "the augmentation does something"


@pytest.mark.parametrize("policy", ["light", "strong"])
def test_photometric_draws_change_intensities_and_stay_in_range(policy: str) -> None:
    params = draws(policy, seed=3, count=8)
    assert any(p.brightness != 1.0 for p in params) and any(p.contrast != 1.0 for p in params)
    config = AugmentConfig.preset(policy)
    assert all(abs(p.brightness - 1) <= config.brightness and abs(p.contrast - 1) <= config.contrast
               for p in params)
    images = [torch.from_numpy(smooth_image(64, 64))[None]] * len(params)
    out = device_path(images, params, 32)
    flat = device_path(images, [IDENTITY] * len(params), 32)
    assert out.shape == (8, 1, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
    assert (out - flat).abs().mean() > 1.0


def test_light_never_rotates_strong_does() -> None:
    light = [p.theta for p in draws("light", seed=2, count=50)]
    strong = [p.theta for p in draws("strong", seed=2, count=50)]
    assert all(t[0, 1] == 0 and t[1, 0] == 0 for t in light)
    assert any(abs(t[0, 1]) > 1e-3 for t in strong)


def test_horizontal_flip_is_off_by_default() -> None:
    assert not AugmentConfig().hflip
    assert not any(AugmentConfig.preset(policy).hflip for policy in POLICIES)
    thetas = [p.theta for policy in ("light", "strong") for p in draws(policy, seed=4, count=100)]
    assert all(t[0, 0] > 0 for t in thetas), "a negative x scale would mirror the chest"
    flipped = [p.theta[0, 0] for p in
               (sample_params(AugmentConfig.preset("light", hflip=True), np.random.default_rng(i))
                for i in range(50))]
    assert min(flipped) < 0 < max(flipped), "hflip=True mirrors about half of the samples"


def test_crops_stay_inside_the_image() -> None:
    for params in draws("light", seed=5, count=200):
        (a, b, c), (d, e, f) = params.theta.tolist()
        for x, y in ((-1, -1), (-1, 1), (1, -1), (1, 1)):  # output corners land inside the input
            assert abs(a * x + b * y + c) <= 1 + 1e-5 and abs(d * x + e * y + f) <= 1 + 1e-5
    for params in draws("strong", seed=5, count=200):
        (a, b, c), (d, e, f) = params.theta.tolist()
        width, height = np.hypot(a, b), np.hypot(d, e)  # crop half-sides before the rotation
        assert abs(c) <= 1 - width + 1e-5 and abs(f) <= 1 - height + 1e-5, "shift never passes the edge"


# --- determinism -------------------------------------------------------------------------------------

def test_same_seed_same_parameters_different_seed_different() -> None:
    first, same, other = draws("strong", 7), draws("strong", 7), draws("strong", 8)
    assert all(np.array_equal(a.theta, b.theta) and (a.brightness, a.contrast) == (b.brightness, b.contrast)
               for a, b in zip(first, same, strict=True))
    assert not all(np.array_equal(a.theta, b.theta) for a, b in zip(first, other, strict=True))
    assert [a.brightness for a in first] != [b.brightness for b in other]
    assert len({a.theta.tobytes() for a in first}) == len(first), "every draw differs from the last"


def test_presets_and_overrides() -> None:
    assert AugmentConfig.preset("none") == AugmentConfig()
    assert AugmentConfig.preset("strong", rotate_deg=3.0).rotate_deg == 3.0
    assert AugmentConfig.preset("light").crop_scale[0] > AugmentConfig.preset("strong").crop_scale[0]
    assert {f.name for f in fields(AugmentConfig)} >= {"policy", "hflip", "brightness", "contrast"}
    with pytest.raises(ValueError, match="augment policy"):
        AugmentConfig.preset("medium")


# --- ragged batches ----------------------------------------------------------------------------------

def test_ragged_batch_warps_into_one_batch_of_the_requested_size() -> None:
    shapes = ((130, 100), (90, 120), (64, 64), (33, 47))
    images = [torch.from_numpy(smooth_image(h, w))[None] for h, w in shapes]
    params = [geometric(p) for p in draws("strong", seed=9, count=len(images))]
    for size in (48, 24):
        batch = device_path(images, params, size)
        assert batch.shape == (len(images), 1, size, size) and batch.dtype == torch.float32
        for image, param, out in zip(images, params, batch, strict=True):
            alone = device_path([image], [param], size)[0]
            assert torch.allclose(out, alone, atol=1e-2), "padding in the shared canvas must not leak in"
            # and it is the same image the CPU executor makes of that sample
            cpu = warp_cpu(image[0].numpy(), param, size).float()
            assert (cpu - out).abs().mean() < 6.0


def test_ragged_batch_keeps_images_apart() -> None:
    images = [torch.full((1, 20, 30), 200, dtype=torch.uint8), torch.full((1, 50, 10), 40, dtype=torch.uint8)]
    batch = device_path(images, [IDENTITY, IDENTITY], 8)  # a downscale: every sample point lies in the image
    assert torch.allclose(batch[0], torch.full((1, 8, 8), 200.0), atol=1e-3)
    assert torch.allclose(batch[1], torch.full((1, 8, 8), 40.0), atol=1e-3), "no canvas padding"


def per_image_reference(image: torch.Tensor, theta: np.ndarray, size: int) -> torch.Tensor:
    """One image alone, its own matrix, torch's own affine_grid/grid_sample: no canvas, no rescale."""
    grid = F.affine_grid(torch.from_numpy(theta)[None], [1, 1, size, size], align_corners=False)
    return F.grid_sample(image.reshape(1, 1, *image.shape[-2:]).float(), grid, mode="bilinear",
                         padding_mode="zeros", align_corners=False)[0]


@pytest.mark.parametrize("layout", ["N×H×W uint8", "N×1×H×W float"])
def test_vectorised_warp_matches_each_image_warped_alone(layout: str) -> None:
    """The canvas matrices come from `sizes` in one vectorised step: every image of a ragged batch
    (rotations, flips, crops, the identity, a 1-pixel-high image) must come out as if warped alone."""
    shapes = ((130, 100), (90, 120), (64, 64), (33, 47), (1, 5), (130, 120))
    rng = np.random.default_rng(3)
    images = [torch.from_numpy(noise_image(h, w, seed=i)) for i, (h, w) in enumerate(shapes)]
    strong = AugmentConfig.preset("strong", hflip=True)
    params = [sample_params(strong, rng) for _ in shapes[:-1]] + [IDENTITY]
    canvas, sizes = pad_canvas(images)
    assert canvas.shape == (6, 130, 120) and sizes.tolist() == [list(shape) for shape in shapes]
    if layout == "N×1×H×W float":
        canvas = canvas[:, None].float()
    out = warp(canvas, sizes, batch_params(params)["theta"], 24)
    assert out.shape == (6, 1, 24, 24) and out.dtype == torch.float32
    for image, param, got in zip(images, params, out, strict=True):
        # float rounding of the rescaled coordinates only: ≤ 0.003 gray levels on noise images
        assert torch.allclose(got, per_image_reference(image, param.theta, 24), atol=1e-2)


def test_batch_params_are_float32_tensors_of_the_draws() -> None:
    params = draws("strong", seed=6, count=5)
    tensors = batch_params(params)
    assert {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} == {
        "theta": ((5, 2, 3), torch.float32), "brightness": ((5,), torch.float32),
        "contrast": ((5,), torch.float32)}
    assert np.array_equal(tensors["theta"].numpy(), np.stack([p.theta for p in params]))
    assert tensors["brightness"].tolist() == pytest.approx([p.brightness for p in params])
    assert tensors["contrast"].tolist() == pytest.approx([p.contrast for p in params])


def reference_draw(config: AugmentConfig, rng: np.random.Generator) -> WarpParams:
    """The earlier sampler, one numpy call per draw: the stream's augmentations must not change."""
    area = rng.uniform(*config.crop_scale)
    ratio = math.exp(rng.uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])))
    width, height = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
    center_x = rng.uniform(-(1.0 - width), 1.0 - width)
    center_y = rng.uniform(-(1.0 - height), 1.0 - height)
    angle = math.radians(rng.uniform(-config.rotate_deg, config.rotate_deg)) if config.rotate_deg else 0.0
    shift_x, shift_y = rng.uniform(-config.translate, config.translate, size=2) * 2.0
    shift_x = float(np.clip(center_x + shift_x, -(1.0 - width), 1.0 - width)) - center_x
    shift_y = float(np.clip(center_y + shift_y, -(1.0 - height), 1.0 - height)) - center_y
    flip = -1.0 if config.hflip and rng.random() < 0.5 else 1.0
    cos, sin = math.cos(angle), math.sin(angle)
    theta = np.array([[width * flip * cos, -width * flip * sin, center_x + shift_x],
                      [height * sin, height * cos, center_y + shift_y]], dtype=np.float32)
    brightness = 1.0 + rng.uniform(-config.brightness, config.brightness)
    contrast = 1.0 + rng.uniform(-config.contrast, config.contrast)
    return WarpParams(theta, float(brightness), float(contrast))


@pytest.mark.parametrize("overrides", [{}, {"hflip": True}, {"rotate_deg": 0.0, "hflip": True}])
@pytest.mark.parametrize("policy", ["light", "strong"])
def test_sampler_draws_exactly_what_one_call_per_draw_did(policy: str, overrides: dict) -> None:
    config = AugmentConfig.preset(policy, **overrides)
    ours, theirs = np.random.default_rng(12), np.random.default_rng(12)
    for _ in range(300):
        got, want = sample_params(config, ours), reference_draw(config, theirs)
        assert np.array_equal(got.theta, want.theta)
        assert (got.brightness, got.contrast) == (want.brightness, want.contrast)
    assert ours.random() == theirs.random(), "the generator advanced by the same number of draws"


# --- photometric and normalisation -------------------------------------------------------------------

def test_photometric_brightness_and_contrast() -> None:
    batch = torch.tensor([[[[10.0, 30.0]]], [[[100.0, 200.0]]], [[[250.0, 254.0]]]])
    params = [replace(IDENTITY, brightness=2.0), replace(IDENTITY, contrast=0.5),
              replace(IDENTITY, brightness=1.2)]
    tensors = batch_params(params)
    out = photometric(batch.clone(), tensors["brightness"], tensors["contrast"])
    assert out[0].flatten().tolist() == [20.0, 60.0]
    assert out[1].flatten().tolist() == [125.0, 175.0], "halfway to the mean 150"
    assert out[2].flatten().tolist() == [255.0, 255.0], "clamped to the 8-bit range"
    ones = torch.ones(3)
    assert torch.equal(photometric(batch.clone(), ones, ones), batch), "identity draws change nothing"
    assert is_identity(ones, ones) and not is_identity(tensors["brightness"], tensors["contrast"])


@pytest.mark.parametrize(("mean", "std"), [((0.449,), (0.226,)),
                                           ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_normalize_uses_mean_and_std(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    pixels = torch.from_numpy(noise_image(6, 5))[None, None].repeat(2, 1, 1, 1)
    out = normalize(pixels, mean, std)
    assert out.shape == (2, len(mean), 6, 5) and out.dtype == torch.float32
    for channel, (m, s) in enumerate(zip(mean, std, strict=True)):
        expected = (pixels[:, 0].float() / 255.0 - m) / s
        assert torch.allclose(out[:, channel], expected, atol=1e-5)
    assert torch.allclose(normalize(pixels.float(), mean, std), out), "uint8 and 0..255 float agree"


def test_normalize_per_channel_values() -> None:
    pixels = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    out = normalize(pixels, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    assert out.shape == (1, 3, 1, 2)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]))
    assert torch.allclose(out[0, :, 0, 1], torch.tensor([1.0, 3.0, 1.0]))


def test_normalize_builds_its_constants_once_per_device() -> None:
    """Not a Python list → device tensor on every batch (a blocking copy on a GPU): built once."""
    first = normalize_constants((0.5,), (0.25,), torch.device("cpu"))
    assert normalize_constants((0.5,), (0.25,), torch.device("cpu")) is first
    assert normalize_constants((0.5, 0.4, 0.3), (0.25,) * 3, torch.device("cpu")) is not first
