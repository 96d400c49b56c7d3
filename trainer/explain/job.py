"""The explain job, start to finish: load runs, choose samples, explain, score, write everything.

Outputs under OUT: `overlays/<model>/<method>/<label>/<NN>-<key>.png`, `grids/<label>.png`
(rows: samples; columns: the image with its lesion outlined, then every model × method),
`index.html`, `tensorboard/`, `localization.json` (model → method → label → scores) with
`localization.md` beside it, and `explain.json` (what was run, and scores pooled over labels).
With `ground_truth` files: `ground_truth.json` / `.md` and RUN/localization/ (ground_truth_scores.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shards.atomic import write_json, write_text
from trainer.explain import DEFAULT_METHODS, gallery
from trainer.explain.ground_truth import GroundTruth, read_ground_truth
from trainer.explain.ground_truth_scores import run_ground_truth, write_ground_truth
from trainer.explain.loading import ExplainError, LoadedRun, load_best_model
from trainer.explain.localization import Score, deletion_insertion
from trainer.explain.methods import Method, resolve_methods
from trainer.explain.samples import Inputs, explain_stream_config, gather, score_split, select

log = logging.getLogger("trainer.explain")


@dataclass(frozen=True)
class ExplainOptions:
    runs: tuple[Path, ...]
    out: Path
    shards: Path | None = None
    """Default: each run's data.shards."""
    split: str = "test"
    n: int = 32
    """Samples per label."""
    labels: tuple[str, ...] | None = None
    """Default: the first run's labels that every run predicts."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    device: str = "auto"
    batch_size: int = 16
    steps: int = 8
    """Deletion/insertion curve steps (0: skip the faithfulness curves)."""
    seed: int = 0
    workers: int = 1
    progress: bool = True
    ground_truth: tuple[Path, ...] = ()
    """Radiologists' annotations (CheXlocalize JSON, NIH BBox_List_2017.csv) to score against."""
    threshold: float | None = None
    """How a map is binarized for mIoU: None → Otsu, else this fraction of its [0, 1] range."""


@dataclass
class Cell:
    """One (run, method, label): the maps of that label's samples and their scores."""

    run: LoadedRun
    method: Method
    label: str
    maps: np.ndarray
    score: Score


def progress(items: list, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm import tqdm  # noqa: PLC0415 - optional
    except ImportError:
        return _plain_progress(items, desc)
    return tqdm(items, desc=desc, unit="map-set")


def _plain_progress(items: list, desc: str) -> Iterator:
    for index, item in enumerate(items, start=1):
        log.info("%s %d/%d", desc, index, len(items))
        yield item


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExplainError(f"--device {name}: no CUDA device here")
    return torch.device(name)


def load_runs(paths: tuple[Path, ...], shards: Path | None) -> list[LoadedRun]:
    runs, seen = [], {}
    for path in paths:
        run = load_best_model(path, shards)
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}-{seen[run.name]}"
        runs.append(run)
    return runs


def choose_labels(wanted: tuple[str, ...] | None, runs: list[LoadedRun]) -> list[str]:
    common = [label for label in runs[0].labels if all(label in run.labels for run in runs)]
    if wanted is None:
        if not common:
            raise ExplainError("the runs predict no label in common")
        return common
    for label in wanted:
        if label not in common:
            raise ExplainError(f"--labels: {label!r} is not predicted by every run "
                               f"(common: {', '.join(common)})")
    return list(wanted)


def every_sample_map(run: LoadedRun, method: Method, inputs: Inputs, batch_size: int,
                     device: torch.device) -> np.ndarray:
    """The maps of a class-agnostic method for all of a run's samples, one pass: each label's cell
    takes its rows from them instead of recomputing the same map per label."""
    maps = [method.explain(run.model, inputs.images[start:start + batch_size].to(device), 0)
            for start in range(0, len(inputs.keys), batch_size)]
    return np.concatenate(maps)


def explain_cell(run: LoadedRun, method: Method, label: str, inputs: Inputs, rows: list[int],
                 options: ExplainOptions, device: torch.device, shared: np.ndarray | None = None) -> Cell:
    """Maps for one label's samples, scored where the label is positive (and has a mask).

    `shared`: the method's maps of every sample (`every_sample_map`) when it ignores the label.
    """
    column = run.labels.index(label)
    score, maps = Score(), []
    for start in range(0, len(rows), options.batch_size):
        chunk = rows[start:start + options.batch_size]
        images = inputs.images[chunk].to(device)
        heat = shared[chunk] if shared is not None else method.explain(run.model, images, column)
        maps.append(heat)
        positive = inputs.positive[chunk, column].numpy()
        lesion = inputs.lesion[chunk, column].numpy()
        for j in np.flatnonzero(positive):
            if lesion[j].any():
                score.add_localization(heat[j], lesion[j])
        if options.steps and positive.any():
            keep = np.flatnonzero(positive)
            deletion, insertion = deletion_insertion(run.model, images[torch.from_numpy(keep).to(device)],
                                                     heat[keep], column, options.steps)
            score.deletion += deletion
            score.insertion += insertion
    return Cell(run, method, label, np.concatenate(maps), score)


