"""`python -m shards.synth --layout chexpert|pneumonia|nih|mimic --out DIR [--patients N ...]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shards.errors import DataError, run_cli
from shards.synth import (
    ChexpertOptions,
    MimicOptions,
    NihOptions,
    PneumoniaOptions,
    SynthSummary,
    generate_chexpert,
    generate_mimic,
    generate_nih,
    generate_pneumonia,
)

LAYOUTS = ("chexpert", "pneumonia", "nih", "mimic")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shards.synth",
        description="Write a synthetic CheXpert, Kaggle-pneumonia, NIH ChestX-ray14 or MIMIC-CXR-JPG tree "
                    "(images, tables, lesion masks).",
    )
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--out", required=True, type=Path,
                        help="folder to write DIR/CheXpert-v1.0-small/, DIR/chest_xray/, DIR/CXR8/ or "
                             "DIR/mimic-cxr-jpg/2.0.0/, and DIR/masks/")
    parser.add_argument("--patients", type=int, default=64,
                        help="train patients (CheXpert) or patients in all splits (the others); default 64")
    parser.add_argument("--valid-patients", type=int, default=None,
                        help="CheXpert valid.csv patients (default: patients // 8, at least 2)")
    parser.add_argument("--size", type=int, default=320, help="shorter image side in pixels (default 320)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rates", choices=("realistic", "balanced"), default="realistic",
                        help="CheXpert/NIH/MIMIC label rates: as in the real tables, or 30%% positive each")
    parser.add_argument("--nih-source", choices=("kaggle", "box"), default="kaggle",
                        help="NIH: Kaggle's Data_Entry_2017.csv + images_NNN/images/ (default) or the Box "
                             "share's Data_Entry_2017_v2020.csv + images/")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.patients < 1 or args.size < 32 or args.workers < 1 or not 1 <= args.quality <= 100:
        raise DataError("--patients and --workers must be ≥ 1, --size ≥ 32, --quality in 1..100")
    print(generate(args).line())
    return 0


def generate(args: argparse.Namespace) -> SynthSummary:
    common = {"out": args.out, "patients": args.patients, "size": args.size, "seed": args.seed,
              "workers": args.workers}
    if args.layout == "chexpert":
        return generate_chexpert(ChexpertOptions(**common, valid_patients=args.valid_patients,
                                                 rates=args.rates, quality=args.quality))
    if args.layout == "nih":
        return generate_nih(NihOptions(**common, rates=args.rates, source=args.nih_source))
    if args.layout == "mimic":
        return generate_mimic(MimicOptions(**common, rates=args.rates, quality=args.quality))
    return generate_pneumonia(PneumoniaOptions(**common, quality=args.quality))


if __name__ == "__main__":
    sys.exit(run_cli(main))
