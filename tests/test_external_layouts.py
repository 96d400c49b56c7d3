"""NIH ChestX-ray14 and MIMIC-CXR-JPG: the synthetic twins write the real layouts (read back here
with csv and gzip alone), the readers take them as downloaded, packs stream with the datasets' own
labels and official test splits, and download quirks become rejects."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from shards.errors import DataError
from shards.labels import LABEL_SETS, MIMIC_LABELS, NIH_LABELS
from shards.lesion import label_bit
from shards.pack import PackOptions, pack
from shards.pack.nih import read_nih, read_nih_boxes
from shards.pack.sources import read_source
from shards.stream import StreamConfig, eval_stream
from shards.synth import MimicOptions, NihOptions, generate_mimic, generate_nih
from tests.conftest import NIH_FOLDER_IMAGES

QUIET = {"print_": lambda _: None}
NIH_ENTRY_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                    "OriginalImagePixelSpacing[x", "y]"]
NIH_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$")
NIH_BOX_SPELLINGS = {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia",
                     "Pneumothorax"}
MIMIC = "mimic-cxr-jpg/2.0.0"
DICOM = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


# --- reading the synthetic trees back with the standard library alone ----------------------------


def nih_rows(root: Path, name: str = "Data_Entry_2017.csv") -> list[list[str]]:
    with (root / "CXR8" / name).open(newline="") as handle:
        return list(csv.reader(handle))


def nih_list(root: Path, name: str) -> list[str]:
    return (root / "CXR8" / name).read_text().splitlines()


def gz_rows(root: Path, table: str) -> list[list[str]]:
    with gzip.open(root / MIMIC / f"mimic-cxr-2.0.0-{table}.csv.gz", "rt", newline="") as handle:
        return list(csv.reader(handle))


def write_gz_rows(root: Path, table: str, rows: list[list[str]]) -> None:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    (root / MIMIC / f"mimic-cxr-2.0.0-{table}.csv.gz").write_bytes(gzip.compress(text.getvalue().encode()))


def nih_images(root: Path) -> dict[str, Path]:
    return {path.name: path for path in (root / "CXR8").glob("images*/**/*.png")}


def test_nih_synth_writes_the_kaggle_layout(nih_root: Path) -> None:
    rows = nih_rows(nih_root)
    assert rows[0] == [*NIH_ENTRY_HEADER, ""], "v2017: the real header, trailing empty column included"
    assert (nih_root / "CXR8" / "Data_Entry_2017.csv").read_text().splitlines()[0].endswith(
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    images = nih_images(nih_root)
    train, test = nih_list(nih_root, "train_val_list.txt"), nih_list(nih_root, "test_list.txt")
    assert sorted(train + test) == sorted(row[0] for row in rows[1:]) == sorted(images)
    assert not {n[:8] for n in train} & {n[:8] for n in test}, "the official split is patient-disjoint"
    folders = Counter(path.parent.parent.name for path in images.values())
    assert sorted(folders) == ["images_001", "images_002", "images_003"]
    assert folders["images_001"] == NIH_FOLDER_IMAGES
    assert all(path.parent.name == "images" for path in images.values())
    findings = Counter()
    for row in rows[1:]:
        assert len(row) == 12 and row[11] == ""
        name, labels, follow_up, patient = row[:4]
        match = NIH_NAME.match(name)
        assert match and int(match.group(1)) == int(patient) and int(match.group(2)) == int(follow_up)
        listed = labels.split("|")
        assert listed == sorted(listed) and set(listed) <= set(NIH_LABELS)
        assert listed == ["No Finding"] or "No Finding" not in listed
        assert row[5] in ("M", "F") and row[6] in ("PA", "AP") and row[4].isdigit()
        findings.update(listed)
        image = Image.open(images[name])
        assert image.size == (64, 64) and image.mode in ("L", "RGBA")
        mask = (nih_root / "masks" / images[name].relative_to(nih_root)).with_suffix(".png")
        drawn = set()
        if mask.is_file():
            bits = np.asarray(Image.open(mask))
            drawn = {label for index, label in enumerate(NIH_LABELS) if (bits & label_bit(index)).any()}
        assert drawn <= set(listed), (name, drawn, listed)
    modes = Counter(Image.open(path).mode for path in images.values())
    assert modes["RGBA"] >= 2 and modes["L"] > modes["RGBA"], "a few RGBA PNGs, as in the download"
    assert findings["No Finding"] > 10 and len(findings) >= 8


def test_nih_synth_boxes_come_from_the_lesion_masks(nih_root: Path) -> None:
    text = (nih_root / "CXR8" / "BBox_List_2017.csv").read_text()
    assert text.splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    rows = list(csv.reader(io.StringIO(text)))[1:]
    assert len(rows) >= 3
    test, images = set(nih_list(nih_root, "test_list.txt")), nih_images(nih_root)
    for name, finding, *cells in rows:
        assert len(cells) == 7 and cells[4:] == ["", "", ""] and name in test
        assert finding in NIH_BOX_SPELLINGS
        x, y, w, h = (float(cell) for cell in cells[:4])
        label = "Infiltration" if finding == "Infiltrate" else finding
        mask = (nih_root / "masks" / images[name].relative_to(nih_root)).with_suffix(".png")
        bits = np.asarray(Image.open(mask))
        ys, xs = np.nonzero(bits & label_bit(NIH_LABELS.index(label)))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
    boxes = read_nih_boxes(nih_root)
    assert sum(len(b) for b in boxes.values()) == len(rows)
    box = next(iter(boxes.values()))[0]
    assert box.key == box.key.split(".")[0] and (box.image_width, box.image_height) == (64, 64)
    assert box.scaled(32, 32) == (box.x / 2, box.y / 2, box.w / 2, box.h / 2)


def test_nih_box_flavour_and_its_reader(tmp_path: Path) -> None:
    """The NIH Box share: Data_Entry_2017_v2020.csv (no trailing column) and one flat images/."""
    generate_nih(NihOptions(out=tmp_path, patients=8, size=48, seed=3, source="box"))
    assert not (tmp_path / "CXR8" / "Data_Entry_2017.csv").exists()
    rows = nih_rows(tmp_path, "Data_Entry_2017_v2020.csv")
    assert rows[0] == NIH_ENTRY_HEADER and all(len(row) == 11 for row in rows)
    assert {p.parent.name for p in nih_images(tmp_path).values()} == {"images"}
    data = read_nih(tmp_path / "CXR8")  # the dataset folder itself is a root too
    assert len(data.train_pool) + len(data.test) == len(rows) - 1 and not data.rejects


def test_mimic_synth_writes_the_physionet_layout(mimic_root: Path) -> None:
    labels, metadata, split = gz_rows(mimic_root, "chexpert"), gz_rows(mimic_root, "metadata"), gz_rows(
        mimic_root, "split")
    assert labels[0] == ["subject_id", "study_id", *sorted(MIMIC_LABELS)], "alphabetical, as the real file"
    assert metadata[0] == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                           "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                           "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                           "PatientOrientationCodeSequence_CodeMeaning"]
    assert split[0] == ["dicom_id", "study_id", "subject_id", "split"]
    assert {cell for row in labels[1:] for cell in row[2:]} == {"1.0", "0.0", "-1.0", ""}
    studies = {(row[0], row[1]) for row in labels[1:]}
    assert len(studies) == len(labels) - 1 and labels[1:] == sorted(labels[1:])
    split_of = {row[0]: (row[1], row[2], row[3]) for row in split[1:]}
    assert len(split_of) == len(metadata) - 1
    subjects_by_split: dict[str, set[str]] = {}
    for dicom, subject, study, _, position, rows, columns, *_rest in metadata[1:]:
        assert DICOM.match(dicom) and len(subject) == len(study) == 8 and (subject, study) in studies
        path = mimic_root / MIMIC / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        image = Image.open(path)
        assert image.format == "JPEG" and image.mode == "L" and image.size == (int(columns), int(rows))
        assert position in ("PA", "AP", "LATERAL", "LL")
        assert split_of[dicom][:2] == (study, subject)
        subjects_by_split.setdefault(split_of[dicom][2], set()).add(subject)
    assert set(subjects_by_split) == {"train", "validate", "test"}
    assert sum(len(s) for s in subjects_by_split.values()) == len(set().union(*subjects_by_split.values()))
    assert {p.parent.name[:3] for p in (mimic_root / MIMIC / "files").glob("p1?/*")} > {"p10"}
    masks = list((mimic_root / "masks" / MIMIC / "files").rglob("*.png"))
    assert masks and all((mimic_root / m.relative_to(mimic_root / "masks")).with_suffix(".jpg").is_file()
                         for m in masks)


# --- packing and streaming ----------------------------------------------------------------------


def stream_split(shards: Path, split: str, labels: str) -> dict[str, tuple[str, np.ndarray]]:
    """key → (patient, target) of every sample of a split, through shards.stream."""
    stream = eval_stream(StreamConfig(shards=shards, split=split, labels=labels, batch_size=8, image_size=32,
                                      workers=0, views="all"), 0, 1)
    found = {}
    for batch in stream.batches():
        for key, patient, target in zip(batch["key"], batch["patient"], batch["target"].numpy(), strict=True):
            found[key] = (patient, target)
    return found


def test_nih_pack_streams_with_nih_labels_and_the_official_test_split(nih_root: Path,
                                                                      nih_shards: Path) -> None:
    manifest = json.loads((nih_shards / "manifest.json").read_text())
    assert manifest["dataset"] == "nih" and manifest["label_names"] == list(NIH_LABELS)
    assert manifest["rejects"] == 0 and manifest["leakage"]["overlapping_patients"] == 0
    rows = {row[0]: row for row in nih_rows(nih_root)[1:]}
    names = list(LABEL_SETS["nih14"])
    splits = {split: stream_split(nih_shards, split, "nih14") for split in ("train", "val", "test")}
    assert set(splits["test"]) == {name.removesuffix(".png") for name in nih_list(nih_root, "test_list.txt")}
    assert sum(map(len, splits.values())) == len(rows)
    patients = [{patient for patient, _ in split.values()} for split in splits.values()]
    assert all(not a & b for i, a in enumerate(patients) for b in patients[i + 1:]), "a patient in two splits"
    assert all(patients), "every split has patients"
    for split in splits.values():
        for key, (patient, target) in split.items():
            row = rows[f"{key}.png"]
            assert patient == key[:8] and int(patient) == int(row[3])
            listed = row[1].split("|")
            assert [names[i] for i in np.flatnonzero(target)] == [n for n in names if n in listed]


@pytest.mark.parametrize("layout", ["nih", "mimic"])
def test_lesion_masks_stream_with_the_packs_label_bits(nih_shards: Path, mimic_shards: Path,
                                                      layout: str) -> None:
    """Explain's ground truth: each streamed label's lesion plane is drawn only where that label is
    positive (the masks' bits follow the pack's own label order), and most positives have one."""
    shards, labels = (nih_shards, "nih14") if layout == "nih" else (mimic_shards, "mimic14")
    config = StreamConfig(shards=shards, split="test", labels=labels, batch_size=8, image_size=32, workers=0,
                          views="all", with_lesion_masks=True)
    marked = positives = 0
    for batch in eval_stream(config, 0, 1).batches():
        drawn = batch["lesion"].flatten(2).any(2).numpy()
        target = batch["target"].numpy() == 1
        assert not (drawn & ~target).any(), "a lesion plane on a negative label"
        marked, positives = marked + int((drawn & target).sum()), positives + int(target.sum())
    assert positives and marked >= 0.7 * positives


def test_mimic_pack_streams_with_mimic_labels_and_the_official_test_split(mimic_root: Path,
                                                                          mimic_shards: Path) -> None:
    manifest = json.loads((mimic_shards / "manifest.json").read_text())
    assert manifest["dataset"] == "mimic" and manifest["label_names"] == list(MIMIC_LABELS)
    assert manifest["rejects"] == 0 and manifest["leakage"]["overlapping_patients"] == 0
    assert set(manifest["splits"]["train"]["views"]) == {"frontal", "lateral"}
    header, *label_rows = gz_rows(mimic_root, "chexpert")
    labels = {(row[0], row[1]): dict(zip(header, row, strict=True)) for row in label_rows}
    split_rows = gz_rows(mimic_root, "split")[1:]
    splits = {split: stream_split(mimic_shards, split, "mimic14") for split in ("train", "val", "test")}
    assert set(splits["test"]) == {row[0] for row in split_rows if row[3] == "test"}
    assert set(splits["train"]) | set(splits["val"]) == {row[0] for row in split_rows if row[3] != "test"}
    patients = [{patient for patient, _ in split.values()} for split in splits.values()]
    assert all(not a & b for i, a in enumerate(patients) for b in patients[i + 1:]) and all(patients)
    meta = {row[0]: row for row in gz_rows(mimic_root, "metadata")[1:]}
    for split in splits.values():
        for key, (patient, target) in split.items():
            subject, study = meta[key][1], meta[key][2]
            assert patient == f"p{subject}"
            expected = [float(labels[(subject, study)][name] == "1.0") for name in MIMIC_LABELS]
            assert target.tolist() == expected  # U-Ignore masks -1, blank is 0: targets are the 1.0s


def test_the_trainer_takes_nih14_and_mimic14(nih_shards: Path, mimic_shards: Path) -> None:
    """A trainer config's label set names the pack's own labels: nih14 is NIH's 14 findings (its
    `No Finding` left out), mimic14 MIMIC's 14 observations; unset, every label of the pack."""
    from tests.trainer_helpers import DEMO
    from trainer.config import load_config
    from trainer.data import run_labels

    for shards, labels, expected in ((nih_shards, "nih14", NIH_LABELS[:14]),
                                     (mimic_shards, "mimic14", MIMIC_LABELS),
                                     (nih_shards, None, NIH_LABELS)):
        overrides = [f"data.shards={shards}"] + ([f"data.labels={labels}"] if labels else ["data.labels=[]"])
        assert run_labels(load_config(DEMO, overrides)) == expected


