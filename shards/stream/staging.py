"""Handing batches to the training step so that, on a GPU, the step never waits on the host.

`lookahead` is the order, the same on every device: batch k + `ahead` is staged (moved to the
device, decoded/warped/normalised there) before batch k is handed out, so on a GPU its copies and
kernels are queued while the caller runs step k. A batch counts as consumed only when handed out:
the stream position (shards.stream) ignores what is staged ahead.

`Stager` stages inline (the CPU path); `CudaStager` is the only CUDA-specific part: it queues the
staging on a side stream (the apex data_prefetcher pattern) and, when handing a batch out, makes
the caller's stream wait for that batch's staging and tells the caching allocator that the
caller's stream uses its tensors (`record_stream`), so their memory is not reused under it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
S = TypeVar("S")
U = TypeVar("U")


def lookahead(items: Iterable[T], stage: Callable[[T], S], hand_out: Callable[[S], U],
              ahead: int) -> Iterator[U]:
    """Items in order, each through `stage` then `hand_out`; `stage` runs `ahead` items early."""
    pending: deque[S] = deque()
    for item in items:
        pending.append(stage(item))
        if len(pending) > ahead:
            yield hand_out(pending.popleft())
    while pending:
        yield hand_out(pending.popleft())


class Stager:
    """Stages with `move` on the caller's thread and stream: nothing to synchronise."""

    def __init__(self, move: Callable[[dict], dict], ahead: int = 0) -> None:
        if ahead < 0:
            raise ValueError(f"prefetch {ahead}: expected ≥ 0 batches staged ahead")
        self.move, self.ahead = move, ahead

    def stage(self, batch: dict) -> object:
        return self.move(batch)

    def hand_out(self, staged: object) -> dict:
        assert isinstance(staged, dict)
        return staged

    def batches(self, host: Iterable[dict]) -> Iterator[dict]:
        """Host batches in, device batches out, `ahead` of them staged early."""
        return lookahead(host, self.stage, self.hand_out, self.ahead)


class CudaStager(Stager):
    """Stages on a side CUDA stream; the caller's stream waits for a batch only when it gets it.

    Not testable without a GPU: the side stream, the event wait and `record_stream`. Everything
    else (order, counting) is `lookahead`, which the CPU tests run with ahead=1.
    """

    def __init__(self, move: Callable[[dict], dict], device: torch.device, ahead: int = 1) -> None:
        super().__init__(move, ahead)
        self.device = device
        self.side = torch.cuda.Stream(device)

    def stage(self, batch: dict) -> object:
        with torch.cuda.stream(self.side):
            moved = self.move(batch)
            done = self.side.record_event()  # this batch's work only, not later batches'
        return moved, done

    def hand_out(self, staged: object) -> dict:
        moved, done = staged  # type: ignore[misc]
        caller = torch.cuda.current_stream(self.device)
        caller.wait_event(done)
        for value in moved.values():
            if isinstance(value, torch.Tensor) and value.is_cuda:
                value.record_stream(caller)
        return moved


def stager(move: Callable[[dict], dict], device: torch.device, ahead: int | None = None) -> Stager:
    """A CUDA device stages one batch ahead on a side stream by default; other devices inline."""
    if device.type == "cuda":
        return CudaStager(move, device, 1 if ahead is None else ahead)
    return Stager(move, 0 if ahead is None else ahead)
