"""Pack a CheXpert, Kaggle-pneumonia, NIH or MIMIC tree into WebDataset tar shards, resumably.

Flow: read records (sources) → split by patient (split) → order each split by a hash of the key
(so every shard mixes patients and labels) → encode images in parallel, in order → write shards
atomically, journaling each finished one → rejects.jsonl and manifest.json last.
The output is a pure function of the input and the options: `--workers` changes speed, not bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from shards import __version__
from shards.atomic import write_json, write_jsonl
from shards.errors import DataError
from shards.hashing import patient_unit, sha256_file
from shards.manifest import FORMAT_VERSION, MANIFEST, REJECTS
from shards.pack.encode import IMAGE_FORMATS, ImageError, ImageFormat, load_image, load_mask
from shards.pack.shardio import (
    AtomicShardWriter,
    Journal,
    iter_stale_temps,
    shard_name,
)
from shards.pack.sources import Record, Reject, SourceData, read_source
from shards.pack.split import DEFAULT_SALT, SPLITS, split_records, split_statistics

log = logging.getLogger("shards.pack")
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
"""tarfile pads an archive to whole 10 KiB records after two zero blocks: part of a shard's size."""
CHUNK = 16


@dataclass(frozen=True)
class PackOptions:
    """Everything that decides what a pack writes (and, with `workers`, how fast)."""

    layout: str
    root: Path
    out: Path
    size: int = 320
    """Shorter side in pixels after resizing (images are never upscaled)."""
    fmt: ImageFormat = "jpg"
    quality: int = 90
    workers: int = 1
    val_fraction: float = 0.1
    salt: str = DEFAULT_SALT
    shard_samples: int = 2000
    shard_bytes: int = 512 << 20
    masks: bool = True
    """Store `{key}.mask.png` where <root>/masks/ has a mask for the image (shards.synth does)."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        problems = {
            "--size": self.size > 0,
            "--quality (1..100)": 1 <= self.quality <= 100,
            "--workers": self.workers > 0,
            "--val-fraction (0 <= f < 1)": 0 <= self.val_fraction < 1,
            "--shard-samples": self.shard_samples > 0,
            "--shard-bytes": self.shard_bytes > 0,
            f"--format ({', '.join(IMAGE_FORMATS)})": self.fmt in IMAGE_FORMATS,
        }
        bad = [name for name, ok in problems.items() if not ok]
        if bad:
            raise DataError(f"invalid option value for {', '.join(bad)}")

    def command(self) -> str:
        """The equivalent command line, stored in the manifest."""
        parts = ["python", "-m", "shards.pack", "--layout", self.layout, "--root", str(self.root),
                 "--out", str(self.out), "--size", str(self.size), "--format", self.fmt,
                 "--quality", str(self.quality), "--val-fraction", str(self.val_fraction),
                 "--shard-samples", str(self.shard_samples), "--shard-bytes", str(self.shard_bytes)]
        if self.salt != DEFAULT_SALT:
            parts += ["--salt", self.salt]
        if not self.masks:
            parts.append("--no-masks")
        return shlex.join(parts)


@dataclass
class Encoded:
    """One record ready for the tar: the sample dict and its approximate size in the tar."""

    key: str
    sample: dict[str, object] = field(repr=False)
    size: int


# --- planning ----------------------------------------------------------------------------------


def plan(options: PackOptions) -> tuple[SourceData, dict[str, list[Record]], list[Reject], dict]:
    """Read and split the source; order each split deterministically."""
    source = read_source(options.layout, options.root)
    result = split_records(source.train_pool, source.test, options.val_fraction, options.salt)
    ordered = {
        split: sorted(records, key=lambda r: patient_unit(r.key, options.salt + ":order"))
        for split, records in result.splits.items()
    }
    return source, ordered, source.rejects + result.rejects, result.audit


def fingerprint(options: PackOptions, source: SourceData, ordered: dict[str, list[Record]]) -> dict:
    """What must match for a resume (or a no-op): options that shape bytes, and the input list."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for record in ordered[split]:
            digest.update(f"{split}\t{record.key}\t{record.path}\n".encode())
    return {
        "format_version": FORMAT_VERSION,
        "layout": options.layout,
        "dataset_dir": str(source.dataset_dir.resolve()),
        "size": options.size,
        "format": options.fmt,
        "quality": options.quality,
        "val_fraction": options.val_fraction,
        "salt": options.salt,
        "shard_samples": options.shard_samples,
        "shard_bytes": options.shard_bytes,
        "masks": options.masks,
        "records": digest.hexdigest(),
    }


# --- encoding (runs in worker processes) --------------------------------------------------------


