"""Reading finished run directories and sweep results (never re-training anything).

A run directory (trainer/rundir.py reads it) is usable when it has config.yaml, metrics.jsonl with
a test record, and predictions_test.npz with the patient of every row; anything missing or
unreadable is reported with its reason and the run skipped, so one broken run never hides the others.
A run's external evaluations (`external/<pack>/`, trainer/evaluate.py) come with it; a broken one is
listed with its reason and the run reported without it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer import rundir
from trainer.config import Config
from trainer.rundir import External, Predictions, RunDirError


@dataclass
class RunData:
    name: str
    path: Path
    config: Config
    records: list[dict]
    test: Predictions
    val: Predictions | None
    card: dict = field(default_factory=dict)
    architecture: str = "cnn"
    """trainer.models.model_family of the trained model: cnn, vit or swin."""
    external: list[External] = field(default_factory=list)
    """best/ scored on other packs (RUN/external/<pack>/), by pack name."""
    external_skipped: list[dict] = field(default_factory=list)
    """External folders that could not be read: {path, reason}."""
    localizations: dict[str, dict] = field(default_factory=dict)
    """RUN/localization/*.json: heatmaps scored against radiologists' ground truth (trainer.explain)."""
    localization_problems: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.config.model.name

    @property
    def freeze(self) -> str:
        return self.config.model.freeze

    @property
    def pretrained(self) -> str:
        """The weights it started from: timm's pretrained tag (`vit_base_patch16_224.augreg_in21k`
        → augreg_in21k), "default" (timm's default weights for an untagged name) or "none" (trained
        from scratch). The same architecture from other weights is another model in a comparison."""
        if not self.config.model.pretrained:
            return "none"
        return self.model.partition(".")[2] or "default"

    @property
    def family(self) -> str:
        """The side of the CNN-vs-ViT question: "vit" for any transformer (ViT, DeiT, hybrid,
        Swin), else "cnn" (the structure the trainer recorded: see `architecture`)."""
        return "cnn" if self.architecture == "cnn" else "vit"

    @property
    def binary(self) -> bool:
        return self.test.labels == ("Pneumonia",)

    def split(self, name: str) -> list[dict]:
        return [r for r in self.records if r.get("split") == name]

    @property
    def train_seconds(self) -> float | None:
        values = [r["train_seconds"] for r in self.records if isinstance(r.get("train_seconds"), int | float)]
        return max(values) if values else None

    @property
    def images_per_second(self) -> float | None:
        values = [r["img_per_s"] for r in self.split("train") if isinstance(r.get("img_per_s"), int | float)]
        return float(np.median(values)) if values else None

    @property
    def trainable_parameters(self) -> int | None:
        return (self.card.get("parameters") or {}).get("trainable")

    @property
    def threshold(self) -> float | None:
        value = self.card.get("threshold")
        return float(value) if isinstance(value, int | float) else None


def load_run(path: Path, name: str) -> RunData:
    """One finished run directory, or RunDirError naming the file and what is wrong with it."""
    config = rundir.read_config(path)
    records = rundir.read_records(path)
    if not any(r["split"] == "test" for r in records):
        raise RunDirError(f"{rundir.METRICS}: no test record (the run did not finish)")
    test = rundir.read_predictions(rundir.predictions_path(path, "test"))
    val_file = rundir.predictions_path(path, "val")
    val = rundir.read_predictions(val_file) if val_file.is_file() else None
    card = rundir.read_card(path)
    external, broken = rundir.read_externals(path)
    localizations, problems = rundir.read_localizations(path)
    return RunData(name, path, config, records, test, val, card, architecture(card, config),
                   external=external, external_skipped=broken, localizations=localizations,
                   localization_problems=problems)


def architecture(card: dict, config: Config) -> str:
    """The model card's family (the trainer classified the model it built); for a run exported
    before cards carried it, the same classification of the architecture built without weights."""
    if card.get("family"):
        return str(card["family"])
    from trainer.models import model_family_by_name  # noqa: PLC0415 - imports timm

    try:
        return model_family_by_name(config.model.name)
    except RuntimeError:  # timm's "Unknown model"
        raise RunDirError(f"{rundir.BEST}/{rundir.CARD}: no family, and this timm does not know "
                          f"{config.model.name!r} to classify it") from None


def find_runs(roots: list[Path]) -> tuple[list[Path], list[Path]]:
    """(run directories, sweep directories) under the given folders. A run directory has
    config.yaml or metrics.jsonl; a sweep directory has results.csv from sweeps.run. Sweep trials
    (trained on val only, never tested) feed the sweep figures, not the run tables; what a restarted
    run set aside (RUN/set-aside/) is part of RUN, not a run."""
    runs: list[Path] = []
    sweeps: list[Path] = []
    for root in roots:
        sweeps += sorted(p.parent for p in root.rglob("results.csv") if (p.parent / "trials").is_dir())
        if (root / "results.csv").is_file() and (root / "trials").is_dir():
            sweeps.append(root)
        if rundir.holds_run(root):
            runs.append(root)
            continue
        candidates = {p.parent for p in root.rglob(rundir.METRICS)}
        candidates |= {p.parent for p in root.rglob(rundir.CONFIG) if p.parent.name != rundir.BEST}
        runs += sorted(p for p in candidates
                       if not any(s in p.parents for s in sweeps) and not _external(p)
                       and rundir.SET_ASIDE not in p.relative_to(root).parts)
    return list(dict.fromkeys(runs)), list(dict.fromkeys(sweeps))


def _external(path: Path) -> bool:
    """RUN/external/<pack>/ (or anything below it): part of RUN, not a run of its own."""
    return any(parent.name == rundir.EXTERNAL and rundir.holds_run(parent.parent) for parent in path.parents)


def load_sweep(path: Path) -> list[dict]:
    """A sweep's results.csv (from sweeps.run) as rows; [] when absent."""
    table = path / "results.csv"
    if not table.is_file():
        return []
    with table.open() as handle:
        return list(csv.DictReader(handle))
