"""A loader batch on the wire: all its arrays in one buffer, one shared-memory segment per batch.

A DataLoader worker sends each tensor as its own shared-memory segment (created and zero-filled
by the kernel when torch moves the tensor there), and the main process fetches each segment's
file descriptor from the worker over a socket. Per tensor, that cost about as much as decoding
two or three JPEGs on the 2-core VM (docs/benchmarks.md, 2026-12-02), and a batch had four to
seven tensors. Here a worker lays a batch's arrays out in one uint8 buffer, allocated in shared
memory from the start (as torch's `default_collate` does for its stacked batches), and fills
them in place through numpy views: one segment, nothing copied twice. The DataLoader's pin
thread pins the one buffer, and `unpack` takes typed views of it again wherever it lies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import get_worker_info

ALIGN = 64
"""Every array starts on a 64-byte boundary: any dtype can be viewed there, on any device."""
TORCH_DTYPES: dict[str, torch.dtype] = {
    np.dtype(np.uint8).str: torch.uint8, np.dtype(np.bool_).str: torch.bool,
    np.dtype(np.float32).str: torch.float32, np.dtype(np.int64).str: torch.int64,
}

Layout = tuple[tuple[str, str, tuple[int, ...], int], ...]
"""(name, numpy dtype string, shape, byte offset) of each array in the buffer."""


def _empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 buffer; in a DataLoader worker, directly in shared memory."""
    if get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(nbytes)  # what default_collate does in a worker
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class Packer:
    """One batch's buffer: lay out the named arrays, allocate once, fill through numpy views."""

    def __init__(self, fields: Mapping[str, tuple[type | np.dtype, tuple[int, ...]]]) -> None:
        layout, offset = [], 0
        for name, (kind, shape) in fields.items():
            dtype = np.dtype(kind)
            if dtype.str not in TORCH_DTYPES:
                raise TypeError(f"{name}: dtype {dtype} has no wire format")
            layout.append((name, dtype.str, tuple(int(n) for n in shape), offset))
            offset += -(-dtype.itemsize * math.prod(shape) // ALIGN) * ALIGN
        self.layout: Layout = tuple(layout)
        self.blob = _empty(max(offset, ALIGN))
        self._host = self.blob.numpy()
        self._arrays = {name: self._view(dtype, shape, start) for name, dtype, shape, start in self.layout}

    def _view(self, dtype: str, shape: tuple[int, ...], start: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * math.prod(shape)
        return self._host[start:start + size].view(dtype).reshape(shape)

    def __getitem__(self, name: str) -> np.ndarray:
        """The writable numpy view of one array (uninitialised until filled)."""
        return self._arrays[name]

    def message(self, **extra: object) -> dict:
        """What the worker yields: the buffer, its layout, and plain Python values (keys)."""
        return {"blob": self.blob, "layout": self.layout, **extra}


def unpack(message: dict) -> dict:
    """A packed batch → its named tensors: views of the (pinned, or device) buffer, no copy."""
    blob = message["blob"]
    batch = {name: value for name, value in message.items() if name not in ("blob", "layout")}
    for name, dtype, shape, start in message["layout"]:
        size = np.dtype(dtype).itemsize * math.prod(shape)
        batch[name] = blob[start:start + size].view(TORCH_DTYPES[dtype]).view(shape)
    return batch
