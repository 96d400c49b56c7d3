"""`python -m trainer.explain --run RUN [RUN ...] --shards DIR --split test [--n 32] [--labels ...]
[--methods gradcam,gradcam++,rollout] [--ground-truth FILE ...] [--threshold otsu|T] --out DIR`:
heatmaps, a gallery and localization scores (against radiologists' annotations too)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.explain import DEFAULT_METHODS


def _names(values: list[str] | None) -> tuple[str, ...] | None:
    """Comma-separated and/or repeated values → names (a preset such as competition5 expands)."""
    if not values:
        return None
    from shards.labels import LABEL_SETS  # noqa: PLC0415

    names: list[str] = []
    for value in values:
        for name in (part.strip() for part in value.split(",")):
            if name:
                names += LABEL_SETS.get(name, (name,))
    return tuple(dict.fromkeys(names))


def _threshold(text: str) -> float | None:
    """otsu → None (Otsu's method), else a number in [0, 1)."""
    if text.lower() == "otsu":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected otsu or a number in [0, 1)") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected otsu or a number in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.explain",
        description="Grad-CAM / Grad-CAM++ / attention rollout for trained runs, scored against "
                    "lesion masks.")
    parser.add_argument("--run", action="extend", nargs="+", type=Path, required=True,
                        help="run directory with best/ (repeat or list several to compare side by side)")
    parser.add_argument("--shards", type=Path, help="shards to read (default: each run's data.shards)")
    parser.add_argument("--split", default="test", help="split to explain (default test)")
    parser.add_argument("--n", type=int, default=32,
                        help="samples per label: top-scoring true positives, a quarter random (default 32)")
    parser.add_argument("--labels", action="extend", nargs="+",
                        help="labels, comma-separated or a preset (default: every label the runs share)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from gradcam, gradcam++, rollout, rollout-max "
                             f"(default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8,
                        help="deletion/insertion curve steps; 0 skips these faithfulness curves")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random share of samples")
    parser.add_argument("--workers", type=int, default=1, help="loader processes per stream")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--ground-truth", action="extend", nargs="+", type=Path, default=[], metavar="FILE",
                        help="radiologists' annotations to score every method against, told apart by "
                             "content: CheXlocalize gt_segmentations_*.json (COCO RLE) or "
                             "gt_annotations_*.json (polygons), or NIH BBox_List_2017.csv (boxes); "
                             "hit rate, mIoU and a random-point baseline per label")
    parser.add_argument("--threshold", type=_threshold, default=None, metavar="otsu|T",
                        help="how a heatmap is binarized for mIoU: otsu (default, as CheXlocalize) or "
                             "a fraction T of its min-max range")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from shards.errors import DataError  # noqa: PLC0415 - keeps --help fast
    from trainer.config import ConfigError  # noqa: PLC0415
    from trainer.explain.job import ExplainOptions, explain  # noqa: PLC0415
    from trainer.explain.loading import ExplainError  # noqa: PLC0415

    options = ExplainOptions(
        runs=tuple(args.run), out=args.out, shards=args.shards, split=args.split, n=args.n,
        labels=_names(args.labels), methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        device=args.device,
        batch_size=args.batch_size, steps=args.steps, seed=args.seed, workers=args.workers,
        progress=args.progress, ground_truth=tuple(args.ground_truth), threshold=args.threshold)
    try:
        scores = explain(options)
    except (ExplainError, ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for model, methods in scores.items():
        for method, labels in methods.items():
            cells = [c for c in labels.values() if c["n"]]
            hits = sum(c["pointing_game"] * c["n"] for c in cells)
            chance = sum(c["random_pointing"] * c["n"] for c in cells)
            total = sum(c["n"] for c in cells)
            if total:
                print(f"{model} {method}: pointing game {hits / total:.3f} (random point "
                      f"{chance / total:.3f}) over {total} positive samples with lesion masks")
    if args.ground_truth:
        _print_ground_truth(args.out)
    print(f"explain: wrote {args.out}/index.html and {args.out}/localization.json")
    return 0


def _print_ground_truth(out: Path) -> None:
    import json  # noqa: PLC0415

    for entry in json.loads((out / "ground_truth.json").read_text())["files"]:
        for model, methods in entry["pooled"].items():
            for method, cell in methods.items():
                print(f"{model} {method} vs {entry['path']}: hit rate {cell['hit_rate']} (random point "
                      f"{cell['random_point']}), mIoU {cell['miou']} over n={cell['n']}")
    print(f"explain: wrote {out}/ground_truth.json and {out}/ground_truth.md")


if __name__ == "__main__":
    sys.exit(main())
