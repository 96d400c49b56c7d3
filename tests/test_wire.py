"""A worker batch crosses as one shared-memory buffer, recycled only after the main process let go.

Real DataLoader worker processes throughout; the only thing not exercised here is pinning, which
needs an accelerator (`Packed.pin_memory` is a plain `Tensor.pin_memory` plus the hand-back).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from shards.stream.wire import POOL_SIZE, Packed, Packer, unpack


def fields(n: int) -> dict:
    return {"canvas": (np.uint8, (n, 5, 7)), "theta": (np.float32, (n, 2, 3)), "sizes": (np.int64, (n, 2)),
            "lesion": (np.bool_, (n, 3))}


def filled(index: int, n: int = 4) -> dict:
    """Batch `index`'s arrays: every value a function of the index, so a reused buffer shows."""
    base = np.arange(n * 35, dtype=np.int64).reshape(n, 5, 7) + index
    return {"canvas": (base % 251).astype(np.uint8), "theta": np.full((n, 2, 3), index / 7, np.float32),
            "sizes": np.full((n, 2), index, np.int64), "lesion": (base[:, 0, :3] + index) % 2 == 0}


class Batches(IterableDataset):
    """Packs `count` batches the way the stream's collate does."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self) -> Iterator[dict]:
        for index in range(self.count):
            packer = Packer(fields(4))
            for name, value in filled(index).items():
                packer[name][...] = value
            yield packer.message(key=[f"k{index}-{i}" for i in range(4)])


def segment(message: dict) -> int:
    """The inode of the shared-memory segment a received buffer maps."""
    fd, _ = message["packed"].blob.untyped_storage()._share_fd_cpu_()
    return os.fstat(fd).st_ino


def test_round_trip_in_process_keeps_dtypes_shapes_and_alignment() -> None:
    packer = Packer(fields(3))
    for name, value in filled(5, n=3).items():
        packer[name][...] = value
    message = packer.message(key=["a", "b", "c"])
    assert [name for name, value in message.items() if isinstance(value, torch.Tensor)] == []
    batch = unpack(message)
    assert batch["key"] == ["a", "b", "c"]
    for name, value in filled(5, n=3).items():
        assert batch[name].dtype == torch.from_numpy(value).dtype
        assert np.array_equal(batch[name].numpy(), value)
        assert batch[name].data_ptr() % 64 == 0, "every array aligned, so any dtype views on any device"
    with pytest.raises(TypeError, match="no wire format"):
        Packer({"x": (np.float16, (2,))})


def test_a_worker_batch_is_one_segment_and_arrives_intact() -> None:
    loader = DataLoader(Batches(6), batch_size=None, num_workers=1)
    for index, message in enumerate(loader):
        assert set(message) == {"key", "packed"} and isinstance(message["packed"], Packed)
        assert message["packed"].blob.is_shared(), "allocated in shared memory by the worker"
        batch = unpack(message)
        assert batch["key"][0] == f"k{index}-0"
        for name, value in filled(index).items():
            assert np.array_equal(batch[name].numpy(), value), name
        assert not batch["canvas"].is_shared(), "unpacked views are of a copy, not of the worker's buffer"


def test_buffers_are_recycled_once_let_go_and_held_batches_stay_intact() -> None:
    """40 batches through one worker reuse at most POOL_SIZE segments; batches the consumer keeps
    (as a training loop's logs or a test's list would) are copies, unchanged by later reuse."""
    loader = DataLoader(Batches(40), batch_size=None, num_workers=1, prefetch_factor=2)
    seen, kept = set(), []
    for message in loader:
        seen.add(segment(message))
        kept.append(unpack(message))
        del message
    assert len(seen) <= POOL_SIZE, f"{len(seen)} segments for 40 batches: buffers are not recycled"
    for index, batch in enumerate(kept):
        for name, value in filled(index).items():
            assert np.array_equal(batch[name].numpy(), value), f"batch {index} {name} was overwritten"


def test_a_buffer_still_held_is_never_reused() -> None:
    """The consumer keeps every received message (the worker's buffer with it): each batch needs a
    new segment, and every held buffer keeps its own batch."""
    loader = DataLoader(Batches(POOL_SIZE + 4), batch_size=None, num_workers=1, prefetch_factor=2)
    held = list(loader)
    assert len({segment(message) for message in held}) == len(held)
    for index, message in enumerate(held):
        assert np.array_equal(message["packed"].tensors()["theta"].numpy(), filled(index)["theta"])
