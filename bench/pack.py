"""Pack throughput (images/s per core at 320 px) and peak memory of pack and stream vs dataset size.

    python bench/pack.py [--patients 300] [--workers 1 2]

Throughput: packing synthetic CheXpert trees to 320 px shards, from 320 px sources (CheXpert-small:
decode + re-encode) and from 640 px sources (a resize on the way, as from a larger tree), with
1 and 2 workers; per core = images/s ÷ workers. Memory: peak RSS of a fresh process packing, and
of one streaming a whole training epoch (workers=0, a 256-sample shuffle buffer, which both sizes
fill), at 1× and 3× the dataset size: it must not grow with the dataset.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _data import CACHE, peak_rss_mib, source_tree

from shards.pack import PackOptions, pack
from shards.stream import StreamConfig, train_stream


def timed_pack(root: Path, workers: int) -> tuple[int, float]:
    out = CACHE / "pack-bench-out"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    manifest = pack(PackOptions(layout="chexpert", root=root, out=out, size=320, workers=workers),
                    print_=lambda _: None)
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return sum(split["samples"] for split in manifest["splits"].values()), seconds


def child(mode: str, root: Path) -> None:
    """Run in a fresh interpreter: peak RSS belongs to this one job."""
    out = root.with_name(root.name + "-rss-shards")
    if mode == "pack":
        shutil.rmtree(out, ignore_errors=True)
        pack(PackOptions(layout="chexpert", root=root, out=out, size=320, workers=1), print_=lambda _: None)
        images = json.loads((out / "manifest.json").read_text())["splits"]["train"]["samples"]
    else:
        config = StreamConfig(shards=out, batch_size=8, image_size=224, workers=0, shuffle_buffer=256)
        stream = train_stream(config)
        images = sum(len(batch["key"]) for batch in stream.batches())
    print(json.dumps({"images": images, "peak_rss_mib": peak_rss_mib()}))


def measure(mode: str, root: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(root)], capture_output=True,
                            text=True, check=False)
    if result.returncode:
        raise SystemExit(f"bench: the {mode} job failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    print(f"{'source':<22}{'workers':>8}{'images':>8}{'seconds':>9}{'img/s':>8}{'img/s/core':>12}")
    per_core = {}
    for size in (320, 640):
        root = source_tree(args.patients, size)
        for workers in args.workers:
            images, seconds = timed_pack(root, workers)
            rate = images / seconds
            per_core[(size, workers)] = rate / workers
            label = f"{size} px JPEGs"
            print(f"{label:<22}{workers:>8}{images:>8}{seconds:>9.1f}{rate:>8.0f}{rate / workers:>12.0f}")
    print()
    print(f"{'peak RSS (MiB)':<22}{'images':>8}{'pack':>8}{'stream':>8}")
    rss = []
    for patients in (args.patients, 3 * args.patients):
        root = source_tree(patients, 320)
        packed, streamed = measure("pack", root), measure("stream", root)
        rss.append((packed["peak_rss_mib"], streamed["peak_rss_mib"]))
        print(f"{'':<22}{packed['images']:>8}{packed['peak_rss_mib']:>8.0f}{streamed['peak_rss_mib']:>8.0f}")
    growth = [large / small for small, large in zip(rss[0], rss[1], strict=True)]
    print(f"pack: {per_core[(320, min(args.workers))]:.0f} img/s/core at 320 px "
          f"(from 640 px: {per_core[(640, min(args.workers))]:.0f}); "
          f"peak RSS ×{growth[0]:.2f} (pack), ×{growth[1]:.2f} (stream) for 3× the images")


if __name__ == "__main__":
    main()
