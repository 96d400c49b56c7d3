"""Read CheXpert, Kaggle-pneumonia, NIH ChestX-ray14 and MIMIC-CXR-JPG trees, exactly as users have
them on disk, into records (NIH and MIMIC readers: `shards.pack.nih`, `shards.pack.mimic`).

A wholly wrong root fails at once with one line (DataError). A bad row or file is not fatal:
it becomes a Reject (kept, with its reason, for rejects.jsonl) and reading goes on.
Image files are not opened here; a missing or corrupt image is found when packing (the NIH and
MIMIC readers list their image folders, so they also reject rows without an image, and images
without a row, at once).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from shards.errors import DataError
from shards.labels import (
    CHEXPERT_LABELS,
    PNEUMONIA_LABELS,
    LabelValueError,
    RawLabel,
    parse_raw_label,
)

Layout = Literal["chexpert", "pneumonia", "nih", "mimic"]
LAYOUTS: tuple[str, ...] = ("chexpert", "pneumonia", "nih", "mimic")

CHEXPERT_DIRS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True, slots=True)
class Record:
    """One image and everything known about it before packing."""

    key: str
    """Unique, stable, WebDataset-safe (no dots): split-folder + patient + study + view."""
    path: str
    """Absolute path of the image file."""
    relpath: str
    """Path relative to the dataset root's parent (how the CSV names it); masks mirror it."""
    patient: str
    view: str = "frontal"
    study: str | None = None
    projection: str | None = None
    sex: str | None = None
    age: int | None = None
    labels: dict[str, RawLabel] = field(default_factory=dict)
    subtype: str | None = None
    """Kaggle pneumonia only: bacteria / virus."""

    def metadata(self) -> dict:
        """The JSON stored beside the image in a shard (raw labels, null for blank)."""
        meta = {
            "key": self.key,
            "patient": self.patient,
            "study": self.study,
            "view": self.view,
            "projection": self.projection,
            "sex": self.sex,
            "age": self.age,
            "labels": dict(self.labels),
            "source": self.relpath,
        }
        if self.subtype is not None:
            meta["subtype"] = self.subtype
        return meta


@dataclass(frozen=True, slots=True)
class Reject:
    """An input that was skipped, with where it was found and why."""

    where: str
    reason: str
    kind: str
    """A short category for the manifest's counts: malformed_row, bad_label, missing_file, ..."""
    key: str | None = None

    def as_json(self) -> dict:
        return {"where": self.where, "kind": self.kind, "reason": self.reason, "key": self.key}


@dataclass
class SourceData:
    """What a reader found: records by the source's pools, plus the rejects."""

    layout: Layout
    dataset_dir: Path
    """CheXpert-v1.0-small/, CheXpert-v1.0/, chest_xray/, the folder holding NIH's Data_Entry CSV,
    or MIMIC's mimic-cxr-jpg/<version>/."""
    label_names: tuple[str, ...]
    train_pool: list[Record]
    """Patients that split.py divides into train and val."""
    test: list[Record]
    """The source's own held-out set: CheXpert valid.csv, Kaggle test/, NIH test_list.txt, MIMIC's
    split `test`."""
    rejects: list[Reject]
    base: Path | None = None
    """The folder record relpaths start from: dataset_dir's parent unless set (MIMIC's
    mimic-cxr-jpg/<version>/ is two levels below it)."""

    @property
    def mask_root(self) -> Path:
        """shards.synth writes masks to <base>/masks/<relpath>.png; real data has none."""
        return (self.base or self.dataset_dir.parent) / "masks"


def _first_dataset_dir(root: Path, candidates: list[Path], holds_dataset: Callable[[Path], bool],
                       expected: str) -> Path:
    """The first candidate folder that holds the dataset (users point --root at the download, its
    parent or its inner folder: each is fine); where none does, one line says what was expected."""
    for candidate in candidates:
        if holds_dataset(candidate):
            return candidate
    raise DataError(f"--root {root}: {expected}")


