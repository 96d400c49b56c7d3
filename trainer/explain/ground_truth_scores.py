"""Heatmaps scored against radiologists' ground truth (`--ground-truth`): per run, one more pass over
the split that explains only the images a file annotates, every method on every annotated label.

What is scored, following CheXlocalize (github.com/rajpurkarlab/cheXlocalize, eval.py): an
(image, label) pair whose ground-truth region is non-empty and whose label the pack carries as
positive (under the run's uncertainty policy). Hit rate = the pointing game over those pairs;
mIoU over those of them whose binarized map is non-empty too (their default `true_pos_only`);
random_point = the mean area share of the regions, what a uniformly random point hits. Left out,
and counted: empty regions, ids the pack lacks or two samples share, findings no explained label
names, regions on samples where the label is not positive, samples the run's stream skips (its
views filter), regions with no pixel left on the model's grid. Not done: CheXlocalize's
full-dataset mIoU (true_pos_only=False), which needs maps gated to empty by tuned probability
cutoffs on negative images; and their resolution: CheXlocalize upsamples each map to the original
image, here the regions come down to the map's grid (ground_truth.py), so small regions lose pixels.

Outputs: OUT/ground_truth.json and OUT/ground_truth.md (per file: scores per model × method ×
label with n, pooled over labels, coverage, and CheXlocalize's published figures beside them), and
per run RUN/localization/<file>-<split>.json for `python -m trainer.report`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from shards.atomic import write_json, write_text
from shards.manifest import load_manifest
from shards.stream import StreamConfig, eval_stream
from shards.stream.tarread import TarFormatError, iter_samples
from trainer import rundir
from trainer.explain.ground_truth import GroundTruth, Matched, Source, match
from trainer.explain.loading import LoadedRun
from trainer.explain.localization import GroundTruthScore
from trainer.explain.methods import Method
from trainer.explain.truth_tables import load_reference, reference_lines, score_header, score_rows

log = logging.getLogger("trainer.explain")
EXAMPLES = 20
"""Ids listed per kind of miss (the rest are counted)."""


@dataclass
class Coverage:
    """What one run could not score of one file's matched regions, by reason."""

    not_positive: int = 0
    not_streamed: int = 0
    vanished: int = 0


Cells = dict[str, dict[str, GroundTruthScore]]
"""method → label → score."""


def split_sources(config: StreamConfig) -> dict[str, Source]:
    """Key → `source` path and original size of every sample of the split, from the shards' JSON
    (no image is read). Packs older than `source_width` have no size: None."""
    sources: dict[str, Source] = {}
    for shard in load_manifest(config.shards).shards(config.split):
        try:
            for sample in iter_samples(shard.path, wanted=("json",)):
                meta = json.loads(sample["json"]) if "json" in sample else {}
                key = meta.get("key", sample["__key__"])
                size = (meta.get("source_height"), meta.get("source_width"))
                sources[key] = Source(str(meta.get("source") or key),
                                      (int(size[0]), int(size[1])) if all(size) else None)
        except (TarFormatError, OSError, ValueError) as err:
            log.warning("%s: unreadable (%s); its samples cannot be matched to ground truth", shard.path, err)
    return sources


Job = tuple[int, int, np.ndarray]
"""(file number, batch row, ground truth on the map's grid)."""


def score_run(run: LoadedRun, config: StreamConfig, methods: Sequence[Method], matched: Sequence[Matched],
              threshold: float | None, device: torch.device) -> tuple[list[Cells], list[Coverage]]:
    """One pass over the split: each file's scores and coverage for this run."""
    wanted = set().union(*(m.wanted for m in matched))
    cells: list[Cells] = [{} for _ in matched]
    coverage = [Coverage() for _ in matched]
    applicable = [method for method in methods if method.supports(run.model)]
    seen: set[str] = set()
    for batch in eval_stream(replace(config, with_lesion_masks=False)).batches(device):
        rows = [row for row, key in enumerate(batch["key"]) if key in wanted]
        seen.update(batch["key"][row] for row in rows)
        shared: dict[str, dict[int, np.ndarray]] = {}  # class-agnostic maps: once per batch
        for label, jobs in _jobs(run, batch, rows, matched, coverage, config.image_size).items():
            column = run.labels.index(label)
            chunk = sorted({row for _, row, _ in jobs})
            for method in applicable:
                if method.class_specific:
                    maps = _explain(method, run, batch["image"], chunk, column)
                else:
                    if method.name not in shared:
                        shared[method.name] = _explain(method, run, batch["image"], rows, 0)
                    maps = shared[method.name]
                for f, row, truth in jobs:
                    cell = cells[f].setdefault(method.name, {}).setdefault(label, GroundTruthScore())
                    cell.add(maps[row], truth, threshold)
    for f, file in enumerate(matched):
        coverage[f].not_streamed = sum(len(by_label) for key, by_label in file.wanted.items()
                                       if key not in seen)
    return cells, coverage


def _explain(method: Method, run: LoadedRun, images: torch.Tensor, rows: list[int],
             column: int) -> dict[int, np.ndarray]:
    return dict(zip(rows, method.explain(run.model, images[rows], column), strict=True))


def _jobs(run: LoadedRun, batch: dict, rows: list[int], matched: Sequence[Matched], coverage: list[Coverage],
          size: int) -> dict[str, list[Job]]:
    """A batch's (file, row, ground truth) to score, by label; what cannot be scored is counted."""
    positive = ((batch["target"] > 0.5) & (batch["mask"] > 0)).cpu().numpy()
    jobs: dict[str, list[Job]] = {}
    for row in rows:
        for f, file in enumerate(matched):
            for label, regions in file.wanted.get(batch["key"][row], {}).items():
                if not positive[row, run.labels.index(label)]:
                    coverage[f].not_positive += 1
                    continue
                truth = np.logical_or.reduce([region.mask(size) for region in regions])
                if not truth.any():
                    coverage[f].vanished += 1
                    continue
                jobs.setdefault(label, []).append((f, row, truth))
    return jobs


