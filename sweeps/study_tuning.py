"""A study's tuning stage: an equal-budget search per architecture, on val only, before the grid.

A comparison is only as fair as the tuning each side got. With a `tune:` section in the space
(sweeps.space.TuneSpec), `python -m sweeps.study` first runs one search per value of `tune.per`
(by default the architecture: the `config` preset, else `model.name`), each with the same number of
trials, the same params, the same fixed settings (epochs included) and the same search algorithm
(Optuna TPE with the same sampler seed), with no early stopping (ASHA would give a family that
starts slowly fewer epochs, so a smaller budget). Grid params not in `per` take their first listed
value during the search. Trials never see the test split. Then every cell of the grid runs with its
search's winning values, each seed tested once, and `run.tuning` in its config.yaml records the
search it came from (the report's recipe card and budget table read it).

Written under STORAGE/NAME/tuning/<search>/: the sweep's own trials/, results.csv, results.md,
best.yaml, and winner.json (the winning values and the budget spent). A finished search is kept on
--resume; an interrupted one starts again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from shards.atomic import write_json
from sweeps.results import collect
from sweeps.run import check_space, sweep
from sweeps.space import DEFAULT_SCHEDULER, SearchSpace, SpaceError, TuneSpec
from sweeps.study_plan import Cell, cell_name
from sweeps.trial import trial_overrides
from trainer import rundir

WINNER = "winner.json"


@dataclass(frozen=True)
class Search:
    """One equal-budget search: the `per` values it tunes for, and the settings of its trials."""

    name: str
    point: tuple[tuple[str, object], ...]
    """The grid point its trials train (per values, other grid params at their first value)."""
    base: str
    overrides: tuple[str, ...]

    def covers(self, cell: Cell, per: tuple[str, ...]) -> bool:
        point = dict(self.point)
        return all(point[key] == dict(cell.point)[key] for key in per)


def searches(space: SearchSpace) -> list[Search]:
    """Every combination of the `per` params' values, in grid order."""
    tune = _spec(space)
    out = []
    per_params = [p for p in space.params if p.key in tune.per]
    for values in itertools.product(*(p.values for p in per_params)):
        point = _point(space, per_params, values)
        base, overrides = trial_overrides(point)
        name = cell_name({p.key: point[p.key] for p in per_params})
        fixed = [f"{key}={json.dumps(value)}" for key, value in tune.fixed.items()]
        out.append(Search(name, tuple(point.items()), base or space.base or "", (*overrides, *fixed)))
    return out


def _point(space: SearchSpace, per_params: list, values: tuple) -> dict:
    point = {p.key: p.values[0] for p in space.params}
    point.update({p.key: value for p, value in zip(per_params, values, strict=True)})
    return point


def _spec(space: SearchSpace) -> TuneSpec:
    if space.tune is None:
        raise SpaceError(f"{space.path}: no tune section")
    return space.tune


def search_space(space: SearchSpace, search: Search) -> SearchSpace:
    """The sweep one search runs: the tune params over the search's grid point, no early stopping."""
    tune = _spec(space)
    return SearchSpace(path=space.path, base=search.base, metric=space.metric, search=tune.search,
                       trials=tune.trials, scheduler=DEFAULT_SCHEDULER | {"type": "none"},
                       cpu=space.cpu, gpu=space.gpu, ranks=space.ranks, fixed={}, params=list(tune.params))


def check(space: SearchSpace, overrides: list[str]) -> None:
    """Every search's trial configs through the trainer's validation, before anything runs."""
    for search in searches(space):
        check_space(search_space(space, search), [*overrides, *search.overrides])


def run_searches(space: SearchSpace, overrides: list[str], out: Path,
                 study_args: argparse.Namespace) -> dict[str, dict]:
    """Each search's winner.json (run now, or kept from an earlier attempt), by search name."""
    tune = _spec(space)
    winners = {}
    for search in searches(space):
        directory = out / "tuning" / search.name
        if (directory / WINNER).is_file():
            winners[search.name] = json.loads((directory / WINNER).read_text(encoding="utf-8"))
            print(f"tuning {search.name}: kept ({winners[search.name]['trials']} trials)")
            continue
        if directory.exists():
            shutil.rmtree(directory)  # an interrupted search starts again, clean
        sub = search_space(space, search)
        trial_overrides_ = [*overrides, *search.overrides]
        max_epochs = check_space(sub, trial_overrides_)
        print(f"tuning {search.name}: {tune.trials} trials ({tune.search}) on val", flush=True)
        args = argparse.Namespace(resume=False, seed=0, max_failures=study_args.max_failures,
                                  address=study_args.address, dashboard=False, verbose=0)
        sweep(sub, trial_overrides_, directory, max_epochs, args)
        winners[search.name] = _winner(space, search, directory)
        write_json(directory / WINNER, winners[search.name])
        won = winners[search.name]
        values = ", ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in won["values"].items())
        print(f"tuning {search.name}: best val {space.metric} {won['val']:.4f} with {values} "
              f"({won['trials']} trials, {won['trial_epochs']} trial-epochs)", flush=True)
    return winners


def _winner(space: SearchSpace, search: Search, directory: Path) -> dict:
    tune = _spec(space)
    rows = collect(directory / "trials", space.metric)
    if not rows or rows[0].best is None:
        raise SpaceError(f"tuning {search.name}: no trial produced a validation {space.metric} "
                         f"(see {directory / 'trials'})")
    best = rows[0]
    images = 0
    for row in rows:
        val = [r for r in rundir.read_records(row.run_dir, tolerant=True) if r["split"] == "val"]
        seen = [r.get("images_seen") for r in val]
        images += max((s for s in seen if isinstance(s, int)), default=0)
    return {"search": search.name, "trials": len(rows), "algorithm": tune.search, "per": list(tune.per),
            "values": {p.key: best.params.get(p.key) for p in tune.params}, "val": best.best,
            "trial": best.trial, "trial_epochs": sum(row.epochs for row in rows), "images": images}


def cell_overrides(cell: Cell, space: SearchSpace, winners: dict[str, dict]) -> list[str]:
    """The winning values of the search that covers the cell, and the record of that search."""
    tune = _spec(space)
    search = next(s for s in searches(space) if s.covers(cell, tune.per))
    winner = winners[search.name]
    values = [f"{key}={json.dumps(value)}" for key, value in winner["values"].items()]
    record = {key: winner[key] for key in ("search", "trials", "algorithm", "trial_epochs", "images")}
    return [*values, f"run.tuning={json.dumps(record)}"]