def encode_record(record: Record, split: str, options: PackOptions, mask_root: Path) -> Encoded | Reject:
    """Load, resize, encode one record; a bad image becomes a Reject, never an exception."""
    try:
        image = load_image(record.path, options.size, options.fmt, options.quality)
        meta = record.metadata() | {"split": split, "width": image.width, "height": image.height,
                                    "source_width": image.source_width, "source_height": image.source_height}
        sample: dict[str, object] = {"__key__": record.key, options.fmt: image.data}
        mask_path = mask_root / Path(record.relpath).with_suffix(".png")
        if options.masks and mask_path.is_file():
            sample["mask.png"] = load_mask(str(mask_path), image.width, image.height)
            meta["has_mask"] = True
    except ImageError as err:
        return Reject(record.relpath, str(err), err.kind, record.key)
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    size = sum(_tar_member_size(len(v)) for k, v in sample.items() if k != "__key__")
    return Encoded(record.key, sample, size)


def _tar_member_size(data_bytes: int) -> int:
    """Header block plus data rounded up to whole blocks."""
    return TAR_BLOCK + -(-data_bytes // TAR_BLOCK) * TAR_BLOCK


def tar_file_size(member_bytes: int) -> int:
    """The size of a finished tar whose members take `member_bytes`."""
    return -(-(member_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def _encode_chunk(chunk: list[Record], split: str, options: PackOptions, mask_root: Path) -> list:
    return [encode_record(record, split, options, mask_root) for record in chunk]


def ordered_map(fn: Callable[[list[Record]], list], records: Sequence[Record], workers: int) -> Iterator:
    """Apply fn to chunks of records in `workers` processes; yield per-record results in order.

    At most 4 chunks per worker are in flight, so memory stays flat however large the split.
    """
    chunks = (list(records[i:i + CHUNK]) for i in range(0, len(records), CHUNK))
    if workers <= 1:
        for chunk in chunks:
            yield from fn(chunk)
        return
    with get_context("fork").Pool(workers) as pool:
        pending: list = []
        for chunk in chunks:
            pending.append(pool.apply_async(fn, (chunk,)))
            if len(pending) >= 4 * workers:
                yield from pending.pop(0).get()
        for result in pending:
            yield from result.get()


# --- writing ----------------------------------------------------------------------------------


class SplitWriter:
    """Cut one split's encoded samples into shards by count and bytes; journal each shard."""

    def __init__(self, options: PackOptions, split: str, journal: Journal, first_index: int) -> None:
        self.options, self.split, self.journal = options, split, journal
        self.index = first_index
        self.writer: AtomicShardWriter | None = None
        self.member_bytes = 0
        """Exact tar bytes of the open shard's members (the tar stream itself writes in 10 KiB records)."""
        self.consumed = 0
        self.rejects: list[dict] = []
        self.entries: list[dict] = []

    def add(self, result: Encoded | Reject) -> None:
        if isinstance(result, Reject):
            self.consumed += 1
            self.rejects.append(result.as_json())
            return
        if self.writer is not None and (
            self.writer.samples >= self.options.shard_samples
            or tar_file_size(self.member_bytes + result.size) > self.options.shard_bytes
        ):
            self._commit()
        if self.writer is None:
            self.writer = AtomicShardWriter(self.options.out, shard_name(self.split, self.index))
            self.index += 1
            self.member_bytes = 0
        self.writer.write(result.sample)
        self.member_bytes += result.size
        self.consumed += 1

    def close(self) -> None:
        """Commit the last shard; trailing rejects with no shard still get a journal entry."""
        if self.writer is not None or self.consumed:
            self._commit()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def _commit(self) -> None:
        entry = self.writer.commit() if self.writer is not None else {"name": None, "samples": 0}
        entry |= {"split": self.split, "consumed": self.consumed, "rejects": self.rejects}
        self.journal.append(entry)
        self.entries.append(entry)
        self.writer, self.consumed, self.rejects = None, 0, []


def _valid_entries(out: Path, entries: list[dict]) -> list[dict]:
    """Keep journal entries up to the first whose shard is missing or fails its checksum."""
    valid = []
    for entry in entries:
        name = entry.get("name")
        if name is not None and (not (out / name).is_file() or sha256_file(out / name) != entry["sha256"]):
            log.warning("%s: missing or changed since it was journaled; re-packing from it", name)
            break
        valid.append(entry)
    return valid


def _damaged_shards(out: Path, manifest: dict) -> list[str]:
    """Shards of a finished pack that are missing or fail their checksum."""
    return [shard["name"] for split in manifest["splits"].values() for shard in split["shards"]
            if not (out / shard["name"]).is_file() or sha256_file(out / shard["name"]) != shard["sha256"]]


def _clear_outputs(out: Path) -> None:
    for path in [*out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"), out / MANIFEST, out / REJECTS]:
        path.unlink(missing_ok=True)
    Journal(out).remove()


def pack(options: PackOptions, print_: Callable[[str], None] = print) -> dict:
    """Pack (or resume, or confirm) a dataset; return the manifest."""
    started = time.perf_counter()
    source, ordered, early_rejects, audit = plan(options)
    wanted = fingerprint(options, source, ordered)
    options.out.mkdir(parents=True, exist_ok=True)
    for stale in iter_stale_temps(options.out):
        stale.unlink()
    if options.overwrite:
        _clear_outputs(options.out)
    elif (options.out / MANIFEST).exists():
        done = json.loads((options.out / MANIFEST).read_text(encoding="utf-8"))
        if done.get("fingerprint") != wanted:
            raise DataError(f"{options.out / MANIFEST}: written by a pack with other options or input; "
                            "use a new --out or pass --overwrite")
        damaged = _damaged_shards(options.out, done)
        if not damaged:
            print_(f"{options.out}: already packed with these options; nothing to do")
            return done
        print_(f"{', '.join(damaged)}: missing or changed since packing; re-packing")
        _clear_outputs(options.out)

    journal = Journal(options.out)
    entries = journal.read(wanted)
    if entries is None:
        raise DataError(f"{journal.path}: an interrupted pack with other options or input; "
                        "use a new --out or pass --overwrite")
    entries = _valid_entries(options.out, entries)
    journal.start(wanted, entries)
    if entries:
        print_(f"resuming: {sum(1 for e in entries if e['name'])} finished shard(s) kept")

    total = sum(len(records) for records in ordered.values())
    resumed = sum(entry["consumed"] for entry in entries)
    with tqdm(total=total, initial=resumed, unit="img", desc="pack", disable=None) as bar:
        for split in SPLITS:
            done = [entry for entry in entries if entry["split"] == split]
            todo = ordered[split][sum(entry["consumed"] for entry in done):]
            first_index = sum(1 for entry in done if entry["name"])
            entries += _pack_split(options, split, todo, journal, first_index, source, bar)

    manifest = _write_outputs(options, source, ordered, entries, early_rejects, audit, wanted)
    journal.remove()
    _print_summary(manifest, time.perf_counter() - started, total - resumed, print_)
    return manifest


def _pack_split(options: PackOptions, split: str, todo: list[Record], journal: Journal,
                first_index: int, source: SourceData, bar: tqdm) -> list[dict]:
    writer = SplitWriter(options, split, journal, first_index)
    encode = partial(_encode_chunk, split=split, options=options, mask_root=source.mask_root)
    try:
        for result in ordered_map(encode, todo, options.workers):
            writer.add(result)
            bar.update(1)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.entries


def _write_outputs(options: PackOptions, source: SourceData, ordered: dict[str, list[Record]],
                   entries: list[dict], early_rejects: list[Reject], audit: dict,
                   wanted: dict) -> dict:
    rejects = [reject.as_json() for reject in early_rejects]
    rejects += [row for entry in entries for row in entry["rejects"]]
    rejected_keys = {row["key"] for row in rejects if row["key"]}
    splits = {}
    for split in SPLITS:
        kept = [record for record in ordered[split] if record.key not in rejected_keys]
        shards = [{k: entry[k] for k in ("name", "samples", "bytes", "sha256")}
                  for entry in entries if entry["split"] == split and entry["name"]]
        splits[split] = split_statistics(kept, source.label_names) | {"shards": shards}
    manifest = {
        "format_version": FORMAT_VERSION,
        "cxrbench_version": __version__,
        "dataset": options.layout,
        "label_names": list(source.label_names),
        "image": {"format": options.fmt, "size": options.size, "quality": options.quality,
                  "mode": "L"},
        "split": {"val_fraction": options.val_fraction, "salt": options.salt, "unit": "patient"},
        "splits": splits,
        "rejects": len(rejects),
        "rejects_by_kind": dict(Counter(row["kind"] for row in rejects).most_common()),
        "leakage": audit,
        "command": options.command(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fingerprint": wanted,
    }
    write_jsonl(options.out / REJECTS, rejects)
    write_json(options.out / MANIFEST, manifest)
    return manifest


def _print_summary(manifest: dict, seconds: float, encoded: int, print_: Callable[[str], None]) -> None:
    for split, info in manifest["splits"].items():
        print_(f"{split:>5}: {info['samples']:>7} images  {info['patients']:>6} patients  "
               f"{len(info['shards']):>4} shards  {sum(s['bytes'] for s in info['shards']) / 2**20:8.1f} MiB")
    if manifest["rejects"]:
        kinds = ", ".join(f"{kind} {count}" for kind, count in manifest["rejects_by_kind"].items())
        print_(f"rejected {manifest['rejects']} input(s) ({kinds}): see {REJECTS}")
    print_(f"leakage: {manifest['leakage']['overlapping_patients']} patients in two splits")
    rate = encoded / seconds if seconds > 0 else 0.0
    print_(f"packed {encoded} images in {seconds:.1f} s ({rate:.0f} img/s)")
