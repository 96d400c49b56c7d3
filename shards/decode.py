"""Decode a shard's image bytes to uint8 grayscale, as fast as the format allows.

JPEG goes through simplejpeg (libjpeg-turbo) with DCT-domain downscaling: asking for at least
the output size lets libjpeg skip most of the inverse DCT work for a 320 px image headed for
224 px. PNG uses Pillow; npy is raw uint8 (np.load with allow_pickle=False: never unpickle
shard data).
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image


class DecodeError(ValueError):
    """The bytes are not a decodable image of the expected format."""


def decode_gray(data: bytes, fmt: str, min_side: int = 0) -> np.ndarray:
    """Bytes → H×W uint8; for JPEG, scaled down by libjpeg while staying ≥ min_side per axis."""
    try:
        if fmt == "jpg":
            pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=min_side, min_width=min_side)
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
