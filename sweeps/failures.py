"""Which trials of a finished sweep failed for good, and why, from Tune's own record.

A trial that raises, or whose worker dies (killed, out of memory), is retried from its last
checkpoint up to `--max-failures` times; only a trial still failing after that ends in Tune's ERROR
state. Tune writes `error.txt` (text: every attempt's traceback, appended as `Failure # N`) and
`error.pkl` in the trial's result folder, and keeps `error.txt` when a retry later succeeds, so the
file alone does not say the trial failed: the final state comes from the ResultGrid, the reason
from the text file (its last line: the exception of the last attempt). Nothing here unpickles.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
REASON_CHARS = 300
"""A reason is one table cell: the exception line, cut to this length."""


@dataclass(frozen=True)
class TrialError:
    """A trial in Tune's ERROR state: its sampled params (a trial can fail before it writes its run
    directory) and the last line of its last failure."""

    trial_id: str
    params: dict
    reason: str
    tune_dir: str
    """Tune's result folder for the trial (error.txt, Ray's own logs)."""


def trial_errors(results: Iterable) -> dict[str, TrialError]:
    """Tune's results (a ResultGrid) → the failed ones by trial id."""
    errors = {}
    for result in results:
        if result.error is None:  # None for every trial that ended TERMINATED (finished or stopped)
            continue
        trial_id = str((result.metrics or {}).get("trial_id", ""))  # Tune fills it in even without reports
        reason = error_line(Path(result.path) / "error.txt") if result.path else ""
        reason = reason or last_line(str(result.error))
        errors[trial_id] = TrialError(trial_id, dict(result.config or {}), reason, str(result.path or ""))
    return errors


def error_line(path: Path) -> str:
    """The last non-empty line of Tune's error.txt, colour codes removed; '' when it is unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return last_line(text)


def last_line(text: str) -> str:
    lines = [line.strip() for line in ANSI.sub("", text).splitlines() if line.strip()]
    return lines[-1][:REASON_CHARS] if lines else ""
