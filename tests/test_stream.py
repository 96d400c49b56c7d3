"""Streams over real tars with real DataLoader workers and several simulated ranks."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.augment import AugmentConfig
from shards.errors import DataError
from shards.labels import COMPETITION5
from shards.stream import Stream, StreamConfig, eval_stream, train_stream
from shards.targets import LabelPolicy


def config(shards: Path, **overrides: object) -> StreamConfig:
    return replace(StreamConfig(shards=shards, batch_size=4, image_size=32, workers=0, shuffle_buffer=16),
                   **overrides)


def tar_metadata(shards: Path, split: str) -> dict[str, dict]:
    """{key: json metadata} of a split, read with the standard library."""
    manifest = json.loads((shards / "manifest.json").read_text())
    found = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    found[member.name.split(".")[0]] = json.loads(tar.extractfile(member).read())
    return found


def eval_keys(cfg: StreamConfig, world: int) -> list[str]:
    return [key for rank in range(world) for batch in eval_stream(cfg, rank, world).batches()
            for key in batch["key"]]


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_scores_every_sample_exactly_once(chexpert_shards: Path, world: int, workers: int) -> None:
    for split in ("val", "test"):
        keys = eval_keys(config(chexpert_shards, split=split, workers=workers), world)
        assert Counter(keys) == Counter(list(tar_metadata(chexpert_shards, split))), (split, world, workers)


def test_eval_batches_are_unaugmented_and_deterministic(chexpert_shards: Path) -> None:
    cfg = config(chexpert_shards, split="val", augment=AugmentConfig.preset("strong"), workers=1)
    first = [batch["image"] for batch in eval_stream(cfg).batches()]
    second = [batch["image"] for batch in eval_stream(replace(cfg, seed=99)).batches()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("world", [2, 3])
def test_train_batches_are_equal_on_every_rank(chexpert_shards: Path, world: int) -> None:
    counts = set()
    for rank in range(world):
        stream = train_stream(config(chexpert_shards, workers=2), rank, world)
        batches = list(stream.batches())
        assert len(batches) == stream.batches_per_epoch > 0
        assert all(len(batch["key"]) == 4 and batch["image"].shape == (4, 1, 32, 32) for batch in batches)
        counts.add(stream.batches_per_epoch)
    samples = json.loads((chexpert_shards / "manifest.json").read_text())["splits"]["train"]["samples"]
    assert counts == {samples // (4 * world)}


def test_ranks_draw_different_samples(chexpert_shards: Path) -> None:
    keys = [[k for b in train_stream(config(chexpert_shards), rank, 2).batches() for k in b["key"]]
            for rank in range(2)]
    assert keys[0] != keys[1]


def run_epoch(stream: Stream) -> list[tuple[list[str], torch.Tensor]]:
    return [(batch["key"], batch["image"]) for batch in stream.batches()]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_the_same_sequence(chexpert_shards: Path, workers: int) -> None:
    cfg = config(chexpert_shards, workers=workers, augment=AugmentConfig.preset("strong"))
    uninterrupted = run_epoch(train_stream(cfg))
    assert len(uninterrupted) >= 6

    stream = train_stream(cfg)
    iterator = stream.batches()
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(stream.state_dict()))  # what a checkpoint stores
    resumed = train_stream(cfg)
    resumed.load_state_dict(state)
    rest = run_epoch(resumed)
    assert [keys for keys, _ in rest] == [keys for keys, _ in uninterrupted[5:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, uninterrupted[5:], strict=True))
    assert resumed.state_dict()["epoch"] == 1, "the epoch ends and the next one starts at batch 0"


def test_seed_and_epoch_change_the_order(chexpert_shards: Path) -> None:
    cfg = config(chexpert_shards, augment=AugmentConfig.preset("light"))
    stream = train_stream(cfg)
    epoch0 = run_epoch(stream)
    epoch1 = run_epoch(stream)  # batches() moved the stream on to epoch 1
    again = run_epoch(train_stream(cfg))
    other_seed = run_epoch(train_stream(replace(cfg, seed=1)))
    keys = [[k for keys, _ in epoch for k in keys] for epoch in (epoch0, epoch1, again, other_seed)]
    assert keys[0] == keys[2] and all(torch.equal(a, b) for (_, a), (_, b) in zip(epoch0, again, strict=True))
    assert keys[0] != keys[1] and keys[0] != keys[3]


def corrupt_copy(shards: Path, tmp_path: Path, split: str) -> tuple[Path, str]:
    """A copy of the pack whose first `split` shard has one sample's JPEG replaced by garbage."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = copy / f"{split}-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".jpg")).split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            body = b"\xff\xd8\xff not a jpeg at all" if member.name == f"{victim}.jpg" else data
            member.size = len(body)
            tar.addfile(member, io.BytesIO(body))
    return copy, victim


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_sample_in_a_tar_is_skipped_and_counted(
        chexpert_shards: Path, tmp_path: Path, workers: int, caplog: pytest.LogCaptureFixture) -> None:
    copy, victim = corrupt_copy(chexpert_shards, tmp_path, "val")
    stream = eval_stream(config(copy, split="val", workers=workers))
    keys = [key for batch in stream.batches() for key in batch["key"]]
    assert Counter(keys) == Counter(set(tar_metadata(chexpert_shards, "val")) - {victim})
    assert stream.skipped == 1
    if workers == 0:
        assert any(victim in record.getMessage() for record in caplog.records)

    train = train_stream(config(copy, split="val", workers=workers))
    batches = list(train.batches())
    assert len(batches) == train.batches_per_epoch and all(len(b["key"]) == 4 for b in batches)


