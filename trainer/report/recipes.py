"""The recipe card of each run, and the budget each side of a comparison got.

A ViT-vs-CNN verdict is only as fair as the recipes behind it: the card shows at a glance whether
two runs were treated alike (weights, resolution, batch, learning rate at the top and bottom of the
network, schedule, data policy, tuning), and `budget_differences` names what differs in what a run
was given (optimizer steps, images seen, tuning trials) for every comparison the report draws.
"""

from __future__ import annotations

from collections.abc import Iterable

from trainer import rundir
from trainer.report.runs import RunData

BUDGET = ("steps", "images_seen", "tuning_trials")
"""What a run was given: a comparison whose sides differ in any of these is flagged."""


def card(run: RunData) -> dict:
    """The recipe as trained: config.yaml, its `resolved` block (or the model card's copy) and the
    records (steps and images seen at the last evaluation)."""
    config = run.config
    recipe = run.card.get("recipe") or rundir.read_resolved(run.path)
    evaluations = [r for r in run.records if r.get("split") in ("val", "test")]
    steps = max((r["step"] for r in evaluations if isinstance(r.get("step"), int)), default=None)
    seen = max((r["images_seen"] for r in evaluations if isinstance(r.get("images_seen"), int)),
               default=None)
    global_batch = recipe.get("global_batch")
    if seen is None and steps is not None and global_batch:
        seen = steps * int(global_batch)  # runs that predate the samples field
    effective = recipe.get("effective_lr", config.optim.lr)
    mode = config.model.layer_decay_mode if config.model.freeze == "layer_decay" else "off"
    return {
        "pretrained": run.pretrained,
        "image_size": config.data.image_size,
        "global_batch": global_batch,
        "lr_top": recipe.get("lr_top", effective),
        "lr_bottom": recipe.get("lr_bottom", effective),
        "lr_scaling": config.optim.lr_scaling,
        "layer_decay": f"{config.model.layer_decay} ({mode})" if mode != "off" else "off",
        "optimizer": config.optim.name,
        "weight_decay": config.optim.weight_decay,
        "epochs": config.optim.epochs,
        "steps": steps,
        "images_seen": seen,
        "augment": config.data.augment,
        "labels": f"uncertain {config.data.uncertain}, blank {config.data.blank}",
        "freeze": config.model.freeze,
        "trainable_parameters": run.trainable_parameters,
        "tuning_trials": int(config.run.tuning.get("trials", 0)),
        "tuning_search": config.run.tuning.get("search"),
    }


def budget_differences(a: dict, b: dict) -> list[str]:
    """`steps 120 vs 60`-style notes for each budget item that differs between two cards (an item
    unknown on either side is not compared)."""
    notes = []
    for key in BUDGET:
        left, right = a.get(key), b.get(key)
        if left is not None and right is not None and left != right:
            notes.append(f"{key.replace('_', ' ')} {left:,} vs {right:,}")
    return notes


def tuning_budget(cards: Iterable[tuple[str, dict, dict]]) -> list[dict]:
    """Per family: the searches its runs' hyperparameters came from and what they spent, from each
    run's `run.tuning` record (family, card, tuning record). A family of hand-set runs shows 0."""
    families: dict[str, dict] = {}
    for family, recipe, tuning in cards:
        row = families.setdefault(family, {"family": family, "runs": 0, "untuned_runs": 0, "searches": {},
                                           "trials": 0, "trial_epochs": 0, "images": 0})
        row["runs"] += 1
        if not recipe.get("tuning_trials"):
            row["untuned_runs"] += 1
            continue
        key = str(tuning.get("search") or tuning.get("sweep") or "?")
        row["searches"][key] = tuning
    out = []
    for row in families.values():
        searches = row.pop("searches")
        row["searches"] = sorted(searches)
        row["trials"] = sum(int(t.get("trials", 0)) for t in searches.values())
        row["trials_per_search"] = sorted({int(t.get("trials", 0)) for t in searches.values()})
        row["trial_epochs"] = sum(int(t.get("trial_epochs", 0)) for t in searches.values())
        row["images"] = sum(int(t.get("images", 0)) for t in searches.values())
        out.append(row)
    return sorted(out, key=lambda row: row["family"])
