"""summary.json → index.md (readable as plain markdown) → index.html (markdown-it, tables on)."""

from __future__ import annotations

import html

from markdown_it import MarkdownIt

from trainer.explain import truth_tables
from trainer.metrics import format_metric

PNEUMONIA_METRICS = ("auroc/Pneumonia", "accuracy", "sensitivity", "specificity", "f1")


def _ci(cell: dict | None) -> str:
    if not cell or cell.get("value") is None:
        return "n/a"
    if cell.get("ci_low") is None:
        return f"{cell['value']:.3f}"
    return f"{cell['value']:.3f} [{cell['ci_low']:.3f}, {cell['ci_high']:.3f}]"


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def render_markdown(summary: dict) -> str:
    runs = summary["runs"]
    lines = [
        "# cxrbench report",
        "",
        f"Generated {summary['generated']} from {len(runs)} runs. Intervals are 95% percentile "
        f"intervals from {summary['resamples']} bootstrap resamples of test *patients* (all of a "
        "patient's images together). Synthetic data gives synthetic numbers: compare models with "
        "each other, not with the published anchors below.",
        "",
    ]
    multilabel = [r for r in runs if r["task"] == "multilabel"]
    binary = [r for r in runs if r["task"] == "binary"]
    if multilabel:
        labels = list(
            dict.fromkeys(
                k.split("/", 1)[1] for r in multilabel for k in r["metrics"] if k.startswith("auroc/")
            )
        )
        lines += ["## Test AUROC per model and freeze strategy", ""]
        metrics = [f"auroc/{label}" for label in labels] + ["auroc_macro", "auroc_chexpert5"]
        lines += _run_table([*labels, "macro", "CheXpert-5"], metrics, multilabel)
    if binary:
        lines += ["## Pneumonia: test metrics (threshold chosen on val)", ""]
        columns = ["AUROC", "accuracy", "sensitivity", "specificity", "F1"]
        lines += _run_table(columns, list(PNEUMONIA_METRICS), binary)
    lines += [
        "## Paired comparisons (same test images)",
        "",
        "Δ = second − first. p: two-sided paired patient bootstrap of the AUROC difference; "
        "DeLong: the smallest per-label p of DeLong's test (per-label values in summary.json).",
        "",
    ]
    rows = []
    for pair in summary["pairs"]:
        delong = [v["p_value"] for v in pair["delong"].values() if v["p_value"] is not None]
        rows.append(
            [
                f"{pair['a']} ({pair['model_a']})",
                f"{pair['b']} ({pair['model_b']})",
                str(pair["n"]),
                pair["metric"],
                f"{format_metric(pair['delta'], '+.3f')} [{format_metric(pair['ci_low'], '+.3f')}, "
                f"{format_metric(pair['ci_high'], '+.3f')}]",
                _p(pair["p_value"]),
                _p(min(delong)) if delong else "n/a",
                _budget(pair.get("budget")),
            ]
        )
    lines += (
        _table(["first", "second", "n", "metric", "Δ [95% CI]", "p (bootstrap)", "min p (DeLong)", "budget"],
               rows)
        if rows
        else ["(needs two runs on the same labels)", ""]
    )
    if any(group["n_seeds"] > 1 for group in summary.get("seed_groups", [])):
        lines += _replicates(summary["seed_groups"], summary["seed_comparisons"])
    external = summary.get("external") or {}
    if external.get("results") or external.get("skipped"):
        lines += _external(external)
    lines += _recipe_cards(runs)
    if summary.get("tuning_budget"):
        lines += _tuning_budget(summary["tuning_budget"])
    lines += ["## Calibration and the val-chosen threshold on test", ""]
    rows = []
    for run in runs:
        for label, calibration in run["calibration"].items():
            at = (run.get("at_threshold") or {}).get(label, {})
            rows.append(
                [
                    run["name"],
                    label,
                    format_metric(calibration["ece"], ".3f"),
                    format_metric(run["thresholds"].get(label), ".3f"),
                    format_metric(at.get("sensitivity"), ".3f"),
                    format_metric(at.get("specificity"), ".3f"),
                ]
            )
    lines += _table(["run", "label", "ECE", "threshold (val)", "test sensitivity", "test specificity"], rows)
    lines += ["## Figures", ""]
    for figure in summary["figures"]:
        lines += [f"### {figure['caption']}", "", f"![{figure['caption']}]({figure['file']})", ""]
    if summary["missing_figures"]:
        lines += [
            "Not drawn: " + "; ".join(f"{f['caption']} ({f['missing']})" for f in summary["missing_figures"]),
            "",
        ]
    lines += _localization(summary.get("localization") or {})
    lines += ["## Published anchors (other people's numbers, other data and protocols)", ""]
    lines += _table(
        ["dataset", "metric", "value", "model"],
        [[a["dataset"], a["metric"], str(a["value"]), a["model"]] for a in summary["anchors"]],
    )
    if summary["skipped"]:
        lines += ["## Skipped runs", ""]
        lines += [f"- `{s['path']}`: {s['reason']}" for s in summary["skipped"]] + [""]
    return "\n".join(lines)


