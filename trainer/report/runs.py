"""Reading finished run directories and sweep results (never re-training anything).

A run directory is usable when it has config.yaml, metrics.jsonl and predictions_test.npz (the
per-sample test predictions the trainer writes); anything missing or unreadable is reported with
its reason and the run skipped, so one broken run never hides the others.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from shards.pack.sources import patient_from_key

CNN_PATTERN = re.compile(
    r"^(resnet|resnext|densenet|efficientnet|convnext|regnet|mobilenet|vgg|inception|"
    r"seresnet|wide_resnet|dpn|nfnet)"
)
TRANSFORMER_PATTERN = re.compile(r"^(vit|deit|swin|beit|eva|cait|xcit|pit|twins|maxvit|coat|levit|crossvit)")


def family(model: str) -> str:
    """cnn, vit (any transformer: ViT, DeiT, Swin, hybrid ResNet+ViT) or other."""
    if TRANSFORMER_PATTERN.match(model):
        return "vit"
    if CNN_PATTERN.match(model):
        return "cnn"
    return "other"


@dataclass
class Predictions:
    keys: np.ndarray
    patients: np.ndarray
    labels: list[str]
    probs: np.ndarray
    targets: np.ndarray
    masks: np.ndarray

    def aligned(self, keys: np.ndarray) -> Predictions:
        """The rows of `keys`, in that order (for paired comparisons on the same images)."""
        index = {key: i for i, key in enumerate(self.keys.tolist())}
        rows = np.array([index[key] for key in keys.tolist()], dtype=int)
        return Predictions(
            self.keys[rows],
            self.patients[rows],
            self.labels,
            self.probs[rows],
            self.targets[rows],
            self.masks[rows],
        )


@dataclass
class RunData:
    name: str
    path: Path
    config: dict
    records: list[dict]
    test: Predictions
    val: Predictions | None
    card: dict = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name", "?"))

    @property
    def freeze(self) -> str:
        return str(self.config.get("model", {}).get("freeze", "?"))

    @property
    def family(self) -> str:
        return family(self.model)

    @property
    def binary(self) -> bool:
        return self.test.labels == ["Pneumonia"]

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


def load_predictions(path: Path) -> Predictions:
    # allow_pickle=False: the arrays are plain numbers and strings; never unpickle a run's files.
    with np.load(path, allow_pickle=False) as data:
        keys = data["keys"].astype(str)
        predictions = Predictions(
            keys,
            np.array([patient_from_key(k) for k in keys]),
            [str(x) for x in data["labels"]],
            data["probs"].astype(np.float64),
            data["targets"].astype(np.float64),
            data["masks"].astype(np.float64),
        )
    rows = len(predictions.keys)
    if not (
        predictions.probs.shape
        == predictions.targets.shape
        == predictions.masks.shape
        == (rows, len(predictions.labels))
    ):
        raise ValueError(f"{path.name}: arrays of mismatched shapes")
    return predictions


def load_run(path: Path, name: str) -> RunData:
    """One run directory, or ValueError naming the file and what is wrong with it."""
    config_file, metrics_file, test_file = (
        path / "config.yaml",
        path / "metrics.jsonl",
        path / "predictions_test.npz",
    )
    for required in (config_file, metrics_file, test_file):
        if not required.is_file():
            raise ValueError(f"{required.name} missing")
    try:
        config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config.yaml: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError("config.yaml: expected a mapping")
    records = []
    for number, line in enumerate(metrics_file.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"metrics.jsonl line {number}: not JSON") from None
        if not isinstance(record, dict) or "split" not in record:
            raise ValueError(f"metrics.jsonl line {number}: expected an object with a split")
        records.append(record)
    if not any(r["split"] == "test" for r in records):
        raise ValueError("metrics.jsonl: no test record (the run did not finish)")
    try:
        test = load_predictions(test_file)
        val_file = path / "predictions_val.npz"
        val = load_predictions(val_file) if val_file.is_file() else None
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"predictions: {err}") from None
    card_file = path / "best" / "model_card.json"
    try:
        card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    except json.JSONDecodeError:
        card = {}
    return RunData(name, path, config, records, test, val, card)


def find_runs(roots: list[Path]) -> tuple[list[Path], list[Path]]:
    """(run directories, sweep directories) under the given folders. A run directory has
    config.yaml or metrics.jsonl; a sweep directory has results.csv from sweeps.run. Sweep trials
    (trained on val only, never tested) feed the sweep figures, not the run tables."""
    runs: list[Path] = []
    sweeps: list[Path] = []
    for root in roots:
        sweeps += sorted(p.parent for p in root.rglob("results.csv") if (p.parent / "trials").is_dir())
        if (root / "results.csv").is_file() and (root / "trials").is_dir():
            sweeps.append(root)
        if (root / "metrics.jsonl").is_file() or (root / "config.yaml").is_file():
            runs.append(root)
            continue
        candidates = {p.parent for p in root.rglob("metrics.jsonl")}
        candidates |= {p.parent for p in root.rglob("config.yaml") if p.parent.name != "best"}
        runs += sorted(p for p in candidates if not any(s in p.parents for s in sweeps))
    return list(dict.fromkeys(runs)), list(dict.fromkeys(sweeps))


def load_sweep(path: Path) -> list[dict]:
    """A sweep's results.csv (from sweeps.run) as rows; [] when absent."""
    table = path / "results.csv"
    if not table.is_file():
        return []
    with table.open() as handle:
        return list(csv.DictReader(handle))
