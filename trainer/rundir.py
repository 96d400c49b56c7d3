"""The run directory, a format: the one module that knows its layout, writes it and reads it back.

Training writes it; sweeps, explain, report and the launch scripts read it. Layout:

    config.yaml              the resolved config (loads back through `load_config`)
    metrics.jsonl            one JSON object per line: train windows, val/test evaluations
    predictions_{split}.npz  per-sample keys, patients, labels, probabilities, targets, masks
    best/                    model.safetensors (timm's names, float32), config.yaml, model_card.json
    checkpoints/step-N/      resumable state (trainer/checkpoint.py owns what is inside)
    pack.json                the pack the checkpoints were trained on: shards (data.shards, absolute),
                             identity (shards.verify.pack_identity), dataset, shards (count),
                             samples; written when the run starts from scratch, checked when a
                             checkpoint is resumed (trainer/packcheck.py)
    preempted.json           present while a preempted run waits to be requeued
    tb/                      TensorBoard event files
    external/<pack>/         best/ scored on another pack (`python -m trainer.evaluate`):
                             external.json (pack, split, label mapping, left-out labels, policy),
                             metrics.jsonl (one record) and predictions_{split}.npz, as above but
                             holding only the labels the pack shares, under the run's names
    localization/<name>.json heatmaps scored against radiologists' ground truth (trainer.explain
                             --ground-truth): one file per ground-truth file and split
    set-aside/<UTC time>/    what an earlier attempt left when `run.resume=restart` started over
                             (its checkpoints, best/, metrics, TensorBoard, predictions, ...),
                             moved, never deleted; readers skip it

A reader never re-derives what the writer knew: a patient comes from the predictions file, not
from a key. Every file is written whole or not at all (shards/atomic.py). Problems with a run
directory are `RunDirError`s: one line naming the file and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from shards.atomic import replacing, replacing_dir, write_json, write_text
from trainer.config import RESOLVED, Config, ConfigError, load_config

if TYPE_CHECKING:  # torch is imported where weights are read or written: readers of the
    import torch  # metrics and predictions (report, sweep tables) start without it

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
BEST = "best"
WEIGHTS = "model.safetensors"
CARD = "model_card.json"
CHECKPOINTS = "checkpoints"
PREEMPTED = "preempted.json"
PACK = "pack.json"
TENSORBOARD = "tb"
EXTERNAL = "external"
EXTERNAL_RECORD = "external.json"
LOCALIZATION = "localization"
SET_ASIDE = "set-aside"
TORCH_WEIGHT_FILES = ("model.pt", "model.pth", "pytorch_model.bin")
"""Accepted in best/ besides model.safetensors (exports from elsewhere), loaded tensors-only."""


class RunDirError(ValueError):
    """A run directory (or one of its files) that cannot be used, in one line."""


def predictions_path(run_dir: Path, split: str) -> Path:
    return run_dir / f"predictions_{split}.npz"


# --- config.yaml ---------------------------------------------------------------------------------


def write_config(run_dir: Path, config: Config, resolved: dict | None = None) -> None:
    """The resolved config, first thing in a run directory (main rank), with what this launch made
    of it (`resolved`: processes, global batch, effective lr; trainer/recipe.py) as a record that
    load_config skips when the file is fed back."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if resolved is not None:
        text += (f"# {RESOLVED}: what this launch made of the settings above (recomputed by every "
                 "launch; ignored when read back)\n" + yaml.safe_dump({RESOLVED: resolved}, sort_keys=False))
    write_text(run_dir / CONFIG, text)


def read_resolved(directory: Path) -> dict:
    """config.yaml's `resolved` block ({} for a run written before runs recorded it)."""
    try:
        raw = yaml.safe_load((directory / CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    block = raw.get(RESOLVED) if isinstance(raw, dict) else None
    return block if isinstance(block, dict) else {}


def read_config(directory: Path, overrides: Sequence[str] = (), environment: bool = False) -> Config:
    """A run's (or best/'s) config.yaml through the config loader, so it is validated as a config.
    `environment`: also check that what it names exists here (shards, weights), for a config about
    to be run again; a record read for its settings (the report, a sweep table) does not need it."""
    path = directory / CONFIG
    if not path.is_file():
        raise RunDirError(f"{CONFIG} missing")
    try:
        return load_config(path, list(overrides), environment=environment)
    except ConfigError as err:
        raise RunDirError(f"{CONFIG}: {err}") from None


# --- metrics.jsonl -------------------------------------------------------------------------------


def append_record(run_dir: Path, record: dict) -> None:
    """One line, appended (the main rank only): a reader may see the file grow, never a record
    change."""
    with (run_dir / METRICS).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=_plain) + "\n")


