"""What the shard check before training costs (data.verify_shards): MB/s of sha256, time of size.

    python bench/verify.py [--shards DIR] [--scale-mb 1024]

The check every training start runs (trainer/packcheck.py → shards.verify.check_shard), timed in
one process over every shard of train, val and test:
- the demo pack (`python -m trainer.demo`'s: 400 patients at 96 px; built in the bench cache
  unless --shards names one), what trainer/configs/demo_cpu.yaml trains on;
- the 320 px CheXpert-small-like pack of bench/_data, its shards copied until they hold
  --scale-mb (hashing does not depend on what the bytes are; a real pack of that size would take
  minutes to synthesise), for a steady rate free of per-file costs;
each from the page cache (warm: a requeued job on a node that just read the pack) and from the disk
(cold: each file's pages dropped with posix_fadvise first), with 1 and 2 threads (the trainer
hashes with data.workers threads per rank, the loader's cores being idle then).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _data import CACHE, packed, source_tree

from shards.manifest import ShardInfo, load_manifest
from shards.verify import check_shard
from trainer.demo import prepare_data

SPLITS = ("train", "val", "test")


def shards_of(pack_dir: Path) -> list[ShardInfo]:
    manifest = load_manifest(pack_dir)
    return [shard for split in SPLITS for shard in manifest.shards(split)]


def replicated(pack_dir: Path, megabytes: int) -> list[ShardInfo]:
    """The pack's shards copied under new names until they hold `megabytes` (with their entries)."""
    out = CACHE / f"verify-scale-{megabytes}mb"
    originals = shards_of(pack_dir)
    copies, total, index = [], 0, 0
    out.mkdir(parents=True, exist_ok=True)
    while total < megabytes * 1e6:
        source = originals[index % len(originals)]
        target = out / f"train-{index:06d}.tar"
        if not target.is_file() or target.stat().st_size != source.bytes:
            shutil.copyfile(source.path, target)
        copies.append(ShardInfo(target, source.samples, source.bytes, source.sha256))
        total += source.bytes or 0
        index += 1
    return copies


def drop_from_cache(shards: list[ShardInfo]) -> None:
    for shard in shards:
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(shards: list[ShardInfo], mode: str, threads: int, cold: bool) -> float:
    if cold:
        drop_from_cache(shards)
    else:
        for shard in shards:  # read once: the pages are in the cache
            check_shard(shard, "sha256")
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        problems = [p for p in pool.map(lambda s: check_shard(s, mode), shards) if p]  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    if problems:
        raise SystemExit(f"bench: the pack does not verify: {problems[0]}")
    return seconds


def measure(name: str, shards: list[ShardInfo], rows: list[dict]) -> None:
    megabytes = sum(s.bytes or 0 for s in shards) / 1e6
    for cache in ("warm", "cold"):
        for threads in (1, 2):
            sha = min(timed(shards, "sha256", threads, cache == "cold") for _ in range(3))
            size = min(timed(shards, "size", threads, cache == "cold") for _ in range(3))
            rows.append({"pack": name, "shards": len(shards), "mb": round(megabytes, 1), "cache": cache,
                         "threads": threads, "sha256_s": round(sha, 4), "mb_per_s": round(megabytes / sha),
                         "size_s": round(size, 5)})
            print(f"| {name} | {len(shards)} | {megabytes:.1f} | {cache} | {threads} | {sha:.3f} | "
                  f"{megabytes / sha:.0f} | {size * 1e3:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None,
                        help="the demo pack (default: built in the bench cache)")
    parser.add_argument("--scale-mb", type=int, default=1024, help="size of the replicated 320 px pack")
    args = parser.parse_args()
    demo = args.shards or prepare_data(CACHE / "verify-demo", 400)
    print("| pack | shards | MB | cache | threads | sha256 s | MB/s | size ms |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    rows: list[dict] = []
    measure("demo (96 px)", shards_of(demo), rows)
    measure(f"320 px × {args.scale_mb} MB", replicated(packed(source_tree(300, 320)), args.scale_mb), rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
