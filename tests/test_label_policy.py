"""Raw labels → (target, mask) under each uncertainty policy, and pos_weight from prevalence."""

from __future__ import annotations

import numpy as np
import pytest

from shards.labels import CHEXPERT_LABELS, COMPETITION5
from shards.stream.label_policy import MIXED_ONES, LabelEncoder, LabelPolicy

NAMES = ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion")
UNCERTAIN_BLANK = {"Atelectasis": -1, "Cardiomegaly": -1, "Edema": -1, "Pleural Effusion": None}


def encode(names: tuple[str, ...], policy: LabelPolicy, raw: dict) -> tuple[list[float], list[float]]:
    target, mask = LabelEncoder(names, policy)(raw)
    assert target.dtype == mask.dtype == np.float32 and target.shape == mask.shape == (len(names),)
    return target.tolist(), mask.tolist()


@pytest.mark.parametrize(("policy", "target", "mask"), [
    (LabelPolicy("ignore"), [0, 0, 0, 0], [0, 0, 0, 1]),
    (LabelPolicy("zeros"), [0, 0, 0, 0], [1, 1, 1, 1]),
    (LabelPolicy("ones"), [1, 1, 1, 0], [1, 1, 1, 1]),
    (LabelPolicy("mixed"), [1, 0, 1, 0], [1, 1, 1, 1]),  # U-Ones for Atelectasis and Edema only
    (LabelPolicy("ignore", blank="ignore"), [0, 0, 0, 0], [0, 0, 0, 0]),
    (LabelPolicy("ones", blank="ignore"), [1, 1, 1, 0], [1, 1, 1, 0]),
    (LabelPolicy("zeros", per_label={"Edema": "ones", "Cardiomegaly": "ignore"}), [0, 0, 1, 0], [1, 0, 1, 1]),
    (LabelPolicy("mixed", per_label={"Edema": "ignore", "Cardiomegaly": "ones"}), [1, 1, 0, 0], [1, 1, 0, 1]),
])
def test_uncertain_and_blank_policies(policy: LabelPolicy, target: list[int], mask: list[int]) -> None:
    assert encode(NAMES, policy, UNCERTAIN_BLANK) == (target, mask)


@pytest.mark.parametrize("policy", [LabelPolicy(u, blank=b) for u in ("ignore", "zeros", "ones", "mixed")
                                    for b in ("zeros", "ignore")])
def test_certain_labels_are_never_changed_by_a_policy(policy: LabelPolicy) -> None:
    raw = {"Atelectasis": 1, "Cardiomegaly": 0, "Edema": 1, "Pleural Effusion": 0}
    assert encode(NAMES, policy, raw) == ([1, 0, 1, 0], [1, 1, 1, 1])


def test_mixed_is_u_ones_for_edema_and_atelectasis_u_zeros_for_the_rest() -> None:
    assert frozenset({"Edema", "Atelectasis"}) == MIXED_ONES
    target, mask = encode(CHEXPERT_LABELS, LabelPolicy("mixed"), dict.fromkeys(CHEXPERT_LABELS, -1))
    assert mask == [1.0] * 14
    assert [name for name, t in zip(CHEXPERT_LABELS, target, strict=True) if t] == ["Edema", "Atelectasis"]
    policy = LabelPolicy("mixed")
    assert {name: policy.for_label(name) for name in COMPETITION5} == {
        "Atelectasis": "ones", "Cardiomegaly": "zeros", "Consolidation": "zeros", "Edema": "ones",
        "Pleural Effusion": "zeros"}


def test_per_label_overrides_beat_the_default_policy() -> None:
    policy = LabelPolicy("ignore", per_label={"Edema": "zeros", "Cardiomegaly": "ones"})
    assert [policy.for_label(n) for n in NAMES] == ["ignore", "ones", "zeros", "ignore"]
    raw = dict.fromkeys(NAMES, -1)
    assert encode(NAMES, policy, raw) == ([0, 1, 0, 0], [0, 1, 1, 0])


def test_blank_policy_applies_to_blanks_only() -> None:
    raw = {"Atelectasis": None, "Cardiomegaly": 1, "Edema": 0, "Pleural Effusion": -1}
    assert encode(NAMES, LabelPolicy("zeros", blank="ignore"), raw) == ([0, 1, 0, 0], [0, 1, 1, 1])
    assert encode(NAMES, LabelPolicy("zeros"), raw) == ([0, 1, 0, 0], [1, 1, 1, 1]), "blank is negative"


def test_a_label_the_sample_lacks_is_masked_and_order_follows_names() -> None:
    encoder = LabelEncoder(("Fracture", *reversed(NAMES)), LabelPolicy("ones"))
    target, mask = encoder({"Atelectasis": 1, "Cardiomegaly": 0, "Edema": -1, "Pleural Effusion": None})
    assert target.tolist() == [0, 0, 1, 0, 1] and mask.tolist() == [0, 1, 1, 1, 1]
    assert encoder.names == ("Fracture", "Pleural Effusion", "Edema", "Cardiomegaly", "Atelectasis")


