"""The training step never waits on the host: our code asks for a device value (`.item()`,
`bool(tensor)`, `.tolist()`, `torch.cuda.synchronize()`) only on logging and signal-check steps.

On a GPU each of those calls stalls the step until the device catches up. There is no GPU here,
so the calls are counted, not timed: the real trainer runs in two real gloo ranks (spawned
processes) with those methods patched to record who called them and during which optimizer step.
Only calls made directly from the project's own code (trainer/, shards/) are counted: what
torch's own optimizer does with its CPU step counters is not a device sync.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.trainer_helpers import DEMO, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROJECT = (str(ROOT / "trainer"), str(ROOT / "shards"))
LOG_EVERY, CHECK_EVERY = 4, 3
STEPS = 12
"""Steps in the epoch: both cadences, alone and together (step 12)."""
PATCHED = ("item", "tolist", "__bool__", "__float__", "__int__")


def _count_syncs(rank: int, world: int, port: int, shards: str, run_dir: str, out: str) -> None:
    """One rank: patch the sync points, train one epoch, write {step: calls} for this rank."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    from trainer import engine  # after the environment is set
    from trainer.config import load_config

    calls: Counter = Counter()
    where: dict[int, list[str]] = {}
    position = {"step": 0, "training": False}

    def record(name: str) -> None:
        caller = sys._getframe(2)
        if position["training"] and caller.f_code.co_filename.startswith(PROJECT):
            step = position["step"]
            calls[step] += 1
            where.setdefault(step, []).append(f"{name} {caller.f_code.co_filename}:{caller.f_lineno}")

    def patch(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args: object, **kwargs: object) -> object:
            record(name)
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    for name in PATCHED:
        patch(torch.Tensor, name)
    patch(torch.cuda, "synchronize")

    step_done, epoch = engine.after_optimizer_step, engine.train_epoch

    def after_step(run: engine.Run, *args: object) -> None:
        position["step"] = run.state.step + 1  # calls made while finishing this step count for it
        step_done(run, *args)
        position["step"] = run.state.step + 1  # ... and the next batch's calls for the next step

    def one_epoch(run: engine.Run, *args: object) -> None:
        position.update(step=run.state.step + 1, training=True)
        try:
            epoch(run, *args)
        finally:
            position["training"] = False

    engine.after_optimizer_step, engine.train_epoch = after_step, one_epoch
    cfg = load_config(DEMO, [f"data.shards={shards}", f"run.dir={run_dir}", "optim.epochs=1",
                             "data.batch_size=4", "data.workers=1",
                             f"data.samples_per_epoch={STEPS * 4 * world}",
                             f"run.log_every={LOG_EVERY}", f"run.signal_check_every={CHECK_EVERY}",
                             "run.test_at_end=false"])
    engine.train(cfg)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"calls": calls, "where": where}))
    torch.distributed.destroy_process_group()


def test_step_loop_syncs_only_on_log_and_signal_check_steps(chexpert_shards: Path, tmp_path: Path) -> None:
    world = 2  # one rank takes the same step path, minus the signal all-reduce
    mp.spawn(_count_syncs, args=(world, free_port(), str(chexpert_shards), str(tmp_path / "run"),
                                 str(tmp_path)), nprocs=world, join=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = next(json.loads(line)["step"] for line in lines if json.loads(line)["split"] == "val")
    assert steps == STEPS
    for rank in range(world):
        saved = json.loads((tmp_path / f"rank{rank}.json").read_text())
        calls = {int(step): count for step, count in saved["calls"].items()}
        for step in range(1, steps + 1):
            expected = int(step % LOG_EVERY == 0) + int(step % CHECK_EVERY == 0)
            assert calls.get(step, 0) == expected, (
                f"rank {rank} step {step}: {calls.get(step, 0)} host syncs, expected {expected}: "
                f"{saved['where'].get(str(step))}")