def read_records(run_dir: Path, tolerant: bool = False) -> list[dict]:
    """Every record of metrics.jsonl, in order.

    `tolerant` for a file that may still be written (a sweep trial running now): a missing file is
    no records and a torn or damaged line is skipped. Otherwise (a finished run) the first bad line
    is a `RunDirError` naming it."""
    path = run_dir / METRICS
    if not path.is_file():
        if tolerant:
            return []
        raise RunDirError(f"{METRICS} missing")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if tolerant:
                continue
            raise RunDirError(f"{METRICS} line {number}: not JSON") from None
        if not isinstance(record, dict) or "split" not in record:
            if tolerant:
                continue
            raise RunDirError(f"{METRICS} line {number}: expected an object with a split")
        records.append(record)
    return records


def truncate_records(run_dir: Path, step: int) -> None:
    """Keep the records up to `step` (a resumed run continues from its checkpoint's step, so a
    step logged after that checkpoint would otherwise appear twice)."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    kept = [record for record in read_records(run_dir, tolerant=True) if record.get("step", 0) <= step]
    with replacing(path) as temp:
        temp.write_text("".join(json.dumps(record, default=_plain) + "\n" for record in kept),
                        encoding="utf-8")


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- predictions_{split}.npz ---------------------------------------------------------------------


Part = tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]
"""One rank's rows: keys, patients, probabilities, targets, masks."""


@dataclass
class Predictions:
    """One split's per-sample scores, one row per sample, unique keys, sorted by key."""

    keys: np.ndarray
    patients: np.ndarray
    """The patient of each row, from the shard's metadata: the report resamples patients."""
    labels: tuple[str, ...]
    probs: np.ndarray
    targets: np.ndarray
    masks: np.ndarray
    gathered: int = 0
    """Rows received from all ranks before de-duplication (equal to len(keys) when exact)."""

    @classmethod
    def merge(cls, labels: tuple[str, ...], parts: Sequence[Part]) -> Predictions:
        """Rows gathered from every rank, as (keys, patients, probs, targets, masks); a key seen
        twice is kept once (its first occurrence)."""
        seen: dict[str, tuple[int, int]] = {}
        for part_index, (keys, *_) in enumerate(parts):
            for row, key in enumerate(keys):
                seen.setdefault(key, (part_index, row))
        order = sorted(seen)
        rows = [seen[key] for key in order]
        width = len(labels)

        def stack(column: int) -> np.ndarray:
            if not rows:
                return np.zeros((0, width), np.float32)
            return np.stack([parts[p][column][r] for p, r in rows])

        patients = np.array([parts[p][1][r] for p, r in rows], dtype=str)
        return cls(np.array(order, dtype=str), patients, tuple(labels), stack(2), stack(3), stack(4),
                   gathered=sum(len(part[0]) for part in parts))

    def aligned(self, keys: np.ndarray) -> Predictions:
        """The rows of `keys`, in that order (paired comparisons on the same images)."""
        index = {key: i for i, key in enumerate(self.keys.tolist())}
        rows = np.array([index[key] for key in keys.tolist()], dtype=int)
        return Predictions(self.keys[rows], self.patients[rows], self.labels, self.probs[rows],
                           self.targets[rows], self.masks[rows], len(rows))


def write_predictions(run_dir: Path, split: str, predictions: Predictions) -> None:
    """Plain arrays (numbers and unicode strings): `np.load` never needs a pickle to read them."""
    with replacing(predictions_path(run_dir, split), suffix=".npz") as temp:
        np.savez_compressed(temp, keys=predictions.keys.astype(str),
                            patients=predictions.patients.astype(str),
                            labels=np.array(predictions.labels, dtype=str), probs=predictions.probs,
                            targets=predictions.targets, masks=predictions.masks)


