"""`python -m shards.demo`: the data half of cxrbench end to end on synthetic CheXpert, on a CPU.

Generate a CheXpert-layout tree → pack it into WebDataset shards → stream a few training and
evaluation batches → print the shard summary. Re-running reuses what is already there (the
synthetic tree if present, the pack as a no-op), so the second run takes seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from shards.errors import run_cli
from shards.pack import PackOptions, pack
from shards.stream import AugmentConfig, StreamConfig, eval_stream, train_stream
from shards.synth import ChexpertOptions, generate_chexpert
from shards.synth.chexpert import DATASET_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"),
                        help="working folder: <out>/source (synthetic tree), <out>/shards (default demo/)")
    parser.add_argument("--patients", type=int, default=200, help="synthetic train patients (default 200)")
    parser.add_argument("--size", type=int, default=320, help="image short side, as CheXpert-small (320)")
    parser.add_argument("--batches", type=int, default=4, help="training batches to stream (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="pack and loader processes (default 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source, shards = args.out / "source", args.out / "shards"
    if (source / DATASET_DIR / "valid.csv").is_file():
        print(f"synth: reusing {source / DATASET_DIR}")
    else:
        summary = generate_chexpert(ChexpertOptions(out=source, patients=args.patients, size=args.size,
                                                    workers=args.workers))
        print(summary.line())
    pack(PackOptions(layout="chexpert", root=source, out=shards, size=args.size, workers=args.workers))

    config = StreamConfig(shards=shards, batch_size=16, image_size=224, workers=args.workers,
                          labels="competition5", augment=AugmentConfig.preset("light"))
    train = train_stream(config)
    started, images = time.perf_counter(), 0
    for step, batch in enumerate(train.batches()):
        images += len(batch["key"])
        if step == 0:
            print(f"train batch: image {tuple(batch['image'].shape)} {batch['image'].dtype}, "
                  f"target {tuple(batch['target'].shape)}, labels {', '.join(train.label_names)}")
        if step + 1 >= args.batches:
            break
    rate = images / (time.perf_counter() - started)
    evaluated = sum(len(batch["key"]) for batch in eval_stream(replace(config, split="val")).batches())
    print(f"streamed {images} augmented training images ({rate:.0f} img/s incl. worker start-up), "
          f"{evaluated} val images exactly once; pos_weight "
          f"{', '.join(f'{w:.2f}' for w in train.pos_weight.tolist())}")
    print(f"shards: {shards.resolve()} (manifest.json, rejects.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
