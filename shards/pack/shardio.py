"""Crash-safe shard files: atomic tar writing with a running sha256, and the resume journal.

A shard is written to a hidden temporary name and renamed only when complete, so a reader never
sees a half-written `train-000003.tar`. The journal records each finished shard (and how many
input records it consumed) so an interrupted pack resumes after the last finished shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import webdataset as wds

from shards.atomic import write_jsonl

JOURNAL = ".pack-journal.jsonl"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class AtomicShardWriter:
    """Write one WebDataset tar under a temporary name; `commit()` renames it into place."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self.temp = directory / f".{name}.tmp"
        self._handle = self.temp.open("wb")
        self._hashing = _HashingFile(self._handle)
        # Fixed mtime and owner make the tar bytes (and so the sha256) reproducible.
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=0, user="cxr", group="cxr")
        self.samples = 0

    def write(self, sample: dict[str, object]) -> None:
        self._tar.write(sample)
        self.samples += 1

    @property
    def bytes(self) -> int:
        return self._hashing.bytes

    def commit(self) -> dict:
        """Finish the tar, fsync, rename into place; return its manifest entry."""
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self.temp.replace(self.path)
        return {"name": self.path.name, "samples": self.samples, "bytes": self._hashing.bytes,
                "sha256": self._hashing.digest.hexdigest()}

    def abort(self) -> None:
        """Drop the unfinished tar. The tar is closed first: left open, its finaliser would later
        write the end-of-archive blocks into the closed handle."""
        if not self._handle.closed:
            self._tar.close()
            self._handle.close()
        self.temp.unlink(missing_ok=True)


class Journal:
    """Append-only record of finished shards; its first line holds the pack's fingerprint."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / JOURNAL

    def read(self, fingerprint: dict) -> list[dict] | None:
        """Finished-shard entries of an interrupted pack with the same fingerprint, else None."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        if not lines or json.loads(lines[0]).get("fingerprint") != fingerprint:
            return None
        entries = []
        for line in lines[1:]:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything before it is sound
        return entries

    def start(self, fingerprint: dict, entries: list[dict]) -> None:
        """Rewrite the journal with the fingerprint and the entries that are still valid."""
        write_jsonl(self.path, [{"fingerprint": fingerprint}, *entries])

    def append(self, entry: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def iter_stale_temps(directory: Path) -> Iterator[Path]:
    """Temporary files left by a crash: never complete, always safe to delete."""
    yield from directory.glob(".*.tmp")
