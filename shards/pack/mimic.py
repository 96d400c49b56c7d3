"""Read MIMIC-CXR-JPG 2.x as downloaded from PhysioNet into records.

What is read, in `mimic-cxr-jpg/<version>/` (`--root` may be that folder, the one holding
`mimic-cxr-jpg/`, or the `physionet.org/` of a `wget -r` download; the newest version wins):
- `mimic-cxr-2.0.0-metadata.csv.gz`: one row per image (`dicom_id`, `subject_id`, `study_id`,
  `ViewPosition`, ...). The image is `files/p<first two digits of subject>/p<subject>/s<study>/
  <dicom_id>.jpg`.
- `mimic-cxr-2.0.0-chexpert.csv.gz`: one row per study, the 14 CheXpert observations as
  1.0 / 0.0 / -1.0 / blank; a study's labels apply to each of its images.
- `mimic-cxr-2.0.0-split.csv.gz`: `train` / `validate` / `test` per image. `test` is kept as the
  test split; train and validate form the pool that split.py divides into train/val by patient.
(The same tables gunzipped, `.csv`, are read too.)

View: ViewPosition PA / AP → frontal, LATERAL / LL → lateral; where ViewPosition is blank the
view code (`postero-anterior`, `antero-posterior`, `lateral`, `left lateral`) decides. Any other
view (oblique, decubitus, swimmer's, or none recorded, ~4% of the download) is rejected as
`unknown_view`: the benchmark's view filter knows frontal and lateral only, and an image whose
projection nobody recorded is not one to train or test on silently.

Skipped and listed as rejects: a metadata row whose JPEG is missing (missing_file), a JPEG with no
metadata row (no_row), an image whose study has no label row (no_labels) or a label row with a bad
cell (bad_label), an image with no split row (no_split), an unknown split or malformed ids
(malformed_row), a repeated dicom_id or study label row (duplicate), unknown_view as above.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from shards.errors import DataError
from shards.labels import MIMIC_LABELS, LabelValueError, RawLabel, parse_raw_label
from shards.pack.sources import Record, Reject, SourceData, _first_dataset_dir, _safe_key
from shards.pack.tables import RowError, find_table, table_rows

DATASET_DIR = "mimic-cxr-jpg"
METADATA, CHEXPERT, SPLIT = (f"mimic-cxr-2.0.0-{name}.csv" for name in ("metadata", "chexpert", "split"))
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLITS = {"train": "train", "validate": "train", "test": "test"}
"""The official split → where it goes here (validate joins the pool; val is split by patient)."""
VIEWS = {"PA": ("frontal", "PA"), "AP": ("frontal", "AP"), "LATERAL": ("lateral", "LATERAL"),
         "LL": ("lateral", "LL")}
VIEW_CODES = {"postero-anterior": "PA", "antero-posterior": "AP", "lateral": "LATERAL", "left lateral": "LL"}
"""ViewCodeSequence_CodeMeaning → ViewPosition, for images whose ViewPosition is blank."""

_VERSION = re.compile(r"^\d+(\.\d+)*$")


def _version_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    versions = [p for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    return sorted(versions, key=lambda p: tuple(int(part) for part in p.name.split(".")), reverse=True)


def find_mimic_dir(root: Path) -> Path:
    """The folder holding the metadata table: --root, or mimic-cxr-jpg/<version>/ below it."""
    candidates = [root, *_version_dirs(root), *_version_dirs(root / DATASET_DIR),
                  *_version_dirs(root / "files" / DATASET_DIR),
                  *_version_dirs(root / "physionet.org" / "files" / DATASET_DIR)]
    return _first_dataset_dir(
        root, candidates, lambda folder: find_table(folder, METADATA) is not None,
        f"no MIMIC-CXR-JPG metadata found (expected {root}/{DATASET_DIR}/2.0.0/{METADATA}.gz "
        f"or {root}/{METADATA}.gz)")


def _table(dataset_dir: Path, name: str) -> Path:
    path = find_table(dataset_dir, name)
    if path is None:
        raise DataError(f"{dataset_dir / name}.gz: missing (MIMIC-CXR-JPG needs {METADATA}.gz, "
                        f"{CHEXPERT}.gz and {SPLIT}.gz)")
    return path


def read_mimic(root: Path) -> SourceData:
    """Every metadata row with a JPEG, labels, a split and a known view."""
    dataset_dir = find_mimic_dir(root)
    base = dataset_dir.parent.parent if dataset_dir.parent.name == DATASET_DIR else dataset_dir.parent
    prefix = dataset_dir.relative_to(base).as_posix()
    rejects: list[Reject] = []
    labels = _read_labels(_table(dataset_dir, CHEXPERT), rejects)
    split_of = _read_split(_table(dataset_dir, SPLIT), rejects)
    metadata = _table(dataset_dir, METADATA)
    images = _index_images(dataset_dir / "files")
    pool: list[Record] = []
    test: list[Record] = []
    seen: set[str] = set()
    for where, row in table_rows(metadata, METADATA_COLUMNS, "MIMIC-CXR-JPG metadata table", rejects, seen):
        dicom = row["dicom_id"].strip()
        if dicom in seen:  # no key: the first row's record is kept and must stay counted
            rejects.append(Reject(where, f"duplicate dicom_id {dicom!r}", "duplicate"))
            continue
        seen.add(dicom)
        try:
            record = _record(dataset_dir, prefix, row, images, labels)
            split = split_of.get(dicom)
            if split is None:
                raise RowError("no_split", f"dicom_id {dicom} has no row in {SPLIT}")
            if split not in SPLITS:
                raise RowError("malformed_row", f"{SPLIT}: split {split!r} (expected {', '.join(SPLITS)})")
        except RowError as err:
            rejects.append(Reject(where, str(err), err.kind, _safe_key(dicom)))
            continue
        (test if SPLITS[split] == "test" else pool).append(record)
    rejects += [Reject(f"{prefix}/{rel}", f"no row for {Path(rel).stem} in {metadata.name}", "no_row",
                       _safe_key(Path(rel).stem))
                for rel in sorted(images) if Path(rel).stem not in seen]
    if not pool:
        raise DataError(f"{metadata}: no usable rows (images found: {len(images)})")
    return SourceData("mimic", dataset_dir, MIMIC_LABELS, pool, test, rejects, base=base)


def _index_images(files: Path) -> set[str]:
    """Every JPEG under files/, as `files/p10/p10000032/s5…/<dicom>.jpg`, by one walk."""
    images: set[str] = set()
    for folder, _, names in os.walk(files):
        rel = Path(folder).relative_to(files.parent).as_posix()
        images.update(f"{rel}/{name}" for name in names
                      if name.lower().endswith(".jpg") and not name.startswith("."))
    return images


def _read_labels(path: Path, rejects: list[Reject]) -> dict[tuple[str, str], dict[str, RawLabel] | str]:
    """(subject_id, study_id) → raw labels, or the reason its row is unusable."""
    labels: dict[tuple[str, str], dict[str, RawLabel] | str] = {}
    required = ("subject_id", "study_id", *MIMIC_LABELS)
    for where, row in table_rows(path, required, "MIMIC-CXR-JPG CheXpert table", rejects):
        study = (row["subject_id"].strip(), row["study_id"].strip())
        if study in labels:
            rejects.append(Reject(where, f"duplicate label row for study s{study[1]}", "duplicate"))
            continue
        labels[study] = _parse_labels(where, row)
    return labels


def _parse_labels(where: str, row: dict[str, str]) -> dict[str, RawLabel] | str:
    parsed: dict[str, RawLabel] = {}
    for name in MIMIC_LABELS:
        try:
            parsed[name] = parse_raw_label(row[name])
        except LabelValueError as err:
            return f"{where}: column {name!r}: {err}"
    return parsed


def _read_split(path: Path, rejects: list[Reject]) -> dict[str, str]:
    return {row["dicom_id"].strip(): row["split"].strip()
            for _, row in table_rows(path, ("dicom_id", "split"), "MIMIC-CXR-JPG split table", rejects)}


def _view(row: dict[str, str]) -> tuple[str, str]:
    position = row["ViewPosition"].strip().upper()
    if not position:
        position = VIEW_CODES.get(row.get("ViewCodeSequence_CodeMeaning", "").strip().lower(), "")
    if position not in VIEWS:
        raise RowError("unknown_view", f"ViewPosition {row['ViewPosition'].strip()!r} is neither frontal "
                                       "(PA, AP) nor lateral (LATERAL, LL)")
    return VIEWS[position]


def _record(dataset_dir: Path, prefix: str, row: dict[str, str], images: set[str],
            labels: dict[tuple[str, str], dict[str, RawLabel] | str]) -> Record:
    dicom, subject, study = (row[column].strip() for column in ("dicom_id", "subject_id", "study_id"))
    if not (dicom and subject.isdigit() and len(subject) >= 2 and study.isdigit()):
        raise RowError("malformed_row", f"malformed ids dicom_id={dicom!r} subject_id={subject!r} "
                                        f"study_id={study!r}")
    rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
    if rel not in images:
        raise RowError("missing_file", f"missing file {prefix}/{rel}")
    view, projection = _view(row)
    study_labels = labels.get((subject, study))
    if study_labels is None:
        raise RowError("no_labels", f"study s{study} of p{subject} has no row in {CHEXPERT}")
    if isinstance(study_labels, str):
        raise RowError("bad_label", study_labels)
    return Record(
        key=_safe_key(dicom),
        path=str(dataset_dir / rel),
        relpath=f"{prefix}/{rel}",
        patient=f"p{subject}",
        view=view,
        study=f"s{study}",
        projection=projection,
        labels=dict(study_labels),
    )
