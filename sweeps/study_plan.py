"""What a study will run, before anything runs: the cells of a space's full grid × seeds, the run
directory of each, which are finished, and an estimate of the compute.

A study reads a sweep space as a full grid: every listed value of every parameter (`grid` or
`choice` lists; a range such as `loguniform` has no finite grid and is refused), crossed with
`run.seed` ∈ {0..N-1}. A cell's name is made of its values (`resnet10t-full`,
`vit_base_patch16_224.augreg_in21k-head`), its run directory is `runs/<cell>-seed<k>/`.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from sweeps.space import CONFIG_PARAM, SearchSpace, SpaceError
from sweeps.trial import trial_overrides
from trainer import rundir
from trainer.config import Config, load_config
from trainer.rundir import RunDirError

THROUGHPUT = Path(__file__).with_name("throughput.yaml")
EVAL_SPEEDUP = 3.0
"""Evaluation (forward only) against training (forward + backward): about 3× the images per second."""


@dataclass(frozen=True)
class Cell:
    """One run of the study: a point of the grid and a seed."""

    name: str
    base: str
    overrides: tuple[str, ...]
    seed: int
    point: tuple[tuple[str, object], ...] = ()
    """The grid values, by param key (the tuning stage finds a cell's search by them)."""

    @property
    def run_name(self) -> str:
        return f"{self.name}-seed{self.seed}"


def cells(space: SearchSpace, seeds: int) -> list[Cell]:
    """Every grid point × every seed, in a stable order (grid point major)."""
    for param in space.params:
        if param.kind not in ("grid", "choice"):
            raise SpaceError(f"{space.path}: params.{param.key}: a study runs a full grid, so every param "
                             f"needs a list ({{grid: [...]}} or {{choice: [...]}}), not {param.kind}")
        if param.key == "run.seed":
            raise SpaceError(f"{space.path}: params.run.seed: the study sets the seed itself (--seeds)")
    keys = [p.key for p in space.params]
    out, names = [], set()
    for values in itertools.product(*(p.values for p in space.params)):
        point = dict(zip(keys, values, strict=True))
        base, overrides = trial_overrides(point)
        name = cell_name(point)
        if name in names:
            raise SpaceError(f"{space.path}: two grid points share the name {name!r}: give distinct values")
        names.add(name)
        out += [Cell(name, base or space.base or "", tuple(overrides), seed, tuple(point.items()))
                for seed in range(seeds)]
    return out


def cell_name(point: dict) -> str:
    """Readable and unique: config files by their stem, model names, strategies and optimizers as they are,
    other settings as `<last key part><value>` (optim.lr=0.001 → lr0.001)."""
    parts = []
    for key, value in point.items():
        if key == CONFIG_PARAM:
            parts.append(Path(str(value)).stem)
        elif key in ("model.name", "model.freeze", "optim.name"):
            parts.append(str(value))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}{value}")
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", "-".join(parts))


def finished(run_dir: Path) -> bool:
    """Trained, selected and tested: the run holds its test record."""
    try:
        return any(r["split"] == "test" for r in rundir.read_records(run_dir, tolerant=True))
    except RunDirError:
        return False


def cell_config(cell: Cell, overrides: list[str], run_dir: Path) -> Config:
    extra = [f"run.seed={cell.seed}", f"run.dir={run_dir}"]
    return load_config(cell.base, [*overrides, *cell.overrides, *extra])


# --- the compute estimate (--dry-run) -------------------------------------------------------------


def load_throughput(path: Path = THROUGHPUT) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def images(cfg: Config) -> dict[str, int]:
    """Images one run reads: train (epochs × the epoch's samples), val (each epoch), test (once)."""
    manifest = json.loads((Path(cfg.data.shards) / "manifest.json").read_text(encoding="utf-8"))
    splits = {name: int(split["samples"]) for name, split in manifest["splits"].items()}
    per_epoch = cfg.data.samples_per_epoch or splits.get("train", 0)
    return {"train": per_epoch * cfg.optim.epochs, "val": splits.get("val", 0) * cfg.optim.epochs,
            "test": splits.get("test", 0)}


def gpu_seconds(cfg: Config, table: dict) -> float | None:
    """Seconds on one table GPU: image counts over the model's training throughput, scaled by pixel
    count from the table's image size; None for a model the table does not list."""
    arch = cfg.model.name.split(".", 1)[0]
    entry = table["models"].get(arch)
    if entry is None:
        return None
    rate = float(entry["img_per_s"]) * (float(entry["size"]) / cfg.data.image_size) ** 2
    counts = images(cfg)
    return counts["train"] / rate + (counts["val"] + counts["test"]) / (rate * EVAL_SPEEDUP)


def estimate(plan: list[Cell], configs: list[Config], table: dict) -> tuple[list[str], float, list[str]]:
    """Per-cell lines, total GPU-hours (H100, via the table's stated speed-up), unknown models."""
    lines, total, unknown = [], 0.0, []
    speedup = float(table["h100_speedup"])
    for cell, cfg in zip(plan, configs, strict=True):
        seconds = gpu_seconds(cfg, table)
        counts = images(cfg)
        if seconds is None:
            unknown.append(cfg.model.name)
            hours = "?"  # not in the table
        else:
            total += seconds / speedup / 3600
            hours = f"{seconds / speedup / 60:.1f}"
        lines.append(f"{cell.run_name}: {cfg.model.name}, freeze {cfg.model.freeze}, "
                     f"{cfg.optim.epochs} epochs, {counts['train']:,} train images, ~{hours} H100-minutes")
    return lines, total, sorted(set(unknown))

