"""Read NIH ChestX-ray14 as downloaded (Kaggle or the NIH Box share) into records, and its boxes.

What is read, in the folder that holds the Data_Entry CSV (`--root` may also be its parent):
- `Data_Entry_2017_v2020.csv` (Box) or else `Data_Entry_2017.csv` (Kaggle; a trailing empty column):
  `Image Index`, `Finding Labels` (pipe-separated NIH findings, or `No Finding`), `Follow-up #`,
  `Patient ID`, `Patient Age`, `Patient Gender`, `View Position` (PA/AP: every image is frontal).
- the PNGs, in `images_001/images/` … `images_012/images/` (Kaggle) or one `images/` (Box).
- the official patient-disjoint split: `test_list.txt` → test, `train_val_list.txt` → the pool
  divided into train/val by patient.
- `BBox_List_2017.csv` (`read_nih_boxes`): radiologists' boxes for ~880 test images.

Labels are binary: 1 for each finding listed, 0 for the others; `No Finding` is 1 when none is.
Skipped and listed as rejects: a row whose image is missing (missing_file), an image with no row
(no_row), an unknown finding or `No Finding` beside a finding (bad_label), a malformed row or
Image Index / Patient ID that disagree (malformed_row), a repeated Image Index or image file
(duplicate), an image in neither split list (no_split) or in both (split_conflict), a file in an
image folder that is not a PNG (not_image). An age over 120 (a handful of v2017 rows say 148 to
414) is kept as unknown rather than rejected. RGBA PNGs (a few in the download) are read as
grayscale by the packer.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from shards.errors import DataError
from shards.labels import NIH_LABELS
from shards.pack.sources import Record, Reject, SourceData, _first_dataset_dir
from shards.pack.tables import RowError, table_rows, text_lines

ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
"""The Box share's corrected table first, then Kaggle's."""
TRAIN_LIST, TEST_LIST, BBOX_FILE = "train_val_list.txt", "test_list.txt", "BBox_List_2017.csv"
NIH_DIRS = ("CXR8", "ChestX-ray14", "NIH", "data")
"""Folder names the download is often unpacked into (any direct child of --root is tried too)."""
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                 "Patient Gender", "View Position")
NO_FINDING = "No Finding"
BOX_FINDINGS = {"Infiltrate": "Infiltration"}
"""BBox_List_2017.csv spells one finding otherwise than Data_Entry: its label name here."""
MAX_AGE = 120

_IMAGE_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$")
_AGE = re.compile(r"^(\d{1,3})Y?$")


def find_nih_dir(root: Path) -> Path:
    """The folder holding a Data_Entry CSV: --root itself, a usual name below it, or any child."""
    children = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return _first_dataset_dir(
        root, [root, *(root / name for name in NIH_DIRS), *children],
        lambda folder: any((folder / name).is_file() for name in ENTRY_FILES),
        f"no NIH ChestX-ray14 table found (expected {root}/Data_Entry_2017.csv or "
        f"{root}/Data_Entry_2017_v2020.csv, or either in a folder below it)")


def read_nih(root: Path) -> SourceData:
    """Every Data_Entry row whose PNG exists: test_list.txt → test, train_val_list.txt → pool."""
    dataset_dir = find_nih_dir(root)
    entry = next(dataset_dir / name for name in ENTRY_FILES if (dataset_dir / name).is_file())
    rejects: list[Reject] = []
    split_of = _read_split_lists(dataset_dir, rejects)
    images = _index_images(dataset_dir, rejects)
    pool: list[Record] = []
    test: list[Record] = []
    seen: set[str] = set()
    for where, row in table_rows(entry, ENTRY_COLUMNS, "NIH Data_Entry CSV", rejects, seen):
        name = row["Image Index"].strip()
        if name in seen:  # no key: the first row's record is kept and must stay counted
            rejects.append(Reject(where, f"duplicate Image Index {name!r}", "duplicate"))
            continue
        seen.add(name)
        try:
            record = _record(dataset_dir, row, images)
            split = split_of.get(name)
            if split is None:
                raise RowError("no_split", f"{name} is in neither {TRAIN_LIST} nor {TEST_LIST}")
        except RowError as err:
            rejects.append(Reject(where, str(err), err.kind, _key(name)))
            continue
        if split == "conflict":
            rejects.append(Reject(where, f"{name} is in both {TRAIN_LIST} and {TEST_LIST}",
                                  "split_conflict", record.key))
            continue
        (test if split == "test" else pool).append(record)
    rejects += [Reject(f"{dataset_dir.name}/{path.relative_to(dataset_dir).as_posix()}",
                       f"no row for {name} in {entry.name}", "no_row", _key(name))
                for name, path in sorted(images.items()) if name not in seen]
    if not pool:
        raise DataError(f"{entry}: no usable rows (images found: {len(images)})")
    return SourceData("nih", dataset_dir, NIH_LABELS, pool, test, rejects)


def _key(name: str) -> str:
    """The image name without `.png` (`00000001_000`): what a box's Image Index maps to."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name.removesuffix(".png"))