PREVALENCE = {
    "Edema": {"pos": 10, "neg": 30, "uncertain": 20, "blank": 40},
    "Atelectasis": {"pos": 4, "neg": 6, "uncertain": 8, "blank": 2},
    "Cardiomegaly": {"pos": 0, "neg": 5, "uncertain": 0, "blank": 5},
}
PW_NAMES = ("Edema", "Atelectasis", "Cardiomegaly", "Fracture")  # Fracture: no counts at all


def expected_pos_weight(name: str, uncertain: str, blank: str) -> float:
    """neg/pos by hand: 1 → pos, 0 → neg, -1 → per `uncertain`, blank → neg unless ignored."""
    counts = PREVALENCE.get(name, {"pos": 0, "neg": 0, "uncertain": 0, "blank": 0})
    pos, neg = counts["pos"], counts["neg"]
    if uncertain == "ones":
        pos += counts["uncertain"]
    elif uncertain == "zeros":
        neg += counts["uncertain"]
    if blank == "zeros":
        neg += counts["blank"]
    return neg / pos if pos else 1.0


@pytest.mark.parametrize("policy", [
    LabelPolicy("ignore"), LabelPolicy("zeros"), LabelPolicy("ones"), LabelPolicy("mixed"),
    LabelPolicy("ignore", blank="ignore"), LabelPolicy("zeros", blank="ignore"),
    LabelPolicy("ones", per_label={"Edema": "zeros"}),
])
def test_pos_weight_is_negatives_over_positives_under_the_policy(policy: LabelPolicy) -> None:
    weights = LabelEncoder(PW_NAMES, policy).pos_weight(PREVALENCE)
    expected = [expected_pos_weight(n, policy.for_label(n), policy.blank) for n in PW_NAMES]
    assert weights.dtype == np.float32 and weights.tolist() == pytest.approx(expected, rel=1e-6)


def test_pos_weight_hand_values() -> None:
    def weights(policy: LabelPolicy) -> list[float]:
        return LabelEncoder(PW_NAMES, policy).pos_weight(PREVALENCE).tolist()

    assert weights(LabelPolicy("ignore")) == pytest.approx([70 / 10, 8 / 4, 1.0, 1.0])
    assert weights(LabelPolicy("zeros")) == pytest.approx([90 / 10, 16 / 4, 1.0, 1.0])
    assert weights(LabelPolicy("ones")) == pytest.approx([70 / 30, 8 / 12, 1.0, 1.0])
    assert weights(LabelPolicy("mixed")) == pytest.approx([70 / 30, 8 / 12, 1.0, 1.0])
    assert weights(LabelPolicy("zeros", blank="ignore")) == pytest.approx([50 / 10, 14 / 4, 1.0, 1.0])


@pytest.mark.parametrize("kwargs", [
    {"uncertain": "maybe"}, {"uncertain": "U-Ones"}, {"blank": "ones"}, {"blank": "mixed"},
    {"per_label": {"Edema": "mixed"}}, {"per_label": {"Edema": "positive"}},
])
def test_invalid_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="policy"):
        LabelPolicy(**kwargs)


@pytest.mark.parametrize("policy", [LabelPolicy("ignore"), LabelPolicy("mixed", blank="ignore"),
                                    LabelPolicy("zeros", per_label={"Edema": "ones"})])
def test_batch_encoding_fills_rows_exactly_as_per_sample_encoding(policy: LabelPolicy) -> None:
    """The loader's per-batch path (remembered per raw-label combination) against the per-sample one;
    repeats of a combination must hit the memory and still come out right."""
    rng = np.random.default_rng(4)
    values = [1, 0, -1, None]
    raws = [{name: values[rng.integers(4)] for name in CHEXPERT_LABELS if rng.random() < 0.9}
            for _ in range(40)]
    raws += raws[:10]
    encoder = LabelEncoder(CHEXPERT_LABELS, policy)
    target = np.full((len(raws), len(CHEXPERT_LABELS)), 7.0, dtype=np.float32)
    mask = target.copy()
    encoder.encode_into(raws, target, mask)
    for row, raw in enumerate(raws):
        want_target, want_mask = LabelEncoder(CHEXPERT_LABELS, policy)(raw)
        assert np.array_equal(target[row], want_target) and np.array_equal(mask[row], want_mask)


def test_batch_encoding_tells_a_missing_label_from_a_blank_one() -> None:
    """Blank (None) is negative under blank=zeros; a label the sample lacks is masked out."""
    encoder = LabelEncoder(("Edema",), LabelPolicy())
    target, mask = np.zeros((4, 1), np.float32), np.zeros((4, 1), np.float32)
    encoder.encode_into([{"Edema": None}, {}, {"Edema": None}, {}], target, mask)
    assert mask[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0] and target[:, 0].tolist() == [0.0] * 4
