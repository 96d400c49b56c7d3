"""Label vocabularies and raw-label parsing shared by the synthetic generator, readers and streams.

Shards keep labels exactly as the source has them (1, 0, -1 or None for blank), so one pack
serves every uncertainty policy; ``shards.stream.label_policy`` turns them into training targets.
"""

from __future__ import annotations

from typing import Literal

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
"""The 14 CheXpert observations, in the column order of train.csv / valid.csv."""

COMPETITION5: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)
"""The five labels of the CheXpert competition (Irvin et al. 2019)."""

PNEUMONIA_LABELS: tuple[str, ...] = ("Pneumonia",)
"""Kaggle chest_xray (Kermany 2018) is binary: NORMAL vs PNEUMONIA."""

CHEXPERT_META_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
"""Columns before the labels in CheXpert CSVs."""

CHEXPERT_COLUMNS: tuple[str, ...] = CHEXPERT_META_COLUMNS + CHEXPERT_LABELS

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "chexpert14": CHEXPERT_LABELS,
    "competition5": COMPETITION5,
    "pneumonia": PNEUMONIA_LABELS,
}
"""Preset label sets by name (``nih14`` and ``mimic14`` are added below, with their vocabularies)."""

RawLabel = Literal[1, 0, -1] | None
"""1 positive, 0 negative, -1 uncertain, None blank (not mentioned in the report)."""
RAW_VALUES: tuple[RawLabel, ...] = (1, 0, -1, None)
"""Every value a raw label can take (what shards store in their JSON)."""

_RAW_VALUES: dict[str, RawLabel] = {
    "": None,
    "1": 1,
    "1.0": 1,
    "0": 0,
    "0.0": 0,
    "-1": -1,
    "-1.0": -1,
}


class LabelValueError(ValueError):
    """A label cell holds something other than 1, 0, -1 or blank."""


def parse_raw_label(cell: str) -> RawLabel:
    """Parse one CheXpert label cell ('1.0', '0.0', '-1.0', '' and integer spellings)."""
    try:
        return _RAW_VALUES[cell.strip()]
    except KeyError:
        raise LabelValueError(f"unknown label value {cell!r} (expected 1.0, 0.0, -1.0 or blank)") from None


def format_raw_label(value: RawLabel) -> str:
    """Write a raw label the way CheXpert's CSVs do ('1.0', '0.0', '-1.0', '')."""
    return "" if value is None else f"{float(value):.1f}"


def resolve_label_set(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A preset name (chexpert14, competition5, pneumonia, nih14, mimic14) or a list of label names."""
    if isinstance(spec, str):
        if spec not in LABEL_SETS:
            raise ValueError(f"unknown label set {spec!r} (expected one of {sorted(LABEL_SETS)} or a list)")
        return LABEL_SETS[spec]
    names = tuple(spec)
    if not names:
        raise ValueError("label set is empty")
    return names


NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
    "No Finding",
)
"""ChestX-ray14's 14 findings as `Finding Labels` spells them (pipe-separated), and `No Finding`."""

MIMIC_LABELS: tuple[str, ...] = CHEXPERT_LABELS
"""MIMIC-CXR-JPG's `mimic-cxr-2.0.0-chexpert.csv.gz` carries the 14 CheXpert observations."""

SAME_MEANING: tuple[frozenset[str], ...] = (
    frozenset({"Effusion", "Pleural Effusion"}),
    frozenset({"Pleural_Thickening", "Pleural Thickening"}),
)
"""Label names that differ in spelling between vocabularies but name the same finding (NIH's
`Effusion` is CheXpert's `Pleural Effusion`). Identical names always match. Findings that only
overlap (NIH `Mass`/`Nodule` vs CheXpert `Lung Lesion`, `Infiltration` vs `Lung Opacity`) are
deliberately absent: a label with no exact counterpart is left out and listed, never guessed."""

DEFINED_BY_VOCABULARY: frozenset[str] = frozenset({"No Finding"})
"""Spelled alike but defined by each dataset's own findings (NIH's `No Finding` is "none of its 14",
CheXpert's excludes fractures, devices and more): matched only within one vocabulary."""


def _vocabulary(labels: tuple[str, ...] | list[str]) -> str | None:
    for name, vocabulary in (("chexpert", CHEXPERT_LABELS), ("nih", NIH_LABELS)):
        if set(labels) <= set(vocabulary):
            return name
    return None


def shared_labels(source: tuple[str, ...] | list[str], target: tuple[str, ...] | list[str],
                  ) -> tuple[list[tuple[str, str]], list[str]]:
    """The (source name, target name) pairs that mean the same finding, in the source's order,
    and the source labels with no counterpart in the target (left out, to be listed)."""
    pairs, missing = [], []
    same_vocabulary = _vocabulary(source) is not None and _vocabulary(source) == _vocabulary(target)
    for name in source:
        if name in DEFINED_BY_VOCABULARY and not same_vocabulary:
            missing.append(name)
            continue
        match = next((other for other in target if other == name), None)
        if match is None:
            group = next((g for g in SAME_MEANING if name in g), frozenset())
            match = next((other for other in target if other in group), None)
        if match is None:
            missing.append(name)
        else:
            pairs.append((name, match))
    return pairs, missing


LABEL_SETS["nih14"] = NIH_LABELS[:14]
LABEL_SETS["mimic14"] = MIMIC_LABELS
