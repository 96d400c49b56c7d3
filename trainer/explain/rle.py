"""COCO run-length encoding (pycocotools' `mask.encode` / `mask.decode`), which CheXlocalize's
`gt_segmentations_*.json` use; numpy only, so pycocotools is no dependency.

A mask is flattened in column-major (Fortran) order and described by alternating run lengths,
zeros first (the first run may be 0). The compressed string form (`rleToString` in COCO's
maskApi.c) writes each run, from the fourth on as the difference to the run two before it, in
5-bit groups, least significant first, one character (ASCII 48 + value) per group: bit 5 (0x20)
says another group follows, and bit 4 of the last group is the sign. Both the string form and the
plain list of counts (COCO's "uncompressed RLE") are read.
"""

from __future__ import annotations

import numpy as np


class RLEError(ValueError):
    """Counts that are not a COCO RLE of the stated size."""


def string_to_counts(text: str) -> np.ndarray:
    """The compressed string → run lengths, int64 (maskApi.c `rleFrString`, vectorised: a
    CheXlocalize file holds thousands of strings of a few thousand characters each)."""
    if not text.isascii():
        raise RLEError("compressed RLE holds a non-ASCII character (COCO's alphabet is ASCII 48-111)")
    codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if codes.size == 0:
        return np.zeros(0, dtype=np.int64)
    if codes.min() < 0 or codes.max() >= 64:
        bad = text[int(np.flatnonzero((codes < 0) | (codes >= 64))[0])]
        raise RLEError(f"character {bad!r} is not in COCO's RLE alphabet (ASCII 48-111)")
    last = (codes & 0x20) == 0  # a group without the continuation bit ends a number
    if not last[-1]:
        raise RLEError("compressed RLE ends inside a number")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    position = np.arange(codes.size) - np.repeat(starts, ends - starts + 1)  # group index in its number
    values = np.add.reduceat((codes & 0x1F) << (5 * position), starts)
    negative = (codes[ends] & 0x10) != 0  # sign-extend past the last group
    values[negative] -= np.left_shift(1, 5 * (position[ends][negative] + 1))
    # From the fourth run on, each is stored as the difference to the run two before it.
    counts = values.copy()
    counts[1::2] = np.cumsum(values[1::2])
    counts[2::2] = np.cumsum(values[2::2])
    return counts


def counts_to_string(counts: list[int]) -> str:
    """Run lengths → the compressed string (maskApi.c `rleToString`)."""
    chars = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            code = value & 0x1F
            value >>= 5  # arithmetic shift, as C's on a signed long
            more = value != -1 if code & 0x10 else value != 0
            if more:
                code |= 0x20
            chars.append(chr(code + 48))
    return "".join(chars)


def encode(mask: np.ndarray) -> dict:
    """A 2-D boolean mask → {"size": [h, w], "counts": compressed string}, as pycocotools writes it."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]  # counts start with a run of zeros, possibly empty
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(runs)}


def parse(rle: dict) -> tuple[int, int, np.ndarray]:
    """{"size": [h, w], "counts": string or list of ints} → (h, w, run lengths), checked to cover h×w."""
    try:
        height, width = (int(v) for v in rle["size"])
        raw = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise RLEError('expected {"size": [h, w], "counts": ...}') from None
    if isinstance(raw, str):
        counts = string_to_counts(raw)
    elif isinstance(raw, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in raw):
        counts = np.asarray(raw, dtype=np.int64)
    else:
        raise RLEError("counts must be a COCO compressed string or a list of integers")
    if (counts < 0).any() or int(counts.sum()) != height * width:
        raise RLEError(f"run lengths add up to {int(counts.sum())}, not {height}×{width} = {height * width}")
    return height, width, counts


def decode(rle: dict) -> np.ndarray:
    """{"size": [h, w], "counts": string or list of ints} → h×w bool mask."""
    height, width, counts = parse(rle)
    return runs_to_mask(counts, height, width)


def runs_to_mask(counts: np.ndarray, height: int, width: int) -> np.ndarray:
    """Run lengths (zeros first, column-major) → height × width bool mask."""
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((height, width), order="F")
