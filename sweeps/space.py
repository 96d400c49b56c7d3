"""Search spaces as YAML: which trainer settings a sweep varies, how, and how it is scheduled.

    base: trainer/configs/demo_cpu.yaml      # trainer config every trial starts from
    metric: auroc_macro                      # validation metric (higher is better)
    search: optuna                           # optuna (TPE) or grid (full factorial)
    trials: 4                                # optuna: trials; grid: repeats of the whole grid
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: none}
    resources: {cpu: 1, gpu: 0}              # per trial; gpu > 1 (or ranks: N) runs N ranks per trial
    fixed: {data.workers: 0}                 # overrides every trial gets
    params:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.freeze: {choice: [head, head+last_block, full]}
      config: {choice: [a.yaml, b.yaml]}     # the base config itself as a categorical (model presets)

Parameter kinds: loguniform, uniform, randint ([low, high)), choice, grid. Keys are dotted
trainer config keys (checked against the config tree when the space is loaded; values are checked
against the trainer's own validation before any trial starts, see sweeps.run).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config import METRICS, Config

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
SCHEDULERS = ("asha", "none")
TOP_KEYS = {"base", "metric", "search", "trials", "scheduler", "resources", "fixed", "params", "description",
            "tune"}
TUNE_KEYS = {"per", "trials", "search", "fixed", "params"}
DEFAULT_SCHEDULER = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
CONFIG_PARAM = "config"
"""The special parameter whose values are base config files (a choice of model presets)."""


class SpaceError(ValueError):
    """A mistake in a space file, in one line naming the file and the key."""


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    values: tuple

    def extremes(self) -> list:
        """The values worth validating before a sweep starts: bounds, or every listed value."""
        return list(self.values)


@dataclass
class SearchSpace:
    path: Path
    base: str | None
    metric: str = "auroc_macro"
    search: str = "optuna"
    trials: int = 8
    scheduler: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    cpu: float = 1.0
    gpu: float = 0.0
    ranks: int = 0
    """Processes per trial; 0 = one per GPU when gpu > 1, else one (in the Tune worker)."""
    fixed: dict[str, Any] = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)
    tune: TuneSpec | None = None
    """sweeps.study only: the equal-budget search that picks each architecture's hyperparameters."""

    def tune_space(self) -> dict:
        """The Ray Tune param_space (OptunaSearch converts these domains itself)."""
        from ray import tune  # noqa: PLC0415 - keeps space validation free of Ray's import time

        space: dict[str, Any] = {}
        for param in self.params:
            low, high = (*param.values, None, None)[:2]
            space[param.key] = {
                "loguniform": lambda lo=low, hi=high: tune.loguniform(lo, hi),
                "uniform": lambda lo=low, hi=high: tune.uniform(lo, hi),
                "randint": lambda lo=low, hi=high: tune.randint(lo, hi),
                "choice": lambda p=param: tune.choice(list(p.values)),
                "grid": lambda p=param: tune.grid_search(list(p.values)),
            }[param.kind]()
        return space


