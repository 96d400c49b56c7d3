"""Stopping on request: SLURM's warning signal becomes a checkpoint and an exit that means
"requeue me", at the same optimizer step on every rank."""

from __future__ import annotations

import logging
import signal
import threading

import torch
from accelerate import Accelerator

log = logging.getLogger("trainer")

EXIT_REQUEUE = 75
"""Exit status after a preemption checkpoint (EX_TEMPFAIL): requeue me. `run_dir/preempted.json`
(trainer/rundir.py) says the same for launchers that cannot see the status (accelerate launch
reports 1 for any non-zero child exit)."""


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


class StopRequest:
    """SIGUSR1 (SLURM's warning signal) or SIGTERM set a flag; ranks agree on it every `every`
    optimizer steps (the same steps on every rank, so all stop at the same step). Agreeing costs
    an all-reduce and a host sync: on a GPU, not something to pay at every step."""

    def __init__(self, every: int = 1) -> None:
        self.requested = False
        self.every = every
        if threading.current_thread() is not threading.main_thread():
            return  # a Ray Tune trial runs in a thread: Tune stops and restores trials itself
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.requested = True
        log.warning("signal %s: checkpointing at the next step, then exiting %d", signum, EXIT_REQUEUE)

    def agreed(self, accelerator: Accelerator, step: int, failed: bool = False) -> tuple[bool, bool]:
        """(any rank signalled, any rank's write failed), the same on every rank: one tiny
        all-reduce every `every` steps carries both flags, so a full disk costs no extra sync."""
        if accelerator.num_processes == 1:
            return self.requested, failed  # nothing to agree on: no collective, no device sync
        if step % self.every:
            return False, False
        flags = torch.tensor([float(self.requested), float(failed)], device=accelerator.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        requested, anyone_failed = flags.tolist()
        return bool(requested), bool(anyone_failed)
