"""The trainer end to end: real `accelerate launch` with two CPU processes on gloo, real shards,
real checkpoints, TensorBoard files read back. Nothing is mocked (no GPU here: CPU paths only)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shards.labels import CHEXPERT_LABELS, COMPETITION5
from shards.stream.tarread import iter_samples
from tests.conftest import pack_to
from tests.trainer_helpers import (
    DEMO,
    DEMO_VIT,
    ROOT,
    assert_same_evaluations,
    best_val,
    environment,
    free_port,
    kill_group,
    records,
    start,
    train,
    wait_for,
)
from trainer.config import load_config

pytestmark = pytest.mark.slow
BAR = 0.8
"""Validation macro AUROC a model must reach to count as having learned the synthetic data."""


def test_tiny_cnn_learns(cnn_run: Path) -> None:
    assert best_val(cnn_run) >= BAR
    test = records(cnn_run, "test")
    assert len(test) == 1 and test[0]["auroc_macro"] > 0.7 and "auroc_chexpert5" in test[0]


# Learning rates for the demo CNN at a global batch of 32 (2 ranks x 16), 3 epochs; measured best
# val macro AUROC: sgd 0.86, lamb 0.883, lion 0.886 (AdamW at 2e-3 is the demo config: cnn_run).
OPTIMIZER_LR = {"sgd": 0.05, "lamb": 0.005, "lion": 0.0006}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZER_LR))
def test_each_optimizer_trains_the_demo_cnn_past_the_bar(learn_shards: Path, tmp_path: Path,
                                                         optimizer: str) -> None:
    run_dir = tmp_path / optimizer
    overrides = [f"data.shards={learn_shards}", f"run.dir={run_dir}", "optim.epochs=3", "data.batch_size=16",
                 f"optim.name={optimizer}", f"optim.lr={OPTIMIZER_LR[optimizer]}", "run.test_at_end=false"]
    result = train(DEMO, overrides, processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert best_val(run_dir) >= BAR
    assert load_config(run_dir / "config.yaml").optim.name == optimizer


def test_tiny_vit_learns(learn_shards: Path, tmp_path: Path) -> None:
    # Two processes of 8: the same global batch (16) as the one-process demo. At the demo's lr
    # (3e-4) this data needs 7 epochs (0.805 at epoch 4); at 1e-3 five epochs give 0.797, 0.842,
    # 0.837 at epochs 3-5, a margin at two thirds of the cost.
    overrides = [f"data.shards={learn_shards}", f"run.dir={tmp_path / 'vit'}", "data.batch_size=8",
                 "optim.epochs=5", "optim.lr=1e-3", "run.test_at_end=false"]
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
                          "optim.epochs=1", "optim.lr=1e-9", "data.samples_per_epoch=64",
                          "run.test_at_end=false"])
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
        # each row's patient came through the eval batch: CheXpert keys name their patient too
        pairs = list(zip(saved["keys"].tolist(), saved["patients"].tolist(), strict=True))
        assert all(patient.startswith("patient") and f"-{patient}-" in key for key, patient in pairs)
        assert len(set(saved["patients"].tolist())) < len(pairs), "patients with several images"
    assert json.loads((cnn_run / "best" / "model_card.json").read_text())["family"] == "cnn"
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


@pytest.mark.parametrize(("strategy", "trainable_prefixes", "optimizer"), [
    ("head", ("fc.",), "adamw"),
    ("head+last_block", ("fc.", "layer4."), "adamw"),
    ("full", ("",), "adamw"),
    ("head+last_block", ("fc.", "layer4."), "sgd"),
    ("head+last_block", ("fc.", "layer4."), "lamb"),
    ("head+last_block", ("fc.", "layer4."), "lion"),
])
def test_freeze_strategies_train_exactly_the_intended_parameters(
        chexpert_shards: Path, tmp_path: Path, strategy: str, trainable_prefixes: tuple,
        optimizer: str) -> None:
    import timm

    start_weights = tmp_path / "start.safetensors"
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(start_weights))
    run_dir = tmp_path / "run"
    result = train(DEMO, [f"data.shards={chexpert_shards}", f"run.dir={run_dir}", "optim.epochs=1",
                          "data.batch_size=8", f"model.freeze={strategy}", "model.pretrained=true",
                          f"model.weights={start_weights}", "run.test_at_end=false", "optim.lr=0.01",
                          "run.checkpoint_every=2", "run.keep_last=100", f"optim.name={optimizer}"])
    assert result.returncode == 0, result.stderr[-4000:]
    before, after = load_file(str(start_weights)), load_file(str(run_dir / "best" / "model.safetensors"))
    # timm re-initialises the classifier when loading weights for a new head, so the start file
    # says nothing about fc.*: the first checkpoint (step 2) is the reference for what trains.
    first = sorted((run_dir / "checkpoints").iterdir())[0]
    assert first.name == "step-00000002"
    early = load_file(str(first / "model.safetensors"))

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], name: str) -> bool:
        return np.array_equal(a[name].numpy(), b[name].numpy())

    for name in before:
        if not name.startswith(("fc.", *trainable_prefixes)):  # frozen, BN statistics included
            assert same(before, after, name), f"{strategy}: frozen {name} changed"
    trainable = [n for n in before if n.startswith(trainable_prefixes) and "running_" not in n
                 and not n.endswith("num_batches_tracked")]
    assert {"fc.weight", "fc.bias"} <= set(trainable)
    # Plain SGD's step is lr x gradient: a block's bn1 gains get gradients only through its
    # zero-initialised last BN gain (timm's zero_init_last), too small to move a float32 1.0 in one
    # epoch. The adaptive and sign-based optimizers move every trainable tensor.
    for name in trainable if optimizer != "sgd" else ["fc.weight", "fc.bias", "layer4.0.conv1.weight"]:
        assert not same(early, after, name), f"{strategy}: {name} did not train after step 2"
        assert name.startswith("fc.") or not same(before, after, name), f"{strategy}: {name} unchanged"

    saved = torch.load(first / "optimizer.bin", weights_only=True)
    assert len(saved["state"]) == len(trainable), "frozen parameters must get no optimizer state"
    # The optimizer asked for, by what its algorithm keeps: AdamW both moments and a step count,
    # Nesterov SGD a momentum buffer, LAMB both moments (its step lives in the group, with its
    # trust-ratio clipping), Lion a single moment.
    state = {"adamw": {"exp_avg", "exp_avg_sq", "step"}, "sgd": {"momentum_buffer"},
             "lamb": {"exp_avg", "exp_avg_sq"}, "lion": {"exp_avg"}}[optimizer]
    assert all(set(kept) == state for kept in saved["state"].values()), saved["state"][0].keys()
    group = saved["param_groups"][0]
    assert {"sgd": group.get("nesterov") is True, "lamb": "trust_clip" in group}.get(optimizer, True)


def expected_lr(step: int, lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: float,
                floor: float = 0.01) -> float:
    """The documented schedule, written out again: linear warm-up, then cosine to floor × lr."""
    total = steps_per_epoch * epochs
    warmup = max(1, min(total - 1, round(warmup_epochs * steps_per_epoch)))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_gpu_shaped_config_kill_9_then_resume_equals_an_uninterrupted_run(learn_shards: Path,
                                                                         tmp_path: Path) -> None:
    """What every GPU config does, on two CPU ranks: three input channels with the pretrained
    mean/std, layer-wise LR decay, gradient accumulation over 2 batches. 21 batches per rank and
    epoch round down to 20 (10 whole optimizer steps: no batch's gradient crosses the epoch-end
    checkpoint); a kill -9 lands anywhere, mid-accumulation included."""
    overrides = [f"data.shards={learn_shards}", "optim.epochs=2", "data.samples_per_epoch=672",
                 "data.batch_size=16", "run.checkpoint_every=4", "run.log_every=2", "model.in_chans=3",
                 "model.freeze=layer_decay", "optim.grad_accum=2"]
    straight = train(DEMO, [*overrides, f"run.dir={tmp_path / 'straight'}"], processes=2)
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert [line["step"] for line in records(tmp_path / "straight", "val")] == [10, 20]
    for line in records(tmp_path / "straight", "train"):  # the step just taken used step - 1's lr
        assert line["lr"] == pytest.approx(expected_lr(line["step"] - 1, 0.002, 10, 2, 0.3), rel=1e-9)
    card = json.loads((tmp_path / "straight" / "best" / "model_card.json").read_text())
    assert card["input"]["channels"] == 3 and card["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])

    run_dir = tmp_path / "killed"
    process = start(DEMO, [*overrides, f"run.dir={run_dir}"], processes=2)
    wait_for(lambda: (run_dir / "checkpoints" / "step-00000004").is_dir() or process.poll() is not None)
    kill_group(process)
    assert not records(run_dir, "val"), "killed mid-epoch, before the first evaluation"
    (run_dir / "checkpoints" / ".tmp-step-00000005").mkdir()  # as if killed while saving
    resumed = train(DEMO, [*overrides, f"run.dir={run_dir}", "run.resume=auto"], processes=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout

    assert_same_evaluations(run_dir, tmp_path / "straight")
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a half-written checkpoint is cleaned up"
    steps = [line["step"] for line in records(run_dir, "train")]
    assert steps == sorted(set(steps)), "no step logged twice"
    assert steps == [line["step"] for line in records(tmp_path / "straight", "train")]


def test_sigusr1_checkpoints_and_exits_for_requeue(learn_shards: Path, tmp_path: Path) -> None:
    overrides = [f"data.shards={learn_shards}", "optim.epochs=50", "run.log_every=1"]
    run_dir = tmp_path / "one"
    process = start(DEMO, [*overrides, f"run.dir={run_dir}"])
    wait_for(lambda: len(records(run_dir, "train", running=True)) >= 2)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=120) == 75
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert (run_dir / "checkpoints" / f"step-{marker['step']:08d}" / "train_state.json").is_file()

    # Two ranks, only rank 1 signalled: both must stop at the same step with one checkpoint.
    run_dir = tmp_path / "two"
    process = start(DEMO, [*overrides, f"run.dir={run_dir}"], processes=2)
    wait_for(lambda: len(records(run_dir, "train", running=True)) >= 2)
    children = psutil.Process(process.pid).children(recursive=True)
    pids = {p.pid for p in children if "run.py" in " ".join(p.cmdline())}
    ranks = [p for p in children if p.pid in pids and p.ppid() not in pids]  # not their loader workers
    assert len(ranks) == 2
    max(ranks, key=lambda p: p.pid).send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    # accelerate launch exits 1 for any failed rank (trainer/preemption.py EXIT_REQUEUE); the ranks'
    # own exit statuses are in torch elastic's failure table: both ranks left with 75.
    assert process.returncode == 1, output[-3000:]
    statuses = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", output))
    assert statuses == {"0": "75", "1": "75"}, output[-3000:]
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["exit_code"] == 75
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
    ("model.name=resnet50.bogus_in1k", "no pretrained tag 'bogus_in1k' for resnet50 (it has: a1_in1k,"),
    ("data.shards=/nonexistent", "data.shards: /nonexistent/manifest.json not found"),
    ("optim.epochs=many", "optim.epochs: expected int"),
    ("optim.name=adam", "optim.name: 'adam' is not one of 'adamw', 'sgd', 'lamb', 'lion'"),
])
def test_bad_config_is_one_line_and_writes_nothing(chexpert_shards: Path, tmp_path: Path, override: str,
                                                   message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """trainer/run.py's main in this process (a subprocess would spend its time importing torch;
    the real command line's exit status and one-line error are test_a_fresh_run_refuses_…'s)."""
    from trainer.run import main

    run_dir = tmp_path / "run"
    assert main(["--config", DEMO, f"run.dir={run_dir}", f"data.shards={chexpert_shards}", override]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.strip().count("\n") == 0, stderr
    assert message in stderr, stderr
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


def test_ema_is_built_on_the_models_device_in_float32(chexpert_shards: Path, tmp_path: Path) -> None:
    """After setup the EMA lives where the prepared model lives (on a GPU node: cuda, not the CPU
    copy it was once made from), in float32, and shares no storage with the model. Here both are
    on the CPU: the device half of this check only bites on a GPU."""
    from accelerate import Accelerator

    from trainer.build import setup

    cfg = load_config(DEMO, [f"data.shards={chexpert_shards}", f"run.dir={tmp_path / 'run'}", "optim.ema=0.9",
                             "data.workers=0"])
    accelerator = Accelerator(cpu=True)
    run = setup(cfg, accelerator)
    try:
        model = dict(run.accelerator.unwrap_model(run.model).named_parameters())
        for name, tensor in run.ema.module.named_parameters():
            assert tensor.device == model[name].device == accelerator.device
            assert tensor.dtype == torch.float32
            assert tensor.data_ptr() != model[name].data_ptr()
    finally:
        run.tracker.close()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lamb", "lion"])
def test_ema_run_preempted_mid_way_resumes_to_the_uninterrupted_result(
        chexpert_shards: Path, tmp_path: Path, optimizer: str) -> None:
    """Each optimizer's state (momentum, moments) goes into the checkpoint and comes back."""
    overrides = [f"data.shards={chexpert_shards}", "data.batch_size=8", "optim.ema=0.9", "optim.epochs=2",
                 "data.samples_per_epoch=160", "run.log_every=1",  # 20 steps an epoch
                 f"optim.name={optimizer}"]
    assert train(DEMO, [*overrides, f"run.dir={tmp_path / 'straight'}"]).returncode == 0

    run_dir = tmp_path / "preempted"
    process = start(DEMO, [*overrides, f"run.dir={run_dir}"])
    wait_for(lambda: len(records(run_dir, "train", running=True)) >= 3)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=120) == 75
    checkpoint = next((run_dir / "checkpoints").iterdir())
    ema = load_file(str(checkpoint / "ema.safetensors"))
    raw = load_file(str(checkpoint / "model.safetensors"))
    assert set(ema) == {f"module.{k}" for k in raw}
    assert any(not np.array_equal(ema[f"module.{k}"].numpy(), raw[k].numpy()) for k in raw)
    result = train(DEMO, [*overrides, f"run.dir={run_dir}", "run.resume=auto"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout

    assert_same_evaluations(run_dir, tmp_path / "straight")
    straight = load_file(str(tmp_path / "straight" / "best" / "model.safetensors"))
    resumed = load_file(str(run_dir / "best" / "model.safetensors"))
    for name, tensor in straight.items():
        assert torch.allclose(resumed[name].float(), tensor.float(), atol=1e-5), name


def other_labels_inverted_in_val(source: Path, destination: Path) -> Path:
    """A copy of a pack whose val split has every label outside the competition five inverted
    (positive ↔ negative or blank; uncertain left as it is): the more a model learns, the higher its
    val AUROC on the five and the lower on the other nine."""
    shutil.copytree(source, destination)
    for shard in sorted(destination.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in members:
                body = data
                if member.name.endswith(".json"):
                    record = json.loads(data)
                    record["labels"] = {name: value if name in COMPETITION5 or value == -1
                                        else int(value != 1) for name, value in record["labels"].items()}
                    body = json.dumps(record).encode()
                    member.size = len(body)
                tar.addfile(member, io.BytesIO(body))
    # The copy is a new pack, not a damaged one: its manifest records the rewritten shards' bytes
    # and sha256 (the trainer checks them before it starts).
    manifest = json.loads((destination / "manifest.json").read_text())
    for shard in manifest["splits"]["val"]["shards"]:
        data = (destination / shard["name"]).read_bytes()
        shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (destination / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return destination


def test_chexpert5_selects_the_best_model_and_resume_takes_a_checkpoint_path(learn_shards: Path,
                                                                           tmp_path: Path) -> None:
    """run.metric=auroc_chexpert5 on 14 labels: the best model is the one with the best competition-5
    mean, where the macro mean over all 14 labels disagrees (by construction: the other nine are
    inverted in val, so learning lowers them). run.resume=PATH: a new run directory continues
    from another run's checkpoint (not its latest) to the same evaluation as the run it left."""
    shards = other_labels_inverted_in_val(learn_shards, tmp_path / "shards")
    overrides = [f"data.shards={shards}", "data.labels=chexpert14", "data.uncertain=ones",
                 "run.metric=auroc_chexpert5", "optim.epochs=3", "data.samples_per_epoch=256",
                 "data.batch_size=16", "data.workers=0", "run.keep_last=3", "run.test_at_end=false",
                 "run.image_grid=false"]
    first = tmp_path / "first"
    result = train(DEMO, [*overrides, f"run.dir={first}"])
    assert result.returncode == 0, result.stderr[-4000:]
    val = records(first, "val")
    chexpert5, macro = [line["auroc_chexpert5"] for line in val], [line["auroc_macro"] for line in val]
    best = int(np.argmax(chexpert5))
    assert best != int(np.argmax(macro)), ("the two metrics must disagree here", chexpert5, macro)
    card = json.loads((first / "best" / "model_card.json").read_text())
    assert card["step"] == val[best]["step"] and card["val_metrics"]["auroc_chexpert5"] == chexpert5[best]
    exported = load_file(str(first / "best" / "model.safetensors"))
    chosen = load_file(str(first / "checkpoints" / f"step-{val[best]['step']:08d}" / "model.safetensors"))
    assert all(torch.equal(exported[name], chosen[name]) for name in chosen)

    step = val[1]["step"]
    checkpoint = first / "checkpoints" / f"step-{step:08d}"  # epoch 1's end: not the latest
    second = tmp_path / "second"
    result = train(DEMO, [*overrides, f"run.dir={second}", f"run.resume={checkpoint}"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {checkpoint} (step {step}, epoch 2)" in result.stdout
    (line,) = records(second, "val")
    assert line["step"] == val[2]["step"] and line["auroc"] == pytest.approx(val[2]["auroc"], abs=1e-5)
    assert [r["step"] for r in records(second, "train")] == [r["step"] for r in records(first, "train")
                                                              if r["step"] > step]


@pytest.mark.parametrize(("stage", "precision"), [(2, "bf16"), (3, "no")])
def test_deepspeed_zero_with_frozen_layers_trains_saves_and_resumes(chexpert_shards: Path, tmp_path: Path,
                                                                     stage: int, precision: str) -> None:
    """DeepSpeed on two CPU ranks (gloo): frozen weights stay bit-identical across save and resume.
    Under bf16 DeepSpeed casts the model (frozen weights are then the bf16-rounded start values),
    the export is float32 and the EMA stays float32 beside the bf16 model."""
    import timm

    start_weights = tmp_path / "start.safetensors"
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(start_weights))
    run_dir = tmp_path / "run"
    config = str(Path(DEMO).parents[2] / "launch" / "accelerate" / f"zero{stage}.yaml")
    overrides = [f"data.shards={chexpert_shards}", f"run.dir={run_dir}", "data.batch_size=8",
                 "model.freeze=head+last_block", "model.pretrained=true", f"model.weights={start_weights}",
                 f"run.precision={precision}"]
    if precision == "bf16":
        overrides += ["optim.ema=0.9", "data.image_size=32"]  # 32 px: this CPU may emulate bf16 (slow)
    for epochs in (1, 2):
        result = train(DEMO, [*overrides, f"optim.epochs={epochs}", "run.resume=auto"], processes=2,
                       accelerate_config=config)
        assert result.returncode == 0, result.stderr[-4000:]
    assert [line["epoch"] for line in records(run_dir, "val")] == [0, 1]
    assert "resumed from" in result.stdout and records(run_dir, "test")
    before, after = load_file(str(start_weights)), load_file(str(run_dir / "best" / "model.safetensors"))
    assert {str(t.dtype) for t in after.values() if t.is_floating_point()} == {"torch.float32"}
    rounded = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, tensor in before.items():
        if not name.startswith(("fc.", "layer4.")):
            start = tensor.to(rounded).to(tensor.dtype) if tensor.is_floating_point() else tensor
            # The export is the EMA under bf16: d·x + (1 − d)·x may differ from x in its last bit.
            tolerance = 1e-6 if precision == "bf16" and tensor.is_floating_point() else 0.0
            assert torch.allclose(start, after[name], rtol=0.0, atol=tolerance), f"frozen {name} changed"
    assert not np.array_equal(before["layer4.0.conv1.weight"].numpy(), after["layer4.0.conv1.weight"].numpy())
    if precision == "bf16":
        checkpoint = next((run_dir / "checkpoints").glob("step-*"))
        ema = load_file(str(checkpoint / "ema.safetensors"))
        assert {str(t.dtype) for t in ema.values() if t.is_floating_point()} == {"torch.float32"}
    assert_deepspeed_checkpoint_validated(sorted((run_dir / "checkpoints").glob("step-*"))[-1])


def assert_deepspeed_checkpoint_validated(checkpoint: Path) -> None:
    """DeepSpeed's own files (every rank's optimizer shard, .pt) are in the checkpoint's listing, and
    a shard cut short is found, with the listing and without it (its zip directory is gone)."""
    from trainer.checkpoint import problem

    listed = json.loads((checkpoint / "complete.json").read_text())["files"]
    shards = sorted(name for name in listed if name.endswith("optim_states.pt"))
    assert len(shards) == 2 and "random_states_1.pkl" in listed, listed
    assert problem(checkpoint) is None
    shard = checkpoint / shards[1]
    size = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(size - 100)
    assert problem(checkpoint) == f"{shards[1]} is {size - 100} bytes, complete.json says {size}"
    (checkpoint / "complete.json").unlink()
    cut = f"{shards[1]}: {size - 100} bytes: a torch file without its end (truncated?)"
    assert problem(checkpoint) == cut


def test_compiled_two_process_run_exports_timm_names_explain_and_report_accept_it(
        chexpert_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.compile=true under DDP (CPU inductor; ~30 s of compiling per rank): the model is
    compiled after `prepare`, so the exports carry timm's own names, not `_orig_mod.` ones."""
    import timm

    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    run_dir = tmp_path / "run"
    result = train(DEMO, [f"data.shards={chexpert_shards}", f"run.dir={run_dir}", "optim.epochs=1",
                          "model.compile=true", "data.batch_size=8"], processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert any(path.is_file() for path in cache.rglob("*")), "inductor compiled code for the run"
    expected = set(timm.create_model("resnet10t", num_classes=5, in_chans=1).state_dict())
    assert set(load_file(str(run_dir / "best" / "model.safetensors"))) == expected
    checkpoint = next((run_dir / "checkpoints").iterdir())
    assert set(load_file(str(checkpoint / "model.safetensors"))) == expected
    explain = ["--run", str(run_dir), "--split", "val", "--n", "2", "--methods", "gradcam", "--steps", "0",
               "--workers", "0", "--out", str(tmp_path / "explain")]
    for module, args in (("trainer.explain", explain),
                         ("trainer.report", ["--runs", str(run_dir), "--out", str(tmp_path / "report"),
                                             "--resamples", "50"])):
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=300, check=False)
        assert done.returncode == 0, f"{module}: {done.stderr[-3000:]}"
    assert (tmp_path / "explain" / "localization.json").is_file()
    assert (tmp_path / "report" / "summary.json").is_file()


def native_bf16() -> bool:
    """The CPU computes bf16 itself (AVX512-BF16 or AMX), as every GPU the trainer targets does."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_bf16_learns_and_exports_float32(learn_shards: Path, tmp_path: Path, engine: str) -> None:
    """bf16 on two CPU ranks (32 px: a CPU without AVX512-BF16/AMX emulates bf16, 10-20x slower than
    float32): autocast under DDP; under DeepSpeed ZeRO-2 the model itself is cast to bf16 (fp32
    master weights in the optimizer). Each learns past the bar and exports float32."""
    if engine == "zero2" and not native_bf16():
        pytest.skip("this CPU emulates bf16 (no AVX512-BF16/AMX): ZeRO-2 bf16 takes ~9 minutes here")
    run_dir = tmp_path / "bf16"
    config = str(ROOT / "launch" / "accelerate" / "zero2.yaml") if engine == "zero2" else None
    result = train(DEMO, [f"data.shards={learn_shards}", f"run.dir={run_dir}", "optim.epochs=3",
                          "run.precision=bf16", "data.image_size=32", "run.test_at_end=false"], processes=2,
                   accelerate_config=config)
    assert result.returncode == 0, result.stderr[-4000:]
    assert best_val(run_dir) >= BAR
    weights = load_file(str(run_dir / "best" / "model.safetensors"))
    assert {str(t.dtype) for t in weights.values() if t.is_floating_point()} == {"torch.float32"}


def frontal_per_consumer(shards: Path, split: str, consumers: int) -> list[int]:
    """Frontal samples in each evaluation consumer's contiguous span of the split (manifest
    order), read straight from the tars: the documented exactly-once contract, not the stream."""
    manifest = json.loads((shards / "manifest.json").read_text())
    views = [json.loads(raw["json"])["view"] for shard in manifest["splits"][split]["shards"]
             for raw in iter_samples(shards / shard["name"], wanted=("jpg", "json"))]
    total = len(views)
    return [sum(v == "frontal" for v in views[c * total // consumers:(c + 1) * total // consumers])
            for c in range(consumers)]


def test_zero3_evaluates_ranks_with_unequal_batch_counts(chexpert_shards: Path, tmp_path: Path) -> None:
    """The frontal-view filter runs after the rank split, so ranks can hold different numbers of
    evaluation batches: ZeRO-3 evaluation must neither hang nor score a sample twice. Compile is
    asked for and turned off (one line)."""
    counts = frontal_per_consumer(chexpert_shards, "val", 2)  # 2 ranks × 1 loader worker
    batch = next((b for b in range(2, 9) if len({math.ceil(n / b) for n in counts}) == 2), None)
    assert batch is not None, f"no batch size gives the ranks unequal batch counts: {counts}"
    run_dir = tmp_path / "run"
    config = str(ROOT / "launch" / "accelerate" / "zero3.yaml")
    result = train(DEMO, [f"data.shards={chexpert_shards}", f"run.dir={run_dir}", "optim.epochs=1",
                          f"data.batch_size={batch}", "data.views=frontal", "data.workers=1",
                          "data.samples_per_epoch=32", "model.compile=true", "run.test_at_end=false"],
                   processes=2, accelerate_config=config, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("model.compile: off under DeepSpeed ZeRO-3") == 1
    (val,) = records(run_dir, "val")
    assert val["samples"] == val["gathered"] == sum(counts)
    keys = np.load(run_dir / "predictions_val.npz")["keys"]
    assert len(set(keys.tolist())) == len(keys) == sum(counts)


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WORLD_SIZE": "2"}, "accelerate launch with 2 processes and no CPU flag"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, "a DeepSpeed accelerate config"),
    ({"CXR_EXPECT_GPUS": "8"}, "CXR_EXPECT_GPUS=8"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "True"}, None),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "CXR_EXPECT_GPUS": "0"}, None),
    ({"WORLD_SIZE": "2", "run.cpu": "true"}, None),
    ({}, None),
])
def test_which_launches_expect_gpus(chexpert_shards: Path, monkeypatch: pytest.MonkeyPatch, environ: dict,
                                    expected: str | None) -> None:
    """The launch environments accelerate and launch/node.sh really set; no GPU here is real."""
    from trainer.distributed import DeviceError, check_gpus

    for name in ("WORLD_SIZE", "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "CXR_EXPECT_GPUS"):
        monkeypatch.delenv(name, raising=False)
    overrides = [f"data.shards={chexpert_shards}"] + (["run.cpu=true"] if "run.cpu" in environ else [])
    for name, value in environ.items():
        if name != "run.cpu":
            monkeypatch.setenv(name, value)
    cfg = load_config(DEMO, overrides)
    if expected is None:
        check_gpus(cfg)
        return
    with pytest.raises(DeviceError) as err:
        check_gpus(cfg)
    assert f"({expected}" in str(err.value) and "torch sees 0 CUDA device(s)" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_gpu_launch_on_a_node_without_gpus_stops_in_one_line(chexpert_shards: Path, tmp_path: Path) -> None:
    """launch/node.sh with GPUS_PER_NODE=2 runs the real `accelerate launch` of the GPU branch on this
    GPU-less machine: the ranks must stop before writing anything instead of training on the CPU."""
    run_dir = tmp_path / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = environment() | {"CXR_ROOT": str(ROOT), "CXR_ACCELERATE": accelerate, "GPUS_PER_NODE": "2",
                           "NUM_MACHINES": "1", "MACHINE_RANK": "0", "MAIN_PORT": str(free_port())}
    env.pop("ACCELERATE_USE_CPU")
    done = subprocess.run(["bash", str(ROOT / "launch" / "node.sh"), "--config", DEMO,
                           f"data.shards={chexpert_shards}", f"run.dir={run_dir}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert ours, done.stderr[-3000:]  # one line per rank that got there before the launcher stopped the rest
    assert all("(CXR_EXPECT_GPUS=2" in line and "torch sees 0 CUDA device(s)" in line for line in ours), ours
    assert not run_dir.exists()
