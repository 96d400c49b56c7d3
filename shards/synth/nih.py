"""A synthetic NIH ChestX-ray14 tree (Wang et al. 2017), as Kaggle or the NIH Box share ship it.

`CXR8/` holds `Data_Entry_2017.csv` (Kaggle: the real header, whose unquoted commas split
`OriginalImage[Width,Height]` and `OriginalImagePixelSpacing[x,y]` over two cells each, and a
trailing empty column) or `Data_Entry_2017_v2020.csv` (Box: no trailing column), the PNGs named
`<patient:08d>_<follow-up:03d>.png` in `images_001/images/` … (Kaggle, `folder_images` a folder)
or `images/` (Box), `train_val_list.txt` / `test_list.txt` (patient-disjoint), and
`BBox_List_2017.csv`, boxes around the drawn lesions of some test images, in the PNG's pixels.

Images are square 8-bit grayscale PNGs (a few RGBA, as in the download); findings are drawn from
the binary labels (`Finding Labels`, pipe-separated, alphabetical, or `No Finding`) with the
CheXpert painters where one fits and four NIH-only painters below; masks use NIH's label order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from shards.labels import NIH_LABELS
from shards.lesion import label_bit
from shards.synth.common import SynthSummary, parallel_map, patient_rng, staged, write_csv, write_png
from shards.synth.render import (
    Anatomy,
    Canvas,
    Painter,
    _pick,
    _point_in_lung,
    _sigmoid,
    atelectasis,
    cardiomegaly,
    consolidation,
    edema,
    labelled,
    lung_lesion,
    pleural_effusion,
    pleural_other,
    pneumonia,
    pneumothorax,
    render,
)

DATASET_DIR = "CXR8"
"""The Box share's folder name (Kaggle's zip has none; the reader accepts any)."""
ENTRY_HEADER = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]")
"""The real header as csv splits it: the brackets' commas are unquoted."""
BBOX_HEADER = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", "")
"""`Image Index,Finding Label,Bbox [x,y,w,h],,,`: rows carry x, y, w, h and three empty cells."""
BOX_SPELLING = {"Infiltration": "Infiltrate"}
BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
         "Pneumothorax")
"""The eight findings BBox_List_2017.csv has boxes for."""
RGBA_EVERY = 23
"""Every 23rd image is an RGBA PNG (the download has a few)."""

RATES: dict[str, float] = {
    # per-image prevalence in the real Data_Entry_2017.csv
    "Atelectasis": 0.103, "Cardiomegaly": 0.025, "Effusion": 0.119, "Infiltration": 0.177, "Mass": 0.052,
    "Nodule": 0.056, "Pneumonia": 0.013, "Pneumothorax": 0.047, "Consolidation": 0.042, "Edema": 0.021,
    "Emphysema": 0.022, "Fibrosis": 0.015, "Pleural_Thickening": 0.030, "Hernia": 0.002,
}
BALANCED_RATE = 0.3


# --- NIH findings without a CheXpert painter ----------------------------------------------------