def _read_split_lists(dataset_dir: Path, rejects: list[Reject]) -> dict[str, str]:
    """Image name → train / test, or `conflict` when both lists name it."""
    split_of: dict[str, str] = {}
    for name, split in ((TRAIN_LIST, "train"), (TEST_LIST, "test")):
        path = dataset_dir / name
        if not path.is_file():
            raise DataError(f"{path}: missing (NIH's official split lists are {TRAIN_LIST} and {TEST_LIST})")
        for _, image in text_lines(path):
            previous = split_of.get(image)
            split_of[image] = split if previous in (None, split) else "conflict"
    return split_of


def _image_folders(dataset_dir: Path) -> list[Path]:
    """images/ (Box), images_NNN/images/ (Kaggle) or images_NNN/ (a flattened unzip)."""
    folders = [dataset_dir / "images"] if (dataset_dir / "images").is_dir() else []
    for part in sorted(dataset_dir.glob("images_*")):
        if part.is_dir():
            folders.append(part / "images" if (part / "images").is_dir() else part)
    return folders


def _index_images(dataset_dir: Path, rejects: list[Reject]) -> dict[str, Path]:
    """Image name → its file, over every image folder (listing, not opening: fast on 112k files)."""
    images: dict[str, Path] = {}
    for folder in _image_folders(dataset_dir):
        with os.scandir(folder) as entries:
            names = sorted(entry.name for entry in entries
                           if entry.is_file() and not entry.name.startswith("."))
        for name in names:
            rel = f"{dataset_dir.name}/{(folder / name).relative_to(dataset_dir).as_posix()}"
            if not name.lower().endswith(".png"):
                rejects.append(Reject(rel, "not an image file (NIH images are .png)", "not_image"))
            elif name in images:
                rejects.append(Reject(rel, f"duplicate image file {name} (also in {images[name].parent})",
                                      "duplicate"))
            else:
                images[name] = folder / name
    return images


