"""The run directory format (trainer/rundir.py): each reader's error policy, predictions that carry
patients, crash-safe writes. Files are written here by hand (json, numpy, safetensors) in the
format the trainer writes, so the readers are checked against the format, not against themselves."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from shards.atomic import replacing_dir
from trainer import rundir
from trainer.checkpoint import TrainState
from trainer.config import Config
from trainer.rundir import Predictions, RunDirError

LABELS = ("Edema", "Effusion")


def write_lines(run_dir: Path, *lines: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def test_records_strict_names_the_bad_line_tolerant_skips_it(tmp_path: Path) -> None:
    write_lines(tmp_path, '{"split": "train", "step": 1}', '{"split": "val", "st', '{"step": 2}',
                '{"split": "val", "step": 2}')
    with pytest.raises(RunDirError, match=r"^metrics.jsonl line 2: not JSON$"):
        rundir.read_records(tmp_path)
    assert [r["step"] for r in rundir.read_records(tmp_path, tolerant=True)] == [1, 2]
    write_lines(tmp_path, '{"split": "train", "step": 1}', '{"step": 2}')
    with pytest.raises(RunDirError, match=r"^metrics.jsonl line 2: expected an object with a split$"):
        rundir.read_records(tmp_path)
    empty = tmp_path / "empty"
    assert rundir.read_records(empty, tolerant=True) == []
    with pytest.raises(RunDirError, match=r"^metrics.jsonl missing$"):
        rundir.read_records(empty)


def test_append_and_truncate_keep_no_step_twice(tmp_path: Path) -> None:
    """A resumed run cuts the records back to its checkpoint's step; a line torn by the kill that
    interrupted the run goes too, and numpy scalars are written as plain numbers."""
    for step in (1, 2, 3):
        rundir.append_record(tmp_path, {"split": "train", "step": step, "loss": np.float32(0.5)})
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"split": "train", "st')  # the kill
    rundir.truncate_records(tmp_path, 2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"split": "train", "step": 1, "loss": 0.5},
                                                    {"split": "train", "step": 2, "loss": 0.5}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"], "no temporary file left"


def predictions(rows: int = 6) -> Predictions:
    rng = np.random.default_rng(0)
    keys = np.array([f"img{i}" for i in range(rows)])
    patients = np.array([f"patient{i // 2}" for i in range(rows)])
    probs = rng.random((rows, 2))
    targets = (rng.random((rows, 2)) > 0.5).astype(np.float64)
    return Predictions(keys, patients, LABELS, probs, targets, np.ones((rows, 2)), rows)


def test_predictions_round_trip_with_their_patients(tmp_path: Path) -> None:
    written = predictions()
    rundir.write_predictions(tmp_path, "test", written)
    path = tmp_path / "predictions_test.npz"
    with np.load(path, allow_pickle=False) as raw:  # the format, read without the module
        assert raw["patients"].tolist() == written.patients.tolist()
        assert raw["keys"].tolist() == written.keys.tolist() and raw["labels"].tolist() == list(LABELS)
    read = rundir.read_predictions(path)
    assert read.labels == LABELS and read.patients.tolist() == written.patients.tolist()
    assert np.array_equal(read.probs, written.probs) and np.array_equal(read.targets, written.targets)
    flipped = read.aligned(np.array(["img5", "img0"]))
    assert flipped.patients.tolist() == ["patient2", "patient0"]
    assert flipped.probs.tolist() == [written.probs[5].tolist(), written.probs[0].tolist()]


def test_predictions_without_patients_are_refused_not_guessed(tmp_path: Path) -> None:
    """A file from before predictions carried patients: the report must not fall back to one
    patient per image (narrower intervals, wrong science)."""
    p = predictions()
    old = tmp_path / "predictions_test.npz"
    np.savez_compressed(old, keys=p.keys, labels=np.array(LABELS), probs=p.probs, targets=p.targets,
                        masks=p.masks)
    with pytest.raises(RunDirError, match=r"^predictions_test.npz: no patients array .*re-evaluate"):
        rundir.read_predictions(old)
    np.savez_compressed(old, keys=p.keys, patients=np.array([""] * 6), labels=np.array(LABELS), probs=p.probs,
                        targets=p.targets, masks=p.masks)
    with pytest.raises(RunDirError, match="a row without a patient"):
        rundir.read_predictions(old)


def test_a_predictions_file_that_needs_unpickling_is_refused(tmp_path: Path) -> None:
    p = predictions()
    path = tmp_path / "predictions_val.npz"
    marker = tmp_path / "unpickled"
    np.savez(path, keys=p.keys, patients=np.array([Unpickled(str(marker))] * 6, dtype=object),
             labels=np.array(LABELS), probs=p.probs, targets=p.targets, masks=p.masks)
    with pytest.raises(RunDirError, match=r"^predictions_val.npz: not a predictions file"):
        rundir.read_predictions(path)
    assert not marker.exists(), "the pickle was executed"


class Unpickled:
    """Unpickling it writes a file: proof that a reader unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path(self.path).write_text, ("pwned",))


