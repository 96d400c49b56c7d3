"""Readers: the real layouts in, records out; bad rows and files become rejects, a wrong root fails."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from shards.errors import DataError
from shards.labels import CHEXPERT_LABELS
from shards.pack.sources import Record, read_chexpert, read_pneumonia, read_source


def folder(record: Record) -> str:
    """The source's own split folder (train / valid, or train / val / test), from the record's path."""
    return record.relpath.split("/")[1]


def csv_rows(root: Path, name: str) -> list[list[str]]:
    with (root / "CheXpert-v1.0-small" / name).open(newline="") as handle:
        return list(csv.reader(handle))


def test_chexpert_records_match_the_csvs(chexpert_root: Path) -> None:
    data = read_chexpert(chexpert_root)
    train_rows, valid_rows = csv_rows(chexpert_root, "train.csv"), csv_rows(chexpert_root, "valid.csv")
    assert len(data.train_pool) == len(train_rows) - 1 and len(data.test) == len(valid_rows) - 1
    assert not data.rejects
    keys = [r.key for r in data.train_pool + data.test]
    assert len(set(keys)) == len(keys) and all("." not in k and "/" not in k for k in keys)
    header, first = train_rows[0], train_rows[1]
    record = data.train_pool[0]
    assert record.relpath == first[0] and Path(record.path).is_file()
    assert record.patient == first[0].split("/")[2] and record.study == first[0].split("/")[3]
    assert record.view == first[3].lower() and record.sex == first[1] and record.age == int(first[2])
    expected = {name: None if first[header.index(name)] == "" else int(float(first[header.index(name)]))
                for name in CHEXPERT_LABELS}
    assert record.labels == expected
    assert {r.view for r in data.train_pool} == {"frontal", "lateral"}
    assert {folder(r) for r in data.test} == {"valid"}


def test_chexpert_full_resolution_and_renamed_trees(chexpert_root: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    shutil.copytree(chexpert_root / "CheXpert-v1.0-small", full / "CheXpert-v1.0")
    data = read_chexpert(full)
    assert data.dataset_dir.name == "CheXpert-v1.0" and all(Path(r.path).is_file() for r in data.train_pool)
    renamed = tmp_path / "renamed" / "chexpert"
    shutil.copytree(chexpert_root / "CheXpert-v1.0-small", renamed)
    data = read_chexpert(renamed)  # the dataset folder itself, under another name
    assert all(Path(r.path).is_file() for r in data.train_pool + data.test)


def test_chexpert_bad_rows_are_rejected_not_fatal(chexpert_root: Path, tmp_path: Path) -> None:
    shutil.copytree(chexpert_root / "CheXpert-v1.0-small", tmp_path / "CheXpert-v1.0-small")
    rows = csv_rows(tmp_path, "train.csv")
    good = rows[1]
    bad_label = [*good[:-1], "2.0"]
    bad_label[0] = good[0].replace("view1", "view7")
    bad_path = ["not/a/chexpert/path.txt", *good[1:]]
    short = good[:5]
    bad_age = [good[0].replace("view1", "view8"), good[1], "sixty", *good[3:]]
    with (tmp_path / "CheXpert-v1.0-small" / "train.csv").open("a", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([bad_label, bad_path, short, good, bad_age])
    data = read_chexpert(tmp_path)
    kinds = sorted(reject.kind for reject in data.rejects)
    assert kinds == ["bad_label", "duplicate", "malformed_row", "malformed_row", "malformed_row"]
    assert len(data.train_pool) == len(rows) - 1
    reasons = " | ".join(r.reason for r in data.rejects)
    assert "'Support Devices'" in reasons and "'2.0'" in reasons and "'Age'" in reasons
    assert all(r.where.startswith("CheXpert-v1.0-small/train.csv:") for r in data.rejects)


@pytest.mark.parametrize("damage", ["no_tree", "no_valid", "not_chexpert_header", "empty_csv"])
def test_chexpert_wrong_root_fails_with_one_line(chexpert_root: Path, tmp_path: Path, damage: str) -> None:
    base = tmp_path / "CheXpert-v1.0-small"
    if damage != "no_tree":
        shutil.copytree(chexpert_root / "CheXpert-v1.0-small", base)
    if damage == "no_valid":
        (base / "valid.csv").unlink()
    if damage == "not_chexpert_header":
        (base / "train.csv").write_text("Path,Label\nx.jpg,1\n")
    if damage == "empty_csv":
        (base / "train.csv").write_text("")
    with pytest.raises(DataError) as err:
        read_source("chexpert", tmp_path)
    message = str(err.value)
    assert "\n" not in message and ("csv" in message.lower())


def test_pneumonia_records(pneumonia_root: Path) -> None:
    data = read_pneumonia(pneumonia_root)
    files = set((pneumonia_root / "chest_xray").rglob("*.jpeg"))
    assert len(data.train_pool) + len(data.test) == len(files) and not data.rejects
    assert {folder(r) for r in data.train_pool} == {"train", "val"}, "val/ is merged into the train pool"
    for record in data.train_pool + data.test:
        name = Path(record.path).name
        assert record.labels == {"Pneumonia": int(name.startswith("person"))}
        assert name.startswith(record.patient)
        assert record.subtype == (name.split("_")[1] if name.startswith("person") else None)
    val_patients = {r.patient for r in data.train_pool if folder(r) == "val"}
    train_patients = {r.patient for r in data.train_pool if folder(r) == "train"}
    assert val_patients <= train_patients


def test_pneumonia_odd_files_and_nesting(pneumonia_root: Path, tmp_path: Path) -> None:
    nested = tmp_path / "chest_xray" / "chest_xray"  # the public zip nests the folder twice
    shutil.copytree(pneumonia_root / "chest_xray", nested)
    normal = nested / "train" / "NORMAL"
    (normal / ".DS_Store").write_bytes(b"\0")
    (normal / "notes.txt").write_text("not an image")
    shutil.copy(next(normal.glob("IM-*.jpeg")), normal / "scan_0001.jpeg")
    shutil.copy(next((nested / "train" / "PNEUMONIA").iterdir()), normal / "person9999_virus_1.jpeg")
    data = read_pneumonia(tmp_path)
    assert sorted(r.kind for r in data.rejects) == ["bad_name", "bad_name", "not_image"]
    assert "contradicts folder NORMAL" in " ".join(r.reason for r in data.rejects)


def test_pneumonia_wrong_root(tmp_path: Path) -> None:
    (tmp_path / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no Kaggle pneumonia layout found"):
        read_source("pneumonia", tmp_path)
    with pytest.raises(DataError, match=r"--layout 'mnist'"):
        read_source("mnist", tmp_path)
