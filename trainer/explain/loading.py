"""A run's `best/` export → a model ready to explain, loading tensors only (never pickles)."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from shards.labels import resolve_label_set
from shards.manifest import load_manifest
from trainer.config import Config, load_config


class ExplainError(ValueError):
    """Input the explain job cannot use, in one line naming the file or option."""


TORCH_FILES = ("model.pt", "model.pth", "pytorch_model.bin")
"""Accepted besides model.safetensors, loaded with torch.load(weights_only=True)."""


@dataclass
class LoadedRun:
    name: str
    """Unique display name (the run directory's name, numbered if two runs share it)."""
    path: Path
    config: Config
    labels: tuple[str, ...]
    """The model's output labels, in output order."""
    model: nn.Module


def load_weights(best: Path) -> dict[str, torch.Tensor]:
    """best/model.safetensors, or a plain tensor file; anything that needs unpickling is refused."""
    path = best / "model.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ExplainError(f"{path}: not a safetensors file ({_first_line(err)}); refusing to load "
                               "it any other way") from None
    for name in TORCH_FILES:
        path = best / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
            raise ExplainError(f"{path}: refused: not a plain tensor file ({_first_line(err)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ExplainError(f"{path}: refused: expected a flat name → tensor mapping")
        return state
    raise ExplainError(f"{best}: no model.safetensors (was the run trained to its first validation?)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_run(run_dir: Path, shards: Path | None) -> LoadedRun:
    """Rebuild the model from best/config.yaml and load best/'s weights onto it (CPU, eval mode)."""
    from trainer.models import build_model  # noqa: PLC0415 - imports timm

    best = run_dir / "best"
    if not (best / "config.yaml").is_file():
        raise ExplainError(f"--run {run_dir}: no best/config.yaml (not a trained run directory)")
    # The export's config names paths of the training machine: pretrained weights are ours now,
    # and the shards are those given here.
    overrides = ["run.resume=auto", "model.pretrained=false", "model.weights=null", "model.compile=false"]
    if shards is not None:
        overrides.append(f"data.shards={shards}")
    config = load_config(best / "config.yaml", overrides)
    card_path = best / "model_card.json"
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    if card.get("labels"):
        labels = tuple(card["labels"])
    elif config.data.labels:
        labels = resolve_label_set(config.data.labels)
    else:
        labels = load_manifest(Path(config.data.shards)).label_names
    weights = load_weights(best)
    model = build_model(config.model, num_classes=len(labels))
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ExplainError(f"{best}: weights do not fit {config.model.name} ({_first_line(err)})") from None
    model.eval()
    return LoadedRun(run_dir.name, run_dir, config, labels, model)
