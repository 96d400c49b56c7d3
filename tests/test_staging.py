"""The order in which batches are staged and handed out: shared by the CPU and CUDA paths.

Not testable without a GPU (the CUDA test below is skipped here): that `CudaStager` really queues
the staging on a side stream, that the caller's stream waits on each batch's event, and that
`record_stream` keeps the caching allocator from reusing a batch's memory under the caller. The
order and the counting around it are `lookahead`, run here with ahead=1 as on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from shards.stream.staging import CudaStager, Stager, lookahead, stager


def run(ahead: int, count: int = 5) -> list[str]:
    """The event log of consuming `count` items: stage(i) and consume(i) in the order they happen."""
    log: list[str] = []

    def stage(item: int) -> int:
        log.append(f"stage {item}")
        return item

    for item in lookahead(range(count), stage, lambda staged: staged, ahead):
        log.append(f"consume {item}")
    return log


def test_ahead_one_stages_the_next_batch_before_the_caller_runs_this_one() -> None:
    log = run(ahead=1)
    for k in range(4):
        assert log.index(f"stage {k + 1}") < log.index(f"consume {k}"), f"{k + 1} staged during step {k}"
    assert [entry for entry in log if entry.startswith("consume")] == [f"consume {k}" for k in range(5)]


def test_ahead_zero_is_the_inline_path_and_two_runs_further_ahead() -> None:
    assert run(ahead=0) == [f"{verb} {k}" for k in range(5) for verb in ("stage", "consume")]
    log = run(ahead=2)
    assert log[:3] == ["stage 0", "stage 1", "stage 2"] and log.count("consume 4") == 1
    assert run(ahead=3, count=2) == ["stage 0", "stage 1", "consume 0", "consume 1"], "short input drains"


def test_stager_choice_and_bounds() -> None:
    move = dict
    inline = stager(move, torch.device("cpu"))
    assert type(inline) is Stager and inline.ahead == 0
    assert stager(move, torch.device("cpu"), 1).ahead == 1
    with pytest.raises(ValueError, match="prefetch"):
        Stager(move, -1)
    batches = [{"x": torch.ones(1) * i} for i in range(3)]
    assert [b["x"].item() for b in stager(move, torch.device("cpu"), 1).batches(batches)] == [0.0, 1.0, 2.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a side CUDA stream needs a GPU (none here)")
def test_cuda_stager_hands_out_finished_batches_in_order() -> None:
    device = torch.device("cuda")
    staging = stager(lambda batch: {"x": batch["x"].to(device, non_blocking=True) * 2}, device)
    assert isinstance(staging, CudaStager) and staging.ahead == 1
    host = [{"x": torch.full((1024,), float(i)).pin_memory()} for i in range(6)]
    out = [batch["x"].sum().item() for batch in staging.batches(host)]
    assert out == [2.0 * 1024 * i for i in range(6)]
