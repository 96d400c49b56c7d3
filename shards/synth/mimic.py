"""A synthetic MIMIC-CXR-JPG 2.0.0 tree (Johnson et al. 2019), as PhysioNet ships it.

`mimic-cxr-jpg/2.0.0/` holds the three gzip tables, with the real columns:
`mimic-cxr-2.0.0-chexpert.csv.gz` (one row per study, subject_id, study_id and the 14 CheXpert
observations in alphabetical order, 1.0 / 0.0 / -1.0 / blank), `mimic-cxr-2.0.0-metadata.csv.gz`
(one row per image: dicom_id, ViewPosition, Rows, Columns, StudyDate, ...) and
`mimic-cxr-2.0.0-split.csv.gz` (train / validate / test by subject), and the JPEGs at
`files/p<first two digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg`. Subject ids are 8 digits
from 10000000 (folders p10 … p19), study ids 8 digits from 50000000, dicom ids five dash-separated
groups of 8 hex digits. Labels follow the CheXpert generator (same rates and structure), drawn
on every image of the study; a study has a frontal (PA/AP) and often a lateral (LATERAL/LL) view.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from shards.labels import MIMIC_LABELS, format_raw_label
from shards.synth.chexpert import _draws, sample_labels
from shards.synth.common import SynthSummary, parallel_map, patient_rng, staged, write_csv_gz, write_image
from shards.synth.render import render

DATASET_DIR = "mimic-cxr-jpg"
VERSION = "2.0.0"
TABLE = "mimic-cxr-2.0.0-{}.csv.gz"
CHEXPERT_HEADER = ("subject_id", "study_id", *sorted(MIMIC_LABELS))
METADATA_HEADER = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                   "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                   "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
SPLIT_HEADER = ("dicom_id", "study_id", "subject_id", "split")
VIEW_CODES = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
PROCEDURES = {"PA": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)"}
_BIJECTION = 1_000_003
"""Coprime with 10^7: number → (number × it) mod 10^7 gives distinct, scattered ids."""


@dataclass(frozen=True, slots=True)
class MimicOptions:
    out: Path
    patients: int = 64
    size: int = 320
    seed: int = 0
    rates: str = "realistic"
    lateral_fraction: float = 0.5
    workers: int = 1
    quality: int = 90


def subject_id(number: int) -> int:
    return 10_000_000 + (number * _BIJECTION) % 10_000_000


def study_id(number: int, study: int) -> int:
    return 50_000_000 + ((number * 16 + study) * _BIJECTION) % 10_000_000


def official_split(number: int) -> str:
    """By subject, as the real split: 1 in 8 test, 1 in 8 validate (enough of each at 16 patients)."""
    return {3: "test", 5: "validate"}.get(number % 8, "train")


def dicom_id(seed: int, subject: int, study: int, view: int) -> str:
    digest = hashlib.sha1(f"{seed}:{subject}:{study}:{view}".encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


Rows = list[list[str]]


def _patient(task: tuple[MimicOptions, Path, int]) -> tuple[Rows, Rows, Rows, int]:
    """Every study and image of one subject: its label, metadata and split rows, and masks written."""
    options, root, number = task
    rng = patient_rng(options.seed, 20, number)
    subject = subject_id(number)
    split = official_split(number)
    labels_rows, metadata_rows, split_rows, masks = [], [], [], 0
    for index in range(int(min(6, rng.geometric(0.45)))):
        study = study_id(number, index)
        labels = sample_labels(rng, options.rates, valid=False)
        labels_rows.append([str(subject), str(study), *(format_raw_label(labels[name]) for name in
                                                        CHEXPERT_HEADER[2:])])
        frontal = str(rng.choice(["PA", "AP"], p=[0.45, 0.55]))
        positions = [frontal] + ([str(rng.choice(["LATERAL", "LL"], p=[0.7, 0.3]))]
                                 if rng.uniform() < options.lateral_fraction else [])
        date = f"21{rng.integers(10, 99)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
        hour, minute, second, millis = (int(rng.integers(0, top)) for top in (24, 60, 60, 1000))
        clock = f"{hour:02d}{minute:02d}{second:02d}.{millis:03d}"
        for view, position in enumerate(positions):
            dicom = dicom_id(options.seed, subject, study, view)
            lateral = position in ("LATERAL", "LL")
            height = round(options.size * rng.uniform(1.15, 1.3))
            drawn = render(height, options.size, rng, lateral, _draws(labels, rng))
            rel = f"{DATASET_DIR}/{VERSION}/files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
            masks += write_image(root, rel, drawn, options.quality)
            procedure = PROCEDURES[frontal]
            metadata_rows.append([dicom, str(subject), str(study), procedure, position, str(height),
                                  str(options.size), date, clock, procedure, VIEW_CODES[position],
                                  "Erect" if frontal == "PA" else "Recumbent"])
            split_rows.append([dicom, str(study), str(subject), split])
    return labels_rows, metadata_rows, split_rows, masks


def generate_mimic(options: MimicOptions) -> SynthSummary:
    """Write <out>/mimic-cxr-jpg/2.0.0/{files/, the three tables} and <out>/masks/."""
    started = time.perf_counter()
    summary = SynthSummary("mimic", options.out, options.out / DATASET_DIR / VERSION,
                           patients=options.patients)
    tables: dict[str, Rows] = {"chexpert": [], "metadata": [], "split": []}
    with staged(options.out, DATASET_DIR) as root:
        tasks = [(options, root, number) for number in range(1, options.patients + 1)]
        for labels, metadata, split, masks in parallel_map(_patient, tasks, options.workers):
            tables["chexpert"] += labels
            tables["metadata"] += metadata
            tables["split"] += split
            summary.masks += masks
        base = root / DATASET_DIR / VERSION
        for name, header in (("split", SPLIT_HEADER), ("metadata", METADATA_HEADER),
                             ("chexpert", CHEXPERT_HEADER)):
            rows = sorted(tables[name]) if name == "chexpert" else tables[name]  # by subject, study
            write_csv_gz(base / TABLE.format(name), header, rows)
    for row in tables["split"]:
        summary.by_split[row[3]] = summary.by_split.get(row[3], 0) + 1
    summary.images = len(tables["metadata"])
    summary.seconds = time.perf_counter() - started
    return summary