def test_truncated_tar_is_skipped_and_counted(chexpert_shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(chexpert_shards, copy)
    shard = copy / "val-000000.tar"
    with tarfile.open(chexpert_shards / "val-000000.tar") as tar:
        in_shard = len({name.split(".")[0] for name in tar.getnames()})
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    stream = eval_stream(config(copy, split="val"))
    keys = [key for batch in stream.batches() for key in batch["key"]]
    expected = set(tar_metadata(chexpert_shards, "val"))
    assert len(keys) == len(set(keys)) and set(keys) < expected
    assert len(expected) - in_shard <= len(keys) < len(expected)
    assert stream.skipped == 1


@pytest.mark.parametrize(("policy", "uncertain_target", "uncertain_mask"),
                         [("ignore", 0.0, 0.0), ("zeros", 0.0, 1.0), ("ones", 1.0, 1.0)])
def test_label_policies_apply_to_raw_labels(chexpert_shards: Path, policy: str, uncertain_target: float,
                                            uncertain_mask: float) -> None:
    metadata = tar_metadata(chexpert_shards, "train")
    cfg = config(chexpert_shards, split="train", policy=LabelPolicy(uncertain=policy), labels="competition5")
    seen = {-1: 0, None: 0, 1: 0}
    for batch in eval_stream(cfg).batches():
        assert batch["target"].shape[1] == len(COMPETITION5)
        for key, target, mask in zip(batch["key"], batch["target"].tolist(), batch["mask"].tolist(),
                                     strict=True):
            for index, name in enumerate(COMPETITION5):
                raw = metadata[key]["labels"][name]
                expected = {1: (1.0, 1.0), 0: (0.0, 1.0), None: (0.0, 1.0),
                            -1: (uncertain_target, uncertain_mask)}[raw]
                assert (target[index], mask[index]) == expected, (key, name, raw)
                seen[raw] = seen.get(raw, 0) + 1
    assert seen[-1] and seen[None] and seen[1], "the synthetic data must exercise every raw value"


def test_pneumonia_is_one_binary_label(pneumonia_shards: Path) -> None:
    metadata = tar_metadata(pneumonia_shards, "test")
    for batch in eval_stream(config(pneumonia_shards, split="test")).batches():
        assert batch["target"].shape[1] == 1 and bool((batch["mask"] == 1).all())
        for key, target in zip(batch["key"], batch["target"][:, 0].tolist(), strict=True):
            assert target == metadata[key]["labels"]["Pneumonia"]


def test_view_filter(chexpert_shards: Path) -> None:
    metadata = tar_metadata(chexpert_shards, "train")
    assert {m["view"] for m in metadata.values()} == {"frontal", "lateral"}
    for view in ("frontal", "lateral"):
        keys = eval_keys(config(chexpert_shards, split="train", views=view), 2)
        assert sorted(keys) == sorted(k for k, m in metadata.items() if m["view"] == view)
        stream = train_stream(config(chexpert_shards, views=view, batch_size=2))
        assert all(metadata[k]["view"] == view for b in stream.batches() for k in b["key"])


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_shape_and_normalisation(chexpert_shards: Path, channels: int) -> None:
    mean, std = (0.5,) * channels, (0.25,) * channels
    batch = next(iter(train_stream(config(chexpert_shards, mean=mean, std=std, image_size=48)).batches()))
    image = batch["image"]
    assert image.shape == (4, channels, 48, 48) and image.dtype == torch.float32
    assert torch.isfinite(image).all() and image.min() >= -2.0 - 1e-5 and image.max() <= 2.0 + 1e-5
    if channels == 3:
        assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 1], image[:, 2])