def explain(options: ExplainOptions) -> dict:
    """Run the job; returns localization.json's content."""
    if options.n < 1 or options.batch_size < 1 or options.steps < 0:
        raise ExplainError("--n and --batch-size must be ≥ 1, --steps ≥ 0")
    if options.threshold is not None and not 0.0 <= options.threshold < 1.0:
        raise ExplainError(f"--threshold {options.threshold}: expected otsu or a number in [0, 1)")
    truths: list[GroundTruth] = [read_ground_truth(path) for path in options.ground_truth]  # fail fast
    methods = resolve_methods(list(options.methods))
    device = resolve_device(options.device)
    runs = load_runs(options.runs, options.shards)
    labels = choose_labels(options.labels, runs)
    for run in runs:
        run.model.to(device)
    configs = [explain_stream_config(run, options.split, options.batch_size, options.workers)
               for run in runs]
    scored = [score_split(run, config, device) for run, config in zip(runs, configs, strict=True)]
    chosen = select(labels, runs, scored, options.n, options.seed)
    keys = list(dict.fromkeys(key for label in labels for key in chosen[label]))
    inputs = [gather(config, keys, device) for config in configs]
    position = {key: i for i, key in enumerate(keys)}
    work = [(r, method, label) for r, run in enumerate(runs) for method in methods
            if method.supports(run.model) for label in labels]
    for run in runs:
        skipped = [m.name for m in methods if not m.supports(run.model)]
        if skipped:
            log.info("%s (%s): %s does not apply; skipped", run.name, run.config.model.name,
                     ", ".join(skipped))
    shared = {(r, method.name): every_sample_map(run, method, inputs[r], options.batch_size, device)
              for r, run in enumerate(runs) for method in methods
              if method.supports(run.model) and not method.class_specific}
    cells = [explain_cell(runs[r], method, label, inputs[r], [position[k] for k in chosen[label]], options,
                          device, shared.get((r, method.name)))
             for r, method, label in progress(work, options.progress, "explain")]
    scores = write_outputs(options, runs, labels, chosen, inputs, position, cells)
    if truths:
        entries = run_ground_truth(truths, runs, configs, labels, methods, options.threshold, device)
        write_ground_truth(options.out, options.split, options.threshold, entries, runs)
    return scores


def write_outputs(options: ExplainOptions, runs: list[LoadedRun], labels: list[str],
                  chosen: dict[str, list[str]], inputs: list[Inputs], position: dict[str, int],
                  cells: list[Cell]) -> dict:
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, dict[str, dict]]] = {}
    pooled: dict[str, dict[str, Score]] = {}
    for cell in cells:
        by_method = scores.setdefault(cell.run.name, {}).setdefault(cell.method.name, {})
        by_method[cell.label] = cell.score.as_dict()
        pooled.setdefault(cell.run.name, {}).setdefault(cell.method.name, Score()).merge(cell.score)
    sections, tb_images = [], {}
    size = max(*(int(i.images.shape[-1]) for i in inputs), 96)
    for label in labels:
        section, rgb = label_section(out, label, chosen[label], runs, inputs, position,
                                     [c for c in cells if c.label == label], size)
        sections.append(section)
        tb_images[gallery.slug(label)] = rgb
    table = gallery.score_table(scores)
    write_text(out / "localization.md", f"# Localization ({options.split} split)\n\n{table}")
    gallery.write_index(out, f"cxrbench explain: {', '.join(r.name for r in runs)} on {options.split}",
                        table, sections)
    gallery.log_images(out, tb_images)
    write_json(out / "explain.json", {
        "split": options.split, "n_per_label": options.n, "labels": labels,
        "methods": list(options.methods), "seed": options.seed, "steps": options.steps,
        "models": {run.name: {"run": str(run.path), "model": run.config.model.name,
                              "image_size": run.config.data.image_size} for run in runs},
        "samples": chosen,
        "pooled": {m: {k: s.as_dict() for k, s in methods.items()} for m, methods in pooled.items()},
    })
    write_json(out / "localization.json", scores)
    return scores


def label_section(out: Path, label: str, keys: list[str], runs: list[LoadedRun], inputs: list[Inputs],
                  position: dict[str, int], cells: list[Cell],
                  size: int) -> tuple[gallery.LabelSection, np.ndarray]:
    """Per-sample overlays and the label's comparison grid; returns its HTML section and grid."""
    base = inputs[0]
    column = runs[0].labels.index(label)
    columns = ["image + lesion"] + [f"{c.run.name} {c.method.name}" for c in cells]
    grid_rows, grid_cells, html_rows = [], [], []
    for row, key in enumerate(keys):
        at = position[key]
        lesion = base.lesion[at, column].numpy()
        truth = "pos" if bool(base.positive[at, column]) else "neg"
        row_cells = [gallery.overlay(base.gray(at), None, lesion)]
        paths = []
        for cell in cells:
            run_inputs = inputs[runs.index(cell.run)]
            run_lesion = run_inputs.lesion[at, cell.run.labels.index(label)].numpy()
            rgb = gallery.overlay(run_inputs.gray(at), cell.maps[row], run_lesion)
            relative = (f"overlays/{gallery.slug(cell.run.name)}/{gallery.slug(cell.method.name)}/"
                        f"{gallery.slug(label)}/{row:03d}-{gallery.slug(key)}.png")
            gallery.save_png(rgb, out / relative)
            row_cells.append(rgb)
            paths.append(relative)
        grid_rows.append(f"{key[-22:]}\n{truth}")
        grid_cells.append(row_cells)
        html_rows.append((key, truth, paths))
    rgb = gallery.grid(columns, grid_rows, grid_cells, size)
    grid_path = f"grids/{gallery.slug(label)}.png"
    gallery.save_png(rgb, out / grid_path)
    return gallery.LabelSection(label, grid_path, columns[1:], html_rows), rgb
