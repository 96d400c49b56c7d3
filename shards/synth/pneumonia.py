"""A synthetic Kaggle "Chest X-Ray Images (Pneumonia)" tree (Kermany et al. 2018).

`chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg` with the real file naming:
`personN_bacteria_M.jpeg` / `personN_virus_M.jpeg` (M a running image counter) for pneumonia,
`IM-XXXX-YYYY.jpeg` and `NORMAL2-IM-XXXX-YYYY.jpeg` for normals; several images per person.
As in the download, test persons are disjoint from train, while the tiny val folder holds
images of persons who also appear in train (which is why the reader merges it back by patient).
Kaggle's images are larger than 320 px, landscape, and a few are 3-channel: so are these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from shards.labels import PNEUMONIA_LABELS
from shards.lesion import label_bit
from shards.synth.common import SynthSummary, parallel_map, patient_rng, staged, write_image
from shards.synth.render import Draw, bacterial_pneumonia, labelled, render, viral_pneumonia

DATASET_DIR = "chest_xray"
VAL_PER_CLASS = 8
"""The real val folder holds 8 NORMAL and 8 PNEUMONIA images."""
RGB_FRACTION = 0.05
_PNEUMONIA_BIT = label_bit(PNEUMONIA_LABELS.index("Pneumonia"))
SUBTYPE_DRAWS: dict[str, Draw] = {"bacteria": labelled(_PNEUMONIA_BIT, bacterial_pneumonia),
                                  "virus": labelled(_PNEUMONIA_BIT, viral_pneumonia)}
"""Everything either subtype draws is the one label's lesion (consolidation and effusion included)."""


@dataclass(frozen=True, slots=True)
class PneumoniaOptions:
    out: Path
    patients: int = 64
    size: int = 320
    seed: int = 0
    workers: int = 1
    quality: int = 90


@dataclass(frozen=True, slots=True)
class Person:
    number: int
    label: str
    """NORMAL or PNEUMONIA."""
    subtype: str | None
    """bacteria / virus for PNEUMONIA."""
    normal_prefix: str
    split: str
    """train or test (val is decided per image)."""
    images: int


def plan_person(seed: int, number: int) -> Person:
    """Class and test membership follow the person number, so every split holds both classes from
    --patients 10 on; everything else is random per person."""
    rng = patient_rng(seed, 2, number)
    pneumonia = number % 10 not in (0, 3, 6)  # 70% of persons, ~74% of images as in Kaggle
    subtype = str(rng.choice(["bacteria", "virus"], p=[0.65, 0.35])) if pneumonia else None
    return Person(
        number=number,
        label="PNEUMONIA" if pneumonia else "NORMAL",
        subtype=subtype,
        normal_prefix="NORMAL2-IM" if rng.uniform() < 0.4 else "IM",
        split="test" if number % 7 == 3 else "train",
        images=int(min(5, rng.geometric(0.5 if pneumonia else 0.7))),
    )


def file_names(persons: list[Person]) -> list[tuple[Person, str, str]]:
    """(person, folder, relpath) for every image, with Kaggle's running counter for pneumonia files
    and the last image of some multi-image train persons moved to val/ (8 per class at most)."""
    counter, names = 0, []
    val_left = {"NORMAL": VAL_PER_CLASS, "PNEUMONIA": VAL_PER_CLASS}
    for person in persons:
        for index in range(1, person.images + 1):
            if person.subtype is not None:
                counter += 1
                name = f"person{person.number}_{person.subtype}_{counter}.jpeg"
            else:
                name = f"{person.normal_prefix}-{person.number:04d}-{index:04d}.jpeg"
            folder = person.split
            if folder == "train" and index == person.images > 1 and val_left[person.label] > 0:
                val_left[person.label] -= 1
                folder = "val"
            names.append((person, folder, f"{DATASET_DIR}/{folder}/{person.label}/{name}"))
    return names


def _image(task: tuple[PneumoniaOptions, Path, Person, str, int]) -> bool:
    options, root, person, relpath, index = task
    rng = patient_rng(options.seed, 3, person.number * 16 + index)
    height = round(options.size * rng.uniform(1.0, 1.5))
    width = round(height * rng.uniform(1.15, 1.5))
    draws = [SUBTYPE_DRAWS[person.subtype]] if person.subtype else []
    drawn = render(height, width, rng, lateral=False, draws=draws)
    return write_image(root, relpath, drawn, options.quality, rgb=rng.uniform() < RGB_FRACTION)


def generate_pneumonia(options: PneumoniaOptions) -> SynthSummary:
    """Write <out>/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/ and lesion masks."""
    started = time.perf_counter()
    persons = [plan_person(options.seed, number) for number in range(1, options.patients + 1)]
    names = file_names(persons)
    summary = SynthSummary("pneumonia", options.out, options.out / DATASET_DIR, patients=len(persons))
    with staged(options.out, DATASET_DIR) as root:
        for folder in ("train", "val", "test"):
            for label in ("NORMAL", "PNEUMONIA"):  # the reader wants every class folder, even if empty
                (root / DATASET_DIR / folder / label).mkdir(parents=True, exist_ok=True)
        seen: dict[int, int] = {}
        tasks = []
        for person, _, relpath in names:
            seen[person.number] = seen.get(person.number, 0) + 1
            tasks.append((options, root, person, relpath, seen[person.number]))
        summary.masks = sum(parallel_map(_image, tasks, options.workers))
    for person, folder, _ in names:
        summary.by_split[folder] = summary.by_split.get(folder, 0) + 1
        summary.by_class[person.label] = summary.by_class.get(person.label, 0) + 1
    summary.images = len(names)
    summary.seconds = time.perf_counter() - started
    return summary
