"""Fetch (online) or verify (offline) the pretrained weights a sweep space or trainer configs need.

    python -m trainer.weights fetch  --space SPACE | --config FILE [--config FILE ...] [key.sub=value ...]
    python -m trainer.weights verify --space SPACE | --config FILE [--config FILE ...] [key.sub=value ...]

fetch, on a machine with internet (a login node), downloads each into the cache that timm reads
on the compute nodes: the Hugging Face cache (HF_HOME, HF_HUB_CACHE), the safetensors file as
timm's loader prefers it plus the repo's config.json; or torch hub's cache (TORCH_HOME) for the
few timm weights published only at a URL. verify proves, with the hub offline, that each is in
the cache and loads into its timm architecture. Models are those with model.pretrained: true and
no model.weights file: in each config, or in a space's base config(s) under its `fixed`
overrides and every value of its model.name / model.pretrained / model.weights params.

One line per model: `ok NAME (PATH)` or `missing NAME: why`.
Exit status: 0 all ok, 1 some missing, 2 bad space/config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sweeps.space import SpaceError
from trainer.config import ConfigError
from trainer.weights.needs import Need, from_configs, from_space
from trainer.weights.sources import Source, WeightsError, check_loads, fetch, locate, source_of


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.weights",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("action", choices=("fetch", "verify"),
                        help="fetch: download (needs internet); verify: check offline")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--space", type=Path, help="search space YAML (sweeps/spaces/)")
    given.add_argument("--config", type=Path, action="append", metavar="FILE",
                       help="trainer config YAML (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every config")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow the options
    try:
        needs = from_space(args.space, args.overrides) if args.space else \
            from_configs(args.config, args.overrides)
        sources = [_source(need) for need in needs]
    except (ConfigError, SpaceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not sources:
        print("no pretrained weights needed: every config has model.pretrained: false or model.weights")
        return 0
    step = STEPS[args.action]
    missing = 0
    for source in sources:
        try:
            print(f"ok {source.name} ({step(source)})", flush=True)
        except WeightsError as err:
            missing += 1
            print(f"missing {source.name}: {err}", flush=True)
    return 1 if missing else 0


def _source(need: Need) -> Source:
    try:
        return source_of(need.name)
    except ConfigError as err:
        raise ConfigError(f"{need.config}: {err}") from None


def _verify(source: Source) -> Path:
    """Found offline, then loaded: a file in the cache that does not load fails the same way."""
    path = locate(source)
    check_loads(source.name)
    return path


STEPS: dict[str, Callable[[Source], Path]] = {"fetch": fetch, "verify": _verify}

if __name__ == "__main__":
    sys.exit(main())