@dataclass(frozen=True)
class TuneSpec:
    """A study's tuning stage (sweeps.study): one search per value of the `per` grid params (by
    default the architecture), each with the same trials, search, fixed settings and params, on val
    only; the grid then runs with each search's winning values.

        tune:
          per: [config]             # grid params that define "an architecture" [config, else model.name]
          trials: 8                 # the same number for every search
          search: optuna            # optuna (TPE, the same sampler seed for every search) or grid
          fixed: {optim.epochs: 2}  # settings of the search trials only (e.g. shorter)
          params:
            optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
    """

    per: tuple[str, ...]
    trials: int
    search: str
    fixed: dict[str, Any]
    params: tuple[Param, ...]


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"--space {path}: no such file (see sweeps/spaces/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with base, metric, search, params, ...")
    if unknown := sorted(set(raw) - TOP_KEYS):
        allowed = ", ".join(sorted(TOP_KEYS))
        raise SpaceError(f"{path}: unknown key {unknown[0]!r} (expected one of: {allowed})")
    space = SearchSpace(path=path, base=raw.get("base"))
    space.metric = _one_of(path, "metric", raw.get("metric", space.metric), METRICS)
    space.search = _one_of(path, "search", raw.get("search", space.search), ("optuna", "grid"))
    default_trials = 1 if space.search == "grid" else space.trials
    space.trials = _positive_int(path, "trials", raw.get("trials", default_trials))
    space.scheduler = _scheduler(path, raw.get("scheduler", space.scheduler))
    space.cpu, space.gpu, space.ranks = _resources(path, raw.get("resources", {}) or {}, space)
    space.fixed = raw.get("fixed", {}) or {}
    if not isinstance(space.fixed, dict):
        raise SpaceError(f"{path}: fixed: expected a mapping of config keys to values")
    for key in space.fixed:
        _check_key(path, f"fixed.{key}", key)
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{path}: params: expected a mapping of config keys to {{kind: values}}")
    space.params = [_param(path, key, spec) for key, spec in params.items()]
    kinds = {p.kind for p in space.params}
    if space.search == "grid" and kinds - {"grid"}:
        raise SpaceError(
            f"{path}: search: grid needs every param as {{grid: [...]}}, found {sorted(kinds - {'grid'})[0]}"
        )
    if space.search == "optuna" and "grid" in kinds:
        raise SpaceError(f"{path}: a grid param needs search: grid (optuna samples choice/loguniform/...)")
    if space.base is None and not any(p.key == CONFIG_PARAM for p in space.params):
        raise SpaceError(f"{path}: base: missing (a trainer config YAML), or give params.config")
    if "tune" in raw:
        space.tune = _tune(path, raw["tune"], space)
    return space


def _tune(path: Path, raw: object, space: SearchSpace) -> TuneSpec:
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: tune: expected a mapping with per, trials, search, fixed, params")
    if unknown := sorted(set(raw) - TUNE_KEYS):
        allowed = ", ".join(sorted(TUNE_KEYS))
        raise SpaceError(f"{path}: tune: unknown key {unknown[0]!r} (expected one of: {allowed})")
    grid = [p.key for p in space.params]
    default = [CONFIG_PARAM] if CONFIG_PARAM in grid else [k for k in grid if k == "model.name"]
    per = raw.get("per", default)
    if not isinstance(per, list) or not per or any(key not in grid for key in per):
        raise SpaceError(f"{path}: tune.per: expected a list of the grid's params ({', '.join(grid)}), "
                         f"got {per!r}")
    search = _one_of(path, "tune.search", raw.get("search", "optuna"), ("optuna", "grid"))
    trials = _positive_int(path, "tune.trials", raw.get("trials", 1 if search == "grid" else 8))
    fixed = raw.get("fixed", {}) or {}
    if not isinstance(fixed, dict):
        raise SpaceError(f"{path}: tune.fixed: expected a mapping of config keys to values")
    for key in fixed:
        _check_key(path, f"tune.fixed.{key}", key)
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{path}: tune.params: expected a mapping of config keys to {{kind: values}}")
    tuned = tuple(_param(path, key, spec) for key, spec in params.items())
    for param in tuned:
        if param.key == CONFIG_PARAM or param.key in grid:
            raise SpaceError(f"{path}: tune.params.{param.key}: already a grid param (tune what the grid "
                             "does not vary)")
        if (search == "grid") != (param.kind == "grid"):
            raise SpaceError(f"{path}: tune.params.{param.key}: tune.search {search} takes "
                             f"{'grid' if search == 'grid' else 'choice/loguniform/uniform/randint'} params")
    return TuneSpec(tuple(per), trials, search, dict(fixed), tuned)


