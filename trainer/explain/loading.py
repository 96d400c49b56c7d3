"""A run's `best/` export → a model ready to explain, loading tensors only (never pickles).

What `best/` holds and how it is read is trainer/rundir.py's; this module rebuilds the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from shards.labels import resolve_label_set
from shards.manifest import load_manifest
from trainer import rundir
from trainer.config import Config
from trainer.rundir import RunDirError


class ExplainError(ValueError):
    """Input the explain job cannot use, in one line naming the file or option."""


@dataclass
class LoadedRun:
    name: str
    """Unique display name (the run directory's name, numbered if two runs share it)."""
    path: Path
    config: Config
    labels: tuple[str, ...]
    """The model's output labels, in output order."""
    model: nn.Module


def load_best_model(run_dir: Path, shards: Path | None) -> LoadedRun:
    """Rebuild the model from best/config.yaml and load best/'s weights onto it (CPU, eval mode)."""
    from trainer.models import build_model  # noqa: PLC0415 - imports timm

    best = run_dir / rundir.BEST
    # The export's config names paths of the training machine: pretrained weights are ours now,
    # and the shards are those given here.
    overrides = ["run.resume=auto", "model.pretrained=false", "model.weights=null", "model.compile=false"]
    if shards is not None:
        overrides.append(f"data.shards={shards}")
    try:
        config = rundir.read_config(best, overrides, environment=True)
    except RunDirError as err:  # names config.yaml: say which one
        raise ExplainError(f"--run {run_dir}: {rundir.BEST}/{err}") from None
    try:
        card = rundir.read_card(run_dir)
        weights = rundir.read_best_weights(run_dir)
    except RunDirError as err:  # names the file by its whole path already
        raise ExplainError(str(err)) from None
    if card.get("labels"):
        labels = tuple(card["labels"])
    elif config.data.labels:
        labels = resolve_label_set(config.data.labels)
    else:
        labels = load_manifest(Path(config.data.shards)).label_names
    model = build_model(config.model, num_classes=len(labels), image_size=config.data.image_size)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        text = str(err).strip().splitlines()[0]
        raise ExplainError(f"{best}: weights do not fit {config.model.name} ({text})") from None
    model.eval()
    return LoadedRun(run_dir.name, run_dir, config, labels, model)
