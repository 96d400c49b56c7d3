"""shards.synth writes the real layouts, deterministically, with a signal a model can learn."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from shards.errors import DataError
from shards.labels import CHEXPERT_COLUMNS, CHEXPERT_LABELS
from shards.lesion import label_bit
from shards.synth import ChexpertOptions, PneumoniaOptions, generate_chexpert, generate_pneumonia
from shards.synth.chexpert import TRAIN_RATES
from tests.conftest import SIZE

CHEXPERT_PATH = re.compile(
    r"^CheXpert-v1\.0-small/(train|valid)/patient(\d{5})/study(\d+)/view(\d)_(frontal|lateral)\.jpg$")
KAGGLE_NAME = re.compile(r"^(person\d+_(bacteria|virus)_\d+|IM-\d{4}-\d{4}|NORMAL2-IM-\d{4}-\d{4})\.jpeg$")


def read_rows(root: Path, name: str) -> list[dict[str, str]]:
    with (root / "CheXpert-v1.0-small" / name).open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == CHEXPERT_COLUMNS
        return list(reader)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_chexpert_layout_columns_and_values(chexpert_root: Path) -> None:
    train, valid = read_rows(chexpert_root, "train.csv"), read_rows(chexpert_root, "valid.csv")
    for rows, folder in ((train, "train"), (valid, "valid")):
        for row in rows:
            match = CHEXPERT_PATH.match(row["Path"])
            assert match and match.group(1) == folder, row["Path"]
            assert (chexpert_root / row["Path"]).is_file()
            assert row["Frontal/Lateral"] == match.group(5).capitalize()
            assert row["Sex"] in ("Male", "Female", "Unknown") and 18 <= int(row["Age"]) <= 90
            assert row["AP/PA"] in (("AP", "PA") if row["Frontal/Lateral"] == "Frontal" else ("",))
    train_patients = sorted({int(CHEXPERT_PATH.match(r["Path"]).group(2)) for r in train})
    valid_patients = sorted({int(CHEXPERT_PATH.match(r["Path"]).group(2)) for r in valid})
    assert train_patients == list(range(1, 41))
    assert valid_patients == list(range(64541, 64547))
    train_values = {row[name] for row in train for name in CHEXPERT_LABELS}
    assert train_values == {"1.0", "0.0", "-1.0", ""}
    assert {row[name] for row in valid for name in CHEXPERT_LABELS} <= {"1.0", "0.0"}
    studies = {(m.group(2), m.group(3)) for m in (CHEXPERT_PATH.match(r["Path"]) for r in train)}
    assert len(studies) > len(train_patients), "some patients must have several studies"
    assert any(row["Frontal/Lateral"] == "Lateral" for row in train)


def test_no_finding_is_consistent(chexpert_root: Path) -> None:
    for row in read_rows(chexpert_root, "train.csv") + read_rows(chexpert_root, "valid.csv"):
        findings = [row[name] for name in CHEXPERT_LABELS if name not in ("No Finding", "Support Devices")]
        has_finding = any(value in ("1.0", "-1.0") for value in findings)
        assert (row["No Finding"] == "1.0") == (not has_finding), row


def test_images_and_masks(chexpert_root: Path) -> None:
    rows = read_rows(chexpert_root, "train.csv")
    with_mask = marked = total = 0
    for row in rows:
        image = Image.open(chexpert_root / row["Path"])
        assert image.mode == "L" and min(image.size) == SIZE
        pixels = np.asarray(image)
        assert pixels.std() > 10, "a radiograph, not a flat image"
        mask_path = (chexpert_root / "masks" / row["Path"]).with_suffix(".png")
        positives = [n for n in CHEXPERT_LABELS if n != "No Finding" and row[n] == "1.0"]
        if mask_path.is_file():
            with_mask += 1
            mask = Image.open(mask_path)
            assert mask.mode == "I;16", "16-bit label bits (shards.lesion)"
            bits = np.asarray(mask)
            assert bits.shape == pixels.shape and bits.max() > 0
            drawn = {name for index, name in enumerate(CHEXPERT_LABELS) if (bits & label_bit(index)).any()}
            assert positives, f"{row['Path']}: a mask without a positive finding"
            # Each bit is its own finding: only positives are marked (uncertain ones are drawn faintly,
            # unmarked), and a positive finding is marked unless it fell off the image.
            assert drawn <= set(positives), (row["Path"], drawn, positives)
            marked += len(drawn)
            total += len(positives)
        else:
            assert not positives, f"{row['Path']}: positive {positives} but no mask"
    assert with_mask > len(rows) // 2
    assert marked >= 0.9 * total, "almost every positive finding has its own bit"


def test_realistic_label_rates(tmp_path: Path) -> None:
    generate_chexpert(ChexpertOptions(out=tmp_path, patients=300, valid_patients=2, size=32, seed=1))
    rows = read_rows(tmp_path, "train.csv")
    for name in ("Support Devices", "Pleural Effusion", "Cardiomegaly", "Pneumothorax"):
        positive, uncertain, negative = TRAIN_RATES[name]
        values = [row[name] for row in rows]
        assert abs(values.count("1.0") / len(values) - positive) < 0.06, name
        assert abs(values.count("0.0") / len(values) - negative) < 0.06, name
        assert abs(values.count("-1.0") / len(values) - uncertain) < 0.04, name


def test_deterministic_and_independent_of_workers(tmp_path: Path) -> None:
    def make(name: str, seed: int, workers: int) -> str:
        options = ChexpertOptions(out=tmp_path / name, patients=8, size=48, seed=seed, workers=workers)
        generate_chexpert(options)
        return tree_digest(tmp_path / name)

    first = make("a", seed=3, workers=1)
    assert make("b", seed=3, workers=2) == first
    assert make("c", seed=4, workers=1) != first


def test_refuses_to_overwrite_and_leaves_no_partial_tree(tmp_path: Path) -> None:
    generate_pneumonia(PneumoniaOptions(out=tmp_path, patients=10, size=48))
    assert not list(tmp_path.glob(".*partial"))
    with pytest.raises(DataError, match="already exists"):
        generate_pneumonia(PneumoniaOptions(out=tmp_path, patients=10, size=48))


def test_pneumonia_layout(pneumonia_root: Path) -> None:
    base = pneumonia_root / "chest_xray"
    persons: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            files = sorted((base / split / label).iterdir())
            assert files, f"{split}/{label} is empty"
            for path in files:
                assert KAGGLE_NAME.match(path.name), path.name
                assert path.name.startswith("person") == (label == "PNEUMONIA")
                persons.setdefault(split, set()).add(re.split(r"_|-\d{4}\.", path.name)[0])
                image = Image.open(path)
                assert min(image.size) >= SIZE and image.size[0] > image.size[1]  # landscape, large
                mask = (pneumonia_root / "masks" / path.relative_to(pneumonia_root)).with_suffix(".png")
                assert mask.is_file() == (label == "PNEUMONIA")
                if mask.is_file():  # one label: every lesion pixel is bit 0 (Pneumonia)
                    assert set(np.unique(np.asarray(Image.open(mask)))) == {0, 1}
    assert not persons["test"] & (persons["train"] | persons["val"]), "test persons must be disjoint"
    assert persons["val"] <= persons["train"], "Kaggle's val folder shares persons with train"
    names = [p.name for p in base.rglob("*.jpeg")]
    assert any("_virus_" in n for n in names) and any("_bacteria_" in n for n in names)
    assert any(n.startswith("NORMAL2-") for n in names)
    counters = [int(n.rsplit("_", 1)[1].split(".")[0]) for n in names if n.startswith("person")]
    assert len(set(counters)) == len(counters), "the image counter runs across all pneumonia files"


def _features(root: Path, rows: list[dict[str, str]]) -> np.ndarray:
    return np.stack([
        np.asarray(Image.open(root / row["Path"]).resize((24, 28)), dtype=np.float32).ravel() / 255
        for row in rows
    ])


@pytest.mark.parametrize("label", ["Cardiomegaly", "Pleural Effusion", "Edema"])
def test_signal_is_learnable(tmp_path_factory: pytest.TempPathFactory, label: str) -> None:
    """A linear model on 24×28 thumbnails separates positives (AUROC ≥ 0.75); shuffled labels do not.

    Only findings with a consistent place pass a linear probe; small findings anywhere in a lung
    (nodules, devices) need a convolution, which the trainer's learning tests provide.
    """
    root = tmp_path_factory.getbasetemp() / "balanced"
    if not root.exists():
        generate_chexpert(ChexpertOptions(out=root, patients=240, valid_patients=2, size=48, seed=5,
                                          rates="balanced"))
    rows = [r for r in read_rows(root, "train.csv")
            if r["Frontal/Lateral"] == "Frontal" and r[label] != "-1.0"]
    x = _features(root, rows)
    y = np.array([row[label] == "1.0" for row in rows])
    half = len(rows) // 2

    def held_out_auc(targets: np.ndarray) -> float:
        model = LogisticRegression(C=0.05, max_iter=2000).fit(x[:half], targets[:half])
        return roc_auc_score(targets[half:], model.predict_proba(x[half:])[:, 1])

    assert held_out_auc(y) >= 0.75
    assert held_out_auc(np.random.default_rng(0).permutation(y)) < 0.65
