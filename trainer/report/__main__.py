"""`python -m trainer.report --runs RUNS [--runs MORE] --out OUT`: the paper-style comparison of
finished runs (and the sweeps found under RUNS), written as OUT/index.md, OUT/index.html, PNG
figures and OUT/summary.json. Reads run directories; never trains. Broken runs are listed with
the reason and skipped. Exit status: 0 written, 2 bad arguments or no usable run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shards.atomic import write_json, write_text
from trainer import rundir
from trainer.config import Config
from trainer.explain import truth_tables
from trainer.report import external, figures, recipes, seeds
from trainer.report.analysis import ANCHORS, Settings, compare, pairs, run_metrics
from trainer.report.render import render_html, render_markdown
from trainer.report.runs import RunData, find_runs, load_run, load_sweep
from trainer.rundir import RunDirError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=Path,
        action="append",
        required=True,
        help="a run directory or a folder of them (repeatable)",
    )
    parser.add_argument(
        "--sweep",
        type=Path,
        action="append",
        default=[],
        help="a sweep: its directory (STORAGE/NAME from sweeps.run), or its NAME under a --runs "
        "folder or its sweeps/ subfolder (repeatable; sweeps inside --runs are found anyway)",
    )
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples [1000]")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = [str(p) for p in args.runs if not p.exists()]
    if missing:
        print(f"error: --runs {missing[0]}: no such directory", file=sys.stderr)
        return 2
    paths, sweeps = find_runs(args.runs)
    sweeps = [s.resolve() for s in sweeps]
    for name in args.sweep:
        found = resolve_sweep(name, args.runs)
        if found is None:
            print(
                f"error: --sweep {name}: no sweep there (a folder with results.csv from sweeps.run, "
                f"given as a path or a name under {', '.join(map(str, args.runs))})",
                file=sys.stderr,
            )
            return 2
        if found not in sweeps:
            sweeps.append(found)
    runs, skipped = [], []
    for path in paths:
        name = _name(path, paths)
        try:
            runs.append(load_run(path, name))
        except RunDirError as err:
            skipped.append({"path": str(path), "reason": str(err)})
            print(f"skipped {path}: {err}", file=sys.stderr)
    if not runs:
        print(
            f"error: no usable run under {', '.join(map(str, args.runs))} ({len(skipped)} skipped)",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    summary = build(runs, sweeps, skipped, args.out, Settings(args.resamples, args.seed))
    write_json(args.out / "summary.json", summary)
    markdown = render_markdown(summary)
    write_text(args.out / "index.md", markdown)
    write_text(args.out / "index.html", render_html(markdown, "cxrbench report"))
    print(
        f"report: {len(runs)} runs, {len(summary['pairs'])} paired comparisons, "
        f"{len(summary['external']['results'])} external results, "
        f"{len(summary['figures'])} figures, {len(skipped)} skipped → {args.out / 'index.html'}"
    )
    return 0


def resolve_sweep(name: Path, runs: list[Path]) -> Path | None:
    """A sweep given as a directory, or by name under a --runs folder (or its sweeps/)."""
    candidates = [name, *(root / name for root in runs), *(root / "sweeps" / name for root in runs)]
    return next((c.resolve() for c in candidates if (c / "results.csv").is_file()), None)


def _name(path: Path, paths: list[Path]) -> str:
    """The run's folder name, or parent-folder when two runs share a folder name."""
    clash = sum(p.name == path.name for p in paths) > 1
    return f"{path.parent.name}-{path.name}" if clash else path.name


