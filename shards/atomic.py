"""Files written whole or not at all: the one crash-safe write helper of the project.

Everything a reader may open while a writer runs (shards, manifests, run directories, reports)
is written under a hidden temporary name beside the target and renamed over it when complete, so
a crash leaves either the old file or the new one, never half of one. It lives at the top of the
`shards` package because both halves of it and the trainer, sweeps and report use it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(path: Path, suffix: str = "") -> Path:
    """The hidden temporary sibling of `path`; `suffix` keeps a writer that picks the format
    from the extension (numpy, matplotlib) on the right one."""
    return path.with_name(f".{path.name}.tmp{suffix}")


@contextmanager
def replacing(path: Path, suffix: str = "", fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name(path, suffix)
    try:
        yield temp
        if fsync:
            with temp.open("rb") as handle:
                os.fsync(handle.fileno())
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)


@contextmanager
def replacing_dir(path: Path) -> Iterator[Path]:
    """A directory written as a unit (`best/`): filled under a hidden temporary name, then swapped
    in; a crash leaves the previous directory (or, between the two renames, its `.old` copy beside
    it), never a half-filled one under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp, old = temp_name(path), path.with_name(f".{path.name}.old")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.replace(old)
        temp.replace(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as temp:
        temp.write_text(text, encoding="utf-8")


def write_json(path: Path, payload: object) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as temp:
        temp.write_bytes(data)

