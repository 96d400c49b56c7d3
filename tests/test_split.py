"""Patient-level split: deterministic, stable under growth, and its audit catches a leak."""

from __future__ import annotations

from dataclasses import replace

import pytest

import shards.pack.split
from shards.errors import LeakageError
from shards.pack.sources import Record
from shards.pack.split import audit_leakage, split_records


def records(patients: range, per_patient: int = 3, origin: str = "train") -> list[Record]:
    return [Record(key=f"{origin}-p{p}-{i}", path=f"/x/p{p}/{i}.jpg", relpath=f"d/p{p}/{i}.jpg",
                   patient=f"patient{p:05d}")
            for p in patients for i in range(per_patient)]


def split_of(result: shards.pack.split.SplitResult) -> dict[str, str]:
    return {r.patient: name for name, rs in result.splits.items() for r in rs}


def test_every_image_of_a_patient_goes_to_one_split() -> None:
    result = split_records(records(range(500)), records(range(1000, 1050), origin="valid"), 0.2)
    assert result.audit["overlapping_patients"] == 0
    assert all(count == 0 for count in result.audit["pairs"].values())
    val_patients = {r.patient for r in result.splits["val"]}
    assert 70 <= len(val_patients) <= 130, "≈20% of 500 patients"
    assert len(result.splits["train"]) + len(result.splits["val"]) == 1500


def test_deterministic_and_stable_when_the_dataset_grows() -> None:
    small = split_of(split_records(records(range(200)), [], 0.1))
    assert split_of(split_records(list(reversed(records(range(200)))), [], 0.1)) == small
    grown = split_of(split_records(records(range(400)), [], 0.1))
    assert {p: grown[p] for p in small} == small, "existing patients never move"
    other_salt = split_of(split_records(records(range(200)), [], 0.1, salt="another"))
    assert other_salt != small


def test_train_patient_also_in_test_is_dropped_from_train() -> None:
    pool = records(range(20))
    test = [replace(pool[0], key="valid-dup")]
    result = split_records(pool, test, 0.1)
    assert [r.kind for r in result.rejects] == ["test_overlap"] * 3
    assert result.audit["dropped_for_test_overlap"] == 3 and result.audit["overlapping_patients"] == 0
    assert pool[0].patient not in {r.patient for r in result.splits["train"] + result.splits["val"]}


def test_audit_catches_an_injected_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the split were made per image (the classic bug), the audit must stop the pack."""
    calls = iter(range(10**6))
    monkeypatch.setattr(shards.pack.split, "patient_unit", lambda patient, salt: (next(calls) % 10) / 10)
    with pytest.raises(LeakageError, match="train"):
        split_records(records(range(30)), [], 0.3)


def test_audit_leakage_reports_pairs_and_examples() -> None:
    audit = audit_leakage({"train": ["a", "b", "c"], "val": ["c", "d"], "test": ["a", "e"]})
    assert audit["overlapping_patients"] == 2
    assert audit["pairs"] == {"test|train": 1, "test|val": 0, "train|val": 1}
    assert audit["examples"] == {"test|train": ["a"], "train|val": ["c"]}


def test_val_fraction_is_validated() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_records(records(range(3)), [], 1.0)
