"""`python -m shards.synth --layout chexpert|pneumonia --out DIR [--patients N] [--size PX] [--seed S]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shards.errors import DataError, run_cli
from shards.synth import ChexpertOptions, PneumoniaOptions, generate_chexpert, generate_pneumonia


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shards.synth",
        description="Write a synthetic CheXpert or Kaggle-pneumonia tree (images, CSVs, lesion masks).",
    )
    parser.add_argument("--layout", required=True, choices=("chexpert", "pneumonia"))
    parser.add_argument("--out", required=True, type=Path,
                        help="folder to write DIR/CheXpert-v1.0-small/ or DIR/chest_xray/, and DIR/masks/")
    parser.add_argument("--patients", type=int, default=64,
                        help="train patients (CheXpert) or persons in all splits (pneumonia); default 64")
    parser.add_argument("--valid-patients", type=int, default=None,
                        help="CheXpert valid.csv patients (default: patients // 8, at least 2)")
    parser.add_argument("--size", type=int, default=320, help="shorter image side in pixels (default 320)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rates", choices=("realistic", "balanced"), default="realistic",
                        help="CheXpert label rates: as in the real train.csv, or 30%% positive everywhere")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.patients < 1 or args.size < 32 or args.workers < 1 or not 1 <= args.quality <= 100:
        raise DataError("--patients and --workers must be ≥ 1, --size ≥ 32, --quality in 1..100")
    if args.layout == "chexpert":
        summary = generate_chexpert(ChexpertOptions(
            out=args.out, patients=args.patients, valid_patients=args.valid_patients, size=args.size,
            seed=args.seed, rates=args.rates, workers=args.workers, quality=args.quality))
    else:
        summary = generate_pneumonia(PneumoniaOptions(
            out=args.out, patients=args.patients, size=args.size, seed=args.seed, workers=args.workers,
            quality=args.quality))
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