def read_predictions(path: Path) -> Predictions:
    """A predictions file, or a `RunDirError` naming it and what is missing or wrong."""
    if not path.is_file():
        raise RunDirError(f"{path.name} missing")
    try:
        with np.load(path, allow_pickle=False) as data:  # never unpickle a run's files
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path.name}: not a predictions file ({_first_line(err)})") from None
    if "patients" not in arrays:
        raise RunDirError(f"{path.name}: no patients array (written before predictions carried "
                          "patients): re-evaluate the run to score it by patient")
    missing = sorted({"keys", "labels", "probs", "targets", "masks"} - set(arrays))
    if missing:
        raise RunDirError(f"{path.name}: no {missing[0]} array")
    predictions = Predictions(
        arrays["keys"].astype(str), arrays["patients"].astype(str), tuple(str(x) for x in arrays["labels"]),
        arrays["probs"].astype(np.float64), arrays["targets"].astype(np.float64),
        arrays["masks"].astype(np.float64), gathered=len(arrays["keys"]))
    rows = len(predictions.keys)
    shape = (rows, len(predictions.labels))
    if not (predictions.probs.shape == predictions.targets.shape == predictions.masks.shape == shape) \
            or predictions.patients.shape != (rows,):
        raise RunDirError(f"{path.name}: arrays of mismatched shapes")
    if rows and not all(predictions.patients):
        raise RunDirError(f"{path.name}: a row without a patient (were the shards packed without one?)")
    return predictions


# --- best/: the exported model -------------------------------------------------------------------


def export_best(run_dir: Path, weights: dict[str, torch.Tensor], config: Config, card: dict) -> None:
    """Weights (float32 safetensors, timm's names) + the config that rebuilds the model + a model
    card, swapped in as one directory (main rank)."""
    import torch  # noqa: PLC0415 - see the imports
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {name: value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype)
               .contiguous() for name, value in weights.items()}
    with replacing_dir(run_dir / BEST) as temp:
        save_file(tensors, str(temp / WEIGHTS), metadata={"format": "pt"})
        config.save(temp / CONFIG)
        write_json(temp / CARD, card)