def _localization(section: dict) -> list[str]:
    """Heatmaps against radiologists' ground truth (runs' localization/), CheXlocalize beside."""
    entries = section.get("entries") or []
    if not entries:
        return []
    lines = [
        "## Localization against radiologists' ground truth",
        "",
        "From `python -m trainer.explain --ground-truth` (each run's `localization/`). Hit rate: the "
        "heatmap's peak lies in the radiologists' region (pointing game); random point: the regions' mean "
        "area share, what a uniformly random point hits; mIoU: the map binarized (Otsu unless stated), "
        "over images where it is non-empty (n IoU). Scored: positive labels with a non-empty region.",
        "",
        *truth_tables.score_header(["run", "model", "ground truth"]),
    ]
    for entry in entries:
        where = f"{entry['name']} ({entry['split']}, {entry['threshold']})"
        lines += truth_tables.score_rows(entry["scores"] or {}, entry["pooled"] or {},
                                         [entry["run"], entry["model"], where])
    lines.append("")
    if section.get("problems"):
        lines += [f"Not read: {'; '.join(section['problems'])}", ""]
    if section.get("reference"):
        lines += truth_tables.reference_lines(section["reference"])
    return lines


def _replicates(groups: list[dict], comparisons: list[dict]) -> list[str]:
    """Runs of one config over seeds (mean ± sd), and the groups compared over matched seeds."""
    lines = [
        "## Replicates (mean ± sd over seeds)",
        "",
        "Runs whose configs differ only in the seed (and where or how they ran) form a group; mean "
        "and sample sd of each run's test point estimate (per label in summary.json).",
        "",
    ]
    rows = [
        [
            g["name"],
            g["model"],
            g["pretrained"],
            g["freeze"],
            str(g["n_seeds"]),
            g["headline"],
            _mean_sd(g["metrics"][g["headline"]]),
            ", ".join(
                f"{seed}: {format_metric(value, '.3f')}"
                for seed, value in zip(g["seeds"], g["metrics"][g["headline"]]["values"], strict=True)
            ),
        ]
        for g in groups
    ]
    lines += _table(
        ["group", "model", "pretrained", "freeze", "n seeds", "metric", "mean ± sd", "per seed"], rows
    )
    lines += [
        "## CNN vs ViT over matched seeds",
        "",
        "Δ = second − first, the mean over the seeds both groups trained with of the per-seed "
        "difference on the same test images. The interval and p come from a hierarchical bootstrap "
        "(seeds, then patients), so they hold the seed-to-seed spread as well as the test patients; "
        "with one matched seed it is the paired patient bootstrap.",
        "",
    ]
    rows = [
        [
            c["a"],
            c["b"],
            ", ".join(map(str, c["seeds"])),
            c["metric"],
            f"{format_metric(c['delta'], '+.3f')} [{format_metric(c['ci_low'], '+.3f')}, "
            f"{format_metric(c['ci_high'], '+.3f')}]",
            _p(c["p_value"]),
            c["test"],
            _budget(c.get("budget")),
        ]
        for c in comparisons
    ]
    lines += (
        _table(["first", "second", "seeds", "metric", "Δ [95% CI]", "p", "test", "budget"], rows)
        if rows
        else ["(needs two groups on the same labels that share a seed)", ""]
    )
    return lines


def _external(external: dict) -> list[str]:
    """Each run on each external pack beside its internal test, then CNN vs ViT per pack."""
    lines = [
        "## External validation",
        "",
        "Each run's best model on other packs (`python -m trainer.evaluate`), on the labels both "
        "vocabularies share with the same meaning, scored with the run's own label policy. AUROC with "
        "its patient-bootstrap 95% interval outside, and inside (the run's internal test, same label); "
        "drop = internal − external (positive: worse outside). macro: the shared labels defined in "
        "both sets.",
        "",
    ]
    rows = []
    for result in external["results"]:
        for row in result["rows"]:
            name = row["label"] if row["label"] == "macro" or row["label"] == row["target"] \
                else f"{row['label']} (= {row['target']})"
            rows.append([result["run"], result["model"], f"{result['dataset']} ({result['split']})",
                         name, str(result["n"]), _ci(row["external"]), _ci(row["internal"]),
                         format_metric(row["drop"], "+.3f")])
    lines += _table(["run", "model", "external pack", "label", "n", "external AUROC [95% CI]",
                     "internal test AUROC [95% CI]", "drop"], rows)
    lines += [f"- {r['run']} on {r['dataset']}: left out (no same-meaning label in the pack): "
              f"{', '.join(r['left_out']) or 'none'}"
              + (f" — ⚠ scored best/ of step {r['best_step']}, exported again since: re-run "
                 "trainer.evaluate" if r.get("stale") else "")
              for r in external["results"]] + [""]
    lines += ["### CNN vs ViT on each external pack", "",
              "Δ = second − first on the same external images; p: paired patient bootstrap, as for "
              "the internal test.", ""]
    rows = [
        [c["dataset"], f"{c['a']} ({c['model_a']})", f"{c['b']} ({c['model_b']})", str(c["n"]), c["metric"],
         f"{format_metric(c['delta'], '+.3f')} [{format_metric(c['ci_low'], '+.3f')}, "
         f"{format_metric(c['ci_high'], '+.3f')}]", _p(c["p_value"]),
         _p(min(ps)) if (ps := [v["p_value"] for v in c["delong"].values() if v["p_value"] is not None])
         else "n/a"]
        for c in external["comparisons"]
    ]
    lines += (_table(["external pack", "first", "second", "n", "metric", "Δ [95% CI]", "p (bootstrap)",
                      "min p (DeLong)"], rows)
              if rows else ["(needs two runs on the same labels evaluated on the same pack)", ""])
    if external.get("skipped"):
        lines += ["Not read: " + "; ".join(f"`{s['path']}` ({s['reason']})" for s in external["skipped"]), ""]
    return lines


