"""Decoding shard bytes: JPEG scaled only by SIMD-friendly powers of two; npy never unpickles."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from shards.decode import DecodeError, decode_gray


def jpeg(height: int, width: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 1), dtype=np.uint8)
    return simplejpeg.encode_jpeg(pixels, colorspace="GRAY")


@pytest.mark.parametrize(("min_side", "shape"), [
    (0, (800, 640)), (224, (400, 320)), (320, (400, 320)), (100, (200, 160)), (50, (100, 80)),
    (1000, (800, 640)),
])
def test_jpeg_is_cut_by_powers_of_two_and_never_below_min_side(min_side: int, shape: tuple[int, int]) -> None:
    assert decode_gray(jpeg(800, 640), "jpg", min_side).shape == shape


def test_png_and_npy_round_trip() -> None:
    pixels = np.arange(64 * 48, dtype=np.uint32).reshape(64, 48).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    npy = io.BytesIO()
    np.save(npy, pixels)
    assert np.array_equal(decode_gray(png.getvalue(), "png"), pixels)
    assert np.array_equal(decode_gray(npy.getvalue(), "npy"), pixels)


def test_npy_pickles_and_wrong_arrays_are_refused() -> None:
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DecodeError, match="cannot decode npy"):
        decode_gray(pickled.getvalue(), "npy")
    floats = io.BytesIO()
    np.save(floats, np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(DecodeError, match="2-D uint8"):
        decode_gray(floats.getvalue(), "npy")
    with pytest.raises(DecodeError, match="cannot decode jpg"):
        decode_gray(b"\xff\xd8 not really", "jpg")
    with pytest.raises(DecodeError, match="unknown image format"):
        decode_gray(b"", "webp")
