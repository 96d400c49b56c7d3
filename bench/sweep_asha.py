"""What ASHA early stopping saves: the same grid of trials run with ASHA and to completion (FIFO).

    python bench/sweep_asha.py [--shards demo/shards] [--epochs 4]

The grid (the tiny CNN, 2 freeze strategies x 4 learning rates from 1e-5 to 1e-2) runs twice on
a local Ray with the same trials; figures: trial-epochs trained, wall time, and the best config
each found (did stopping early lose the winner?). Needs packed shards: `python -m trainer.demo`
or `python -m shards.demo` makes demo/shards.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def space(path: Path, scheduler: str, epochs: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "base": "trainer/configs/demo_cpu.yaml",
                "metric": "auroc_macro",
                "search": "grid",
                "scheduler": {"type": scheduler, "grace_period": 1, "reduction_factor": 2},
                "resources": {"cpu": 1},
                "fixed": {"optim.epochs": epochs, "data.workers": 0, "run.log_every": 50, "run.keep_last": 1},
                "params": {
                    "model.freeze": {"grid": ["full", "head+last_block"]},
                    "optim.lr": {"grid": [1e-5, 1e-4, 1e-3, 1e-2]},
                },
            }
        )
    )
    return path


def run(scheduler: str, shards: Path, storage: Path, epochs: int) -> dict:
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeps.run",
            "--space",
            str(space(storage / f"{scheduler}.yaml", scheduler, epochs)),
            "--address",
            "local",
            "--name",
            scheduler,
            "--storage",
            str(storage),
            f"data.shards={shards}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - started
    with (storage / scheduler / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    best = rows[0]
    return {
        "seconds": seconds,
        "trial_epochs": sum(int(r["epochs"]) for r in rows),
        "stopped": sum(r["status"] == "stopped early" for r in rows),
        "best": (best["model.freeze"], float(best["optim.lr"])),
        "best_val": float(best["val_auroc_macro"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=ROOT / "demo" / "shards")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        fifo = run("none", args.shards.resolve(), Path(folder), args.epochs)
        asha = run("asha", args.shards.resolve(), Path(folder), args.epochs)
    print(f"{'':14}{'to completion':>16}{'ASHA':>12}{'ratio':>8}")
    print(
        f"{'trial-epochs':14}{fifo['trial_epochs']:>16}{asha['trial_epochs']:>12}"
        f"{asha['trial_epochs'] / fifo['trial_epochs']:>8.2f}"
    )
    ratio = asha["seconds"] / fifo["seconds"]
    print(f"{'wall s':14}{fifo['seconds']:>16.0f}{asha['seconds']:>12.0f}{ratio:>8.2f}")
    print(f"{'stopped early':14}{fifo['stopped']:>16}{asha['stopped']:>12}")
    print(f"{'best config':14}{fifo['best']!s:>16}  {asha['best']!s}")
    print(f"{'best val AUROC':14}{fifo['best_val']:>16.4f}{asha['best_val']:>12.4f}")
    same = fifo["best"] == asha["best"]
    print(f"sweep_asha: compute={asha['trial_epochs'] / fifo['trial_epochs']:.2f}x same_best={same}")


if __name__ == "__main__":
    main()
