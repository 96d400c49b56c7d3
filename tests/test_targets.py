"""Raw labels → (target, mask) under each uncertainty policy, and pos_weight from prevalence."""

from __future__ import annotations

import numpy as np
import pytest

from shards.targets import LabelEncoder, LabelPolicy

NAMES = ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion")
RAW = {"Atelectasis": -1, "Cardiomegaly": -1, "Edema": -1, "Pleural Effusion": None}


@pytest.mark.parametrize(("policy", "target", "mask"), [
    (LabelPolicy("ignore"), [0, 0, 0, 0], [0, 0, 0, 1]),
    (LabelPolicy("zeros"), [0, 0, 0, 0], [1, 1, 1, 1]),
    (LabelPolicy("ones"), [1, 1, 1, 0], [1, 1, 1, 1]),
    (LabelPolicy("mixed"), [1, 0, 1, 0], [1, 1, 1, 1]),  # U-Ones for Atelectasis and Edema only
    (LabelPolicy("ignore", blank="ignore"), [0, 0, 0, 0], [0, 0, 0, 0]),
    (LabelPolicy("zeros", per_label={"Edema": "ones", "Cardiomegaly": "ignore"}), [0, 0, 1, 0], [1, 0, 1, 1]),
])
def test_uncertain_and_blank_policies(policy: LabelPolicy, target: list[int], mask: list[int]) -> None:
    got_target, got_mask = LabelEncoder(NAMES, policy)(RAW)
    assert got_target.tolist() == target and got_mask.tolist() == mask
    assert got_target.dtype == got_mask.dtype == np.float32


def test_certain_labels_and_missing_labels() -> None:
    encoder = LabelEncoder((*NAMES, "Fracture"), LabelPolicy("ignore"))
    target, mask = encoder({"Atelectasis": 1, "Cardiomegaly": 0, "Edema": 1, "Pleural Effusion": 0})
    assert target.tolist() == [1, 0, 1, 0, 0] and mask.tolist() == [1, 1, 1, 1, 0], "absent label: masked"


def test_pos_weight_is_negatives_over_positives_under_the_policy() -> None:
    prevalence = {"Edema": {"pos": 10, "neg": 30, "uncertain": 20, "blank": 40},
                  "Cardiomegaly": {"pos": 0, "neg": 5, "uncertain": 0, "blank": 5}}
    names = ("Edema", "Cardiomegaly")
    def weights(policy: LabelPolicy) -> list[float]:
        return LabelEncoder(names, policy).pos_weight(prevalence).tolist()

    assert weights(LabelPolicy("ignore")) == [7.0, 1.0]  # (30 + 40) / 10; no positives → 1
    assert weights(LabelPolicy("ones")) == pytest.approx([70 / 30, 1.0])
    assert weights(LabelPolicy("zeros", blank="ignore")) == [5.0, 1.0]  # (30 + 20) / 10


@pytest.mark.parametrize("kwargs", [{"uncertain": "maybe"}, {"blank": "ones"},
                                    {"per_label": {"Edema": "mixed"}}])
def test_invalid_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="policy"):
        LabelPolicy(**kwargs)