def mass(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """A large (> 3 cm) round, well-defined opacity: a nodule's shape at twice its size."""
    lung = _pick(anatomy, rng)
    cx, cy = _point_in_lung(lung, rng, 0.5)
    radius = rng.uniform(0.1, 0.14)
    win, weight = canvas.ellipse(cx, cy, radius, radius * rng.uniform(0.8, 1.2), edge=0.05)
    canvas.add(win, weight, 0.3 * strength, strength >= 1)


def infiltration(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """Ill-defined patchy opacities scattered over both lungs (CheXpert's Lung Opacity, spread out)."""
    for lung in anatomy.lungs:
        for _ in range(2):
            cx, cy = _point_in_lung(lung, rng, 0.6)
            win, weight = canvas.ellipse(cx, cy, rng.uniform(0.1, 0.16), rng.uniform(0.12, 0.2), edge=0.25)
            canvas.add(win, weight * lung.weight[win], 0.18 * strength, strength >= 1)


def emphysema(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """Hyperinflation: hyperlucent lungs reaching lower, over flattened hemidiaphragms."""
    for lung in anatomy.lungs:
        canvas.add(canvas.full, lung.weight, -0.11 * strength, strength >= 1)
        win, weight = canvas.ellipse(lung.cx, lung.cy + 0.9 * lung.ry, 0.8 * lung.rx, 0.22 * lung.ry,
                                     edge=0.1)
        canvas.add(win, weight, -0.1 * strength, strength >= 1)


def fibrosis(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """Reticular (net-like) opacities in the lower, outer lung zones."""
    frequency = rng.uniform(15, 19)
    for lung in anatomy.lungs:
        win = canvas.window(lung.cx, lung.cy, lung.rx * 1.1, lung.ry * 1.1)
        u, v = canvas.coords(win)
        net = np.maximum(np.cos(frequency * u + rng.uniform(0, 2 * math.pi)),
                         np.cos(frequency * v + rng.uniform(0, 2 * math.pi))) ** 8
        zone = _sigmoid((v - lung.cy) / (0.2 * lung.ry)) * lung.weight[win]
        canvas.add(win, net * zone, 0.3 * strength)
        if strength >= 1:
            canvas.mark(win, zone > 0.5)


def hernia(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """A hiatal hernia: a round retrocardiac shadow with an air-fluid level, above the diaphragm."""
    _, cy, _, ry = anatomy.heart
    hx, hy = anatomy.mediastinum_x + rng.uniform(-0.04, 0.04), cy + 0.4 * ry
    radius = rng.uniform(0.1, 0.13)
    win, weight = canvas.ellipse(hx, hy, 1.2 * radius, radius, edge=0.06)
    _, v = canvas.coords(win)
    air = _sigmoid((hy - v) / 0.01)
    canvas.add(win, weight * (1 - air), 0.22 * strength)
    canvas.add(win, weight * air, -0.25 * strength)
    if strength >= 1:
        canvas.mark(win, weight > 0.5)


PAINTERS: dict[str, Painter] = {
    "Atelectasis": atelectasis,
    "Cardiomegaly": cardiomegaly,
    "Effusion": pleural_effusion,
    "Infiltration": infiltration,
    "Mass": mass,
    "Nodule": lung_lesion,
    "Pneumonia": pneumonia,
    "Pneumothorax": pneumothorax,
    "Consolidation": consolidation,
    "Edema": edema,
    "Emphysema": emphysema,
    "Fibrosis": fibrosis,
    "Pleural_Thickening": pleural_other,
    "Hernia": hernia,
}
"""NIH finding → painter ('No Finding' draws nothing); each marks its NIH label's mask bit."""


# --- the tree -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NihOptions:
    out: Path
    patients: int = 64
    size: int = 320
    seed: int = 0
    rates: str = "realistic"
    source: str = "kaggle"
    """kaggle: Data_Entry_2017.csv + images_NNN/images/; box: Data_Entry_2017_v2020.csv + images/."""
    folder_images: int = 10_000
    """Images per images_NNN/ folder (Kaggle)."""
    box_fraction: float = 0.5
    """Of the test images with a boxed finding drawn, the share listed in BBox_List_2017.csv (the
    real file boxes ~880 of 25,596 test images)."""
    workers: int = 1


@dataclass(frozen=True, slots=True)
class NihImage:
    patient: int
    follow_up: int
    index: int
    """Running number over all images (which folder; which are RGBA)."""

    @property
    def name(self) -> str:
        return f"{self.patient:08d}_{self.follow_up:03d}.png"

    @property
    def test(self) -> bool:
        """Official test patients: every fifth (a fifth of them, ~23% of images in the download)."""
        return self.patient % 5 == 2


def plan_images(options: NihOptions) -> list[NihImage]:
    images = []
    for patient in range(1, options.patients + 1):
        count = int(min(8, patient_rng(options.seed, 10, patient).geometric(0.4)))
        images += [NihImage(patient, follow_up, len(images) + follow_up) for follow_up in range(count)]
    return images


def relpath(options: NihOptions, image: NihImage) -> str:
    if options.source == "box":
        return f"{DATASET_DIR}/images/{image.name}"
    return f"{DATASET_DIR}/images_{image.index // options.folder_images + 1:03d}/images/{image.name}"


def sample_findings(rng: np.random.Generator, rates: str) -> list[str]:
    """Binary findings of one image, alphabetical as `Finding Labels` lists them."""
    return sorted(name for name, rate in RATES.items()
                  if rng.uniform() < (BALANCED_RATE if rates == "balanced" else rate))


def _image(task: tuple[NihOptions, Path, NihImage]) -> tuple[list[str], list[list[str]], bool]:
    """Draw one image; returns its Data_Entry row, its box rows (test images only) and whether a
    mask was written."""
    options, root, image = task
    rng = patient_rng(options.seed, 11, image.patient * 64 + image.follow_up)
    person = patient_rng(options.seed, 10, image.patient)
    person.geometric(0.4)  # the image count drawn in plan_images
    sex, age = str(person.choice(["M", "F"], p=[0.56, 0.44])), int(np.clip(person.normal(47, 17), 1, 95))
    findings = sample_findings(rng, options.rates)
    draws = [labelled(label_bit(NIH_LABELS.index(name)), partial(PAINTERS[name], strength=1.0))
             for name in findings]
    drawn = render(options.size, options.size, rng, lateral=False, draws=draws)
    rel = relpath(options, image)
    masked = write_png(root, rel, drawn, rgba=image.index % RGBA_EVERY == RGBA_EVERY - 1)
    width, height = (int(value) for value in rng.integers(2400, 3056, size=2))
    spacing = str(rng.choice(["0.143", "0.139", "0.168"]))
    row = [image.name, "|".join(findings) or "No Finding", str(image.follow_up), str(image.patient),
           str(age + image.follow_up // 4), sex, str(rng.choice(["PA", "AP"], p=[0.6, 0.4])),
           str(width), str(height), spacing, spacing]
    boxes = []
    if image.test and drawn.mask is not None and rng.uniform() < options.box_fraction:
        boxes = box_rows(image.name, drawn.mask)
    return row, boxes, masked


def box_rows(name: str, mask: np.ndarray) -> list[list[str]]:
    """One BBox_List_2017.csv row per boxed finding marked in the mask: its pixels' bounding box."""
    rows = []
    for finding in BOXED:
        ys, xs = np.nonzero(mask & label_bit(NIH_LABELS.index(finding)))
        if len(xs):
            x, y = float(xs.min()), float(ys.min())
            w, h = float(xs.max() + 1) - x, float(ys.max() + 1) - y
            cells = [repr(value) for value in (x, y, w, h)]
            rows.append([name, BOX_SPELLING.get(finding, finding), *cells, "", "", ""])
    return rows


def generate_nih(options: NihOptions) -> SynthSummary:
    """Write <out>/CXR8/ (images, Data_Entry CSV, split lists, BBox_List_2017.csv) and <out>/masks/."""
    started = time.perf_counter()
    images = plan_images(options)
    summary = SynthSummary("nih", options.out, options.out / DATASET_DIR, patients=options.patients)
    with staged(options.out, DATASET_DIR) as root:
        rows, boxes = [], []
        tasks = [(options, root, image) for image in images]
        for row, image_boxes, masked in parallel_map(_image, tasks, options.workers):
            rows.append(row)
            boxes += image_boxes
            summary.masks += masked
        base = root / DATASET_DIR
        for name, test in (("train_val_list.txt", False), ("test_list.txt", True)):
            listed = "".join(f"{image.name}\n" for image in images if image.test == test)
            (base / name).write_text(listed, encoding="utf-8")
        write_csv(base / "BBox_List_2017.csv", BBOX_HEADER, boxes)
        if options.source == "box":
            write_csv(base / "Data_Entry_2017_v2020.csv", ENTRY_HEADER, rows)
        else:
            write_csv(base / "Data_Entry_2017.csv", (*ENTRY_HEADER, ""), [[*row, ""] for row in rows])
    summary.by_split = {"train_val": sum(not i.test for i in images), "test": sum(i.test for i in images)}
    summary.by_class = {"boxes": len(boxes)}
    summary.images = len(images)
    summary.seconds = time.perf_counter() - started
    return summary
