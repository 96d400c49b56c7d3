"""`python -m trainer.demo --external`: the demo's two runs validated on other synthetic packs.

After the demo trains its CNN and ViT on synthetic CheXpert, each external target is generated
(`python -m shards.synth --layout L`), packed (`shards.pack`, same image size as the demo's pack),
and both runs' best models are scored on its test split (`trainer.evaluate`, written to
RUN/external/<target>/); the report then shows the external-validation table.

Targets: the layouts of EXTERNAL_LAYOUTS that this checkout's shards.synth and shards.pack both
know, in that order; when none is known, synthetic CheXpert drawn with another seed, named
`chexpert-seed1` (a stand-in: the same generator and vocabulary, so it measures a change of
sample, not of dataset). `--target LAYOUT` (repeatable) asks for layouts by name.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shards.errors import DataError

EXTERNAL_LAYOUTS: tuple[str, ...] = ("nih", "mimic")
"""Synthetic twins of other datasets the demo validates on, each used once shards.synth and
shards.pack both accept its `--layout` (checked at run time)."""

FALLBACK_SEED = 1
SYNTH_EXTRA: dict[str, list[str]] = {"chexpert": ["--valid-patients", "{quarter}"]}
"""Layout-specific shards.synth arguments ({quarter}: a quarter of the patients): CheXpert's test
split is valid.csv, an eighth of the patients by default, too few for an external set."""


@dataclass(frozen=True)
class Target:
    name: str
    """The pack folder's name, hence RUN/external/<name>/ and the report's row."""
    layout: str
    seed: int
    note: str


def known_layouts() -> tuple[str, ...]:
    """Layouts both halves accept: shards.synth's --layout choices and shards.pack's LAYOUTS."""
    from shards.pack.sources import LAYOUTS  # noqa: PLC0415
    from shards.synth.__main__ import build_parser  # noqa: PLC0415

    action = next(a for a in build_parser()._actions if a.dest == "layout")
    return tuple(layout for layout in action.choices or () if layout in LAYOUTS)


def external_targets(requested: Sequence[str] | None = None) -> list[Target]:
    """The asked-for layouts (an unknown one is an error), or EXTERNAL_LAYOUTS where known, or the
    CheXpert stand-in."""
    known = known_layouts()
    if requested:
        unknown = [layout for layout in requested if layout not in known]
        if unknown:
            raise DataError(f"--target {unknown[0]}: shards.synth/shards.pack here do not know this layout "
                            f"(they know {', '.join(known)})")
        return [_target(layout) for layout in dict.fromkeys(requested)]
    chosen = [layout for layout in EXTERNAL_LAYOUTS if layout in known]
    return [_target(layout) for layout in chosen] or [_target("chexpert")]


def _target(layout: str) -> Target:
    if layout == "chexpert":
        return Target(f"chexpert-seed{FALLBACK_SEED}", layout, FALLBACK_SEED,
                      "synthetic CheXpert drawn with another seed: a stand-in for another dataset "
                      "(same generator and labels)")
    return Target(layout, layout, 0, f"synthetic {layout} (its own layout and label vocabulary)")


def prepare_target(out: Path, target: Target, patients: int) -> Path:
    """Generate (unless already there) and pack one target; the pack's folder.

    Both run as their own commands: their worker pools fork, and a fork of this process (torch's
    threads already running after training) can deadlock in the child.
    """
    source, shards = out / "external" / "source" / target.name, out / "external" / target.name
    if not source.is_dir() or not any(not p.name.startswith(".") for p in source.iterdir()):
        extra = [arg.format(quarter=max(2, patients // 4)) for arg in SYNTH_EXTRA.get(target.layout, [])]
        _command(["shards.synth", "--layout", target.layout, "--out", str(source), "--patients",
                  str(patients), "--size", "128", "--seed", str(target.seed), "--workers", "2", *extra])
    _command(["shards.pack", "--layout", target.layout, "--root", str(source), "--out", str(shards),
              "--size", "96", "--shard-samples", "128", "--workers", "2", "--overwrite"])
    return shards


def _command(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", *args], check=False)
    if done.returncode != 0:
        raise DataError(f"python -m {' '.join(args)} failed (exit {done.returncode})")


def validate(out: Path, runs: Sequence[Path], targets: Sequence[Target], patients: int) -> None:
    """Every run on every target's test split (RUN/external/<target>/), one line each."""
    from trainer.evaluate import EvaluateOptions, evaluate_external  # noqa: PLC0415
    from trainer.metrics import format_metric  # noqa: PLC0415

    for target in targets:
        print(f"\n== external target {target.name}: {target.note} ==")
        shards = prepare_target(out, target, patients)
        for run in runs:
            where, record = evaluate_external(EvaluateOptions(run, shards))
            labels = ", ".join(f"{k} {format_metric(v, '.3f')}" for k, v in record["auroc"].items())
            print(f"{run.name} on {target.name} ({record['samples']} test images): macro "
                  f"{format_metric(record['auroc_macro'], '.3f')} ({labels}) → {where}")