def _record(dataset_dir: Path, row: dict[str, str], images: dict[str, Path]) -> Record:
    name = row["Image Index"].strip()
    match = _IMAGE_NAME.match(name)
    if match is None:
        raise RowError("malformed_row", f"malformed Image Index {name!r} (expected NNNNNNNN_NNN.png)")
    patient = row["Patient ID"].strip()
    if not patient.isdigit() or int(patient) != int(match.group(1)):
        raise RowError("malformed_row", f"column 'Patient ID': {patient!r} does not match {name}")
    follow_up = row["Follow-up #"].strip()
    if not follow_up.isdigit():
        raise RowError("malformed_row", f"column 'Follow-up #': {follow_up!r} is not a whole number")
    labels = parse_findings(row["Finding Labels"])
    age_match = _AGE.match(row["Patient Age"].strip())
    if age_match is None:
        raise RowError("malformed_row", f"column 'Patient Age': {row['Patient Age']!r} is not a whole number")
    age = int(age_match.group(1))
    path = images.get(name)
    if path is None:
        raise RowError("missing_file", f"no image file {name} in {dataset_dir.name}/images*/")
    return Record(
        key=_key(name),
        path=str(path),
        relpath=f"{dataset_dir.name}/{path.relative_to(dataset_dir).as_posix()}",
        patient=match.group(1),
        view="frontal",
        study=f"{int(follow_up):03d}",
        projection=row["View Position"].strip() or None,
        sex=row["Patient Gender"].strip() or None,
        age=age if age <= MAX_AGE else None,
        labels=labels,
    )


def parse_findings(cell: str) -> dict[str, int]:
    """`Cardiomegaly|Effusion` → 1 for those two, 0 for the other NIH labels (No Finding included)."""
    names = [name.strip() for name in cell.split("|")]
    unknown = [name for name in names if name not in NIH_LABELS]
    if unknown:
        raise RowError("bad_label", f"column 'Finding Labels': unknown finding(s) {unknown} in {cell!r}")
    if NO_FINDING in names and len(names) > 1:
        raise RowError("bad_label", f"column 'Finding Labels': {NO_FINDING!r} beside findings in {cell!r}")
    return {label: int(label in names) for label in NIH_LABELS}


# --- BBox_List_2017.csv ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NihBox:
    """One radiologist box, in the pixels of its PNG (1024 × 1024 in the real download)."""

    key: str
    """The packed sample's key: Image Index without `.png`."""
    finding: str
    """As an NIH label name (`Infiltrate` in the file → `Infiltration`)."""
    x: float
    y: float
    w: float
    h: float
    image_width: int
    image_height: int

    def scaled(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x, y, w, h) on an image resized to width × height (a packed sample's `width`/`height`)."""
        sx, sy = width / self.image_width, height / self.image_height
        return self.x * sx, self.y * sy, self.w * sx, self.h * sy


def read_nih_boxes(root: Path) -> dict[str, list[NihBox]]:
    """Packed-sample key → its boxes, from BBox_List_2017.csv beside the Data_Entry CSV.

    Each box carries its PNG's size (read from the file header), so `scaled` maps it onto a packed
    image of any size. Rows whose image is missing or whose cells do not parse are skipped.
    """
    dataset_dir = find_nih_dir(root)
    path = dataset_dir / BBOX_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing (NIH's boxes are in {BBOX_FILE})")
    images = _index_images(dataset_dir, [])
    sizes: dict[str, tuple[int, int]] = {}
    boxes: dict[str, list[NihBox]] = {}
    for row in _box_rows(path):
        name, finding, *cells = row
        if name not in images or len(cells) < 4:
            continue
        try:
            x, y, w, h = (float(cell) for cell in cells[:4])
        except ValueError:
            continue
        if name not in sizes:
            with Image.open(images[name]) as image:
                sizes[name] = image.size
        box = NihBox(_key(name), BOX_FINDINGS.get(finding, finding), x, y, w, h, *sizes[name])
        boxes.setdefault(box.key, []).append(box)
    return boxes


def _box_rows(path: Path) -> Iterator[list[str]]:
    """Rows after the header `Image Index,Finding Label,Bbox [x,y,w,h],,,` (the header's unquoted
    commas spread `Bbox [x,y,w,h]` over four cells, and three empty ones follow)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or [cell.strip() for cell in header[:2]] != ["Image Index", "Finding Label"]:
            raise DataError(f"{path}: not an NIH box list (expected the header 'Image Index,Finding Label,"
                            "Bbox [x,y,w,h],,,')")
        for row in reader:
            if len(row) >= 6:
                yield [cell.strip() for cell in row]
