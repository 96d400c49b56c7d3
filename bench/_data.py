"""Benchmark datasets: synthetic CheXpert trees and their packs, cached between runs."""

from __future__ import annotations

import os
import resource
from pathlib import Path

from shards.pack import PackOptions, pack
from shards.synth import ChexpertOptions, generate_chexpert

CACHE = Path(os.environ.get("CXR_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))


def source_tree(patients: int, size: int) -> Path:
    """A synthetic CheXpert tree (made once per patients × size, with every core)."""
    root = CACHE / f"chexpert-p{patients}-s{size}"
    if not (root / "CheXpert-v1.0-small" / "valid.csv").is_file():
        generate_chexpert(ChexpertOptions(out=root, patients=patients, size=size, seed=11,
                                          workers=os.cpu_count() or 1))
    return root


def packed(root: Path, size: int = 320) -> Path:
    out = root.with_name(root.name + f"-shards{size}")
    pack(PackOptions(layout="chexpert", root=root, out=out, size=size, shard_samples=256,
                     workers=os.cpu_count() or 1), print_=lambda _: None)
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