def _ordered(cells: Cells, labels: list[str], methods: Sequence[Method]) -> tuple[dict, dict]:
    """(method → label → dict, method → pooled dict) in the job's method and label order."""
    scores, pooled = {}, {}
    for method in methods:
        if method.name not in cells:
            continue
        by_label = cells[method.name]
        scores[method.name] = {label: by_label[label].as_dict() for label in labels if label in by_label}
        total = GroundTruthScore()
        for score in by_label.values():
            total.merge(score)
        pooled[method.name] = total.as_dict()
    return scores, pooled


def _listed(ids: list[str]) -> dict:
    return {"count": len(ids), "examples": ids[:EXAMPLES]}


def file_name(truth: GroundTruth, split: str) -> str:
    """RUN/localization/<this>.json: the file's name and the split explained."""
    return f"{truth.path.stem}-{split}"


def run_ground_truth(truths: list[GroundTruth], runs: list[LoadedRun], configs: list[StreamConfig],
                     labels: list[str], methods: Sequence[Method], threshold: float | None,
                     device: torch.device) -> list[dict]:
    """Every file scored for every run: one entry per file (ground_truth.json's `files`)."""
    sources: dict[tuple[Path, str], dict[str, Source]] = {}
    entries = [{"path": str(t.path), "kind": t.kind, "runs": {}, "scores": {}, "pooled": {}} for t in truths]
    for run, config in zip(runs, configs, strict=True):
        where = (Path(config.shards), config.split)
        if where not in sources:
            sources[where] = split_sources(config)
        matched = [match(truth, sources[where], labels) for truth in truths]
        cells, coverage = score_run(run, config, methods, matched, threshold, device)
        for entry, file, file_cells, file_coverage in zip(entries, matched, cells, coverage, strict=True):
            entry["scores"][run.name], entry["pooled"][run.name] = _ordered(file_cells, labels, methods)
            entry["runs"][run.name] = {
                "shards": str(config.shards), "image_size": config.image_size,
                "images_with_regions": file.images, "empty_regions": file.empty,
                "images_in_pack": file.found, "images_scored": len(file.wanted),
                "not_in_pack": _listed(file.not_in_pack), "ambiguous": _listed(file.ambiguous),
                "unknown_findings": file.unknown_findings, **asdict(file_coverage),
            }
    return entries


def write_ground_truth(out: Path, split: str, threshold: float | None, entries: list[dict],
                       runs: list[LoadedRun]) -> None:
    """OUT/ground_truth.json and .md, and each run's RUN/localization/<file>-<split>.json."""
    binarized = "otsu" if threshold is None else threshold
    write_json(out / "ground_truth.json", {"split": split, "threshold": binarized,
                                           "convention": __doc__.split("\n\n")[1].replace("\n", " "),
                                           "files": entries})
    write_text(out / "ground_truth.md", markdown(split, binarized, entries))
    for entry in entries:
        name = file_name(GroundTruth(Path(entry["path"]), entry["kind"]), split)
        for run in runs:
            payload = {"ground_truth": entry["path"], "kind": entry["kind"], "split": split,
                       "threshold": binarized, "explain_out": str(out),
                       "coverage": entry["runs"][run.name], "scores": entry["scores"][run.name],
                       "pooled": entry["pooled"][run.name]}
            try:
                rundir.write_localization(run.path, name, payload)
            except OSError as err:  # a read-only run directory: the explain outputs still stand
                log.warning("%s: could not write %s/%s.json (%s)", run.path, rundir.LOCALIZATION, name, err)


def markdown(split: str, threshold: object, entries: list[dict]) -> str:
    lines = [f"# Localization against radiologists' ground truth ({split} split)", "",
             "Hit rate: the map's peak lies inside the region (CheXlocalize's pointing game); random "
             "point: what a uniformly random point hits (the regions' mean area share); mIoU: the map "
             f"binarized ({'Otsu' if threshold == 'otsu' else f'> {threshold}'}), over the images where "
             "it is non-empty (n IoU). Scored: positive labels with a non-empty region.", ""]
    for entry in entries:
        lines += [f"## {entry['path']} ({entry['kind']})", "", *score_header(["model"])]
        for model, scores in entry["scores"].items():
            lines += score_rows(scores, entry["pooled"][model], [model])
        lines.append("")
        lines += [coverage_line(model, info) for model, info in entry["runs"].items()]
        lines.append("")
    if any(entry["kind"].startswith("chexlocalize") for entry in entries):
        lines += reference_lines(load_reference())
    return "\n".join(lines) + "\n"


def coverage_line(model: str, info: dict) -> str:
    """What of one file a run scored, and what it left out and why."""
    missing = info["not_in_pack"]
    examples = f" (e.g. {', '.join(missing['examples'][:5])})" if missing["count"] else ""
    unknown = ", ".join(f"{name} ({count})" for name, count in info["unknown_findings"].items()) or "none"
    return (f"- {model}: {info['images_in_pack']} of {info['images_with_regions']} annotated images are in "
            f"the pack, {info['images_scored']} with a region to score; not in it: "
            f"{missing['count']}{examples}; shared by several samples: "
            f"{info['ambiguous']['count']}; findings no explained label names: {unknown}; regions where "
            f"the label is not positive: {info['not_positive']}; on samples the run's stream skips: "
            f"{info['not_streamed']}; lost at {info['image_size']} px: {info['vanished']}; empty "
            f"regions: {info['empty_regions']}")
