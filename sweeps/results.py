"""A finished (or interrupted) sweep → results.csv, results.md (sorted by the metric) and best.yaml.

Read from the trials' own run directories (config.yaml, metrics.jsonl), not from Ray's state, so
the table is the same whether Tune finished, was restored, or is read again later. Only which
trials failed for good (Tune's ERROR state, sweeps/failures.py) comes from Tune, when it is given.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from shards.atomic import write_text
from sweeps.failures import TrialError
from trainer import rundir
from trainer.metrics import format_metric
from trainer.rundir import RunDirError


@dataclass
class TrialRow:
    trial: str
    trial_id: str
    params: dict
    best: float | None
    best_epoch: int | None
    epochs: int
    max_epochs: int
    status: str
    run_dir: Path
    reason: str = ""
    """Why an `error` trial failed: the exception line of its last attempt."""


def collect(trials_dir: Path, metric: str, errors: Mapping[str, TrialError] | None = None) -> list[TrialRow]:
    """One row per trial directory (its trial.json: Tune's trial id and the sampled params);
    trials whose metrics are missing or unreadable are kept with status 'no metrics'. `errors`
    (Tune's failed trials by id) marks those `error` with their reason, after every other row:
    a trial that crashed for good never wins, whatever it reached before."""
    errors = errors or {}
    rows = []
    for run_dir in sorted(p for p in trials_dir.iterdir() if p.is_dir()) if trials_dir.is_dir() else []:
        records = rundir.read_records(run_dir, tolerant=True)  # a trial may be writing it now
        try:
            info = json.loads((run_dir / "trial.json").read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
        val = [r for r in records if r.get("split") == "val"]
        values = [
            (r.get(metric), i + 1)
            for i, r in enumerate(val)
            if isinstance(r.get(metric), int | float) and math.isfinite(r[metric])
        ]
        best, best_epoch = max(values) if values else (None, None)
        max_epochs = _max_epochs(run_dir)
        if not val:
            status = "no metrics"
        elif len(val) < max_epochs:
            status = "stopped early"
        else:
            status = "finished"
        error = errors.get(info.get("trial_id", ""))
        rows.append(
            TrialRow(
                trial=run_dir.name,
                trial_id=info.get("trial_id", ""),
                params=info.get("params", {}),
                best=best,
                best_epoch=best_epoch,
                epochs=len(val),
                max_epochs=max_epochs,
                status="error" if error else status,
                run_dir=run_dir,
                reason=error.reason if error else "",
            )
        )
    seen = {row.trial_id for row in rows}
    for error in errors.values():  # failed before it wrote its run directory
        if error.trial_id not in seen:
            rows.append(TrialRow(trial=error.trial_id, trial_id=error.trial_id, params=error.params,
                                 best=None, best_epoch=None, epochs=0, max_epochs=0, status="error",
                                 run_dir=Path(error.tune_dir), reason=error.reason))
    rows.sort(key=lambda row: (row.status == "error", row.best is None, -(row.best or 0.0), row.trial))
    return rows


def _max_epochs(run_dir: Path) -> int:
    try:
        return rundir.read_config(run_dir).optim.epochs
    except RunDirError:
        return 0


def write_tables(rows: list[TrialRow], out: Path, metric: str, times: dict[str, float]) -> None:
    keys = sorted({key for row in rows for key in row.params})
    header = [
        "rank",
        "trial",
        *keys,
        f"val_{metric}",
        "best_epoch",
        "epochs",
        "max_epochs",
        "status",
        "reason",
        "seconds",
        "run_dir",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    table = []
    for rank, row in enumerate(rows, 1):
        seconds = times.get(row.trial_id)
        params = (_param_cell(k, row.params.get(k, "")) for k in keys)
        cells = [
            rank,
            row.trial,
            *params,
            format_metric(row.best, missing=""),
            row.best_epoch or "",
            row.epochs,
            row.max_epochs,
            row.status,
            row.reason,
            "" if seconds is None else f"{seconds:.1f}",
            str(row.run_dir),
        ]
        writer.writerow(cells)
        table.append([_short(c) for c in cells[:-1]])
    write_text(out / "results.csv", buffer.getvalue())
    lines = [
        f"# Sweep results: {out.name}",
        "",
        f"Sorted by the best validation {metric} over epochs; `stopped early` = ended by ASHA;",
        "`error` = failed on every attempt (`--max-failures` retries), listed last, never the best.",
        "The sweep never looks at the test split: train best.yaml for test figures.",
        "",
        "| " + " | ".join(header[:-1]) + " |",
        "|" + "---|" * (len(header) - 1),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    write_text(out / "results.md", "\n".join(lines) + "\n")


def write_best(rows: list[TrialRow], out: Path, name: str, search: str = "") -> Path | None:
    """The best trial's resolved config as a ready trainer YAML (fresh run dir, no resume), with the
    trial's global batch pinned (`data.global_batch`): on 8 GPUs it trains with the batch, steps and
    effective lr the trial had on one. `run.tuning` records the search it came from."""
    for row in rows:
        if row.status == "error" or row.best is None or not (row.run_dir / rundir.CONFIG).is_file():
            continue
        tuning = {"trials": len(rows), "search": search, "sweep": name, "trial": row.trial}
        fresh = [f"run.dir=runs/{name}-best", "run.resume=never", "run.test_at_end=true",
                 f"run.tuning={json.dumps(tuning)}"]
        trained = rundir.read_resolved(row.run_dir).get("global_batch")
        if trained:
            fresh.append(f"data.global_batch={int(trained)}")
        cfg = rundir.read_config(row.run_dir, fresh, environment=True)
        text = (f"# Best trial of sweep {name}: {row.trial}, val {row.best:.4f}.\n"
                f"# Train it in full: python trainer/run.py --config {out / 'best.yaml'}\n")
        if trained:
            text += (f"# data.global_batch keeps the trial's {trained} images per step on any number\n"
                     "# of GPUs (and with it the steps and the effective lr); remove it to scale\n"
                     "# by optim.lr_scaling instead.\n")
        write_text(out / "best.yaml", text + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return out / "best.yaml"
    return None


def _param_cell(key: str, value: object) -> object:
    """A sampled base config shows as its preset name (resnet50), not a path."""
    return Path(str(value)).stem if key == "config" and value else value


def _short(cell: object) -> str:
    """Sampled floats to 3 significant digits in the markdown table (the CSV keeps them whole); a
    reason's `|` escaped so it stays one cell."""
    return f"{cell:.3g}" if isinstance(cell, float) else str(cell).replace("|", "\\|")