def test_best_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    weights = {"head.weight": torch.ones(2, 3, dtype=torch.bfloat16), "head.bias": torch.zeros(2)}
    config = Config()
    rundir.export_best(tmp_path, weights, config, {"step": 1, "family": "cnn"})
    loaded = rundir.read_best_weights(tmp_path)
    assert loaded["head.weight"].dtype == torch.float32
    assert torch.equal(loaded["head.weight"], torch.ones(2, 3))
    assert rundir.read_card(tmp_path) == {"step": 1, "family": "cnn"}
    assert yaml.safe_load((tmp_path / "best" / "config.yaml").read_text()) == config.to_dict()
    with pytest.raises(OSError), replacing_dir(tmp_path / "best") as temp:  # a full disk half-way
        (temp / "model_card.json").write_text('{"step": 2}')
        raise OSError(28, "No space left on device")
    assert rundir.read_card(tmp_path) == {"step": 1, "family": "cnn"}, "the previous best/ stays"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"], "no temporary directory left"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, before it refuses
def test_best_weights_that_need_unpickling_are_refused(tmp_path: Path) -> None:
    (tmp_path / "best").mkdir()
    marker = tmp_path / "unpickled"
    (tmp_path / "best" / "model.pt").write_bytes(pickle.dumps({"w": Unpickled(str(marker))}))
    with pytest.raises(RunDirError, match="refused: not a plain tensor file"):
        rundir.read_best_weights(tmp_path)
    assert not marker.exists()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "best" / "model.safetensors"))
    (tmp_path / "best" / "model.safetensors").write_bytes(b"\x00" * 7)  # truncated
    with pytest.raises(RunDirError, match="not a safetensors file"):
        rundir.read_best_weights(tmp_path)
    assert rundir.read_card(tmp_path / "nothing") == {}


def test_a_runs_config_reads_back_without_its_shards(tmp_path: Path) -> None:
    """The report reads run directories on another machine, months later: the record loads, and
    only a config about to run again is checked against this machine."""
    config = Config()
    config.data.shards = str(tmp_path / "gone")
    config.model.name = "resnet18"
    rundir.write_config(tmp_path / "run", config)
    assert rundir.read_config(tmp_path / "run").data.shards == str(tmp_path / "gone")
    with pytest.raises(RunDirError, match=r"^config.yaml: data.shards: .*manifest.json not found"):
        rundir.read_config(tmp_path / "run", environment=True)
    (tmp_path / "run" / "config.yaml").write_text("optim: {epochs: 0}\n")
    with pytest.raises(RunDirError, match=r"^config.yaml: optim.epochs: must be ≥ 1"):
        rundir.read_config(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"^config.yaml missing$"):
        rundir.read_config(tmp_path)


def test_a_checkpoint_from_an_older_version_still_resumes() -> None:
    saved = {"step": 7, "epoch": 1, "samples": 56, "best_metric": 0.7, "best_step": 7, "epoch_done": True,
             "stream": {"epoch": 1, "next_batch": 0}, "train_seconds": 3.5}
    state = TrainState.from_saved(saved)
    assert (state.step, state.best_step, state.stream) == (7, 7, {"epoch": 1, "next_batch": 0})
