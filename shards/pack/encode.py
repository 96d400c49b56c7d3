"""Turn one source image (+ optional lesion mask) into the bytes a shard stores.

The packing side of a shard's image format; `shards.stream.decode` reads the bytes back.
Torch-free on purpose: pack workers are forked processes and should start in milliseconds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import simplejpeg
from PIL import Image

from shards.lesion import encode_lesion, resize_nearest, to_bits

ImageFormat = Literal["jpg", "png", "npy"]
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "png", "npy")


class ImageError(Exception):
    """The file is missing or cannot be decoded; `kind` goes to rejects.jsonl."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class EncodedImage:
    data: bytes
    width: int
    height: int
    source_width: int
    """The image file's own size, before the resize: annotations given in the original pixels
    (NIH boxes) are mapped onto the packed image with it."""
    source_height: int


def load_grayscale(path: str, short_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode to uint8 H×W, shorter side at most `short_side` (never upscaled); also the file's
    own (width, height).

    JPEG `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale first: a full-resolution
    CheXpert image (~2,500 px) then costs a fraction of a full decode before the final resize.
    """
    try:
        with Image.open(path) as image:
            source = image.size
            if image.format == "JPEG":
                scale = min(image.size) / short_side
                if scale >= 2:
                    image.draft("L", (image.size[0] / scale, image.size[1] / scale))
            gray = image.convert("L") if image.mode != "L" else image
            gray.load()
            width, height = gray.size
            factor = short_side / min(width, height)
            if factor < 1:
                size = (max(1, round(width * factor)), max(1, round(height * factor)))
                gray = gray.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            return np.asarray(gray, dtype=np.uint8), source
    except FileNotFoundError:
        raise ImageError("missing_file", f"missing file {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError("corrupt_image", f"unreadable image {path}: {err}") from None


def encode_image(pixels: np.ndarray, fmt: ImageFormat, quality: int) -> bytes:
    """uint8 H×W → jpg (libjpeg-turbo via simplejpeg), png, or npy (no pickle, fixed dtype)."""
    if fmt == "jpg":
        return simplejpeg.encode_jpeg(pixels[:, :, None], quality=quality, colorspace="GRAY")
    buffer = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    else:
        np.save(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
    return buffer.getvalue()


def load_image(path: str, short_side: int, fmt: ImageFormat, quality: int) -> EncodedImage:
    """Load, resize and encode one image for a shard."""
    pixels, (source_width, source_height) = load_grayscale(path, short_side)
    return EncodedImage(encode_image(pixels, fmt, quality), pixels.shape[1], pixels.shape[0],
                        source_width, source_height)


def load_mask(path: str, width: int, height: int) -> bytes:
    """Resize a lesion mask to the packed image's size (nearest) and store it as PNG.

    A 16-bit label-bit mask (`shards.lesion`, what shards.synth writes) keeps its bits; an 8-bit
    union mask stays 8-bit 0/255.
    """
    try:
        with Image.open(path) as mask:
            mask.load()
            bits = to_bits(mask)
            union_only = mask.mode not in ("I;16", "I;16B", "I;16L", "I")
    except FileNotFoundError:
        raise ImageError("missing_file", f"missing mask {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("corrupt_image", f"unreadable mask {path}: {err}") from None
    resized = resize_nearest(bits, height, width)
    if not union_only:
        return encode_lesion(resized)
    buffer = io.BytesIO()
    union = np.where(resized != 0, 255, 0).astype(np.uint8)
    Image.fromarray(union).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
