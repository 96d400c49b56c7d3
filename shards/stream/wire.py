"""A loader batch on the wire: all its arrays in one buffer, one shared-memory segment per batch,
and in a worker that segment is recycled once the main process has let go of it.

A DataLoader worker sends each tensor as its own shared-memory segment, and the main process
fetches each segment's file descriptor from the worker over a socket; a fresh segment costs its
size in kernel page zeroing and page faults again (about 6.7 ms per 4 MiB batch on the 2-core VM,
a third of the batch's JPEG decode; docs/benchmarks.md, 2026-12-02). Here a worker lays a batch's
arrays out in one uint8 buffer (`Packer`) taken from a small per-worker pool of shared-memory
buffers, and fills them in place through numpy views.

Recycling protocol: the buffer's first 8 bytes are a flag, IN_USE from the moment the worker
takes it. The main process copies the buffer out as soon as it arrives (the DataLoader's pin
thread calls `Packed.pin_memory`, or `unpack` copies it when nothing pins) and then drops its
handle on the shared segment; dropping it (`_Received.__del__`) sets the flag FREE, and only then
may the worker reuse that buffer. A batch that is never received or copied keeps its buffer
IN_USE, and the worker takes a fresh one: a leak costs speed, never correctness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import get_worker_info

ALIGN = 64
"""Every array starts on a 64-byte boundary: any dtype can be viewed there, on any device."""
HEADER = ALIGN
"""The flag (int64) in front of the arrays."""
FREE, IN_USE = 0, 1
POOL_SIZE = 8
"""Buffers a worker recycles: more than the batches it can have in flight (prefetch_factor 4,
one being pinned, one being filled)."""
GROWTH = 1 << 20
"""Pooled buffers are sized in whole MiB, so slightly larger batches still fit one."""
TORCH_DTYPES: dict[str, torch.dtype] = {
    np.dtype(np.uint8).str: torch.uint8, np.dtype(np.bool_).str: torch.bool,
    np.dtype(np.float32).str: torch.float32, np.dtype(np.int64).str: torch.int64,
}

Layout = tuple[tuple[str, str, tuple[int, ...], int], ...]
"""(name, numpy dtype string, shape, byte offset) of each array in the buffer."""

_pool: list[torch.Tensor] = []
"""This worker process's recyclable shared-memory buffers (empty in the main process)."""


def _flag(buffer: torch.Tensor) -> np.ndarray:
    return buffer[:8].numpy().view(np.int64)


def _acquire(nbytes: int) -> tuple[torch.Tensor, bool]:
    """A uint8 buffer of ≥ nbytes and whether it is pooled: in a DataLoader worker, shared memory
    (a FREE pooled buffer if one fits, else a new one, pooled if there is room or a FREE buffer
    too small to keep); elsewhere plain memory, never pooled (no one would hand it back)."""
    if get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8), False
    small = None
    for index, buffer in enumerate(_pool):
        flag = _flag(buffer)
        if flag[0] == FREE and len(buffer) >= nbytes:
            flag[0] = IN_USE
            return buffer, True
        if flag[0] == FREE and small is None:
            small = index
    storage = torch.UntypedStorage._new_shared(-(-nbytes // GROWTH) * GROWTH)  # shared from the start
    buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
    _flag(buffer)[0] = IN_USE
    if small is not None:
        _pool[small] = buffer
    elif len(_pool) < POOL_SIZE:
        _pool.append(buffer)
    else:
        return buffer, False
    return buffer, True


class Packed:
    """A batch's buffer and layout as they cross from a worker to the main process."""

    def __init__(self, blob: torch.Tensor, layout: Layout, pooled: bool) -> None:
        self.blob, self.layout, self.pooled = blob, layout, pooled

    def __reduce__(self) -> tuple:
        return _Received, (self.blob, self.layout, self.pooled)

    def pin_memory(self, device: object = None) -> Packed:
        """Called by the DataLoader's pin thread: a pinned copy (the shared buffer goes back)."""
        return Packed(self.blob.pin_memory(), self.layout, pooled=False)

    def detached(self) -> Packed:
        """Independent of the worker's pool: a copy if the buffer is pooled, else itself."""
        return Packed(self.blob.clone(), self.layout, pooled=False) if self.pooled else self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The named arrays as tensor views of this buffer (on whatever device it is)."""
        out = {}
        for name, dtype, shape, start in self.layout:
            size = np.dtype(dtype).itemsize * math.prod(shape)
            out[name] = self.blob[start:start + size].view(TORCH_DTYPES[dtype]).view(shape)
        return out


class _Received(Packed):
    """The main process's handle on a worker's buffer: letting go of it hands the buffer back."""

    def __del__(self) -> None:
        if self.pooled:
            _flag(self.blob)[0] = FREE


class Packer:
    """One batch's buffer: lay out the named arrays, allocate once, fill through numpy views."""

    def __init__(self, fields: Mapping[str, tuple[type | np.dtype, tuple[int, ...]]]) -> None:
        layout, offset = [], HEADER
        for name, (kind, shape) in fields.items():
            dtype = np.dtype(kind)
            if dtype.str not in TORCH_DTYPES:
                raise TypeError(f"{name}: dtype {dtype} has no wire format")
            layout.append((name, dtype.str, tuple(int(n) for n in shape), offset))
            offset += -(-dtype.itemsize * math.prod(shape) // ALIGN) * ALIGN
        self.layout: Layout = tuple(layout)
        self.blob, self.pooled = _acquire(offset)
        host = self.blob.numpy()
        self._arrays = {name: host[start:start + np.dtype(dtype).itemsize * math.prod(shape)]
                        .view(dtype).reshape(shape) for name, dtype, shape, start in self.layout}

    def __getitem__(self, name: str) -> np.ndarray:
        """The writable numpy view of one array (uninitialised until filled)."""
        return self._arrays[name]

    def message(self, **extra: object) -> dict:
        """What the worker yields: the packed buffer, and plain Python values (keys) beside it."""
        return {"packed": Packed(self.blob, self.layout, self.pooled), **extra}


def unpack(message: dict) -> dict:
    """A worker's message → the batch: its named tensors (views of a buffer no worker will reuse)
    and its plain values."""
    batch = {name: value for name, value in message.items() if name != "packed"}
    batch.update(message["packed"].detached().tensors())
    return batch