RECIPE_COLUMNS = (
    ("pretrained", "pretrained"), ("image_size", "size"), ("global_batch", "global batch"),
    ("lr_top", "lr top"), ("lr_bottom", "lr bottom"), ("lr_scaling", "lr scaling"),
    ("layer_decay", "layer decay"), ("optimizer", "optimizer"), ("weight_decay", "weight decay"),
    ("epochs", "epochs"), ("steps", "steps"), ("images_seen", "images seen"), ("augment", "augment"),
    ("labels", "label policy"), ("freeze", "freeze"), ("trainable_parameters", "trainable"),
    ("tuning_trials", "tuning trials"),
)


def _recipe_cards(runs: list[dict]) -> list[str]:
    """One row per run: how it was trained, so a reader sees whether two runs were treated alike."""
    lines = [
        "## Recipe cards",
        "",
        "How each run was trained. lr top/bottom: the peak learning rate of the highest and lowest "
        "trainable layer group (after the global-batch rule and layer decay); images seen and steps "
        "at the last evaluation; tuning trials: the search its hyperparameters came from (0: set by "
        "hand). A comparison whose sides differ in steps, images seen or tuning trials is flagged in "
        "its budget column.",
        "",
    ]
    rows = [[r["name"], *(_recipe_cell(key, r.get("recipe", {}).get(key)) for key, _ in RECIPE_COLUMNS)]
            for r in runs]
    return lines + _table(["run", *(title for _, title in RECIPE_COLUMNS)], rows)


def _recipe_cell(key: str, value: object) -> str:
    if value is None:
        return "n/a"
    if key in ("lr_top", "lr_bottom", "weight_decay") and isinstance(value, int | float):
        return f"{value:.3g}"
    if key == "trainable_parameters" and isinstance(value, int):
        return _params(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _tuning_budget(budget: list[dict]) -> list[str]:
    lines = [
        "## Tuning budget",
        "",
        "The hyperparameter searches each family's runs came from (sweeps.study's tuning stage or a "
        "sweep's best.yaml): searches, their trials, the epochs and images those trials trained.",
        "",
    ]
    rows = [[b["family"], str(b["runs"]), str(b["untuned_runs"]), str(len(b["searches"])),
             ", ".join(map(str, b.get("trials_per_search", []))) or "—", str(b["trials"]),
             f"{b['trial_epochs']:,}", f"{b['images']:,}"] for b in budget]
    lines += _table(["family", "runs", "hand-set runs", "searches", "trials per search", "trials",
                     "trial epochs", "images seen in tuning"], rows)
    per_search = {tuple(b.get("trials_per_search", [])) for b in budget}
    untuned = {b["untuned_runs"] == b["runs"] for b in budget}
    if len(per_search) > 1 or len(untuned) > 1:
        lines += ["**Unequal tuning**: the families' searches differ in trials (or one side was not "
                  "tuned at all); a difference between them may be the tuning, not the architecture.", ""]
    return lines


def _budget(notes: list[str] | None) -> str:
    if notes is None:
        return "n/a"
    return "equal" if not notes else "⚠ " + "; ".join(notes)


def _mean_sd(cell: dict) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean']:.3f}" if cell["sd"] is None else f"{cell['mean']:.3f} ± {cell['sd']:.3f}"


def _run_table(columns: list[str], metrics: list[str], runs: list[dict]) -> list[str]:
    """One row per run: who it is, each metric with its CI, then its cost."""
    header = ["run", "model", "pretrained", "freeze", "optimizer", *columns, "trainable params", "train min",
              "img/s"]
    rows = [
        [
            r["name"],
            r["model"],
            r["pretrained"],
            r["freeze"],
            r.get("optimizer", "adamw"),
            *(_ci(r["metrics"].get(m)) for m in metrics),
            _params(r["trainable_parameters"]),
            _minutes(r["train_seconds"]),
            format_metric(r["img_per_s"], ".0f"),
        ]
        for r in runs
    ]
    return _table(header, rows)


def _params(count: int | None) -> str:
    return "n/a" if count is None else f"{count / 1e6:.2f} M"


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f}"


def render_html(markdown: str, title: str) -> str:
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;display:block;overflow-x:auto}"
        "td,th{border:1px solid #ccc;padding:3px 6px}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n{body}</body></html>\n"
    )
