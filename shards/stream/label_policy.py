"""Raw CheXpert labels (1, 0, -1, blank) → training targets and a loss/metric mask.

Shards keep raw labels so one pack serves every policy; the policy is applied here, at stream
time, so a sweep can vary it. Known policies for the uncertain label (-1):
- ignore: masked out of loss and metrics (U-Ignore),
- zeros / ones: counted as negative / positive (U-Zeros / U-Ones),
- mixed: U-Ones for Edema and Atelectasis, U-Zeros for the rest (the LibAUC / Jeremy Irvin choice).
Blank (not mentioned in the report) is negative by default, as in the CheXpert paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shards.manifest import PREVALENCE_STATES

UncertainPolicy = Literal["ignore", "zeros", "ones", "mixed"]
BlankPolicy = Literal["zeros", "ignore"]
UNCERTAIN_POLICIES: tuple[str, ...] = ("ignore", "zeros", "ones", "mixed")
BLANK_POLICIES: tuple[str, ...] = ("zeros", "ignore")
MIXED_ONES: frozenset[str] = frozenset({"Edema", "Atelectasis"})


@dataclass(frozen=True)
class LabelPolicy:
    """How raw labels become targets; `per_label` overrides `uncertain` for named labels."""

    uncertain: UncertainPolicy = "ignore"
    blank: BlankPolicy = "zeros"
    per_label: Mapping[str, Literal["ignore", "zeros", "ones"]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain policy {self.uncertain!r}: expected one of {UNCERTAIN_POLICIES}")
        if self.blank not in BLANK_POLICIES:
            raise ValueError(f"blank policy {self.blank!r}: expected one of {BLANK_POLICIES}")
        for name, policy in self.per_label.items():
            if policy not in ("ignore", "zeros", "ones"):
                raise ValueError(f"per-label policy for {name!r}: {policy!r}, expected ignore/zeros/ones")

    def for_label(self, name: str) -> str:
        """The effective uncertain policy of one label: ignore, zeros or ones."""
        if name in self.per_label:
            return self.per_label[name]
        if self.uncertain == "mixed":
            return "ones" if name in MIXED_ONES else "zeros"
        return self.uncertain


_UNCERTAIN = {"ignore": (0.0, 0.0), "zeros": (0.0, 1.0), "ones": (1.0, 1.0)}
_BLANK = {"zeros": (0.0, 1.0), "ignore": (0.0, 0.0)}
_ABSENT = object()
"""A label the sample does not carry (distinct from None, a blank)."""
_MEMO_LIMIT = 1 << 16


class LabelEncoder:
    """Precomputes the per-label rules so encoding a sample is a few dict lookups."""

    def __init__(self, names: Sequence[str], policy: LabelPolicy) -> None:
        self.names = tuple(names)
        self.policy = policy
        self._rules = [
            {1: (1.0, 1.0), 0: (0.0, 1.0), -1: _UNCERTAIN[policy.for_label(name)], None: _BLANK[policy.blank]}
            for name in self.names
        ]
        self._memo: dict[tuple, tuple[list[float], list[float]]] = {}

    def __call__(self, raw: Mapping[str, int | None]) -> tuple[np.ndarray, np.ndarray]:
        """(target, mask), both float32 of length len(names); mask 0 = excluded from loss/metrics.

        A label the sample does not carry at all (e.g. a CheXpert label asked of a Kaggle shard)
        is masked out rather than guessed.
        """
        target = np.zeros(len(self.names), dtype=np.float32)
        mask = np.zeros(len(self.names), dtype=np.float32)
        for i, (name, rules) in enumerate(zip(self.names, self._rules, strict=True)):
            if name in raw:
                target[i], mask[i] = rules[raw[name]]
        return target, mask

    def encode_into(self, raws: Sequence[Mapping[str, int | None]], target: np.ndarray,
                    mask: np.ndarray) -> None:
        """Encode a batch into preallocated N×labels rows, exactly as `self(raw)` per sample.

        The loader's per-batch path: each distinct combination of raw labels is encoded once per
        process and remembered (a few thousand exist in CheXpert), so a sample costs one tuple and
        one dict lookup, and each array gets one write.
        """
        rows = [self._row(raw) for raw in raws]
        target[:] = [row[0] for row in rows]
        mask[:] = [row[1] for row in rows]

    def _row(self, raw: Mapping[str, int | None]) -> tuple[list[float], list[float]]:
        state = tuple([raw.get(name, _ABSENT) for name in self.names])
        row = self._memo.get(state)
        if row is None:
            target, mask = self(raw)
            row = (target.tolist(), mask.tolist())
            if len(self._memo) < _MEMO_LIMIT:
                self._memo[state] = row
        return row

    def pos_weight(self, prevalence: Mapping[str, Mapping[str, int]]) -> np.ndarray:
        """neg/pos per label after this policy, from a manifest split's raw-label counts.

        For BCEWithLogitsLoss(pos_weight=...): a label with no positives gets weight 1.0.
        """
        weights = np.ones(len(self.names), dtype=np.float32)
        raw_state = {state: raw for raw, state in PREVALENCE_STATES.items()}
        for i, (name, rules) in enumerate(zip(self.names, self._rules, strict=True)):
            pos = neg = 0.0
            for state, count in prevalence.get(name, {}).items():
                value, known = rules[raw_state[state]]
                pos += count * known * value
                neg += count * known * (1.0 - value)
            if pos > 0:
                weights[i] = neg / pos
        return weights
