"""Radiologists' ground truth: CheXlocalize segmentations or polygons, NIH boxes, read, matched to a
pack's images and the runs' labels, and mapped onto the geometry the heatmaps are computed at.

Files (the kind is detected from the content, not the name):

- CheXlocalize `gt_segmentations_{val,test}.json` (Saporta et al. 2022): image id → pathology →
  `{"size": [h, w], "counts": COCO RLE}` at the original image size, every pathology present
  (empty masks too).
- CheXlocalize `gt_annotations_{val,test}.json`: image id → `{"img_size": [h, w], pathology:
  [polygon, ...]}`, each polygon a list of [x, y] points in original pixels, only positive
  pathologies present. Polygons are filled the way CheXlocalize's annotation_to_segmentation.py
  makes its masks (Pillow, outline included), so both files of one set give the same masks.
- NIH `BBox_List_2017.csv`: `Image Index,Finding Label,Bbox [x,y,w,h]` rows in the 1024×1024
  pixels of ChestX-ray14's PNGs; several boxes of one image and finding are one region (their union).

Image ids: CheXlocalize names an image `patient64541_study1_view1_frontal`, CheXpert's path from the
patient folder on with '/' → '_' and no extension; a packed sample is matched by its `source`
(`CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg`). NIH names the file
(`00013118_008.png`), matched to the source's file name without extension (so a pack of converted
JPEGs still matches). An id no sample has, or that two samples share, is counted and listed.

Geometry: a pack stores the whole image resized (shorter side to --size, aspect kept, never
cropped or padded: shards/pack/encode.py) and the eval stream squashes the whole packed image to
image_size × image_size (the IDENTITY warp; the synthetic lesion masks get the same
`resize_nearest`). The resize in between cancels out: an output pixel (i, j) of an S×S map shows
the original point ((j + ½)·W/S, (i + ½)·H/S). A raster region (RLE, filled polygons) is read at
the original pixel holding that point; a box holds the pixel when the point lies in
[x, x + w) × [y, y + h).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from shards.labels import shared_labels
from shards.lesion import resize_nearest
from trainer.explain import rle
from trainer.explain.loading import ExplainError

Kind = Literal["chexlocalize-segmentations", "chexlocalize-polygons", "nih-boxes"]

ALIASES: dict[str, str] = {
    "Airspace Opacity": "Lung Opacity",  # CheXlocalize's name for CheXpert's Lung Opacity
    "Infiltrate": "Infiltration",  # BBox_List_2017.csv's spelling of ChestX-ray14's Infiltration
}
"""Ground-truth spellings of a label that the runs' vocabularies spell otherwise. After this,
`shards.labels.shared_labels` matches across vocabularies (NIH `Effusion` = CheXpert `Pleural
Effusion`) and leaves out findings with no exact counterpart (NIH `Mass`, `Nodule`, `Infiltration`
on a CheXpert run; `Lung Opacity` on an NIH run)."""

NIH_IMAGE_SIZE = (1024, 1024)
"""(height, width) of every ChestX-ray14 PNG: the pixels BBox_List_2017.csv's boxes are given in.
A pack records each image's own size (`source_width`/`source_height`): where it does, the boxes
are read against that instead (a re-distribution at another size, the synthetic twin)."""
NIH_HEADER = ("Image Index", "Finding Label")


@dataclass(frozen=True, eq=False)
class Region:
    """One finding on one image, in the original image's pixels (x right, y down)."""

    image: str
    """The image id as the file writes it."""
    finding: str
    """The finding as the file spells it."""
    height: int
    width: int
    runs: np.ndarray | None = None
    """COCO RLE run lengths (CheXlocalize segmentations), checked to cover height × width."""
    polygons: tuple[tuple[tuple[float, float], ...], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    """(x, y, w, h) each."""

    def empty(self) -> bool:
        """Nothing drawn (an empty CheXlocalize mask): not scored, as CheXlocalize does not."""
        if self.runs is not None:
            return not self.runs[1::2].any()
        return not self.polygons and not any(w > 0 and h > 0 for _, _, w, h in self.boxes)

    def full_mask(self) -> np.ndarray:
        """The region at the original size, height × width bool (raster kinds)."""
        if self.runs is not None:
            return rle.runs_to_mask(self.runs, self.height, self.width)
        canvas = Image.new("1", (self.width, self.height))
        draw = ImageDraw.Draw(canvas)
        for polygon in self.polygons:
            if len(polygon) == 1:  # Pillow wants two points for a polygon; a lone click is a pixel
                draw.point(list(polygon), fill=1)
            else:
                draw.polygon(list(polygon), outline=1, fill=1)
        return np.array(canvas, dtype=bool)

    def mask(self, size: int) -> np.ndarray:
        """The region on the size × size grid of the model's input and heatmaps (module docstring)."""
        if self.boxes:
            ys = (np.arange(size) + 0.5) * self.height / size
            xs = (np.arange(size) + 0.5) * self.width / size
            out = np.zeros((size, size), dtype=bool)
            for x, y, w, h in self.boxes:
                out |= ((ys >= y) & (ys < y + h))[:, None] & ((xs >= x) & (xs < x + w))[None, :]
            return out
        return resize_nearest(self.full_mask(), size, size)


@dataclass
class GroundTruth:
    """One file's regions, and how its image ids are found among a pack's sources."""

    path: Path
    kind: Kind
    regions: list[Region] = field(default_factory=list)

    @property
    def images(self) -> set[str]:
        return {region.image for region in self.regions}

    def image_id(self, source: str) -> str | None:
        """The id this file would give the image a pack read from `source` (None: it has none)."""
        return nih_id(source) if self.kind == "nih-boxes" else chexlocalize_id(source)

    def id_key(self, image: str) -> str:
        """The file's own id in the form `image_id` returns."""
        return PurePosixPath(image).stem if self.kind == "nih-boxes" else image


def chexlocalize_id(source: str) -> str | None:
    """`.../valid/patient64541/study1/view1_frontal.jpg` → `patient64541_study1_view1_frontal`."""
    parts = PurePosixPath(source.replace("\\", "/")).with_suffix("").parts
    start = next((i for i, part in enumerate(parts) if re.fullmatch(r"patient\d+", part)), None)
    return None if start is None else "_".join(parts[start:])


def nih_id(source: str) -> str:
    """`images_001/images/00000001_000.png` → `00000001_000` (matched without the extension)."""
    return PurePosixPath(source.replace("\\", "/")).stem


def resolve_finding(name: str, labels: Iterable[str]) -> str | None:
    """The run label a ground-truth finding names, or None (ALIASES, then exact-meaning matches)."""
    pairs, _ = shared_labels([ALIASES.get(name, name)], list(labels))
    return pairs[0][1] if pairs else None


# --- reading ---------------------------------------------------------------------------------------


def _malformed(path: Path, expected: str, where: str = "") -> ExplainError:
    at = f" at {where}" if where else ""
    return ExplainError(f"--ground-truth {path}: malformed{at} (expected {expected})")


SEGMENTATIONS = 'CheXlocalize gt_segmentations: {image id: {pathology: {"size": [h, w], "counts": RLE}}}'
POLYGONS = 'CheXlocalize gt_annotations: {image id: {"img_size": [h, w], pathology: [[[x, y], ...], ...]}}'
EITHER = f"{SEGMENTATIONS}, or {POLYGONS}, or NIH BBox_List_2017.csv"


def read_ground_truth(path: Path) -> GroundTruth:
    """Read one file, its kind detected from the content; ExplainError (one line) if malformed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ExplainError(f"--ground-truth {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ExplainError(f"--ground-truth {path}: unreadable ({err})") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise _malformed(path, EITHER, f"line {err.lineno}: {err.msg}") from None
        return _read_chexlocalize(path, data)
    first = text.splitlines()[0] if text.strip() else ""
    if tuple(cell.strip() for cell in first.split(",")[:2]) == NIH_HEADER:
        return _read_nih(path, text)
    raise _malformed(path, EITHER, "line 1")


def _read_chexlocalize(path: Path, data: object) -> GroundTruth:
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise _malformed(path, EITHER)
    polygons = any("img_size" in entry for entry in data.values())
    truth = GroundTruth(path, "chexlocalize-polygons" if polygons else "chexlocalize-segmentations")
    for image, entry in data.items():
        if polygons:
            truth.regions += _polygon_regions(path, image, entry)
        else:
            truth.regions += _rle_regions(path, image, entry)
    return truth


def _rle_regions(path: Path, image: str, entry: dict) -> list[Region]:
    regions = []
    for finding, item in entry.items():
        if not isinstance(item, dict):  # polygons without img_size look like this
            raise _malformed(path, f"{SEGMENTATIONS}, or {POLYGONS}", f"{image} / {finding}")
        try:
            height, width, runs = rle.parse(item)
        except rle.RLEError as err:
            raise _malformed(path, SEGMENTATIONS, f"{image} / {finding}: {err}") from None
        regions.append(Region(image, finding, height, width, runs=runs))
    return regions


def _polygon_regions(path: Path, image: str, entry: dict) -> list[Region]:
    try:
        height, width = (int(v) for v in entry["img_size"])
    except (KeyError, TypeError, ValueError):
        raise _malformed(path, POLYGONS, f"{image} / img_size") from None
    regions = []
    for finding, contours in entry.items():
        if finding == "img_size":
            continue
        try:
            shapes = tuple(tuple((float(x), float(y)) for x, y in contour) for contour in contours)
        except (TypeError, ValueError):
            raise _malformed(path, POLYGONS, f"{image} / {finding}") from None
        regions.append(Region(image, finding, height, width, polygons=tuple(s for s in shapes if s)))
    return regions


def _read_nih(path: Path, text: str) -> GroundTruth:
    boxes: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    rows = csv.reader(text.splitlines())
    next(rows)
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            image, finding = row[0].strip(), row[1].strip()
            x, y, w, h = (float(cell) for cell in row[2:6])
        except (IndexError, ValueError):
            raise _malformed(path, "NIH BBox_List_2017.csv rows: Image Index,Finding Label,x,y,w,h",
                             f"line {line}") from None
        if not image or not finding or not all(np.isfinite([x, y, w, h])):
            raise _malformed(path, "an image name, a finding and four finite numbers", f"line {line}")
        boxes.setdefault((image, finding), []).append((x, y, w, h))
    height, width = NIH_IMAGE_SIZE
    regions = [Region(image, finding, height, width, boxes=tuple(b)) for (image, finding), b in boxes.items()]
    return GroundTruth(path, "nih-boxes", regions)


# --- matching --------------------------------------------------------------------------------------


@dataclass
class Matched:
    """One file's regions matched to a pack and to the runs' labels."""

    truth: GroundTruth
    wanted: dict[str, dict[str, list[Region]]]
    """Pack key → run label → its non-empty regions (several: one union, e.g. two spellings)."""
    images: int
    """Images in the file with at least one non-empty region."""
    found: int
    """Of those, the images one sample of the split has."""
    not_in_pack: list[str]
    ambiguous: list[str]
    """Ids that several of the split's samples share (never scored)."""
    unknown_findings: dict[str, int]
    """Finding → non-empty regions whose finding names no label being explained."""
    empty: int
    """Empty regions (not scored)."""


@dataclass(frozen=True)
class Source:
    """What a packed sample says of its original file: its path and (height, width), if recorded."""

    path: str
    size: tuple[int, int] | None = None


def in_file_pixels(region: Region, size: tuple[int, int] | None) -> Region:
    """Boxes are in their image file's pixels: read them against the size the pack recorded for
    that file (else NIH's 1024 × 1024). Rasters carry their own size."""
    if not region.boxes or size is None:
        return region
    return dataclasses.replace(region, height=size[0], width=size[1])


def match(truth: GroundTruth, sources: dict[str, Source], labels: list[str]) -> Matched:
    """Pair the file's non-empty regions with the split's samples (`sources`: key → its source)."""
    keys_by_id: dict[str, list[str]] = {}
    for key, source in sources.items():
        image_id = truth.image_id(source.path)
        if image_id is not None:
            keys_by_id.setdefault(image_id, []).append(key)
    wanted: dict[str, dict[str, list[Region]]] = {}
    not_in_pack, ambiguous, found, unknown = set(), set(), set(), {}
    drawn = [region for region in truth.regions if not region.empty()]
    for region in drawn:
        keys = keys_by_id.get(truth.id_key(region.image), [])
        if len(keys) != 1:  # not in the split, or two of its samples: never guessed
            (ambiguous if keys else not_in_pack).add(region.image)
            continue
        found.add(region.image)
        label = resolve_finding(region.finding, labels)
        if label is None:
            unknown[region.finding] = unknown.get(region.finding, 0) + 1
        else:
            wanted.setdefault(keys[0], {}).setdefault(label, []).append(
                in_file_pixels(region, sources[keys[0]].size))
    return Matched(truth, wanted, len({r.image for r in drawn}), len(found), sorted(not_in_pack),
                   sorted(ambiguous), dict(sorted(unknown.items())), len(truth.regions) - len(drawn))
