"""Patient-level, deterministic train/val/test split, the leakage audit, and each split's statistics.

A patient's split is a pure function of (salt, patient id): it does not depend on file order,
on which other patients exist, or on the machine, so re-packing a grown dataset keeps every
existing patient where it was. The source's own test set (CheXpert valid.csv, Kaggle test/) is
kept whole; a train-pool patient who also appears there is dropped from train/val, not from test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations

from shards.errors import LeakageError
from shards.hashing import patient_unit
from shards.manifest import PREVALENCE_STATES
from shards.pack.sources import Record, Reject

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SALT = "cxrbench-split-v1"


@dataclass
class SplitResult:
    splits: dict[str, list[Record]]
    rejects: list[Reject]
    audit: dict


def split_records(
    train_pool: Iterable[Record],
    test: Iterable[Record],
    val_fraction: float,
    salt: str = DEFAULT_SALT,
) -> SplitResult:
    """Divide the train pool by patient into train/val; keep test; audit for leakage."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    test = list(test)
    test_patients = {record.patient for record in test}
    splits: dict[str, list[Record]] = {"train": [], "val": [], "test": test}
    rejects: list[Reject] = []
    for record in train_pool:
        if record.patient in test_patients:
            reason = f"patient {record.patient} is also in the test split"
            rejects.append(Reject(record.relpath, reason, "test_overlap", record.key))
            continue
        split = "val" if patient_unit(record.patient, salt) < val_fraction else "train"
        splits[split].append(record)
    audit = audit_leakage({name: (r.patient for r in records) for name, records in splits.items()})
    audit["dropped_for_test_overlap"] = len(rejects)
    if audit["overlapping_patients"]:
        raise LeakageError(f"patients in two splits after splitting: {audit['pairs']}")
    return SplitResult(splits, rejects, audit)


def audit_leakage(patients_by_split: Mapping[str, Iterable[str]]) -> dict:
    """Count patients shared by each pair of splits; `overlapping_patients` must be 0."""
    sets = {name: set(patients) for name, patients in patients_by_split.items()}
    pairs: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    overlapping: set[str] = set()
    for first, second in combinations(sorted(sets), 2):
        shared = sets[first] & sets[second]
        pairs[f"{first}|{second}"] = len(shared)
        if shared:
            examples[f"{first}|{second}"] = sorted(shared)[:5]
        overlapping |= shared
    return {"overlapping_patients": len(overlapping), "pairs": pairs, "examples": examples}


def split_statistics(records: Iterable[Record], label_names: Iterable[str]) -> dict:
    """Samples, patients, views and raw-label prevalence of one split (its manifest entry)."""
    records = list(records)
    prevalence = {name: dict.fromkeys(PREVALENCE_STATES.values(), 0) for name in label_names}
    for record in records:
        for name, counts in prevalence.items():
            counts[PREVALENCE_STATES[record.labels.get(name)]] += 1
    return {
        "samples": len(records),
        "patients": len({record.patient for record in records}),
        "views": dict(sorted(Counter(record.view for record in records).items())),
        "prevalence": prevalence,
    }