# --- real-download quirks -----------------------------------------------------------------------


def test_nih_quirks_are_rejected_and_rgba_is_packed(nih_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(nih_root / "CXR8", source / "CXR8")
    base, images = source / "CXR8", nih_images(source)
    rows = nih_rows(source)
    first = rows[1]
    rgba = sorted(name for name, path in images.items() if Image.open(path).mode == "RGBA")
    missing_row = [f"{first[0][:8]}_090.png", *first[1:]]  # no image file
    bad_label = [rows[2][0], "Cardiomegaly|Flu", *rows[2][2:]]
    rows[2] = bad_label
    shutil.copy(images[rows[3][0]], images[rows[3][0]].with_name("00000099_000.png"))  # no row
    no_split = [f"{first[0][:8]}_091.png", *first[1:]]
    shutil.copy(images[first[0]], images[first[0]].with_name(no_split[0]))
    rows += [missing_row, no_split, first[:5]]
    with (base / "Data_Entry_2017.csv").open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    (base / "images_001" / "images" / "Thumbs.db").write_bytes(b"\0")

    manifest = pack(PackOptions(layout="nih", root=source, out=tmp_path / "out", size=32), **QUIET)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert Counter(r["kind"] for r in rejects) == {"missing_file": 1, "bad_label": 1, "no_row": 1,
                                                   "no_split": 1, "malformed_row": 1, "not_image": 1}
    by_kind = {r["kind"]: r for r in rejects}
    assert "'Flu'" in by_kind["bad_label"]["reason"] and by_kind["bad_label"]["key"] == rows[2][0][:-4]
    assert by_kind["no_row"]["where"].endswith("/images/00000099_000.png")
    assert by_kind["no_split"]["key"] == no_split[0][:-4]
    assert by_kind["missing_file"]["key"] == missing_row[0][:-4]
    assert manifest["rejects"] == 6
    packed = sum(manifest["splits"][s]["samples"] for s in ("train", "val", "test"))
    assert packed == len(nih_rows(nih_root)) - 2, "every other image is packed, the RGBA ones included"
    streamed = {key for split in ("train", "val", "test")
                for key in stream_split(tmp_path / "out", split, "nih14")}
    assert {name[:-4] for name in rgba} <= streamed and rgba


def test_nih_image_in_both_split_lists_is_rejected(nih_root: Path, tmp_path: Path) -> None:
    shutil.copytree(nih_root / "CXR8", tmp_path / "CXR8")
    name = nih_list(nih_root, "train_val_list.txt")[0]
    with (tmp_path / "CXR8" / "test_list.txt").open("a") as handle:
        handle.write(f"{name}\n")
    data = read_nih(tmp_path)
    assert [(r.kind, r.key) for r in data.rejects] == [("split_conflict", name[:-4])]


def test_mimic_quirks_are_rejected(mimic_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(mimic_root / "mimic-cxr-jpg", source / "mimic-cxr-jpg")
    metadata, labels = gz_rows(source, "metadata"), gz_rows(source, "chexpert")
    split = gz_rows(source, "split")
    files = source / MIMIC / "files"

    def image(row: list[str]) -> Path:
        return files / f"p{row[1][:2]}" / f"p{row[1]}" / f"s{row[2]}" / f"{row[0]}.jpg"

    image(metadata[1]).unlink()  # a row without its image
    stray = image(metadata[2]).with_name("0badc0de-00000000-00000000-00000000-00000000.jpg")
    shutil.copy(image(metadata[2]), stray)  # an image without a row
    lone = [row for row in metadata[4:] if sum(r[2] == row[2] for r in metadata[1:]) == 1]
    assert len(lone) >= 4, "studies with a single image to damage"
    bad_study, unlabeled_study = lone[0][2], lone[1][2]
    labels = [row if row[1] != bad_study else [*row[:2], "yes", *row[3:]] for row in labels]
    labels = [row for row in labels if row[1] != unlabeled_study]
    lone[2][4] = lone[2][10] = ""  # no view recorded anywhere
    lone[3][4], lone[3][10] = "", "lateral"  # ViewPosition blank, the view code says lateral
    no_split = metadata[3][0]
    split = [row for row in split if row[0] != no_split]
    write_gz_rows(source, "metadata", metadata)
    write_gz_rows(source, "chexpert", labels)
    write_gz_rows(source, "split", split)

    data = read_source("mimic", source)
    kinds = Counter(r.kind for r in data.rejects)
    assert kinds == {"missing_file": 1, "no_row": 1, "bad_label": 1, "no_labels": 1, "unknown_view": 1,
                     "no_split": 1}
    by_kind = {r.kind: r for r in data.rejects}
    assert by_kind["bad_label"].key == lone[0][0] and "'Atelectasis'" in by_kind["bad_label"].reason
    assert by_kind["no_labels"].key == lone[1][0] and by_kind["unknown_view"].key == lone[2][0]
    assert by_kind["no_row"].where.endswith(stray.name) and by_kind["no_split"].key == no_split
    records = {r.key: r for r in data.train_pool + data.test}
    assert records[lone[3][0]].view == "lateral" and records[lone[3][0]].projection == "LATERAL"
    assert len(records) == len(metadata) - 1 - 5, "five rows rejected (the sixth reject is the stray image)"


def test_mimic_roots_as_users_have_them(mimic_root: Path, tmp_path: Path) -> None:
    """physionet.org/files/mimic-cxr-jpg/<version>/ from wget -r (newest version wins), the version
    folder itself, and tables the user gunzipped."""
    physionet = tmp_path / "physionet.org" / "files" / "mimic-cxr-jpg"
    shutil.copytree(mimic_root / MIMIC, physionet / "2.1.0")
    (physionet / "2.0.0").mkdir()
    expected = len(gz_rows(mimic_root, "metadata")) - 1
    for root in (tmp_path, tmp_path / "physionet.org", physionet, physionet / "2.1.0"):
        data = read_source("mimic", root)
        assert data.dataset_dir == physionet / "2.1.0" and len(data.train_pool) + len(data.test) == expected
    assert data.mask_root == physionet.parent / "masks", "masks mirror relpaths from above mimic-cxr-jpg/"
    for table in ("metadata", "chexpert", "split"):
        gz = physionet / "2.1.0" / f"mimic-cxr-2.0.0-{table}.csv.gz"
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    data = read_source("mimic", tmp_path)
    assert len(data.train_pool) + len(data.test) == expected and not data.rejects


@pytest.mark.parametrize(("layout", "damage", "message"), [
    ("nih", "empty", "no NIH ChestX-ray14 table found"),
    ("nih", "no_test_list", "test_list.txt: missing"),
    ("nih", "header", "missing column(s) Finding Labels"),
    ("mimic", "empty", "no MIMIC-CXR-JPG metadata found"),
    ("mimic", "no_labels", "mimic-cxr-2.0.0-chexpert.csv.gz: missing"),
    ("mimic", "no_files", "no usable rows (images found: 0)"),
])
def test_wrong_root_fails_with_one_line(nih_root: Path, mimic_root: Path, tmp_path: Path, layout: str,
                                        damage: str, message: str) -> None:
    if damage != "empty":
        shutil.copytree(nih_root / "CXR8" if layout == "nih" else mimic_root / "mimic-cxr-jpg",
                        tmp_path / ("CXR8" if layout == "nih" else "mimic-cxr-jpg"))
    if damage == "no_test_list":
        (tmp_path / "CXR8" / "test_list.txt").unlink()
    if damage == "header":
        (tmp_path / "CXR8" / "Data_Entry_2017.csv").write_text("Image Index,Labels\nx.png,Mass\n")
    if damage == "no_labels":
        (tmp_path / MIMIC / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    if damage == "no_files":
        shutil.rmtree(tmp_path / MIMIC / "files")
    with pytest.raises(DataError) as err:
        read_source(layout, tmp_path)
    assert "\n" not in str(err.value) and message in str(err.value), str(err.value)


def test_cli_synth_and_pack(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120,
                              check=False)

    result = run("shards.synth", "--layout", "mimic", "--out", str(tmp_path), "--patients", "10",
                 "--size", "48")
    assert result.returncode == 0 and result.stdout.startswith("synth: mimic: 10 patients"), result.stderr
    result = run("shards.pack", "--layout", "mimic", "--root", str(tmp_path), "--out",
                 str(tmp_path / "shards"), "--size", "32", "--workers", "1")
    assert result.returncode == 0 and "leakage: 0 patients in two splits" in result.stdout, result.stderr
    result = run("shards.pack", "--layout", "nih", "--root", str(tmp_path), "--out", str(tmp_path / "nih"))
    assert result.returncode == 2 and result.stderr.startswith("error: --root")
    assert result.stderr.strip().count("\n") == 0, result.stderr


# --- the signal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["Emphysema", "Hernia", "Infiltration"])
def test_nih_only_findings_are_learnable(tmp_path_factory: pytest.TempPathFactory, label: str) -> None:
    """A linear probe on thumbnails separates the NIH-only painters that have a consistent place
    (Mass, a lesion anywhere in a lung, needs the convolution the trainer tests provide)."""
    root = tmp_path_factory.getbasetemp() / "nih-balanced"
    if not root.exists():
        generate_nih(NihOptions(out=root, patients=160, size=48, seed=5, rates="balanced"))
    rows = nih_rows(root)[1:]
    images = nih_images(root)
    x = np.stack([np.asarray(Image.open(images[row[0]]).convert("L").resize((24, 24)), np.float32).ravel()
                  for row in rows]) / 255
    y = np.array([label in row[1].split("|") for row in rows])
    half = len(rows) // 2
    model = LogisticRegression(C=0.05, max_iter=2000).fit(x[:half], y[:half])
    assert roc_auc_score(y[half:], model.predict_proba(x[half:])[:, 1]) >= 0.75


def test_mimic_synth_is_deterministic(tmp_path: Path) -> None:
    def digest(out: Path, seed: int) -> bytes:
        generate_mimic(MimicOptions(out=out, patients=6, size=32, seed=seed))
        return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())

    assert digest(tmp_path / "a", 1) == digest(tmp_path / "b", 1) != digest(tmp_path / "c", 2)


@pytest.mark.slow
def test_a_tiny_cnn_learns_nih_findings(tmp_path: Path) -> None:
    """The demo CNN, 3 epochs on a packed synthetic NIH (240 patients, 64 px, one process: 20-30 s),
    learns five NIH findings on the official test split, with the labels named as NIH spells them."""
    from tests.trainer_helpers import DEMO, records, train

    generate_nih(NihOptions(out=tmp_path / "src", patients=240, size=64, seed=1, rates="balanced"))
    pack(PackOptions(layout="nih", root=tmp_path / "src", out=tmp_path / "shards", size=64, shard_samples=64,
                     val_fraction=0.2), **QUIET)
    result = train(DEMO, [f"data.shards={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}",
                          "data.labels=[Cardiomegaly,Effusion,Edema,Emphysema,Hernia]", "optim.epochs=3",
                          "data.workers=0"])
    assert result.returncode == 0, result.stderr[-4000:]
    test = records(tmp_path / "run", "test")[-1]
    assert test["auroc_macro"] >= 0.75, test
