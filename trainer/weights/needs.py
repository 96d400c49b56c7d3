"""Which timm models a sweep space or a set of trainer configs loads with pretrained weights from
a cache (`model.pretrained: true` and no `model.weights` file): the ones a compute node can only
load if someone fetched them first."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
WEIGHT_KEYS = ("model.name", "model.pretrained", "model.weights")
"""Sweep params that change which weights a trial loads; every other param leaves them alone."""


@dataclass(frozen=True)
class Need:
    name: str
    """The timm model name as the config writes it (may carry a tag: resnet50.a1_in1k)."""
    config: str
    """The first config file that asks for it, named in errors."""


def from_configs(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> list[Need]:
    """Configs as given (like `trainer/run.py --config`), with `key=value` overrides."""
    return _dedupe(need for path in paths for need in _needs(path, [list(overrides)]))


def from_space(path: str | Path, overrides: Sequence[str] = ()) -> list[Need]:
    """Every base config of the space (`base`, or each `params.config` value) under its `fixed`
    overrides, crossed with every value of the params that pick the weights (WEIGHT_KEYS)."""
    from sweeps.space import CONFIG_PARAM, SpaceError, load_space  # noqa: PLC0415

    space = load_space(path)
    bases = next((list(p.values) for p in space.params if p.key == CONFIG_PARAM), [space.base])
    try:
        bases = [resolve(str(base)) for base in bases]
    except FileNotFoundError as err:
        raise SpaceError(f"{path}: {err}") from None
    fixed = [f"{key}={json.dumps(value)}" for key, value in space.fixed.items()] + list(overrides)
    varied = [[f"{p.key}={json.dumps(v)}" for v in p.values] for p in space.params if p.key in WEIGHT_KEYS]
    variants = [fixed + list(combo) for combo in itertools.product(*varied)]
    return _dedupe(need for base in bases for need in _needs(base, variants))


def resolve(path: str) -> str:
    """A space's config file: from the current directory, else from the checkout (spaces name the
    shipped presets as trainer/configs/...), as sweeps.run resolves them."""
    here = Path(path)
    if not here.is_file() and (ROOT / path).is_file():
        here = ROOT / path
    if not here.is_file():
        raise FileNotFoundError(f"config file {path}: not found (from {Path.cwd()} or {ROOT})")
    return str(here)


def _needs(path: str | Path, variants: list[list[str]]) -> list[Need]:
    """environment=False: a login node holds neither the shards nor the weights yet."""
    found = []
    for overrides in variants:
        try:
            model = load_config(path, overrides, environment=False).model
        except ConfigError as err:
            raise ConfigError(str(err) if str(path) in str(err) else f"{path}: {err}") from None
        if model.pretrained and not model.weights:
            found.append(Need(model.name, str(path)))
    return found


def _dedupe(needs: Iterable[Need]) -> list[Need]:
    """First config per model name, in the order the files list them."""
    seen: dict[str, Need] = {}
    for need in needs:
        seen.setdefault(need.name, need)
    return list(seen.values())
