"""Failed writes (a full disk above all) as one agreed stop instead of a hang or a traceback.

Only some ranks write (the main rank: metrics, TensorBoard, predictions, best/; every rank: its
part of a checkpoint), so a write that fails on one rank must not simply raise there: the others
would wait at the next collective until the launcher kills them, each with its own traceback.
Instead a failed write is held (`Writes.guard`), the ranks compare notes at the next agreement
point (`check`: a one-element all-reduce, and an all-gather of the messages only when something
failed), and every rank stops at the same place; the main rank says why in one line and the
process exits `EXIT_IOERR`. Nothing here writes `preempted.json`: a full disk is not requeued.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator

log = logging.getLogger("trainer")

EXIT_IOERR = 74
"""Exit status after a write failed (EX_IOERR): not requeued; free space, then resubmit."""

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_MARKERS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
"""How the writers we use say "full" without an errno (safetensors' Rust I/O errors)."""
NEARLY_FULL = 1 << 20
"""Bytes free below which a failed write is put down to a full file system: torch.save's zip
writer reports ENOSPC as `unexpected pos N vs M`, without naming the cause."""


class Stopped(SystemExit):
    """Every rank stops here with `code`; the main rank has already printed `error: message`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message


def disk_full(err: BaseException, target: Path) -> bool:
    """Whether `err`, raised while writing under `target`, means the file system is full."""
    if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
        return True
    if any(marker in str(err).lower() for marker in FULL_MARKERS):
        return True
    return free_bytes(target) < NEARLY_FULL


def free_bytes(target: Path) -> int:
    """Bytes available on the file system holding `target` (or its nearest existing parent)."""
    for path in (target, *target.parents):
        try:
            stat = os.statvfs(path)
        except OSError:
            continue
        return stat.f_bavail * stat.f_frsize
    return sys.maxsize


def describe(err: BaseException, target: Path) -> str:
    """One line: what could not be written, and why."""
    if disk_full(err, target):
        return f"no space left on device writing {target}"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"could not write {target} ({type(err).__name__}: {first})"


class Writes:
    """This rank's first failed write, held until the ranks next agree (`check`)."""

    def __init__(self) -> None:
        self.failure: str | None = None

    @contextmanager
    def guard(self, target: Path) -> Iterator[None]:
        """Run a write; an exception becomes the held failure (the first one wins) instead of
        propagating. One that is not a full disk is logged with its traceback: it may be a bug."""
        try:
            yield
        except Exception as err:  # whatever stopped the write, the ranks must agree
            if not disk_full(err, target):
                log.exception("writing %s failed", target)
            if self.failure is None:
                self.failure = describe(err, target)

    def skip(self) -> bool:
        """True once a write failed: later writes of the same kind are not attempted."""
        return self.failure is not None


def agree(accelerator: Accelerator, failure: str | None) -> str | None:
    """Collective: the failure of the lowest rank that had one, the same on every rank (None when
    no rank failed). Costs one one-element all-reduce; the messages are gathered only on failure."""
    if accelerator.num_processes == 1:
        return failure
    flag = torch.tensor([float(failure is not None)], device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if not flag.item():
        return None
    messages: list[str | None] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(messages, failure)
    return next(message for message in messages if message)


def stop(accelerator: Accelerator, message: str, code: int) -> None:
    """Every rank calls it with the same message: the main rank prints it once, then all leave
    together (no rank exits before the line is out: the launcher stops the rest when one exits)."""
    if accelerator.is_main_process:
        print(f"error: {message}", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    raise Stopped(message, code)


def check(accelerator: Accelerator, writes: Writes, where: str) -> None:
    """Collective: stop every rank with one line (`<failure>; <where>`) if any rank's write failed."""
    failure = agree(accelerator, writes.failure)
    if failure is not None:
        stop(accelerator, f"{failure}; {where}", EXIT_IOERR)


def quiet_writer_threads() -> None:
    """TensorBoard writes from a thread that prints its own traceback when a write fails, and
    raises the same error again at the next call from ours (which `Writes.guard` holds): keep the
    thread's copy out of the log. Other threads' errors are printed as before."""
    previous = threading.excepthook
    if getattr(previous, "cxr_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    hook.cxr_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook
