"""Decoding shard bytes: JPEG scaled only by SIMD-friendly powers of two; npy never unpickles."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from shards.stream.decode import DecodeError, Scratch, decode_gray


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


def test_scratch_lends_one_buffer_per_image_until_reset() -> None:
    """Images decoded into a scratch equal fresh decodes and stay intact until `reset`; after it,
    the same memory is lent again (so a caller must be done with them: the loader's collate)."""
    flat = simplejpeg.encode_jpeg(np.full((30, 20, 1), 77, np.uint8), colorspace="GRAY")
    blobs = [jpeg(80, 64), jpeg(400, 320), flat]
    scratch = Scratch()
    first = [decode_gray(blob, "jpg", 0, scratch) for blob in blobs]
    for blob, pixels in zip(blobs, first, strict=True):
        assert np.array_equal(pixels, decode_gray(blob, "jpg")), "decoded while the others are held"
    assert len({pixels.__array_interface__["data"][0] for pixels in first}) == 3
    scratch.reset()
    again = decode_gray(blobs[2], "jpg", 0, scratch)
    assert np.shares_memory(again, first[0]), "reused after reset"
    assert decode_gray(blobs[1], "jpg", 160, scratch).shape == (200, 160), "a larger image, a larger buffer"
