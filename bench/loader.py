"""Loader throughput: the shard stream vs a seed-style ImageFolder/PIL loader vs a decode-only ceiling.

    python bench/loader.py [--patients 300] [--images 1200] [--workers 1 2]

All three read the same images (synthetic CheXpert, 320 px short side) and produce the same
training input: 224 px, light augmentation (random resized crop, small affine, brightness/
contrast), normalised. The baseline is what the seed projects did: one JPEG file per sample,
PIL decode, torchvision transforms, a DataLoader. The ceiling is a single process doing nothing
but decoding the very JPEG bytes the shards hold, the way the stream decodes them (libjpeg-turbo;
no augment, no batching, no IPC). A third row shows `warp_on="device"`: the loader side of a GPU
run, where workers only decode and the warp runs batched on the GPU (not measurable here): the
host batches as the device stage receives them (`Stream.host_batches`).
Images/s per core = images/s ÷ (loader workers, or 1 for the in-process ceiling).
The last two lines, both at 1 worker:
    loader (warp_on=device): vs_ceiling=<fraction>
    loader: vs_baseline=<ratio>x vs_ceiling=<fraction>      (the CPU-augmenting stream)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from _data import packed, source_tree
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from shards.stream import IMAGENET_GRAY, AugmentConfig, StreamConfig, train_stream
from shards.stream.decode import decode_gray

BATCH = 32
SIZE = 224


class SeedStyleFiles(Dataset):
    """The seeds' loader: a list of JPEG paths, PIL, torchvision transforms."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(SIZE, scale=(0.8, 1.0), ratio=(0.9, 1.1)),
            transforms.RandomAffine(0, translate=(0.03, 0.03)),
            transforms.ColorJitter(brightness=0.1, contrast=0.1),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_GRAY[0], IMAGENET_GRAY[1]),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("L"))


def timed(batches: Iterable, images: int, skip: int = 2) -> float:
    """Images/s after `skip` warm-up batches (worker start-up is not throughput)."""
    seen, started = 0, None
    for index, batch in enumerate(batches):
        size = len(batch["key"]) if isinstance(batch, dict) else len(batch)
        if index == skip:
            started, seen = time.perf_counter(), 0
        seen += size
        if started is not None and seen >= images:
            break
    if started is None:
        raise SystemExit("bench: too few images for the warm-up; raise --patients or lower --images")
    return seen / (time.perf_counter() - started)


def stream_rate(shards: Path, workers: int, images: int, warp_on: str = "worker") -> float:
    config = StreamConfig(shards=shards, batch_size=BATCH, image_size=SIZE, workers=workers,
                          augment=AugmentConfig.preset("light"), shuffle_buffer=256,
                          samples_per_epoch=images + 4 * BATCH, warp_on=warp_on)
    stream = train_stream(config)
    # warp_on=device: what the loader cores deliver; the warp is left to the GPU (none here).
    return timed(stream.batches() if warp_on == "worker" else stream.host_batches(), images)


def baseline_rate(paths: list[Path], workers: int, images: int) -> float:
    loader = DataLoader(SeedStyleFiles(paths), batch_size=BATCH, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0,
                        worker_init_fn=lambda _: torch.set_num_threads(1))
    return timed((batch for _ in itertools.count() for batch in loader), images)


def ceiling_rate(shards: Path, images: int) -> float:
    """Decode-only images/s in one process, exactly as the stream decodes (shards.stream.decode)."""
    blobs = []
    for tar_path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            blobs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    blobs = (blobs * (images // len(blobs) + 1))[:images]
    started = time.perf_counter()
    for blob in blobs:
        decode_gray(blob, "jpg", SIZE)
    return len(blobs) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--images", type=int, default=1200, help="images timed per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = source_tree(args.patients, 320)
    shards = packed(root)
    with (root / "CheXpert-v1.0-small" / "train.csv").open(newline="") as handle:
        paths = [root / row["Path"] for row in csv.DictReader(handle)]
    print(f"data: {len(paths)} source JPEGs ({root}), shards {shards}")
    print(f"batch {BATCH}, {SIZE} px, light augment, {torch.get_num_threads()} torch thread(s) per process")
    ceiling = ceiling_rate(shards, args.images)
    print(f"{'loader':<40}{'workers':>8}{'img/s':>9}{'img/s/core':>12}{'vs baseline':>13}")
    print(f"{'decode-only ceiling (shards.stream.decode)':<40}{'-':>8}{ceiling:>9.0f}{ceiling:>12.0f}")
    headline = {}
    for workers in args.workers:
        base = baseline_rate(paths, workers, args.images)
        ours = stream_rate(shards, workers, args.images)
        device = stream_rate(shards, workers, args.images, warp_on="device")
        cores = max(1, workers)
        rows = (("seed-style ImageFolder/PIL", base), ("cxrbench shard stream", ours),
                ("  same, warp_on=device (loader side)", device))
        for name, rate in rows:
            print(f"{name:<40}{workers:>8}{rate:>9.0f}{rate / cores:>12.0f}{rate / base:>12.2f}x")
        headline.setdefault("ratio", ours / base)
        headline.setdefault("ceiling", ours / cores / ceiling)
        headline.setdefault("device", device / cores / ceiling)
    print(f"loader (warp_on=device): vs_ceiling={headline['device']:.2f}")
    print(f"loader: vs_baseline={headline['ratio']:.2f}x vs_ceiling={headline['ceiling']:.2f}")


if __name__ == "__main__":
    main()
