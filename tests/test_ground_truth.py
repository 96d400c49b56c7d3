"""Heatmaps scored against radiologists' ground truth: COCO RLE, the three file layouts (CheXlocalize
RLE and polygons, NIH boxes) at their original resolutions mapped onto the model's grid, hit rate and
Otsu mIoU on constructed maps, name and image matching, refusals, and the explain job end to end on
the shared trained CNN with ground truth converted from a synthetic tree's lesion masks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shards.labels import CHEXPERT_LABELS, COMPETITION5, NIH_LABELS
from shards.lesion import decode_lesion, label_bit
from shards.pack import PackOptions, pack
from shards.synth import ChexpertOptions, generate_chexpert
from trainer.explain import rle
from trainer.explain.__main__ import main
from trainer.explain.ground_truth import (
    Region,
    Source,
    chexlocalize_id,
    match,
    nih_id,
    read_ground_truth,
    resolve_finding,
)
from trainer.explain.loading import ExplainError
from trainer.explain.localization import GroundTruthScore, binarize, iou, otsu_threshold
from trainer.report.__main__ import main as report_main

# --- COCO RLE ----------------------------------------------------------------------------------------


def test_rle_reads_and_writes_coco_counts_written_out_by_hand() -> None:
    # Column-major runs of [[0,1,0],[0,1,1],[0,0,0]]: 3 zeros, 2 ones, 2 zeros, 1 one, 1 zero. From
    # the fourth run on COCO stores the difference to the run two before (1 − 2 = −1 → 'O').
    mask = np.array([[0, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=bool)
    assert rle.encode(mask) == {"size": [3, 3], "counts": "322OO"}
    assert rle.string_to_counts("322OO").tolist() == [3, 2, 2, 1, 1]
    assert np.array_equal(rle.decode({"size": [3, 3], "counts": "322OO"}), mask)
    assert np.array_equal(rle.decode({"size": [3, 3], "counts": [3, 2, 2, 1, 1]}), mask), "uncompressed"
    # 100 = 0b11_00100: low group 4 with the continuation bit (4 + 32 + 48 = 'T'), then 3 ('3').
    assert rle.counts_to_string([100]) == "T3" and rle.string_to_counts("T3").tolist() == [100]
    assert rle.encode(np.ones((2, 2), bool))["counts"] == "04", "a mask starting with ones: empty zero run"
    rng = np.random.default_rng(0)
    for _ in range(50):
        blob = np.kron(rng.random((3, 4)) < 0.5, np.ones((int(rng.integers(1, 60)), 7), bool))
        assert np.array_equal(rle.decode(rle.encode(blob)), blob)
    for bad in ({"size": [3, 3], "counts": "322O"}, {"size": [3, 3], "counts": "32\x7f"}, {"size": [3]}):
        with pytest.raises(rle.RLEError):
            rle.decode(bad)


# --- geometry: annotations at the original size → the model's grid ------------------------------------


def test_annotations_at_another_resolution_cover_the_pixels_computed_by_hand() -> None:
    # NIH: 1024 px box → 64 px grid (16 original px per cell). Cell j covers x = 16j + 8 at its centre:
    # 256 ≤ 16j + 8 < 512 ⇔ 15.5 ≤ j < 31.5 → columns 16..31; 512 ≤ 16i + 8 < 640 → rows 32..39.
    box = Region("00000001_000.png", "Effusion", 1024, 1024, boxes=((256.0, 512.0, 256.0, 128.0),))
    expected = np.zeros((64, 64), bool)
    expected[32:40, 16:32] = True
    assert np.array_equal(box.mask(64), expected)
    # A fractional box: 100 ≤ 16j + 8 < 150 ⇔ 5.75 ≤ j < 8.875 → columns 6..8; 10 ≤ 16i + 8 < 27 → i = 1.
    small = Region("x.png", "Nodule", 1024, 1024, boxes=((100.0, 10.0, 50.0, 17.0),))
    assert np.argwhere(small.mask(64)).tolist() == [[1, 6], [1, 7], [1, 8]]
    # CheXlocalize, non-square 2000 × 2400 (h × w) → 96 px: a polygon filled as Pillow does (outline
    # included: x 600..1199, y 500..999). Column j reads original x = ⌊25 (j + ½)⌋ ∈ [600, 1199] ⇔
    # j ∈ 24..47; row i reads y = ⌊20.83 (i + ½)⌋ ∈ [500, 999] ⇔ i ∈ 24..47.
    corners = ((600.0, 500.0), (1199.0, 500.0), (1199.0, 999.0), (600.0, 999.0))
    polygon = Region("patient64541_study1_view1_frontal", "Cardiomegaly", 2000, 2400, polygons=(corners,))
    full = np.zeros((2000, 2400), bool)
    full[500:1000, 600:1200] = True
    assert np.array_equal(polygon.full_mask(), full)
    expected = np.zeros((96, 96), bool)
    expected[24:48, 24:48] = True
    assert np.array_equal(polygon.mask(96), expected)
    # The same region as CheXlocalize's RLE, and as a box [600, 1200) × [500, 1000), gives the same
    # pixels: 600 ≤ 25 (j + ½) < 1200 ⇔ j ∈ 24..47; 500 ≤ 20.83 (i + ½) < 1000 ⇔ i ∈ 24..47.
    runs = rle.parse(rle.encode(full))[2]
    assert np.array_equal(Region("p", "Cardiomegaly", 2000, 2400, runs=runs).mask(96), expected)
    assert np.array_equal(Region("p", "Cardiomegaly", 2000, 2400, boxes=((600, 500, 600, 500),)).mask(96),
                          expected)
    assert Region("p", "Edema", 4, 4, runs=np.array([16])).empty() and not polygon.empty()


# --- scores -----------------------------------------------------------------------------------------


def test_pointing_game_and_otsu_miou_on_constructed_maps() -> None:
    truth = np.zeros((8, 8), bool)
    truth[2:6, 3:7] = True  # 16 px
    inside = np.full((8, 8), 0.1, np.float32)
    inside[2:6, 2:6] = 1.0  # a 16 px block one column left of the truth: 12 px overlap, 20 px union
    outside = np.zeros((8, 8), np.float32)
    outside[7, 0] = 1.0
    score = GroundTruthScore()
    score.add(inside, truth)
    score.add(outside, truth)
    score.add(np.ones((8, 8), np.float32), truth)  # flat: points nowhere, binarizes to nothing
    cell = score.as_dict()
    # IoU: 12 / 20 for the block; 0 for the lone pixel outside (0 of 1 + 16); none for the flat map.
    assert cell == {"hit_rate": round(1 / 3, 4), "random_point": 0.25, "miou": round((12 / 20 + 0) / 2, 4),
                    "n": 3, "n_iou": 2}, cell
    # Three levels 0 / ½ / 1 (40, 12, 12 px) → uint8 0 / 127 / 255. Between-class variance: t < 127
    # splits {0} | {127, 255}: .625 · .375 · 191² = 8550; t ≥ 127 splits {0, 127} | {255}:
    # .8125 · .1875 · 225.7² = 7760. Otsu takes t = 0: both upper levels are foreground.
    levels = np.zeros((8, 8), np.float32)
    levels[:3, :4] = 0.5
    levels[5:, :4] = 1.0
    assert otsu_threshold((255 * levels).astype(np.uint8)) == 0
    assert np.array_equal(binarize(levels), levels > 0)
    assert np.array_equal(binarize(levels, 0.6), levels == 1.0), "a fixed threshold on the [0, 1] map"
    assert iou(binarize(levels), levels == 1.0) == 12 / 24 and iou(levels > 2, truth) is None


def test_otsu_binarizes_as_opencv_does() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for k in range(200):
        values = (rng.random((12, 14)) ** (1 + k % 4) * 255).astype(np.uint8)
        _, reference = cv2.threshold(values, 0, 255, cv2.THRESH_OTSU)
        assert np.array_equal(values > otsu_threshold(values), reference > 0), k


# --- names, ids, files -------------------------------------------------------------------------------


def test_findings_and_images_are_matched_by_meaning_and_source() -> None:
    assert resolve_finding("Airspace Opacity", CHEXPERT_LABELS) == "Lung Opacity"
    assert resolve_finding("Effusion", COMPETITION5) == "Pleural Effusion"
    assert resolve_finding("Pleural Effusion", NIH_LABELS) == "Effusion"
    assert resolve_finding("Infiltrate", NIH_LABELS) == "Infiltration"
    for name in ("Infiltrate", "Mass", "Lung Opacity", "Airspace Opacity"):
        assert resolve_finding(name, COMPETITION5) is None, name
    assert chexlocalize_id("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg") == \
        "patient64541_study1_view1_frontal"
    assert chexlocalize_id("CheXpert-v1.0/test/patient64741/study1/view2_lateral.jpg") == \
        "patient64741_study1_view2_lateral"
    assert chexlocalize_id("images/00000001_000.png") is None
    assert nih_id("images_001/images/00000001_000.png") == nih_id("images/00000001_000.jpg") == "00000001_000"


def write_layouts(folder: Path) -> tuple[Path, Path, Path]:
    """The three files laid out as the real ones are, under names that do not give the kind away."""
    full = np.zeros((20, 30), bool)
    full[5:10, 6:12] = True
    segmentations = {"patient64541_study1_view1_frontal": {
        name: rle.encode(full if name == "Airspace Opacity" else np.zeros((20, 30), bool))
        for name in ("Airspace Opacity", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                     "Enlarged Cardiomediastinum", "Lung Lesion", "Pleural Effusion", "Pneumothorax",
                     "Support Devices")}}
    annotations = {"patient64541_study1_view1_frontal": {
        "img_size": [20, 30], "Airspace Opacity": [[[6, 5], [11, 5], [11, 9], [6, 9]]]}}
    paths = folder / "a.json", folder / "b.json", folder / "c.csv"
    paths[0].write_text(json.dumps(segmentations))
    paths[1].write_text(json.dumps(annotations))
    paths[2].write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                        "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,"
                        "79.1864406779661\n00013118_008.png,Infiltrate,1,2,3,4\n"
                        "00013118_008.png,Atelectasis,600,600,10,10\n")
    return paths


def test_files_are_told_apart_by_content_and_malformed_ones_refused(tmp_path: Path) -> None:
    seg_path, ann_path, box_path = write_layouts(tmp_path)
    segmentations, annotations, boxes = (read_ground_truth(p) for p in (seg_path, ann_path, box_path))
    assert (segmentations.kind, annotations.kind, boxes.kind) == (
        "chexlocalize-segmentations", "chexlocalize-polygons", "nih-boxes")
    assert len(segmentations.regions) == 10 and sum(not r.empty() for r in segmentations.regions) == 1
    drawn = next(r for r in segmentations.regions if not r.empty())
    assert np.array_equal(drawn.full_mask(), annotations.regions[0].full_mask()), "RLE = filled polygon"
    atelectasis = next(r for r in boxes.regions if r.finding == "Atelectasis")
    assert len(atelectasis.boxes) == 2 and (atelectasis.height, atelectasis.width) == (1024, 1024)
    sources = {"k1": Source("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"),
               "k2": Source("images_003/images/00013118_008.png")}
    matched = match(segmentations, sources, list(CHEXPERT_LABELS))
    assert list(matched.wanted) == ["k1"] and list(matched.wanted["k1"]) == ["Lung Opacity"]
    assert matched.empty == 9 and matched.not_in_pack == [] and (matched.images, matched.found) == (1, 1)
    on_competition5 = match(boxes, sources, list(COMPETITION5))
    assert list(on_competition5.wanted["k2"]) == ["Atelectasis"]
    assert on_competition5.unknown_findings == {"Infiltrate": 1}
    (unsized,) = on_competition5.wanted["k2"]["Atelectasis"]
    assert (unsized.height, unsized.width) == (1024, 1024), "NIH's own size when the pack has none"
    resized = match(boxes, {"k2": Source(sources["k2"].path, (512, 256))}, list(COMPETITION5))
    (sized,) = resized.wanted["k2"]["Atelectasis"]
    assert (sized.height, sized.width) == (512, 256) and sized.boxes == unsized.boxes, \
        "boxes read in the pixels of the file the pack recorded"
    assert match(boxes, {"k3": Source("other.png")}, list(COMPETITION5)).not_in_pack == ["00013118_008.png"]
    assert match(boxes, {**sources, "k4": Source("images/00013118_008.jpg")},
                 list(COMPETITION5)).ambiguous == ["00013118_008.png"]
    broken = {
        "list.json": ("[1, 2]", "expected CheXlocalize gt_segmentations"),
        "sum.json": (json.dumps({"p": {"Edema": {"size": [3, 3], "counts": "32"}}}),
                     "at p / Edema: run lengths add up to 5, not 3×3"),
        "poly.json": (json.dumps({"p": {"img_size": [4, 4], "Edema": [[["a", 1]]]}}), "at p / Edema"),
        "rows.csv": ("Image Index,Finding Label,Bbox [x,y,w,h],,,\nx.png,Mass,1,2\n", "at line 2"),
        "other.csv": ("Path,Sex\nx.jpg,M\n", "at line 1"),
    }
    for name, (text, expected) in broken.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ExplainError) as caught:
            read_ground_truth(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"--ground-truth {tmp_path / name}: ") and expected in message, message
        assert "\n" not in message


def test_the_cli_refuses_a_malformed_file_in_one_line_before_loading_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "gt_segmentations_val.json"
    bad.write_text('{"p": {"Edema": {"size": [3, 3], "counts": "3"}}}')
    code = main(["--run", str(tmp_path / "no-run"), "--out", str(tmp_path / "out"),
                 "--ground-truth", str(bad)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: --ground-truth {bad}: malformed")
    with pytest.raises(SystemExit):
        main(["--run", "r", "--out", "o", "--threshold", "1.5"])


# --- end to end ---------------------------------------------------------------------------------------

CHEXLOCALIZE = {"Lung Opacity": "Airspace Opacity"} | {
    name: name for name in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                            "Enlarged Cardiomediastinum", "Lung Lesion", "Pleural Effusion", "Pneumothorax",
                            "Support Devices")}
"""CheXpert label → CheXlocalize pathology."""
NIH = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion",
       "Pneumothorax": "Pneumothorax", "Lung Opacity": "Infiltrate"}
"""CheXpert label → the BBox_List_2017.csv finding written for it (Infiltrate: no competition-5 label)."""


def nih_names(root: Path) -> list[dict]:
    """Give the valid images NIH-style unique file names (<patient>_<n>.jpg; masks follow), so one
    pack serves both id schemes; returns the valid rows with their images' mask bits."""
    table = root / "CheXpert-v1.0-small" / "valid.csv"
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    images = []
    for number, row in enumerate(rows[1:]):
        old = Path(row[0])
        new = old.with_name(f"{int(old.parts[2][7:]):08d}_{number:03d}.jpg")
        (root / old).rename(root / new)
        mask = (root / "masks" / old).with_suffix(".png")
        bits = None
        if mask.is_file():
            bits = decode_lesion(mask.read_bytes())
            mask.rename((root / "masks" / new).with_suffix(".png"))
        row[0] = str(new)
        images.append({"source": str(new), "bits": bits})
    with table.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return images


