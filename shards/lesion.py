"""Lesion masks as stored on disk and in shards: one 16-bit PNG whose bits name the findings.

Bit i of a pixel is set where the dataset's label i (in the manifest's `label_names` order:
CheXpert's and MIMIC's 14 columns, NIH's 14 findings then `No Finding`, or `Pneumonia` alone) was
drawn at full strength, so one file gives per-label ground truth and `value != 0` is the union.
An 8-bit PNG is a union mask (0/255) that cannot tell findings apart (hand-drawn or legacy masks):
every label sees the union.

Torch-free: the pack workers and the stream's loader workers both use it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

UNION = 0xFFFF
"""What an 8-bit union mask decodes to: every label's bit."""
MAX_LABELS = 16


def label_bit(index: int) -> int:
    """The mask bit of the dataset's label number `index`."""
    if not 0 <= index < MAX_LABELS:
        raise ValueError(f"label index {index}: a 16-bit lesion mask holds labels 0..{MAX_LABELS - 1}")
    return 1 << index


def encode_lesion(bits: np.ndarray) -> bytes:
    """uint16 H×W label bits → 16-bit grayscale PNG bytes."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(bits, dtype=np.uint16))
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def to_bits(image: Image.Image) -> np.ndarray:
    """A decoded mask PNG → uint16 label bits (an 8-bit union mask becomes UNION where > 127)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image).astype(np.uint16)
    gray = np.asarray(image.convert("L"))
    return np.where(gray > 127, UNION, 0).astype(np.uint16)


def decode_lesion(data: bytes) -> np.ndarray:
    """PNG bytes from a shard (`{key}.mask.png`) → uint16 H×W label bits."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_bits(image)


def resize_nearest(bits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres: bits are labels, never interpolated."""
    rows = ((np.arange(height) + 0.5) * bits.shape[0] / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * bits.shape[1] / width).astype(np.int64)
    return bits[np.minimum(rows, bits.shape[0] - 1)[:, None], np.minimum(cols, bits.shape[1] - 1)[None, :]]


def label_planes(bits: np.ndarray, indices: Sequence[int | None]) -> np.ndarray:
    """uint16 H×W bits → bool L×H×W, one plane per wanted label (None: a label the dataset lacks)."""
    planes = np.zeros((len(indices), *bits.shape), dtype=bool)
    for plane, index in zip(planes, indices, strict=True):
        if index is not None:
            plane[:] = (bits & label_bit(index)) != 0
    return planes