def read_source(layout: str, root: Path) -> SourceData:
    """Dispatch on layout name; the one entry point the pack job uses."""
    if layout == "chexpert":
        return read_chexpert(root)
    if layout == "pneumonia":
        return read_pneumonia(root)
    if layout == "nih":
        from shards.pack.nih import read_nih  # noqa: PLC0415 (nih builds on this module's records)

        return read_nih(root)
    if layout == "mimic":
        from shards.pack.mimic import read_mimic  # noqa: PLC0415 (likewise)

        return read_mimic(root)
    raise DataError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")


# --- CheXpert ----------------------------------------------------------------------------------

_PATIENT = re.compile(r"(?:^|/)(patient\d+)/")
_STUDY = re.compile(r"/(study\d+)/")
_REQUIRED_COLUMNS = ("Path", "Frontal/Lateral", *CHEXPERT_LABELS)


def find_chexpert_dir(root: Path) -> Path:
    """Accept the folder holding CheXpert-v1.0-small/ (or CheXpert-v1.0/), or that folder itself."""
    return _first_dataset_dir(
        root, [*(root / name for name in CHEXPERT_DIRS), root],
        lambda folder: (folder / "train.csv").is_file(),
        f"no CheXpert train.csv found (expected {root}/CheXpert-v1.0-small/train.csv "
        f"or {root}/CheXpert-v1.0/train.csv)")


def read_chexpert(root: Path) -> SourceData:
    """Read train.csv (→ train pool) and valid.csv (→ test), small or full-resolution tree."""
    dataset_dir = find_chexpert_dir(root)
    rejects: list[Reject] = []
    train = list(_read_chexpert_csv(dataset_dir, "train.csv", rejects))
    valid_csv = dataset_dir / "valid.csv"
    if not valid_csv.is_file():
        raise DataError(f"{valid_csv}: missing (CheXpert's valid.csv is the test split)")
    test = list(_read_chexpert_csv(dataset_dir, "valid.csv", rejects))
    if not train:
        raise DataError(f"{dataset_dir / 'train.csv'}: no usable rows")
    return SourceData("chexpert", dataset_dir, CHEXPERT_LABELS, train, test, rejects)


def _read_chexpert_csv(dataset_dir: Path, name: str, rejects: list[Reject]) -> Iterator[Record]:
    csv_path = dataset_dir / name
    seen: set[str] = set()
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{csv_path}: empty file (expected a CheXpert header row)")
        header = [column.strip() for column in header]
        missing = [column for column in _REQUIRED_COLUMNS if column not in header]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} (not a CheXpert CSV)")
        index = {column: position for position, column in enumerate(header)}
        for row in reader:
            where = f"{dataset_dir.name}/{name}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                rejects.append(Reject(where, f"malformed row: {len(row)} fields, expected {len(header)}",
                                      "malformed_row"))
                continue
            try:
                record = _chexpert_record(dataset_dir, row, index)
            except ValueError as err:
                kind = "bad_label" if "label value" in str(err) else "malformed_row"
                rejects.append(Reject(where, str(err), kind))
                continue
            if record.key in seen:
                rejects.append(Reject(where, f"duplicate Path {record.relpath!r}", "duplicate", record.key))
                continue
            seen.add(record.key)
            yield record


def _chexpert_record(dataset_dir: Path, row: list[str], index: dict[str, int]) -> Record:
    """One CSV row → Record; ValueError names the bad field."""
    rel = row[index["Path"]].strip()
    patient = _PATIENT.search(rel)
    if not rel or patient is None or PurePosixPath(rel).suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"malformed Path {rel!r} (expected <dir>/<split>/patientNNNNN/studyN/viewN_*.jpg)")
    parts = PurePosixPath(rel).parts
    # The CSV names files relative to the dataset folder's parent; strip that first component so a
    # renamed folder (CheXpert-v1.0-small → chexpert/) still resolves.
    image = dataset_dir.joinpath(*parts[1:])
    study = _STUDY.search(rel)
    labels: dict[str, RawLabel] = {}
    for name in CHEXPERT_LABELS:
        try:
            labels[name] = parse_raw_label(row[index[name]])
        except LabelValueError as err:
            raise ValueError(f"column {name!r}: {err}") from None
    age = _optional_cell(row, index, "Age")
    if age is not None and not age.isdigit():
        raise ValueError(f"column 'Age': {age!r} is not a whole number")
    view_cell = (_optional_cell(row, index, "Frontal/Lateral") or "").lower()
    view = view_cell if view_cell in ("frontal", "lateral") else _view_from_name(parts[-1])
    stem = PurePosixPath(rel).stem
    key = _safe_key("-".join([parts[1] if len(parts) > 1 else "x", patient.group(1),
                              study.group(1) if study else "study0", stem]))
    return Record(
        key=key,
        path=str(image),
        relpath=rel,
        patient=patient.group(1),
        view=view,
        study=study.group(1) if study else None,
        projection=_optional_cell(row, index, "AP/PA"),
        sex=_optional_cell(row, index, "Sex"),
        age=int(age) if age is not None else None,
        labels=labels,
    )


