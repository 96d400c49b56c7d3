"""A synthetic CheXpert-v1.0-small tree: train.csv, valid.csv and the JPEGs they name.

Layout, columns, value spellings and patient numbering follow the real dataset, so
`shards.pack.sources.read_chexpert` reads it exactly as it reads a download. Label rates follow the
real train.csv (positive / uncertain / explicit-negative fractions per observation; the rest are
blank); valid.csv, like the real one, has only 0/1 labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from shards.labels import CHEXPERT_COLUMNS, CHEXPERT_LABELS, RawLabel, format_raw_label
from shards.lesion import label_bit
from shards.synth.common import (
    SynthSummary,
    parallel_map,
    patient_rng,
    staged,
    write_csv,
    write_image,
)
from shards.synth.render import PAINTERS, Draw, labelled, render

DATASET_DIR = "CheXpert-v1.0-small"
FIRST_VALID_PATIENT = 64541
"""Real valid.csv numbers its 200 patients from patient64541 on, after the 64,540 train patients."""

TRAIN_RATES: dict[str, tuple[float, float, float]] = {
    # observation: (positive, uncertain, explicit negative) fractions of train.csv rows
    "Enlarged Cardiomediastinum": (0.048, 0.055, 0.10),
    "Cardiomegaly": (0.12, 0.036, 0.05),
    "Lung Opacity": (0.47, 0.024, 0.03),
    "Lung Lesion": (0.041, 0.006, 0.005),
    "Edema": (0.23, 0.058, 0.09),
    "Consolidation": (0.066, 0.125, 0.12),
    "Pneumonia": (0.027, 0.084, 0.01),
    "Atelectasis": (0.149, 0.15, 0.001),
    "Pneumothorax": (0.087, 0.014, 0.25),
    "Pleural Effusion": (0.385, 0.052, 0.15),
    "Pleural Other": (0.016, 0.012, 0.001),
    "Fracture": (0.04, 0.003, 0.012),
    "Support Devices": (0.52, 0.005, 0.028),
}
BALANCED_RATES = (0.3, 0.05, 0.3)
"""`--rates balanced`: every observation common enough that a few hundred images learn it."""

OPACITY_CHILDREN = ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis")
UNCERTAIN_DRAWN = 0.5
"""An uncertain (-1) label is drawn, faintly, in half the images: truly equivocal evidence."""
UNCERTAIN_STRENGTH = 0.55


@dataclass(frozen=True, slots=True)
class ChexpertOptions:
    out: Path
    patients: int = 64
    valid_patients: int | None = None
    size: int = 320
    seed: int = 0
    rates: str = "realistic"
    lateral_fraction: float = 0.3
    workers: int = 1
    quality: int = 90

    @property
    def n_valid(self) -> int:
        return self.valid_patients if self.valid_patients is not None else max(2, self.patients // 8)


def sample_labels(rng: np.random.Generator, rates: str, valid: bool) -> dict[str, RawLabel]:
    """One study's labels, with CheXpert's structure: Lung Opacity above its children, No Finding
    only when nothing but Support Devices is positive, 0/1 only in valid.csv."""
    labels: dict[str, RawLabel] = {}
    for name, real in TRAIN_RATES.items():
        positive, uncertain, negative = BALANCED_RATES if rates == "balanced" else real
        if valid:
            labels[name] = int(rng.uniform() < positive + uncertain / 2)
            continue
        draw = rng.uniform()
        labels[name] = (1 if draw < positive else -1 if draw < positive + uncertain
                        else 0 if draw < positive + uncertain + negative else None)
    if any(labels[child] == 1 for child in OPACITY_CHILDREN) and rng.uniform() < 0.85:
        labels["Lung Opacity"] = 1
    findings = [value for name, value in labels.items() if name != "Support Devices"]
    if not any(value in (1, -1) for value in findings):
        labels["No Finding"] = 1
    else:
        labels["No Finding"] = 0 if valid else None
    return {name: labels[name] for name in CHEXPERT_LABELS}


def _draws(labels: dict[str, RawLabel], rng: np.random.Generator) -> list[Draw]:
    """The painters of one image, each marking the mask with its label's bit (CSV column order)."""
    draws: list[Draw] = []
    for name, painter in PAINTERS.items():
        value, bit = labels[name], label_bit(CHEXPERT_LABELS.index(name))
        if value == 1:
            draws.append(labelled(bit, partial(painter, strength=1.0)))
        elif value == -1 and rng.uniform() < UNCERTAIN_DRAWN:
            draws.append(labelled(bit, partial(painter, strength=UNCERTAIN_STRENGTH)))
    return draws


def _patient(task: tuple[ChexpertOptions, Path, str, int]) -> tuple[list[list[str]], int]:
    """Draw every study and view of one patient; returns its CSV rows and how many masks."""
    options, root, folder, number = task
    valid = folder == "valid"
    rng = patient_rng(options.seed, 1 if valid else 0, number)
    sex = str(rng.choice(["Male", "Female"], p=[0.59, 0.41])) if rng.uniform() > 0.001 else "Unknown"
    age = int(np.clip(rng.normal(61, 17), 18, 90))
    studies = 1 if valid else int(min(6, rng.geometric(0.55)))
    rows, masks = [], 0
    for study in range(1, studies + 1):
        labels = sample_labels(rng, options.rates, valid)
        projection = str(rng.choice(["AP", "PA"], p=[0.72, 0.28]))
        views = ["frontal"] + (["lateral"] if rng.uniform() < options.lateral_fraction else [])
        for view_index, view in enumerate(views, start=1):
            relpath = f"{DATASET_DIR}/{folder}/patient{number:05d}/study{study}/view{view_index}_{view}.jpg"
            width = options.size
            height = round(options.size * rng.uniform(1.1, 1.3))
            drawn = render(height, width, rng, view == "lateral", _draws(labels, rng))
            masks += write_image(root, relpath, drawn, options.quality)
            rows.append([relpath, sex, str(age), view.capitalize(), projection if view == "frontal" else "",
                         *(format_raw_label(labels[name]) for name in CHEXPERT_LABELS)])
    return rows, masks


def generate_chexpert(options: ChexpertOptions) -> SynthSummary:
    """Write <out>/CheXpert-v1.0-small/{train,valid}/…, train.csv, valid.csv and <out>/masks/."""
    started = time.perf_counter()
    dataset_dir = options.out / DATASET_DIR
    summary = SynthSummary("chexpert", options.out, dataset_dir, patients=options.patients + options.n_valid)
    with staged(options.out, DATASET_DIR) as root:
        parts = {
            "train": [(options, root, "train", number) for number in range(1, options.patients + 1)],
            "valid": [(options, root, "valid", FIRST_VALID_PATIENT + index)
                      for index in range(options.n_valid)],
        }
        for folder, tasks in parts.items():
            rows: list[list[str]] = []
            for patient_rows, masks in parallel_map(_patient, tasks, options.workers):
                rows += patient_rows
                summary.masks += masks
            write_csv(root / DATASET_DIR / f"{folder}.csv", CHEXPERT_COLUMNS, rows)
            summary.by_split[folder] = len(rows)
            summary.images += len(rows)
    summary.seconds = time.perf_counter() - started
    return summary
