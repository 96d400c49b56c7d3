"""What a failed rank tells its launcher: did the run's own code fail, or did a peer vanish?

A node that dies mid-run (power, kernel panic, every process SIGKILLed) leaves the other ranks
failing in their next collective: "Connection closed by peer", a gloo recv timeout, an NCCL
watchdog timeout. That is not a bug in the run, and a requeue on healthy nodes resumes it from the
last checkpoint; a crash of the code, a bad config or a full disk would fail again and must not be
requeued. `accelerate launch` reports any failed rank as 1 and `srun --kill-on-bad-exit` reports
the signal it ended the other nodes with, so neither status says which: each failing rank writes
`rank-N.json` into `$CXR_FAILURE_DIR` (a fresh folder per job attempt, made by launch/common.sh)
with `kind` "peer-lost" or "error", and the job script decides (launch/common.sh,
`cxr_after_training`). Without the variable (a run started by hand) nothing is written.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

from shards.atomic import write_json

FAILURE_DIR_ENV = "CXR_FAILURE_DIR"
PEER_LOST = "peer-lost"
ERROR = "error"
COMMUNICATION_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out waiting",  # gloo: a recv/send that a frozen peer never answers
    "watchdog caught collective operation timeout",  # NCCL
    "nccl communicator was aborted",
    "socket timeout",
)
"""Lower-case fragments of the messages gloo and NCCL raise (as plain RuntimeError, not always
torch.distributed.DistError) when the other side of a collective is gone or silent."""


def is_communication_error(err: BaseException) -> bool:
    """True when `err` says a peer stopped answering, not that this rank's own work failed."""
    torch = sys.modules.get("torch")  # not imported for it: a config error fails before torch loads
    if torch is not None and isinstance(err, torch.distributed.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError | ConnectionError | TimeoutError) and any(
        sign in text for sign in COMMUNICATION_SIGNS)


def failure_kind(err: BaseException) -> str:
    return PEER_LOST if is_communication_error(err) else ERROR


def record_failure(err: BaseException) -> str:
    """Write this rank's failure for the job script (if launched by one); returns its kind. Never
    raises: a rank that cannot write (a full disk) leaves the status alone to speak."""
    kind = failure_kind(err)
    folder = os.environ.get(FAILURE_DIR_ENV)
    if not folder:
        return kind
    rank = os.environ.get("RANK", "0")
    lines = str(err).strip().splitlines()
    record = {"kind": kind, "rank": int(rank), "host": socket.gethostname(),
              "error": f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]}
    with contextlib.suppress(OSError):
        write_json(Path(folder) / f"rank-{rank}.json", record)
    return kind