@pytest.mark.parametrize("split", ["train", "val"])
def test_warp_on_device_matches_the_worker_path(chexpert_shards: Path, split: str) -> None:
    """warp_on=device runs on this CPU as it would on a GPU: same batches, same pixels up to
    interpolation (the worker path antialiases its resize)."""
    cfg = config(chexpert_shards, split=split, augment=AugmentConfig.preset("light"), image_size=48)
    make = train_stream if split == "train" else eval_stream
    for a, b in zip(make(cfg).batches(), make(replace(cfg, warp_on="device")).batches(), strict=True):
        assert a["key"] == b["key"] and a["image"].shape == b["image"].shape
        assert (a["image"] - b["image"]).abs().mean() < 0.1  # in std units: ≈6 gray levels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decode needs a GPU (none here)")
def test_gpu_decode_matches_cpu(chexpert_shards: Path) -> None:
    cfg = config(chexpert_shards, split="val", image_size=48)
    on_gpu = eval_stream(replace(cfg, decode_device="cuda")).batches("cuda")
    for a, b in zip(eval_stream(cfg).batches("cuda"), on_gpu, strict=True):
        assert a["key"] == b["key"] and (a["image"] - b["image"]).abs().mean() < 0.1


def positive_fraction(stream: Stream, index: int) -> float:
    targets = torch.cat([batch["target"][:, index] for batch in stream.batches()])
    return float(targets.mean())


def test_balanced_resampling_and_patient_fraction(chexpert_shards: Path) -> None:
    cfg = config(chexpert_shards, labels=("Cardiomegaly",), samples_per_epoch=400)
    plain = positive_fraction(train_stream(cfg), 0)
    balanced = positive_fraction(train_stream(replace(cfg, balance="Cardiomegaly")), 0)
    assert plain < 0.3 and abs(balanced - 0.5) < abs(plain - 0.5)
    metadata = tar_metadata(chexpert_shards, "train")
    patients = {}
    for fraction in (0.4, 1.0):
        stream = train_stream(replace(cfg, patient_fraction=fraction))
        patients[fraction] = {metadata[k]["patient"] for b in stream.batches() for k in b["key"]}
    assert patients[0.4] < patients[1.0]
    assert len(patients[0.4]) < 0.7 * len(patients[1.0])


def test_pos_weight_follows_prevalence_and_policy(chexpert_shards: Path) -> None:
    labels = [m["labels"]["Pleural Effusion"] for m in tar_metadata(chexpert_shards, "train").values()]
    pos, neg, unc, blank = (labels.count(v) for v in (1, 0, -1, None))
    for policy, expected in (("ignore", (neg + blank) / pos), ("ones", (neg + blank) / (pos + unc))):
        cfg = config(chexpert_shards, labels=("Pleural Effusion",), policy=LabelPolicy(uncertain=policy))
        assert train_stream(cfg).pos_weight.tolist() == pytest.approx([expected])


def test_configuration_errors(chexpert_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"split 'train' has \d+ samples per epoch, fewer than one batch"):
        train_stream(config(chexpert_shards, batch_size=10_000))
    with pytest.raises(DataError, match="no split 'holdout'"):
        eval_stream(config(chexpert_shards, split="holdout"))
    with pytest.raises(DataError, match="balance label"):
        train_stream(config(chexpert_shards, labels="competition5", balance="Fracture"))
    with pytest.raises(DataError, match="manifest"):
        train_stream(config(tmp_path))
    with pytest.raises(ValueError, match="views"):
        config(chexpert_shards, views="oblique")
    assert np.isfinite(train_stream(config(chexpert_shards)).pos_weight.numpy()).all()
