"""What both synthetic layouts share: deterministic per-patient RNGs, file writing, the summary."""

from __future__ import annotations

import csv
import gzip
import io
import multiprocessing
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import simplejpeg
from PIL import Image

from shards.atomic import replacing
from shards.errors import DataError
from shards.lesion import encode_lesion
from shards.synth.render import Drawn

T = TypeVar("T")
R = TypeVar("R")


def patient_rng(seed: int, stream: int, patient: int) -> np.random.Generator:
    """One generator per (seed, dataset part, patient): output does not depend on worker count."""
    return np.random.default_rng([seed, stream, patient])


def write_image(root: Path, relpath: str, drawn: Drawn, quality: int = 90, rgb: bool = False) -> bool:
    """Write the JPEG at root/relpath and, if a lesion was drawn, root/masks/<relpath>.png
    (16-bit, bit i where label i was drawn: `shards.lesion`).

    Returns whether a mask was written.
    """
    pixels = drawn.pixels[:, :, None]
    if rgb:  # a few Kaggle files are 3-channel JPEGs; readers must cope
        data = simplejpeg.encode_jpeg(np.repeat(pixels, 3, axis=2), quality=quality, colorspace="RGB")
    else:
        data = simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="GRAY")
    return _write_with_mask(root, relpath, data, drawn)


def write_png(root: Path, relpath: str, drawn: Drawn, rgba: bool = False) -> bool:
    """As `write_image`, as an 8-bit grayscale PNG (NIH's format), or RGBA (a few NIH files are)."""
    pixels = drawn.pixels
    if rgba:
        pixels = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return _write_with_mask(root, relpath, buffer.getvalue(), drawn)


def _write_with_mask(root: Path, relpath: str, data: bytes, drawn: Drawn) -> bool:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if drawn.mask is None:
        return False
    mask_path = (root / "masks" / relpath).with_suffix(".png")
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.write_bytes(encode_lesion(drawn.mask))
    return True


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Written last and atomically: a tree without its CSV is visibly unfinished to the readers."""
    with replacing(path) as temp, temp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_csv_gz(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """`write_csv`, gzip-compressed with no timestamp or name in the header (same input, same bytes)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as handle:
        handle.write(text.getvalue().encode("utf-8"))
    with replacing(path) as temp:
        temp.write_bytes(buffer.getvalue())


@contextmanager
def staged(out: Path, dataset_dir: str) -> Iterator[Path]:
    """Generate under a hidden staging root, then move the tree and its masks into place.

    An interrupted run leaves only `.<name>.partial/`, never a tree that looks complete;
    an existing tree is refused rather than overwritten.
    """
    target = out / dataset_dir
    if target.exists():
        raise DataError(f"--out {out}: {target} already exists (synth never overwrites; pick another --out)")
    staging = out / f".{dataset_dir}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    if (staging / "masks" / dataset_dir).exists():
        (out / "masks").mkdir(exist_ok=True)
        shutil.rmtree(out / "masks" / dataset_dir, ignore_errors=True)
        (staging / "masks" / dataset_dir).replace(out / "masks" / dataset_dir)
    (staging / dataset_dir).replace(target)
    shutil.rmtree(staging)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """Ordered map over `workers` forked processes (plain map for one)."""
    if workers <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=max(1, min(16, len(items) // (workers * 4))))


@dataclass
class SynthSummary:
    """What a generator wrote; printed by the CLI, asserted on by tests."""

    layout: str
    root: Path
    dataset_dir: Path
    patients: int = 0
    images: int = 0
    masks: int = 0
    seconds: float = 0.0
    by_split: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        splits = ", ".join(f"{name} {count}" for name, count in self.by_split.items())
        rate = self.images / self.seconds if self.seconds else float("inf")
        return (f"synth: {self.layout}: {self.patients} patients, {self.images} images ({splits}), "
                f"{self.masks} lesion masks → {self.dataset_dir} in {self.seconds:.1f} s ({rate:.0f} img/s)")