def build(
    runs: list[RunData], sweeps: list[Path], skipped: list[dict], out: Path, settings: Settings
) -> dict:
    started = time.perf_counter()
    summaries = [run_metrics(run, settings) for run in runs]
    primary = (
        "auroc_macro" if any(len(r.test.labels) > 1 for r in runs) else f"auroc/{runs[0].test.labels[0]}"
    )
    val_metric = "auroc_macro"
    figure_list: list[dict] = []

    def add(path: Path | None, caption: str, missing: str | None = None) -> None:
        figure_list.append({"file": path.name if path else None, "caption": caption, "missing": missing})

    for run, summary in zip(runs, summaries, strict=True):
        add(figures.roc_curves(run, out), f"ROC curves per label (test): {run.name}")
        add(figures.reliability(run, summary["calibration"], out), f"Reliability diagram (test): {run.name}")
        path = figures.confusion(run, summary.get("at_threshold", {}), out)
        add(
            path,
            f"Confusion matrices at the val-chosen threshold: {run.name}",
            None if path else "no val predictions to choose a threshold on",
        )
    add(
        figures.learning_curves(runs, val_metric, out), "Learning curves: val metric per epoch, training loss"
    )
    path = figures.metric_vs_time(runs, val_metric, out)
    add(path, "Val metric vs training time (top models)", None if path else "runs predate train_seconds")
    path = figures.comparison(summaries, primary, out)
    add(path, "Freeze-strategy comparison: test metric with 95% CI by model and strategy")
    points, source = _points(runs, summaries, sweeps, primary)
    for key, title, xlabel, name, log_x in (
        ("fraction", "Data efficiency", "fraction of training patients", "data_efficiency.png", True),
        ("augment", "Impact of augmentation", "augmentation policy", "augmentation.png", False),
        ("lr", "Learning-rate trade-off", "learning rate", "lr_tradeoff.png", True),
    ):
        path = figures.by_setting(points, key, f"{title} ({source})", xlabel, out, name, log_x)
        add(path, f"{title} ({source})", None if path else f"needs runs or sweep trials that vary {key}")
    path = figures.optimizer_tradeoff(_optimizer_curves(runs, sweeps, val_metric), val_metric, out)
    add(path, "Optimizer trade-off: val metric vs training time and per epoch, best run per optimizer",
        None if path else "needs runs or sweep trials that vary optim.name on one model")
    cards = {run.name: recipes.card(run) for run in runs}
    for summary in summaries:
        summary["recipe"] = cards[summary["name"]]
    compared = []
    for a, b in pairs(runs):
        compared.append(compare(a, b, settings) | {"budget": recipes.budget_differences(cards[a.name],
                                                                                       cards[b.name])})
    groups = seeds.group_runs(runs)
    seed_comparisons = []
    for a, b in seeds.pairs(groups):
        budget = recipes.budget_differences(cards[a.first.name], cards[b.first.name])
        seed_comparisons.append(seeds.compare(a, b, primary, settings) | {"budget": budget})
    by_name = {summary["name"]: summary for summary in summaries}
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "primary_metric": primary,
        "resamples": settings.resamples,
        "runs": summaries,
        "pairs": compared,
        "seed_groups": [seeds.describe(group, by_name, primary) for group in groups],
        "seed_comparisons": seed_comparisons,
        "external": external.external_validation(runs, settings),
        "tuning_budget": recipes.tuning_budget((run.family, cards[run.name], run.config.run.tuning)
                                               for run in runs),
        "sweeps": [{"path": str(s), "trials": len(load_sweep(s))} for s in sweeps],
        "figures": [f for f in figure_list if f["file"]],
        "missing_figures": [f for f in figure_list if not f["file"]],
        "skipped": skipped,
        "localization": localization(runs),
        "anchors": ANCHORS,
        "seconds": round(time.perf_counter() - started, 1),
    }


def localization(runs: list[RunData]) -> dict:
    """Heatmaps against radiologists' ground truth, from each run's localization/ (trainer.explain
    --ground-truth), and CheXlocalize's published figures when a file is theirs."""
    entries, problems = [], []
    for run in runs:
        problems += run.localization_problems
        for name, payload in run.localizations.items():
            entries.append({"run": run.name, "model": run.model, "family": run.family, "name": name,
                            **{k: payload.get(k) for k in ("ground_truth", "kind", "split", "threshold",
                                                           "scores", "pooled", "coverage")}})
    for problem in problems:
        print(f"localization skipped: {problem}", file=sys.stderr)
    chexlocalize = any(str(e.get("kind") or "").startswith("chexlocalize") for e in entries)
    return {"entries": entries, "problems": problems,
            "reference": truth_tables.load_reference() if chexlocalize else None}


def _points(runs: list[RunData], summaries: list[dict], sweeps: list[Path], primary: str) -> tuple[list, str]:
    """Setting → metric points for the data-efficiency / augmentation / lr figures: sweep trials
    (their best val metric) when there are any, else the runs' test metric. Never both mixed."""
    points = []
    for sweep in sweeps:
        for row in load_sweep(sweep):
            value = _float(next((v for k, v in row.items() if k.startswith("val_")), None))
            if value is None:
                continue
            try:
                config = rundir.read_config(Path(row.get("run_dir", "")))
            except RunDirError:
                continue  # a trial without a readable config: no setting to draw it at
            points.append(_point(config, value, "best val"))
    if points:
        return points, "sweep trials, best val metric"
    for run, summary in zip(runs, summaries, strict=True):
        value = (summary["metrics"].get(primary) or {}).get("value")
        points.append(_point(run.config, value, f"test {primary}"))
    return points, f"runs, test {primary}"


def _optimizer_curves(runs: list[RunData], sweeps: list[Path], metric: str) -> list[dict]:
    """Val curves of every run and sweep trial, with the optimizer and lr that trained them."""
    sources = [(run.config, run.records, run.name) for run in runs]
    for sweep in sweeps:
        for row in load_sweep(sweep):
            trial = Path(row.get("run_dir", ""))
            try:
                config, records = rundir.read_config(trial), rundir.read_records(trial, tolerant=True)
                sources.append((config, records, trial.name))
            except RunDirError:
                continue  # a trial without a readable config or records: nothing to draw
    curves = []
    for config, records, name in sources:
        val = [r for r in records if r.get("split") == "val" and isinstance(r.get(metric), int | float)]
        minutes = [r["train_seconds"] / 60 if isinstance(r.get("train_seconds"), int | float) else None
                   for r in val]
        curves.append({"model": config.model.name, "optimizer": config.optim.name,
                       "label": f"{config.optim.name} lr {config.optim.lr:g} ({name})",
                       "epochs": [r["epoch"] + 1 for r in val], "minutes": minutes,
                       "values": [r[metric] for r in val]})
    return curves


def _point(config: Config, value: float | None, metric: str) -> dict:
    return {
        "model": config.model.name,
        "freeze": config.model.freeze,
        "value": value,
        "metric": metric,
        "fraction": config.data.patient_fraction,
        "augment": config.data.augment,
        "lr": config.optim.lr,
        "optimizer": config.optim.name,
    }


def _float(text: object) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    sys.exit(main())
