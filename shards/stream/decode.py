"""Decode a shard's image bytes to uint8 grayscale, as fast as the format allows.

The reading side of a shard's image format (`shards.pack.encode` wrote the bytes).
JPEG goes through simplejpeg (libjpeg-turbo), downscaled in the DCT domain only by 1/2, 1/4 or
1/8: those scales have SIMD paths, while libjpeg's other n/8 scales are slower than a full
decode (bench/loader.py measured 6/8 at 0.79× the full-size rate), so a 320 px image headed for
224 px is decoded whole and a full-resolution one is cut by a power of two first. PNG uses
Pillow; npy is raw uint8 (np.load with allow_pickle=False: never unpickle
shard data).
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image


class DecodeError(ValueError):
    """The bytes are not a decodable image of the expected format."""


class Scratch:
    """Decode buffers lent out one per image and all taken back at once (`reset`), when the
    images decoded into them are no longer needed (the loader: once a batch is collated)."""

    def __init__(self) -> None:
        self._buffers: list[np.ndarray] = []
        self._next = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of ≥ nbytes that no image taken since the last reset uses."""
        if self._next == len(self._buffers):
            self._buffers.append(np.empty(0, dtype=np.uint8))
        if self._buffers[self._next].nbytes < nbytes:
            self._buffers[self._next] = np.empty(nbytes, dtype=np.uint8)
        self._next += 1
        return self._buffers[self._next - 1]

    def reset(self) -> None:
        """Every buffer lent out may be overwritten from now on."""
        self._next = 0


def decode_gray(data: bytes, fmt: str, min_side: int = 0, scratch: Scratch | None = None) -> np.ndarray:
    """Bytes → H×W uint8; for JPEG, scaled down by libjpeg while staying ≥ min_side per axis.

    `scratch`: JPEG pixels go into a buffer it lends, reused batch after batch, instead of fresh
    memory per image (page faults: decoding a batch's 32 images into new arrays took 1.25× the
    time of decoding them into memory already in use; see docs/benchmarks.md, 2026-12-02).
    """
    try:
        if fmt == "jpg":
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            scale = 1
            while min_side > 0 and scale < 8 and min(height, width) // (scale * 2) >= min_side:
                scale *= 2
            out_height, out_width = -(-height // scale), -(-width // scale)
            buffer = scratch.take(out_height * out_width) if scratch is not None else None
            pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=out_height,
                                            min_width=out_width, buffer=buffer)
            return pixels[:, :, 0]
        if fmt == "png":
            with Image.open(io.BytesIO(data)) as image:
                return np.asarray(image.convert("L"), dtype=np.uint8)
        if fmt == "npy":
            pixels = np.load(io.BytesIO(data), allow_pickle=False)
            if pixels.dtype != np.uint8 or pixels.ndim != 2:
                raise DecodeError(f"npy image must be 2-D uint8, got {pixels.dtype} {pixels.shape}")
            return pixels
    except DecodeError:
        raise
    except (ValueError, OSError, SyntaxError) as err:
        raise DecodeError(f"cannot decode {fmt}: {err}") from None
    raise DecodeError(f"unknown image format {fmt!r}")