def _optional_cell(row: list[str], index: dict[str, int], column: str) -> str | None:
    if column not in index:
        return None
    value = row[index[column]].strip()
    return value or None


def _view_from_name(filename: str) -> str:
    if "lateral" in filename.lower():
        return "lateral"
    if "frontal" in filename.lower():
        return "frontal"
    raise ValueError(f"column 'Frontal/Lateral': blank, and file name {filename!r} does not say")


def _safe_key(text: str) -> str:
    """WebDataset splits sample keys at the first dot: keep keys dot-free and slash-free."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


# --- Kaggle pneumonia (chest_xray) -------------------------------------------------------------

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+$")
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+(?:-\d+)?$")
_CLASSES = {"NORMAL": 0, "PNEUMONIA": 1}


def find_pneumonia_dir(root: Path) -> Path:
    """Accept chest_xray/ itself, its parent, or the doubly nested chest_xray/chest_xray/ of the zip."""
    return _first_dataset_dir(
        root, [root, root / "chest_xray", root / "chest_xray" / "chest_xray"],
        lambda folder: all((folder / split / cls).is_dir() for split in ("train", "test")
                           for cls in _CLASSES),
        f"no Kaggle pneumonia layout found (expected {root}/chest_xray/{{train,test}}/{{NORMAL,PNEUMONIA}}/)")


def read_pneumonia(root: Path) -> SourceData:
    """train/ and the tiny val/ form the train pool (split by patient later); test/ stays test."""
    dataset_dir = find_pneumonia_dir(root)
    rejects: list[Reject] = []
    pool = list(_read_pneumonia_folder(dataset_dir, "train", rejects))
    pool += list(_read_pneumonia_folder(dataset_dir, "val", rejects))
    test = list(_read_pneumonia_folder(dataset_dir, "test", rejects))
    if not pool:
        raise DataError(f"{dataset_dir / 'train'}: no images found")
    return SourceData("pneumonia", dataset_dir, PNEUMONIA_LABELS, pool, test, rejects)


def _read_pneumonia_folder(dataset_dir: Path, split: str, rejects: list[Reject]) -> Iterator[Record]:
    for class_name, label in _CLASSES.items():
        folder = dataset_dir / split / class_name
        if not folder.is_dir():
            continue
        for image in sorted(folder.iterdir()):
            if image.name.startswith(".") or image.is_dir():
                continue  # .DS_Store and friends ship inside the public zip
            rel = f"{dataset_dir.name}/{split}/{class_name}/{image.name}"
            if image.suffix.lower() not in IMAGE_SUFFIXES:
                rejects.append(Reject(rel, "not an image file (expected .jpeg/.jpg/.png)", "not_image"))
                continue
            person, normal = _PERSON.match(image.stem), _NORMAL.match(image.stem)
            match = person or normal
            if match is None:
                rejects.append(Reject(rel, "unrecognised file name (expected personN_bacteria_M, "
                                           "personN_virus_M, IM-XXXX-YYYY or NORMAL2-IM-XXXX-YYYY)",
                                       "bad_name"))
                continue
            if bool(person) != bool(label):
                rejects.append(Reject(rel, f"file name {image.name!r} contradicts folder {class_name}",
                                      "bad_name"))
                continue
            yield Record(
                key=_safe_key(f"{split}-{class_name}-{image.stem}"),
                path=str(image),
                relpath=rel,
                patient=match.group(1),
                labels={"Pneumonia": label},
                subtype=person.group(2) if person else None,
            )
