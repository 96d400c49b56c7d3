"""Stable hashes: the one hash behind the patient split, the pack order and the stream's patient
fraction (so both halves of `shards` agree on it without importing each other), and the file
checksum the pack writes into manifest.json and the trainer checks shards against."""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_BLOCK = 1 << 20
"""Read size for file checksums (1 MiB: larger blocks were no faster, smaller ones slower)."""


def patient_unit(patient: str, salt: str) -> float:
    """Map a patient id to a stable number in [0, 1) (sha256, so no Python hash randomisation)."""
    digest = hashlib.sha256(f"{salt}:{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sha256_file(path: Path) -> str:
    """A file's sha256, read in blocks (hashlib releases the GIL on each: threads overlap)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()
