"""Lesion masks: 16-bit label bits round-trip, union masks stay unions, nearest resize keeps labels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.lesion import UNION, decode_lesion, encode_lesion, label_bit, label_planes, resize_nearest
from shards.pack.encode import load_mask


def test_label_bits_round_trip_and_split_into_planes() -> None:
    bits = np.zeros((6, 8), np.uint16)
    bits[1:3, 2:5] = label_bit(2)
    bits[2:5, 4:7] |= label_bit(13)
    decoded = decode_lesion(encode_lesion(bits))
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, bits)
    planes = label_planes(decoded, [2, None, 13, 0])
    assert planes.shape == (4, 6, 8) and planes.dtype == bool
    assert np.array_equal(planes[0], (bits & 4) != 0) and not planes[1].any() and not planes[3].any()
    assert planes[0][2, 4] and planes[2][2, 4], "overlapping findings keep both bits"
    with pytest.raises(ValueError, match="16-bit"):
        label_bit(16)


def test_an_8bit_union_mask_counts_for_every_label(tmp_path: Path) -> None:
    union = np.zeros((10, 10), np.uint8)
    union[3:6, 3:6] = 255
    path = tmp_path / "m.png"
    Image.fromarray(union).save(path)
    planes = label_planes(decode_lesion(path.read_bytes()), [0, 7])
    assert planes[0].sum() == planes[1].sum() == 9
    packed = Image.open(io.BytesIO(load_mask(str(path), 20, 20)))
    assert packed.mode == "L" and set(np.unique(np.asarray(packed))) == {0, 255}
    assert decode_lesion(load_mask(str(path), 20, 20)).max() == UNION


def test_nearest_resize_never_mixes_labels() -> None:
    bits = np.array([[1, 2], [4, 8]], np.uint16)
    up = resize_nearest(bits, 4, 6)
    assert set(np.unique(up)) == {1, 2, 4, 8} and up[0, 0] == 1 and up[3, 5] == 8
    down = resize_nearest(np.kron(bits, np.ones((5, 5), np.uint16)), 2, 2)
    assert np.array_equal(down, bits)