def bounding_box(plane: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(plane)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def ground_truth_files(images: list[dict], folder: Path) -> tuple[Path, Path, Path]:
    """The lesion masks as CheXlocalize RLE at twice the resolution (exact), and their bounding
    boxes as CheXlocalize polygons (twice the resolution) and NIH boxes (in the image file's pixels,
    which the pack records, as BBox_List_2017.csv's are in the 1024-pixel PNGs')."""
    segmentations, annotations = {}, {}
    boxes: list[list] = [["Image Index", "Finding Label", "Bbox [x,y,w,h]", "", "", ""]]
    for image in images:
        bits, image_id = image["bits"], chexlocalize_id(image["source"])
        if bits is None:
            bits = np.zeros((2, 2), np.uint16)  # no lesion: every CheXlocalize mask empty
        height, width = bits.shape
        segmentations[image_id] = {}
        for label, pathology in CHEXLOCALIZE.items():
            plane = (bits & label_bit(CHEXPERT_LABELS.index(label))) != 0
            segmentations[image_id][pathology] = rle.encode(np.kron(plane, np.ones((2, 2), bool)))
            if not plane.any():
                continue
            top, bottom, left, right = bounding_box(plane)
            corners = [[2 * left, 2 * top], [2 * right + 1, 2 * top], [2 * right + 1, 2 * bottom + 1],
                       [2 * left, 2 * bottom + 1]]
            annotations.setdefault(image_id, {"img_size": [2 * height, 2 * width]})[pathology] = [corners]
            if label in NIH:
                boxes.append([f"{Path(image['source']).stem}.png", NIH[label], left, top,
                              right + 1 - left, bottom + 1 - top])
    outside = np.zeros((40, 30), bool)
    outside[3:9, 4:8] = True
    segmentations["patient99999_study1_view1_frontal"] = {"Edema": rle.encode(outside)}
    boxes.append(["99999999_000.png", "Atelectasis", 10, 10, 50, 50])
    paths = (folder / "gt_segmentations_val.json", folder / "gt_annotations_val.json",
             folder / "BBox_List_2017.csv")
    paths[0].write_text(json.dumps(segmentations))
    paths[1].write_text(json.dumps(annotations))
    with paths[2].open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(boxes)
    return paths


@pytest.fixture(scope="module")
def annotated_pack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A small synthetic CheXpert tree (valid images NIH-named), packed at its own size (128 px:
    nothing resized, so the pack's lesion masks are the drawn ones)."""
    root = tmp_path_factory.mktemp("gt-src")
    generate_chexpert(ChexpertOptions(out=root, patients=4, valid_patients=16, size=128, seed=3,
                                      rates="balanced"))
    images = nih_names(root)
    out = tmp_path_factory.mktemp("gt-shards")
    pack(PackOptions(layout="chexpert", root=root, out=out, size=128, shard_samples=16, workers=1),
         print_=lambda _: None)
    return out, images


@pytest.mark.slow
def test_explain_scores_every_format_against_the_synthetic_lesions(cnn_run: Path, annotated_pack: tuple,
                                                                   tmp_path: Path) -> None:
    shards, images = annotated_pack
    run = tmp_path / "cnn"  # a copy: the job writes RUN/localization/, and cnn_run is shared read-only
    shutil.copytree(cnn_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    files = ground_truth_files(images, tmp_path)
    out = tmp_path / "explain"
    code = main(["--run", str(run), "--shards", str(shards), "--split", "test", "--n", str(4 * len(images)),
                 "--steps", "0", "--methods", "gradcam", "--workers", "0", "--out", str(out), "--no-progress",
                 "--ground-truth", *map(str, files)])
    assert code == 0
    report = json.loads((out / "ground_truth.json").read_text())
    segmentations, polygons, boxes = report["files"]
    assert [f["kind"] for f in report["files"]] == ["chexlocalize-segmentations", "chexlocalize-polygons",
                                                    "nih-boxes"]
    # Exact masks (RLE at 2× the drawn size) land on the very pixels the stream's lesion masks do: the
    # same samples, the same area shares as the job's synthetic-mask scores.
    synthetic = json.loads((out / "localization.json").read_text())["cnn"]["gradcam"]
    exact = segmentations["scores"]["cnn"]["gradcam"]
    assert set(exact) == {label for label in COMPETITION5 if synthetic[label]["n"]}
    for label, cell in exact.items():
        assert cell["n"] == synthetic[label]["n"], label
        assert cell["random_point"] == synthetic[label]["random_pointing"], label
        assert abs(cell["hit_rate"] - synthetic[label]["pointing_game"]) <= 1 / cell["n"] + 1e-9, label
        assert 0 < cell["n_iou"] <= cell["n"] and 0 <= cell["miou"] <= 1, "a flat Grad-CAM has no IoU"
    # Bounding boxes as CheXlocalize polygons (2×) and as NIH boxes (1024 px) cover the same pixels.
    nih = boxes["scores"]["cnn"]["gradcam"]
    assert set(nih) == {"Atelectasis", "Cardiomegaly", "Pleural Effusion"} & set(exact)
    for label in nih:
        assert nih[label] == polygons["scores"]["cnn"]["gradcam"][label], label
        assert nih[label]["random_point"] >= exact[label]["random_point"], "a box holds its lesion"
    pooled = segmentations["pooled"]["cnn"]["gradcam"]
    assert pooled["n"] >= 15 and pooled["hit_rate"] > pooled["random_point"], pooled
    coverage = segmentations["runs"]["cnn"]
    assert coverage["not_in_pack"] == {"count": 1, "examples": ["patient99999_study1_view1_frontal"]}
    assert coverage["not_positive"] == 0 and coverage["ambiguous"]["count"] == 0
    assert coverage["images_in_pack"] == coverage["images_with_regions"] - 1 >= coverage["images_scored"] > 0
    assert set(coverage["unknown_findings"]) <= {"Airspace Opacity", "Lung Lesion", "Pneumothorax",
                                                 "Enlarged Cardiomediastinum", "Support Devices"}
    assert boxes["runs"]["cnn"]["not_in_pack"]["count"] == 1
    assert set(boxes["runs"]["cnn"]["unknown_findings"]) <= {"Infiltrate", "Pneumothorax"}
    table = (out / "ground_truth.md").read_text()
    assert "| cnn | gradcam | all labels |" in table and "Published: CheXlocalize" in table
    # The run directory keeps one file per ground truth; the report shows them beside CheXlocalize's.
    kept = sorted(p.name for p in (run / "localization").glob("*.json"))
    assert kept == ["BBox_List_2017-test.json", "gt_annotations_val-test.json",
                    "gt_segmentations_val-test.json"]
    assert report_main(["--runs", str(run), "--out", str(tmp_path / "report"), "--resamples", "20"]) == 0
    page = (tmp_path / "report" / "index.md").read_text()
    assert "## Localization against radiologists' ground truth" in page
    assert "| cnn | resnet10t | gt_segmentations_val-test (test, otsu) | gradcam | all labels |" in page
    assert "| Lung Lesion | – | 0.027 | 0.855 | 0.424 |" in page