def read_card(run_dir: Path) -> dict:
    """best/model_card.json, or {} when there is none yet (a run before its first validation)."""
    path = run_dir / BEST / CARD
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise RunDirError(f"{path}: not JSON") from None
    if not isinstance(card, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    return card


def read_best_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """best/model.safetensors, or a plain tensor file; anything that needs unpickling is refused."""
    import pickle  # noqa: PLC0415 - only to name its error

    import torch  # noqa: PLC0415 - see the imports
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    best = run_dir / BEST
    path = best / WEIGHTS
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise RunDirError(f"{path}: not a safetensors file ({_first_line(err)}); refusing to load "
                              "it any other way") from None
    for name in TORCH_WEIGHT_FILES:
        path = best / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
            raise RunDirError(f"{path}: refused: not a plain tensor file ({_first_line(err)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise RunDirError(f"{path}: refused: expected a flat name → tensor mapping")
        return state
    raise RunDirError(f"{best}: no {WEIGHTS} (was the run trained to its first validation?)")


# --- external/<pack>/: best/ on another dataset ---------------------------------------------------


def external_dir(run_dir: Path, name: str) -> Path:
    return run_dir / EXTERNAL / name


def write_external(directory: Path, info: dict, record: dict, predictions: Predictions) -> None:
    """One external evaluation, swapped in as a whole directory (a crash leaves the previous one or
    none): `info` (external.json: at least the split), the metrics `record`, the predictions."""
    with replacing_dir(directory) as temp:
        write_json(temp / EXTERNAL_RECORD, info)
        append_record(temp, record)
        write_predictions(temp, info["split"], predictions)


@dataclass
class External:
    """One `external/<name>/` of a run, read back."""

    name: str
    path: Path
    info: dict
    """external.json: run, shards, dataset, split, labels (run → target pairs), left_out, policy."""
    record: dict
    predictions: Predictions
    """Only the shared labels, named as the run names them."""


def read_externals(run_dir: Path) -> tuple[list[External], list[dict]]:
    """Every external evaluation of a run (by name), and the broken ones as {path, reason}: a
    damaged one never hides the run or the others."""
    found, broken = [], []
    root = run_dir / EXTERNAL
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []:
        try:
            found.append(read_external(path))
        except RunDirError as err:
            broken.append({"path": str(path), "reason": str(err)})
    return found, broken


def read_external(path: Path) -> External:
    info_path = path / EXTERNAL_RECORD
    if not info_path.is_file():
        raise RunDirError(f"{EXTERNAL_RECORD} missing")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise RunDirError(f"{EXTERNAL_RECORD}: not JSON") from None
    if not isinstance(info, dict) or not isinstance(info.get("split"), str) \
            or not isinstance(info.get("labels"), list):
        raise RunDirError(f"{EXTERNAL_RECORD}: expected an object with a split and labels")
    records = read_records(path)
    if not records:
        raise RunDirError(f"{METRICS}: no record")
    predictions = read_predictions(predictions_path(path, info["split"]))
    shared = tuple(pair.get("run") for pair in info["labels"] if isinstance(pair, dict))
    if predictions.labels != shared:
        raise RunDirError(f"{predictions_path(path, info['split']).name}: labels {list(predictions.labels)} "
                          f"differ from {EXTERNAL_RECORD}'s {list(shared)}")
    return External(path.name, path, info, records[-1], predictions)


# --- pack.json: the pack a run trains on ----------------------------------------------------------


def write_pack(run_dir: Path, record: dict) -> None:
    write_json(run_dir / PACK, record)


def read_pack(run_dir: Path) -> dict | None:
    """pack.json, or None for a run written before runs recorded their pack."""
    path = run_dir / PACK
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: unreadable ({_first_line(err)})") from None
    if not isinstance(record, dict) or not isinstance(record.get("identity"), str) \
            or not isinstance(record.get("shards"), str):
        raise RunDirError(f"{path}: expected an object with shards and identity")
    return record


def run_of_checkpoint(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (RUN/checkpoints/step-N → RUN), or None for a
    checkpoint directory kept outside a run directory."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


# --- preemption marker ---------------------------------------------------------------------------


def write_preempted(run_dir: Path, step: int, exit_code: int) -> None:
    write_json(run_dir / PREEMPTED, {"step": step, "exit_code": exit_code})


def clear_preempted(run_dir: Path) -> None:
    (run_dir / PREEMPTED).unlink(missing_ok=True)


def set_aside(run_dir: Path) -> Path | None:
    """Move everything a run wrote besides config.yaml into set-aside/<UTC time>/ (main rank), so
    a run that starts over here neither mixes with nor destroys the earlier attempt. Returns the
    folder, or None when there was nothing to move. Renames only: no space needed."""
    import time  # noqa: PLC0415 - only here

    products = [run_dir / name for name in (CHECKPOINTS, BEST, METRICS, TENSORBOARD, EXTERNAL, LOCALIZATION,
                                            PREEMPTED)]
    products += sorted(run_dir.glob("predictions_*.npz"))
    present = [path for path in products if path.exists()]
    if not present:
        return None
    folder = run_dir / SET_ASIDE / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while folder.exists():
        folder = folder.with_name(folder.name + "+")
    folder.mkdir(parents=True)
    for path in present:
        path.replace(folder / path.name)
    return folder


def has_records(run_dir: Path) -> bool:
    """Whether a run has logged anything here (a fresh run must not append to it)."""
    return (run_dir / METRICS).is_file()


def holds_run(path: Path) -> bool:
    """Whether `path` looks like a run directory (a run that started writes both files first)."""
    return (path / METRICS).is_file() or (path / CONFIG).is_file()


# --- localization against ground truth (written by trainer.explain, read by trainer.report) ------


def write_localization(run_dir: Path, name: str, payload: dict) -> None:
    write_json(run_dir / LOCALIZATION / f"{name}.json", payload)


def read_localizations(run_dir: Path) -> tuple[dict[str, dict], list[str]]:
    """localization/*.json by name, and one line per file that is not a JSON object (skipped)."""
    found, problems = {}, []
    for path in sorted((run_dir / LOCALIZATION).glob("*.json")):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{path}: unreadable ({_first_line(err)})")
            continue
        if isinstance(payload, dict) and isinstance(payload.get("scores"), dict):
            found[path.stem] = payload
        else:
            problems.append(f"{path}: expected a JSON object with scores")
    return found, problems


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
