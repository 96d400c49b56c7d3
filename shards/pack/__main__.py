"""Pack a CheXpert, Kaggle-pneumonia, NIH ChestX-ray14 or MIMIC-CXR-JPG tree into tar shards.

The command line only: options in, `PackOptions` out, the job itself in `shards.pack.job`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from shards.errors import run_cli
from shards.pack.encode import IMAGE_FORMATS
from shards.pack.job import PackOptions, pack
from shards.pack.sources import LAYOUTS
from shards.pack.split import DEFAULT_SALT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards.pack", description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--root", required=True, type=Path,
                        help="folder holding CheXpert-v1.0-small/ (or CheXpert-v1.0/), chest_xray/, "
                             "NIH's Data_Entry_2017*.csv (or a folder with it) or mimic-cxr-jpg/<version>/")
    parser.add_argument("--out", required=True, type=Path, help="shard directory to write")
    parser.add_argument("--size", type=int, default=320, help="shorter side in pixels (default 320)")
    parser.add_argument("--format", dest="fmt", choices=IMAGE_FORMATS, default="jpg",
                        help="jpg (default), png (lossless) or npy (raw uint8, no decode cost)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="encoding processes (output is identical for any value)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of train patients held out as val (default 0.1)")
    parser.add_argument("--salt", default=DEFAULT_SALT, help="changes which patients go to val")
    parser.add_argument("--shard-samples", type=int, default=2000, help="max samples per shard")
    parser.add_argument("--shard-bytes", type=int, default=512 << 20, help="max bytes per shard")
    parser.add_argument("--no-masks", dest="masks", action="store_false",
                        help="do not store lesion masks even where <root>/masks/ has them")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing pack in --out with other options, then pack")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = PackOptions(**vars(args))
    pack(options)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
