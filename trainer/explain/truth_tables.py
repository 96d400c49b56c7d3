"""Markdown tables of scores against radiologists' ground truth, and CheXlocalize's published
figures beside them (chexlocalize_reference.yaml). Torch-free: the explain job and the report both
render them."""

from __future__ import annotations

from pathlib import Path

import yaml

REFERENCE = Path(__file__).with_name("chexlocalize_reference.yaml")
SCORE_KEYS = ("hit_rate", "random_point", "miou", "n", "n_iou")


def load_reference() -> dict:
    """CheXlocalize's figures (other people's numbers on other models), with their provenance."""
    with REFERENCE.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def number(value: object, digits: int = 3) -> str:
    """A score as shown: 3 decimals, integers as they are, "–" for none."""
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def score_header(prefix: list[str]) -> list[str]:
    columns = [*prefix, "method", "label", "hit rate", "random point", "mIoU", "n", "n IoU"]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def score_rows(scores: dict, pooled: dict, prefix: list[str]) -> list[str]:
    """Table rows: one per method × label, then the method pooled over labels."""
    rows = []
    for method, by_label in scores.items():
        for label, cell in [*by_label.items(), ("all labels", pooled[method])]:
            values = [number(cell[key]) for key in SCORE_KEYS]
            rows.append("| " + " | ".join([*prefix, method, label, *values]) + " |")
    return rows


def reference_lines(reference: dict) -> list[str]:
    """CheXlocalize's figures as a table, marked as other people's numbers, with their source."""
    methods = reference["methods"]
    header = [f"{m['name']} {metric}" for m in methods.values() for metric in ("hit rate", "mIoU")]
    lines = [f"### Published: {reference['title']}", "", reference["caveat"].strip(), "",
             "| pathology | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for pathology in reference["pathologies"]:
        cells = [number(m[metric].get(pathology)) for m in methods.values()
                 for metric in ("hit_rate", "miou")]
        lines.append(f"| {pathology} | " + " | ".join(cells) + " |")
    return [*lines, "", f"Source: {reference['source'].strip()}", ""]
