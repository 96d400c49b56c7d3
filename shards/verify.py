"""Is a pack on disk still the pack its manifest describes? One shard's check, and a pack's identity.

A run reads its shards for days, from many ranks, and may be resumed weeks later. A shard
rewritten, truncated or deleted under it would mix two packs in one model without a word (or fail
hours in, on whichever rank happens to read it). The pack recorded every shard's size and sha256
(shards/pack/shardio.py): `check_shard` compares one shard with that record, and `pack_identity`
names what a pack holds, so a run directory can record the pack it started on. Spreading the
checks over the ranks and agreeing on the result is the trainer's (trainer/packcheck.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from shards.hashing import sha256_file
from shards.manifest import MANIFEST, Manifest, ShardInfo

VerifyMode = Literal["sha256", "size"]
VERIFY_MODES: tuple[str, ...] = ("sha256", "size")
"""sha256: existence, size and checksum (reads every byte); size: existence and size only."""

CHANGED_HINT = ("the pack changed after it was written: re-pack, or point data.shards at the pack "
                "this run started with")


def check_shard(shard: ShardInfo, mode: VerifyMode) -> str | None:
    """What is wrong with one shard compared with its manifest entry, or None. A manifest from a
    pack that recorded no size or checksum gets only the checks it allows (existence at least)."""
    try:
        size = shard.path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({type(err).__name__}: {err.strerror or err})"
    if shard.bytes is not None and size != shard.bytes:
        return f"{size} bytes, {MANIFEST} says {shard.bytes}"
    if mode == "sha256" and shard.sha256 is not None:
        try:
            actual = sha256_file(shard.path)
        except OSError as err:
            return f"unreadable ({type(err).__name__}: {err.strerror or err})"
        if actual != shard.sha256:
            return f"sha256 does not match {MANIFEST}"
    return None


def describe(shard: ShardInfo, problem: str, others: int = 0) -> str:
    """The one line a run stops with: the shard, what is wrong, how many more, what to do."""
    more = f", and {others} more shard(s) fail the check" if others else ""
    return f"{shard.path}: {problem}{more} ({CHANGED_HINT})"


def pack_identity(manifest: Manifest) -> str:
    """sha256 of what a pack holds: its label names and every split's shards (name, samples, size,
    checksum), in order. Two packs of different data or split differ; a copy of a pack elsewhere,
    or the same data re-packed to the same bytes, is the same pack (manifest.json's own bytes
    would differ by its `created` time and `--out` path)."""
    content = {
        "label_names": list(manifest.label_names),
        "splits": {split: [[shard.path.name, shard.samples, shard.bytes, shard.sha256]
                           for shard in manifest.shards(split)]
                   for split in manifest.data["splits"] if manifest.data["splits"][split]["shards"]},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
