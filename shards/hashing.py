"""Stable numbers from ids: the one hash behind the patient split, the pack order and the stream's
patient fraction, so both halves of `shards` agree on it without importing each other."""

from __future__ import annotations

import hashlib


def patient_unit(patient: str, salt: str) -> float:
    """Map a patient id to a stable number in [0, 1) (sha256, so no Python hash randomisation)."""
    digest = hashlib.sha256(f"{salt}:{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
