"""What each optimizer does on the synthetic demo data: the tiny CNN and the tiny ViT trained the
same number of epochs with AdamW, SGD (Nesterov), LAMB and Lion, two runs at a time on the CPU.

    python bench/optimizers.py [--shards demo/shards] [--epochs 5]

Prints, per model and optimizer, the learning rate, best val macro AUROC (and its epoch), test
macro AUROC and training seconds. Learning rates: the demo configs' AdamW lr for the CNN (2e-3)
and the one the tiny-ViT test uses (1e-3); SGD 0.05, LAMB 5e-3 for both; Lion 6e-4 (CNN) and 1e-4
(ViT), a tenth of AdamW's or so. Needs packed shards: `python -m trainer.demo` makes demo/shards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import rundir  # noqa: E402
from trainer.metrics import format_metric  # noqa: E402

CONFIGS = {"cnn": "trainer/configs/demo_cpu.yaml", "vit": "trainer/configs/demo_cpu_vit.yaml"}
LR = {("cnn", "adamw"): 2e-3, ("cnn", "sgd"): 0.05, ("cnn", "lamb"): 5e-3, ("cnn", "lion"): 6e-4,
      ("vit", "adamw"): 1e-3, ("vit", "sgd"): 0.05, ("vit", "lamb"): 5e-3, ("vit", "lion"): 1e-4}


def run(model: str, optimizer: str, shards: str, epochs: int, out: Path) -> dict:
    run_dir = out / f"{model}-{optimizer}"
    command = [sys.executable, str(ROOT / "trainer" / "run.py"), "--config", str(ROOT / CONFIGS[model]),
               f"data.shards={shards}", f"run.dir={run_dir}", f"optim.epochs={epochs}",
               f"optim.name={optimizer}", f"optim.lr={LR[model, optimizer]}", "data.workers=0",
               "run.image_grid=false"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{model} {optimizer} failed:\n{done.stderr[-2000:]}")
    records = rundir.read_records(run_dir)
    val = [r for r in records if r["split"] == "val"]
    best = max(val, key=lambda r: r["auroc_macro"])
    test = [r for r in records if r["split"] == "test"][-1]
    return {"model": model, "optimizer": optimizer, "lr": LR[model, optimizer], "val": best["auroc_macro"],
            "epoch": best["epoch"] + 1, "test": test["auroc_macro"],
            "seconds": max(r.get("train_seconds", 0) for r in val), "wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="demo/shards")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run, model, optimizer, args.shards, args.epochs, Path(folder))
                for model in CONFIGS for optimizer in ("adamw", "sgd", "lamb", "lion")]
        rows = [job.result() for job in jobs]
    print(f"| model | optimizer | lr | best val AUROC (epoch of {args.epochs}) | test AUROC | train s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['optimizer']} | {row['lr']:g} | {format_metric(row['val'], '.3f')} "
              f"({row['epoch']}) | {format_metric(row['test'], '.3f')} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