def _resources(path: Path, resources: object, space: SearchSpace) -> tuple[float, float, int]:
    if not isinstance(resources, dict) or set(resources) - {"cpu", "gpu", "ranks"}:
        raise SpaceError(f"{path}: resources: expected {{cpu: N, gpu: N, ranks: N}}, got {resources!r}")
    out = []
    for name in ("cpu", "gpu", "ranks"):
        value = resources.get(name, getattr(space, name))
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise SpaceError(f"{path}: resources.{name}: expected a number ≥ 0, got {value!r}")
        out.append(value)
    if not float(out[2]).is_integer():
        raise SpaceError(f"{path}: resources.ranks: expected a whole number, got {out[2]!r}")
    return float(out[0]), float(out[1]), int(out[2])


def _one_of(path: Path, key: str, value: object, allowed: tuple) -> str:
    if value not in allowed:
        raise SpaceError(f"{path}: {key}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _positive_int(path: Path, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpaceError(f"{path}: {key}: expected an integer ≥ 1, got {value!r}")
    return value


def _scheduler(path: Path, raw: object) -> dict:
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: scheduler: expected a mapping like {DEFAULT_SCHEDULER}")
    out = DEFAULT_SCHEDULER | raw
    _one_of(path, "scheduler.type", out["type"], SCHEDULERS)
    if unknown := sorted(set(out) - {"type", "grace_period", "reduction_factor"}):
        raise SpaceError(f"{path}: scheduler: unknown key {unknown[0]!r}")
    _positive_int(path, "scheduler.grace_period", out["grace_period"])
    factor = out["reduction_factor"]
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor <= 1:
        raise SpaceError(f"{path}: scheduler.reduction_factor: expected a number > 1, got {factor!r}")
    return out


def _param(path: Path, key: str, spec: object) -> Param:
    where = f"{path}: params.{key}"
    if key != CONFIG_PARAM:
        _check_key(path, f"params.{key}", key)
    if not isinstance(spec, dict) or len(spec) != 1:
        kinds = ", ".join(f"{k}: [...]" for k in KINDS)
        raise SpaceError(f"{where}: expected one of {{{kinds}}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise SpaceError(f"{where}: unknown kind {kind!r} (expected one of: {', '.join(KINDS)})")
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{where}: {kind}: expected a non-empty list, got {values!r}")
    if kind in ("loguniform", "uniform", "randint"):
        numbers = [_number(where, v) for v in values]
        if len(numbers) != 2 or not numbers[0] < numbers[1]:
            raise SpaceError(f"{where}: {kind}: expected [low, high] with low < high, got {values!r}")
        if kind == "loguniform" and numbers[0] <= 0:
            raise SpaceError(f"{where}: loguniform: bounds must be > 0, got {values!r}")
        if kind == "randint" and not all(float(n).is_integer() for n in numbers):
            raise SpaceError(f"{where}: randint: expected integer bounds, got {values!r}")
        values = [int(n) for n in numbers] if kind == "randint" else numbers
    if key == CONFIG_PARAM and kind not in ("choice", "grid"):
        raise SpaceError(f"{where}: the base config can only be a choice or a grid of YAML files")
    return Param(key, kind, tuple(values))


def _number(where: str, value: object) -> float:
    try:  # YAML 1.1 reads 1e-4 (no dot) as text, as the trainer config does
        if isinstance(value, bool):
            raise TypeError
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SpaceError(f"{where}: expected a number, got {value!r}") from None


def _check_key(path: Path, where: str, key: str) -> None:
    """The key must name a leaf of the trainer config tree (data.*, model.*, optim.*, run.*)."""
    node: type = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            prefix = ".".join(parts[:i])
            options = ", ".join(f"{prefix + '.' if prefix else ''}{name}" for name in fields)
            raise SpaceError(
                f"{path}: {where}: {key!r} is not a trainer config key (expected one of: {options})"
            )
        kind = typing.get_type_hints(node)[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(kind):
                raise SpaceError(f"{path}: {where}: {'.'.join(parts[: i + 1])} is not a section")
            node = kind
        elif dataclasses.is_dataclass(kind):
            raise SpaceError(f"{path}: {where}: {key} is a section; name one of its keys")
