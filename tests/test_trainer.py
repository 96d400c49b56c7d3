"""The trainer end to end: real `accelerate launch` with two CPU processes on gloo, real shards,
real checkpoints, TensorBoard files read back. Nothing is mocked (no GPU here: CPU paths only)."""

from __future__ import annotations

import csv
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shards.labels import CHEXPERT_LABELS, COMPETITION5
from tests.conftest import pack_to
from tests.trainer_helpers import DEMO, DEMO_VIT, best_val, kill_group, records, start, train, wait_for
from trainer.config import load_config

pytestmark = pytest.mark.slow
BAR = 0.8
"""Validation macro AUROC a model must reach to count as having learned the synthetic data."""


@pytest.fixture(scope="session")
def cnn_run(learn_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo CNN, 3 epochs, two processes; shared by the tests that read a finished run."""
    run_dir = tmp_path_factory.mktemp("cnn") / "run"
    result = train(DEMO, [f"data.shards={learn_shards}", f"run.dir={run_dir}", "optim.epochs=3"], processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_tiny_cnn_learns(cnn_run: Path) -> None:
    assert best_val(cnn_run) >= BAR
    test = records(cnn_run, "test")
    assert len(test) == 1 and test[0]["auroc_macro"] > 0.7 and "auroc_chexpert5" in test[0]


def test_tiny_vit_learns(learn_shards: Path, tmp_path: Path) -> None:
    # Two processes of 8: the same global batch (16) as the one-process demo. Seven epochs: on this
    # data the tiny ViT passes the bar from epoch 4 (0.805, 0.829 at 5), so 7 leaves a margin.
    overrides = [f"data.shards={learn_shards}", f"run.dir={tmp_path / 'vit'}", "data.batch_size=8",
                 "optim.epochs=7"]
    result = train(DEMO_VIT, overrides, processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert best_val(tmp_path / "vit") >= BAR


def shuffled_source(source: Path, destination: Path) -> Path:
    """The same images with train.csv's label columns permuted across rows: no signal left."""
    shutil.copytree(source, destination)
    path = destination / "CheXpert-v1.0-small" / "train.csv"
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    first = header.index(CHEXPERT_LABELS[0])
    order = np.random.default_rng(0).permutation(len(body))
    shuffled = [row[:first] + body[j][first:] for row, j in zip(body, order, strict=True)]
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([header, *shuffled])
    return destination


def test_the_bar_is_real_shuffled_labels_and_an_untrained_model_fail(learn_source: Path, learn_shards: Path,
                                                                      tmp_path: Path) -> None:
    shards = pack_to(shuffled_source(learn_source, tmp_path / "src"), tmp_path / "shards")
    result = train(DEMO, [f"data.shards={shards}", f"run.dir={tmp_path / 'shuffled'}", "optim.epochs=3",
                          "run.test_at_end=false"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert best_val(tmp_path / "shuffled") < 0.7
    result = train(DEMO, [f"data.shards={learn_shards}", f"run.dir={tmp_path / 'untrained'}",
                          "optim.epochs=1", "optim.lr=1e-9", "run.test_at_end=false"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert best_val(tmp_path / "untrained") < 0.7


def test_run_directory_contract_and_tensorboard(cnn_run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "best/model.safetensors", "best/config.yaml",
                 "best/model_card.json"):
        assert (cnn_run / name).is_file(), name
    val_steps = [line["step"] for line in records(cnn_run, "val")]
    best_step = json.loads((cnn_run / "best" / "model_card.json").read_text())["step"]
    kept = sorted({*val_steps[-2:], best_step})  # keep_last=2 plus the best
    assert sorted(p.name for p in (cnn_run / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in kept]
    assert load_config(cnn_run / "config.yaml").run.dir == str(cnn_run), "config.yaml feeds back"
    with np.load(cnn_run / "predictions_test.npz", allow_pickle=False) as saved:
        assert saved["probs"].shape == (records(cnn_run, "test")[-1]["samples"], 5)
        assert list(saved["labels"]) == list(COMPETITION5) and len(set(saved["keys"])) == len(saved["keys"])
    for line in records(cnn_run):
        assert {"split", "epoch", "step"} <= set(line)
    val = records(cnn_run, "val")
    assert [line["epoch"] for line in val] == [0, 1, 2]
    assert set(val[0]["auroc"]) == {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                    "Pleural Effusion"}
    events = EventAccumulator(str(cnn_run / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"train/loss", "train/lr", "train/img_per_s", "train/data_wait", "val/auroc_macro",
            "val/auroc/Cardiomegaly", "test/auroc_macro"} <= scalars
    assert "train/images" in images and any(tag.startswith("val_roc/") for tag in images)
    assert [event.step for event in events.Scalars("val/auroc_macro")] == val_steps


def test_two_process_eval_scores_each_sample_once_and_matches_one_process(cnn_run: Path, learn_shards: Path,
                                                                           tmp_path: Path) -> None:
    """Re-evaluate the finished run's test split from its last checkpoint with 1 and 2 processes."""
    manifest = json.loads((learn_shards / "manifest.json").read_text())
    results = {}
    for processes in (1, 2):
        run_dir = tmp_path / f"eval{processes}"
        shutil.copytree(cnn_run, run_dir)
        result = train(str(run_dir / "config.yaml"), [f"run.dir={run_dir}", "run.resume=auto"], processes)
        assert result.returncode == 0, result.stderr[-4000:]
        results[processes] = records(run_dir, "test")[-1]
    for line in results.values():
        assert line["samples"] == line["gathered"] == manifest["splits"]["test"]["samples"]
    assert results[1]["auroc"] == pytest.approx(results[2]["auroc"], abs=1e-6)
    assert results[2]["auroc"] == pytest.approx(records(cnn_run, "test")[-1]["auroc"], abs=1e-6)


@pytest.mark.parametrize(("strategy", "trainable_prefixes"), [
    ("head", ("fc.",)),
    ("head+last_block", ("fc.", "layer4.")),
    ("full", ("",)),
])
def test_freeze_strategies_train_exactly_the_intended_parameters(
        chexpert_shards: Path, tmp_path: Path, strategy: str, trainable_prefixes: tuple) -> None:
    import timm

    start_weights = tmp_path / "start.safetensors"
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(start_weights))
    run_dir = tmp_path / "run"
    result = train(DEMO, [f"data.shards={chexpert_shards}", f"run.dir={run_dir}", "optim.epochs=1",
                          "data.batch_size=8", f"model.freeze={strategy}", "model.pretrained=true",
                          f"model.weights={start_weights}", "run.test_at_end=false", "optim.lr=0.01"])
    assert result.returncode == 0, result.stderr[-4000:]
    before, after = load_file(str(start_weights)), load_file(str(run_dir / "best" / "model.safetensors"))
    changed = {name for name in after if name in before and not np.array_equal(before[name].numpy(),
                                                                                after[name].numpy())}
    for name in before:
        trainable = name.startswith(trainable_prefixes)  # with its BN statistics
        if name.startswith("fc."):
            continue  # the classifier is re-initialised by timm when loading weights for a new head
        if not trainable:
            assert name not in changed, f"{strategy}: frozen {name} changed"
    trainable_weights = [n for n in before if n.startswith(trainable_prefixes) and n.endswith("weight")
                         and not n.startswith("fc.")]
    assert all(name in changed for name in trainable_weights), f"{strategy}: a trainable tensor is unchanged"
    checkpoint = next((run_dir / "checkpoints").iterdir())
    import torch

    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    trainable_count = sum(1 for n in before if n.startswith(trainable_prefixes) and "running_" not in n
                          and not n.endswith("num_batches_tracked"))
    assert len(optimizer["state"]) == trainable_count, "frozen parameters must get no optimizer state"


def test_kill_9_then_resume_equals_an_uninterrupted_run(learn_shards: Path, tmp_path: Path) -> None:
    overrides = [f"data.shards={learn_shards}", "optim.epochs=2", "data.samples_per_epoch=640",
                 "data.batch_size=16", "run.checkpoint_every=4", "run.log_every=2"]  # 20 steps an epoch
    straight = train(DEMO, [*overrides, f"run.dir={tmp_path / 'straight'}"], processes=2)
    assert straight.returncode == 0, straight.stderr[-4000:]

    run_dir = tmp_path / "killed"
    process = start(DEMO, [*overrides, f"run.dir={run_dir}"], processes=2)
    wait_for(lambda: (run_dir / "checkpoints" / "step-00000008").is_dir() or process.poll() is not None)
    kill_group(process)
    assert not records(run_dir, "val"), "killed mid-epoch, before the first evaluation"
    (run_dir / "checkpoints" / ".tmp-step-00000009").mkdir()  # as if killed while saving
    resumed = train(DEMO, [*overrides, f"run.dir={run_dir}", "run.resume=auto"], processes=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout

    for split in ("val", "test"):
        expected, got = records(tmp_path / "straight", split), records(run_dir, split)
        assert [line["step"] for line in got] == [line["step"] for line in expected]
        for a, b in zip(got, expected, strict=True):
            assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-5)
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a half-written checkpoint is cleaned up"
    steps = [line["step"] for line in records(run_dir, "train")]
    assert steps == sorted(set(steps)), "no step logged twice"
    assert steps == [line["step"] for line in records(tmp_path / "straight", "train")]


def test_sigusr1_checkpoints_and_exits_for_requeue(learn_shards: Path, tmp_path: Path) -> None:
    overrides = [f"data.shards={learn_shards}", "optim.epochs=50", "run.log_every=1"]
    run_dir = tmp_path / "one"
    process = start(DEMO, [*overrides, f"run.dir={run_dir}"])
    wait_for(lambda: len(records(run_dir, "train")) >= 2)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=120) == 75
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert (run_dir / "checkpoints" / f"step-{marker['step']:08d}" / "train_state.json").is_file()

    # Two ranks, only rank 1 signalled: both must stop at the same step with one checkpoint.
    run_dir = tmp_path / "two"
    process = start(DEMO, [*overrides, f"run.dir={run_dir}"], processes=2)
    wait_for(lambda: len(records(run_dir, "train")) >= 2)
    children = psutil.Process(process.pid).children(recursive=True)
    pids = {p.pid for p in children if "run.py" in " ".join(p.cmdline())}
    ranks = [p for p in children if p.pid in pids and p.ppid() not in pids]  # not their loader workers
    assert len(ranks) == 2
    max(ranks, key=lambda p: p.pid).send_signal(signal.SIGUSR1)
    process.wait(timeout=120)
    marker = json.loads((run_dir / "preempted.json").read_text())
    checkpoint = run_dir / "checkpoints" / f"step-{marker['step']:08d}"
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == marker["step"] and state["stream"]["next_batch"] > 0


def test_a_fresh_run_refuses_a_directory_holding_a_run(chexpert_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"split": "val", "step": 3}\n')
    result = train(DEMO, [f"run.dir={run_dir}", f"data.shards={chexpert_shards}"])
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "already holds a run (metrics.jsonl)" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"split": "val", "step": 3}\n', "left as it was"
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize(("override", "message"), [
    ("model.freeze=bogus", "model.freeze: 'bogus' is not one of"),
    ("optim.lrate=0.1", "unknown config key optim.lrate"),
    ("model.name=resnet_9000", "model.name: 'resnet_9000' is not a timm model"),
    ("data.shards=/nonexistent", "data.shards: /nonexistent/manifest.json not found"),
    ("optim.epochs=many", "optim.epochs: expected int"),
])
def test_bad_config_is_one_line_and_writes_nothing(chexpert_shards: Path, tmp_path: Path, override: str,
                                                   message: str) -> None:
    run_dir = tmp_path / "run"
    result = train(DEMO, [f"run.dir={run_dir}", f"data.shards={chexpert_shards}", override])
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0
    assert message in result.stderr, result.stderr
    assert not run_dir.exists()


def test_binary_pneumonia_reports_threshold_metrics(pneumonia_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "pneumonia"
    result = train(DEMO, [f"data.shards={pneumonia_shards}", f"run.dir={run_dir}", "data.labels=pneumonia",
                          "data.batch_size=8", "optim.epochs=2"])
    assert result.returncode == 0, result.stderr[-4000:]
    card = json.loads((run_dir / "best" / "model_card.json").read_text())
    assert card["task"] == "binary" and card["labels"] == ["Pneumonia"] and 0 <= card["threshold"] <= 1
    test = records(run_dir, "test")[-1]
    assert test["threshold"] == card["threshold"], "the test split uses the threshold chosen on val"
    assert {"accuracy", "sensitivity", "specificity", "f1", "confusion", "auroc_macro"} <= set(test)
    assert sum(test["confusion"].values()) == test["samples"]


def test_ema_weights_are_checkpointed_and_resumed(chexpert_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ema"
    overrides = [f"data.shards={chexpert_shards}", f"run.dir={run_dir}", "data.batch_size=8",
                 "optim.ema=0.9", "run.test_at_end=false"]
    assert train(DEMO, [*overrides, "optim.epochs=1"]).returncode == 0
    checkpoint = next((run_dir / "checkpoints").iterdir())
    ema = load_file(str(checkpoint / "ema.safetensors"))
    raw = load_file(str(checkpoint / "model.safetensors"))
    assert set(ema) == {f"module.{k}" for k in raw}
    assert any(not np.array_equal(ema[f"module.{k}"].numpy(), raw[k].numpy()) for k in raw)
    result = train(DEMO, [*overrides, "optim.epochs=2", "run.resume=auto"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert [line["epoch"] for line in records(run_dir, "val")] == [0, 1]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_with_frozen_layers_trains_saves_and_resumes(chexpert_shards: Path, tmp_path: Path,
                                                                     stage: int) -> None:
    """DeepSpeed on two CPU ranks (gloo): frozen weights stay bit-identical across save and resume."""
    import timm

    start_weights = tmp_path / "start.safetensors"
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(start_weights))
    run_dir = tmp_path / "run"
    config = str(Path(DEMO).parents[2] / "launch" / "accelerate" / f"zero{stage}.yaml")
    overrides = [f"data.shards={chexpert_shards}", f"run.dir={run_dir}", "data.batch_size=8",
                 "model.freeze=head+last_block", "model.pretrained=true", f"model.weights={start_weights}"]
    for epochs in (1, 2):
        result = train(DEMO, [*overrides, f"optim.epochs={epochs}", "run.resume=auto"], processes=2,
                       accelerate_config=config)
        assert result.returncode == 0, result.stderr[-4000:]
    assert [line["epoch"] for line in records(run_dir, "val")] == [0, 1]
    assert "resumed from" in result.stdout and records(run_dir, "test")
    before, after = load_file(str(start_weights)), load_file(str(run_dir / "best" / "model.safetensors"))
    for name in before:
        if not name.startswith(("fc.", "layer4.")):
            assert np.array_equal(before[name].numpy(), after[name].numpy()), f"frozen {name} changed"
    assert not np.array_equal(before["layer4.0.conv1.weight"].numpy(), after["layer4.0.conv1.weight"].numpy())


def test_torch_compile_smoke(chexpert_shards: Path, tmp_path: Path) -> None:
    """model.compile=true trains and evaluates (CPU inductor; the first step compiles for ~30 s)."""
    result = train(DEMO, [f"data.shards={chexpert_shards}", f"run.dir={tmp_path / 'run'}", "optim.epochs=1",
                          "model.compile=true", "data.batch_size=8", "run.test_at_end=false"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert records(tmp_path / "run", "val") and (tmp_path / "run" / "best" / "model.safetensors").is_file()
    names = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    assert not any(name.startswith("_orig_mod.") for name in names), "exported names are the plain model's"
