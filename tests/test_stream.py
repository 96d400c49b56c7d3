"""Streams over real tars with real DataLoader workers and several simulated ranks.

Expected values come from the tars themselves, read independently with the standard library's
`tarfile` (WebDataset keys: member name up to the first dot), never from the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards.errors import DataError
from shards.labels import CHEXPERT_LABELS, COMPETITION5
from shards.stream import AugmentConfig, LabelPolicy, Stream, StreamConfig, eval_stream, train_stream

NO_PIN_WARNING = pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
"""decode_device=cuda asks the DataLoader to pin memory; without an accelerator torch warns and skips it."""
NO_TV_DEPRECATION = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
"""torchvision ≥ 0.29 announces the deprecation of torchvision.io's decoders (the device path uses them)."""


def config(shards: Path, **overrides: object) -> StreamConfig:
    return replace(StreamConfig(shards=shards, batch_size=4, image_size=32, workers=0, shuffle_buffer=16),
                   **overrides)


def tar_samples(shards: Path, split: str) -> dict[str, dict]:
    """{key: parsed JSON} of every sample in the split's tars, read with `tarfile` alone."""
    found: dict[str, dict] = {}
    for shard in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert key not in found or ext != "json", f"key {key} twice in the split"
                if ext == "json":
                    found[key] = json.loads(tar.extractfile(member).read())
    assert found, f"no samples in {shards}/{split}-*.tar"
    return found


def keys_of(stream: Stream) -> list[str]:
    return [key for batch in stream.batches() for key in batch["key"]]


def eval_keys(cfg: StreamConfig, world: int) -> list[str]:
    return [key for rank in range(world) for key in keys_of(eval_stream(cfg, rank, world))]


def run_epoch(stream: Stream) -> list[dict]:
    return [{"key": b["key"], "image": b["image"], "target": b["target"]} for b in stream.batches()]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
        for x, y in zip(a, b, strict=True))


def flat_keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


# --- 1. evaluation: every sample exactly once ---------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_scores_every_val_sample_exactly_once(chexpert_shards: Path, world: int, workers: int) -> None:
    expected = tar_samples(chexpert_shards, "val")
    cfg = config(chexpert_shards, split="val", workers=workers)
    keys = []
    for rank in range(world):
        for batch in eval_stream(cfg, rank, world).batches():
            size = len(batch["key"])
            assert 1 <= size <= 4
            assert batch["image"].shape == (size, 1, 32, 32) and batch["target"].shape == (size, 14)
            keys += batch["key"]
    assert len(keys) == len(set(keys)), f"duplicates: {[k for k, n in Counter(keys).items() if n > 1]}"
    assert set(keys) == set(expected)


@pytest.mark.parametrize(("dataset", "split", "workers", "decode_device"), [
    ("chexpert", "val", 0, "cpu"),
    ("chexpert", "train", 2, "cpu"),
    ("chexpert", "test", 1, "cuda"),  # the device-decode path (its GPU part falls back to the CPU here)
    ("pneumonia", "test", 2, "cpu"),
])
@NO_PIN_WARNING
@NO_TV_DEPRECATION
def test_every_batch_carries_each_samples_patient(request: pytest.FixtureRequest, dataset: str, split: str,
                                                  workers: int, decode_device: str) -> None:
    """The patient travels with the key (the report resamples patients from predictions): each
    row's patient is the one in that sample's own JSON, on every layout and loader path."""
    shards = request.getfixturevalue(f"{dataset}_shards")
    expected = tar_samples(shards, split)
    cfg = config(shards, split=split, workers=workers, decode_device=decode_device,
                 labels="pneumonia" if dataset == "pneumonia" else "chexpert14")
    stream = train_stream(cfg, 0, 1) if split == "train" else eval_stream(cfg)
    seen = 0
    for batch in stream.batches():
        assert len(batch["patient"]) == len(batch["key"])
        for key, patient in zip(batch["key"], batch["patient"], strict=True):
            assert patient and patient == expected[key]["patient"], key
            seen += 1
    assert seen > 0 and len({expected[k]["patient"] for k in expected}) > 1


@pytest.mark.parametrize(("dataset", "split", "world", "workers"), [
    ("chexpert", "test", 3, 2),
    ("pneumonia", "val", 2, 2),  # its last val shard holds a single sample
    ("pneumonia", "test", 3, 1),
])
def test_eval_exactly_once_on_other_splits(request: pytest.FixtureRequest, dataset: str, split: str,
                                           world: int, workers: int) -> None:
    shards = request.getfixturevalue(f"{dataset}_shards")
    keys = eval_keys(config(shards, split=split, workers=workers), world)
    assert Counter(keys) == Counter(list(tar_samples(shards, split)))


def test_eval_is_unaugmented_deterministic_and_repeatable(chexpert_shards: Path) -> None:
    cfg = config(chexpert_shards, split="val", augment=AugmentConfig.preset("strong"), workers=1)
    stream = eval_stream(cfg)
    first = run_epoch(stream)
    assert same_batches(first, run_epoch(stream)), "a second pass (persistent workers) repeats the first"
    plain = run_epoch(eval_stream(replace(cfg, augment=AugmentConfig(), seed=99, workers=0)))
    assert same_batches(first, plain), "evaluation ignores augmentation, seed and worker count"


# --- 2. training: equal batches on every rank ---------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_train_batches_are_equal_on_every_rank(chexpert_shards: Path, world: int) -> None:
    samples = len(tar_samples(chexpert_shards, "train"))
    counts, keys = set(), []
    for rank in range(world):
        stream = train_stream(config(chexpert_shards, workers=2), rank, world)
        batches = list(stream.batches())
        assert len(batches) == stream.batches_per_epoch > 0
        for batch in batches:
            assert len(batch["key"]) == 4
            assert batch["image"].shape == (4, 1, 32, 32) and batch["target"].shape == (4, 14)
        counts.add(stream.batches_per_epoch)
        keys.append(flat_keys(batches))
    assert counts == {samples // (4 * world)}
    assert all(a != b for i, a in enumerate(keys) for b in keys[i + 1:]), "ranks draw different samples"


# --- 3. resume ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("workers", "k"), [(0, 5), (2, 4), (2, 5)])
def test_resumed_stream_continues_the_same_sequence(chexpert_shards: Path, workers: int, k: int) -> None:
    cfg = config(chexpert_shards, workers=workers, augment=AugmentConfig.preset("strong"))
    uninterrupted = run_epoch(train_stream(cfg))
    assert len(uninterrupted) > k + 2

    stream = train_stream(cfg)
    iterator = stream.batches()
    consumed = [next(iterator) for _ in range(k)]
    assert flat_keys(consumed) == flat_keys(uninterrupted[:k])
    state = json.loads(json.dumps(stream.state_dict()))  # what a checkpoint stores
    assert (state["epoch"], state["next_batch"]) == (0, k)

    resumed = train_stream(cfg)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the trainer's per-epoch call must not rewind a loaded position
    assert same_batches(run_epoch(resumed), uninterrupted[k:])
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["next_batch"] == 0


def test_epochs_differ_and_set_epoch_reproduces_them(chexpert_shards: Path) -> None:
    cfg = config(chexpert_shards, workers=2, augment=AugmentConfig.preset("light"))
    stream = train_stream(cfg)
    epoch0, epoch1 = run_epoch(stream), run_epoch(stream)  # batches() moves the stream on to epoch 1
    assert flat_keys(epoch0) != flat_keys(epoch1), "a new epoch, a new order"
    fresh = train_stream(cfg)
    fresh.set_epoch(1)
    assert same_batches(run_epoch(fresh), epoch1), "epoch 1 is a function of the seed, not of history"
    again = train_stream(cfg)
    again.set_epoch(1)
    again.set_epoch(0)
    assert same_batches(run_epoch(again), epoch0)


def test_in_process_resume_after_leaving_an_epoch_early(chexpert_shards: Path) -> None:
    cfg = config(chexpert_shards, workers=2, augment=AugmentConfig.preset("light"))
    uninterrupted = run_epoch(train_stream(cfg))
    stream = train_stream(cfg)
    iterator = stream.batches()
    for _ in range(3):
        next(iterator)
    del iterator  # e.g. the trainer stopped for a mid-epoch evaluation
    assert same_batches(run_epoch(stream), uninterrupted[3:]), "prefetched batches must not leak in"


def test_loading_a_state_from_another_layout_warns(chexpert_shards: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    state = train_stream(config(chexpert_shards, workers=2)).state_dict()
    stream = train_stream(config(chexpert_shards, workers=0))
    with caplog.at_level("WARNING", logger="shards.stream"):
        stream.load_state_dict(state)
    assert any("layout changed" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="shards.stream"):
        stream.load_state_dict(stream.state_dict())
    assert not caplog.records


@pytest.mark.parametrize(("workers", "k"), [(0, 3), (2, 4)])
def test_prefetching_keeps_the_position_contract(chexpert_shards: Path, workers: int, k: int) -> None:
    """prefetch=1 (a CUDA device's default, run here on the CPU): batch k+1 is already staged when
    step k runs, yet a checkpoint after step k says next_batch = k and resumes at batch k."""
    cfg = config(chexpert_shards, workers=workers, augment=AugmentConfig.preset("light"), warp_on="device")
    uninterrupted = run_epoch(train_stream(cfg))
    stream = train_stream(cfg)
    assert same_batches([{"key": b["key"], "image": b["image"], "target": b["target"]}
                         for b in stream.batches(prefetch=1)], uninterrupted), "same batches, same order"
    stream = train_stream(cfg)
    iterator = stream.batches(prefetch=1)
    consumed = [next(iterator) for _ in range(k)]
    assert flat_keys(consumed) == flat_keys(uninterrupted[:k])
    state = json.loads(json.dumps(stream.state_dict()))
    assert (state["epoch"], state["next_batch"]) == (0, k), "batches staged ahead are not consumed"
    resumed = train_stream(cfg)
    resumed.load_state_dict(state)
    assert same_batches(run_epoch(resumed), uninterrupted[k:])


# --- 4. determinism -----------------------------------------------------------------------------------

def test_same_seed_same_batches_other_seed_other_order(chexpert_shards: Path) -> None:
    cfg = config(chexpert_shards, augment=AugmentConfig.preset("light"))
    first = run_epoch(train_stream(cfg))
    assert same_batches(first, run_epoch(train_stream(cfg)))
    other = run_epoch(train_stream(replace(cfg, seed=1)))
    assert flat_keys(first) != flat_keys(other)
    # the same samples under a new seed still get new augmentations
    same_key_images = [(a["image"][i], b["image"][j]) for a in first for b in other
                       for i, ka in enumerate(a["key"]) for j, kb in enumerate(b["key"]) if ka == kb]
    assert same_key_images and any(not torch.equal(x, y) for x, y in same_key_images)


# --- 5. damaged data ----------------------------------------------------------------------------------

def copy_pack(shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return copy


def rewrite_tar(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a tar member by member; `edit` returns the new body, or None to drop the member."""
    with tarfile.open(path) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            body = edit(member.name, data)
            if body is not None:
                member.size = len(body)
                tar.addfile(member, io.BytesIO(body))


def sample_keys(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return list(dict.fromkeys(name.split(".", 1)[0] for name in tar.getnames()))


CORRUPTIONS: dict[str, tuple[str, bytes | None]] = {
    "jpeg garbage": ("jpg", b"\xff\xd8\xff not a jpeg"),
    "json garbage": ("json", b"{\"labels\": \xff"),
    "jpeg missing": ("jpg", None),  # the sample keeps its JSON (and mask) but has no image
}
"""How a sample is damaged: which member, and its new body (None: the member is removed)."""


def corrupt_copy(shards: Path, tmp_path: Path, split: str, corruption: str) -> tuple[Path, str]:
    """A copy of the pack whose first `split` shard has its 6th sample damaged; manifest untouched."""
    copy = copy_pack(shards, tmp_path)
    shard = copy / f"{split}-000000.tar"
    victim = sample_keys(shard)[5]
    ext, body = CORRUPTIONS[corruption]
    rewrite_tar(shard, lambda name, data: body if name == f"{victim}.{ext}" else data)
    manifest = json.loads((copy / "manifest.json").read_text())
    recorded = next(s["sha256"] for s in manifest["splits"][split]["shards"] if s["name"] == shard.name)
    assert hashlib.sha256(shard.read_bytes()).hexdigest() != recorded, "the copy must really differ"
    return copy, victim


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 1)])
def test_corrupt_sample_in_a_tar_is_skipped_and_counted(chexpert_shards: Path, tmp_path: Path, world: int,
                                                        workers: int, corruption: str) -> None:
    """Streams do not check the manifest's sha256 (only pack does): a damaged shard is read, and
    its bad sample skipped and counted, instead of refusing the whole split."""
    copy, victim = corrupt_copy(chexpert_shards, tmp_path, "val", corruption)
    keys, skipped = [], 0
    for rank in range(world):
        stream = eval_stream(config(copy, split="val", workers=workers), rank, world)
        keys += keys_of(stream)
        skipped += stream.skipped  # read after the epoch: workers count in shared memory
    assert victim not in keys
    assert Counter(keys) == Counter(set(tar_samples(chexpert_shards, "val")) - {victim})
    assert skipped == 1, "the bad sample is decoded by exactly one consumer"


def test_corrupt_sample_is_logged_and_training_keeps_full_batches(
        chexpert_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    copy, victim = corrupt_copy(chexpert_shards, tmp_path, "val", "jpeg garbage")
    with caplog.at_level("WARNING", logger="shards.stream"):
        keys_of(eval_stream(config(copy, split="val")))
    assert any(victim in record.getMessage() for record in caplog.records)
    for workers in (0, 2):
        train = train_stream(config(copy, split="val", workers=workers, samples_per_epoch=48))
        batches = list(train.batches())
        assert len(batches) == train.batches_per_epoch == 12
        assert all(len(b["key"]) == 4 and b["image"].shape == (4, 1, 32, 32) for b in batches)
        assert victim not in flat_keys(batches) and train.skipped >= 1


@NO_PIN_WARNING
@NO_TV_DEPRECATION
def test_corrupt_sample_is_skipped_on_the_device_decode_path(chexpert_shards: Path, tmp_path: Path) -> None:
    """The device-decode code path, run on the CPU (to_device decodes on the batch's device)."""
    copy, victim = corrupt_copy(chexpert_shards, tmp_path, "val", "jpeg garbage")
    stream = eval_stream(config(copy, split="val", decode_device="cuda"))
    keys = keys_of(stream)
    assert Counter(keys) == Counter(set(tar_samples(chexpert_shards, "val")) - {victim})
    assert stream.skipped == 1


def complete_before(shard: Path, cut: int) -> set[str]:
    """Keys whose image and JSON members lie wholly in the first `cut` bytes."""
    parts: dict[str, set[str]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if member.offset_data + member.size <= cut:
                parts.setdefault(key, set()).add(ext)
    return {key for key, exts in parts.items() if {"jpg", "json"} <= exts}


def member_of(shard: Path, key: str, ext: str) -> tarfile.TarInfo:
    with tarfile.open(shard) as tar:
        return tar.getmember(f"{key}.{ext}")


CUTS: list = [
    pytest.param("inside the JSON of sample 7", id="inside-json"),
    pytest.param("inside the JPEG of sample 7", id="inside-first-member"),
    pytest.param("partial header of sample 7", id="partial-header"),
    pytest.param("member boundary before sample 7", id="member-boundary"),
]


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_tar_yields_what_precedes_the_cut_and_counts(chexpert_shards: Path, tmp_path: Path,
                                                               cut: str) -> None:
    copy = copy_pack(chexpert_shards, tmp_path)
    shard = copy / "val-000000.tar"
    seventh = sample_keys(shard)[6]
    image, meta = member_of(shard, seventh, "jpg"), member_of(shard, seventh, "json")
    position = {
        "inside the JSON of sample 7": meta.offset_data + meta.size // 2,
        "inside the JPEG of sample 7": image.offset_data + 100,
        "partial header of sample 7": image.offset + 100,
        "member boundary before sample 7": image.offset,
    }[cut]
    survivors = complete_before(shard, position)
    assert len(survivors) == 6 and seventh not in survivors
    shard.write_bytes(shard.read_bytes()[:position])
    lost = set(sample_keys(chexpert_shards / "val-000000.tar")) - survivors

    stream = eval_stream(config(copy, split="val"))
    keys = keys_of(stream)
    assert Counter(keys) == Counter(set(tar_samples(chexpert_shards, "val")) - lost), \
        f"missing {sorted(set(tar_samples(chexpert_shards, 'val')) - lost - set(keys))}"
    assert stream.skipped >= 1, "a damaged tar is counted"


def test_truncated_tar_cut_in_half_with_workers(chexpert_shards: Path, tmp_path: Path) -> None:
    copy = copy_pack(chexpert_shards, tmp_path)
    shard = copy / "val-000000.tar"
    middle = shard.stat().st_size // 2
    with tarfile.open(shard) as tar:  # half, moved into a member's data so the reader must notice
        half = next(m.offset_data + 1 for m in tar.getmembers() if m.offset_data + m.size > middle)
    shard.write_bytes(shard.read_bytes()[:half])
    expected = set(tar_samples(chexpert_shards, "val"))
    in_shard = set(sample_keys(chexpert_shards / "val-000000.tar"))
    keys, skipped = [], 0
    for rank in range(2):
        stream = eval_stream(config(copy, split="val", workers=2), rank, 2)
        keys += keys_of(stream)
        skipped += stream.skipped
    assert len(keys) == len(set(keys)) and set(keys) < expected
    assert expected - in_shard <= set(keys), "the other shard is read in full"
    assert 0 < len(set(keys) & in_shard) < len(in_shard), "samples before the cut still come"
    assert skipped >= 1
    train = train_stream(config(copy, split="val", workers=2, samples_per_epoch=64))
    batches = list(train.batches())
    assert len(batches) == 16 and all(len(b["key"]) == 4 for b in batches), "training carries on"
    assert train.skipped >= 1


# --- 6. label policies through the stream -------------------------------------------------------------

RAW_TO_PAIR = {
    "ignore": {1: (1.0, 1.0), 0: (0.0, 1.0), None: (0.0, 1.0), -1: (0.0, 0.0)},
    "ones": {1: (1.0, 1.0), 0: (0.0, 1.0), None: (0.0, 1.0), -1: (1.0, 1.0)},
    "zeros": {1: (1.0, 1.0), 0: (0.0, 1.0), None: (0.0, 1.0), -1: (0.0, 1.0)},
}


def check_targets(stream: Stream, metadata: dict[str, dict], names: tuple[str, ...],
                  expected: Callable[[str, int | None], tuple[float, float]]) -> Counter:
    """Compare every (target, mask) cell with the raw label in the sample's JSON; count raw values."""
    seen: Counter = Counter()
    assert stream.label_names == names
    for batch in stream.batches():
        assert batch["target"].shape == batch["mask"].shape == (len(batch["key"]), len(names))
        assert batch["target"].dtype == batch["mask"].dtype == torch.float32
        for key, target, mask in zip(batch["key"], batch["target"].tolist(), batch["mask"].tolist(),
                                     strict=True):
            for index, name in enumerate(names):
                raw = metadata[key]["labels"][name]
                assert (target[index], mask[index]) == expected(name, raw), (key, name, raw)
                seen[raw] += 1
    return seen


@pytest.mark.parametrize("policy", ["ignore", "ones", "zeros"])
def test_label_policies_apply_to_raw_labels(chexpert_shards: Path, policy: str) -> None:
    metadata = tar_samples(chexpert_shards, "val")
    stream = eval_stream(config(chexpert_shards, split="val", policy=LabelPolicy(uncertain=policy)))
    seen = check_targets(stream, metadata, CHEXPERT_LABELS, lambda _, raw: RAW_TO_PAIR[policy][raw])
    assert all(seen[value] for value in (1, 0, -1, None)), f"val must exercise every raw value: {seen}"
    assert sum(seen.values()) == 14 * len(metadata)


def test_mixed_and_blank_ignore_policies_through_the_stream(chexpert_shards: Path) -> None:
    metadata = tar_samples(chexpert_shards, "val")
    policy = LabelPolicy(uncertain="mixed", blank="ignore", per_label={"Pneumothorax": "ignore"})

    def expected(name: str, raw: int | None) -> tuple[float, float]:
        if raw is None:
            return (0.0, 0.0)
        if raw == -1:
            rule = "ones" if name in ("Edema", "Atelectasis") else "zeros"
            return RAW_TO_PAIR["ignore" if name == "Pneumothorax" else rule][-1]
        return (float(raw), 1.0)

    seen = check_targets(eval_stream(config(chexpert_shards, split="val", policy=policy)), metadata,
                         CHEXPERT_LABELS, expected)
    assert seen[-1] and seen[None]


def test_competition5_columns_follow_its_order(chexpert_shards: Path) -> None:
    metadata = tar_samples(chexpert_shards, "val")
    stream = eval_stream(config(chexpert_shards, split="val", labels="competition5",
                                policy=LabelPolicy(uncertain="ones")))
    check_targets(stream, metadata, COMPETITION5, lambda _, raw: RAW_TO_PAIR["ones"][raw])
    # The check can tell orders apart: COMPETITION5's order is not the manifest's, and the data differ.
    manifest_order = tuple(n for n in CHEXPERT_LABELS if n in COMPETITION5)
    assert manifest_order != COMPETITION5
    assert any([m["labels"][n] for n in manifest_order] != [m["labels"][n] for n in COMPETITION5]
               for m in metadata.values())


def test_pneumonia_is_one_binary_label(pneumonia_shards: Path) -> None:
    metadata = tar_samples(pneumonia_shards, "test")
    stream = eval_stream(config(pneumonia_shards, split="test", workers=1))
    seen = check_targets(stream, metadata, ("Pneumonia",), lambda _, raw: RAW_TO_PAIR["ignore"][raw])
    assert seen[1] and seen[0] and set(seen) == {0, 1}


def test_labels_a_dataset_lacks_are_masked(pneumonia_shards: Path) -> None:
    batches = list(eval_stream(config(pneumonia_shards, split="val", labels="competition5")).batches())
    mask = torch.cat([b["mask"] for b in batches])
    assert mask.shape == (len(tar_samples(pneumonia_shards, "val")), 5)
    pneumonia = torch.cat([b["mask"] for b in eval_stream(
        config(pneumonia_shards, split="val", labels=("Pneumonia", "Edema"))).batches()])
    assert not mask.any() and pneumonia[:, 0].all() and not pneumonia[:, 1].any()


def test_pos_weight_follows_prevalence_and_policy(chexpert_shards: Path) -> None:
    labels = [m["labels"]["Edema"] for m in tar_samples(chexpert_shards, "train").values()]
    pos, neg, unc, blank = (labels.count(v) for v in (1, 0, -1, None))
    for policy, expected in (("ignore", (neg + blank) / pos), ("ones", (neg + blank) / (pos + unc)),
                             ("zeros", (neg + blank + unc) / pos)):
        cfg = config(chexpert_shards, labels=("Edema",), policy=LabelPolicy(uncertain=policy))
        assert train_stream(cfg).pos_weight.tolist() == pytest.approx([expected])


# --- 7. views -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("view", ["frontal", "lateral"])
def test_view_filter(chexpert_shards: Path, view: str) -> None:
    for split in ("val", "train"):
        metadata = tar_samples(chexpert_shards, split)
        wanted = sorted(k for k, m in metadata.items() if m["view"] == view)
        assert 0 < len(wanted) < len(metadata), f"{split} must hold both views"
        assert sorted(eval_keys(config(chexpert_shards, split=split, views=view, workers=1), 2)) == wanted
    train = tar_samples(chexpert_shards, "train")
    stream = train_stream(config(chexpert_shards, views=view, batch_size=2))
    keys = [k for b in stream.batches() for k in b["key"]]
    in_view = sum(m["view"] == view for m in train.values())
    assert stream.batches_per_epoch == in_view // 2 and len(keys) == 2 * stream.batches_per_epoch
    assert {train[k]["view"] for k in keys} == {view}


# --- 8. channels, shape and normalisation ------------------------------------------------------------

@pytest.mark.parametrize(("channels", "image_size"), [(1, 48), (3, 32), (3, 64)])
def test_channels_shape_and_normalisation(chexpert_shards: Path, channels: int, image_size: int) -> None:
    mean, std = (0.5,) * channels, (0.25,) * channels
    cfg = config(chexpert_shards, split="val", mean=mean, std=std, image_size=image_size)
    raw = config(chexpert_shards, split="val", mean=(0.0,), std=(1.0,), image_size=image_size)
    for batch, unit in zip(eval_stream(cfg).batches(), eval_stream(raw).batches(), strict=True):
        image = batch["image"]
        assert image.shape == (len(batch["key"]), channels, image_size, image_size)
        assert image.dtype == torch.float32 and torch.isfinite(image).all()
        assert unit["image"].min() >= 0 and unit["image"].max() <= 1, "mean 0, std 1: pixels / 255"
        for channel in range(channels):
            assert torch.allclose(image[:, channel], (unit["image"][:, 0] - 0.5) / 0.25, atol=1e-5)
    strong = replace(cfg, split="train", augment=AugmentConfig.preset("strong"))
    train = next(iter(train_stream(strong).batches()))
    assert train["image"].shape == (4, channels, image_size, image_size)
    assert train["image"].dtype == torch.float32 and torch.isfinite(train["image"]).all()


# --- 9. decoding / warping where the model runs -------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val"])
def test_warp_on_device_matches_the_worker_path(chexpert_shards: Path, split: str) -> None:
    """warp_on=device runs on this CPU as it would on a GPU: same batches, same pixels up to
    interpolation (the worker path rounds crops to whole pixels and antialiases its resize)."""
    cfg = config(chexpert_shards, split=split, augment=AugmentConfig.preset("light"), image_size=48)
    make = train_stream if split == "train" else eval_stream
    pairs = list(zip(make(cfg).batches(), make(replace(cfg, warp_on="device")).batches(), strict=True))
    assert pairs
    for a, b in pairs:
        assert a["key"] == b["key"] and torch.equal(a["target"], b["target"])
        assert set(b) == {"key", "patient", "target", "mask", "image"}
        assert a["image"].shape == b["image"].shape
        assert (a["image"] - b["image"]).abs().mean() < 0.1  # in std units: ≈6 gray levels


@NO_PIN_WARNING
@NO_TV_DEPRECATION
@pytest.mark.parametrize(("split", "image_size", "tolerance"), [("val", 64, 0.05), ("train", 48, 0.1)])
def test_decode_on_device_path_matches_the_cpu_path(chexpert_shards: Path, split: str, image_size: int,
                                                    tolerance: float) -> None:
    """decode_device=cuda: workers ship JPEG bytes and `to_device` decodes (torchvision) and warps on
    the batch's device; on this CPU that is the same code with device="cpu". JPEG decoders differ
    slightly; in training the CPU executor also rounds its crops to whole pixels."""
    cfg = config(chexpert_shards, split=split, image_size=image_size, augment=AugmentConfig.preset("light"))
    make = train_stream if split == "train" else eval_stream
    on_device = make(replace(cfg, decode_device="cuda")).batches("cpu")
    pairs = list(zip(make(cfg).batches(), on_device, strict=True))
    assert len(pairs) >= 6
    for cpu, device in pairs:
        assert set(device) == {"key", "patient", "target", "mask", "image"}, "JPEG bytes, params consumed"
        assert cpu["key"] == device["key"] and torch.equal(cpu["target"], device["target"])
        assert device["image"].shape == cpu["image"].shape == (len(cpu["key"]), 1, image_size, image_size)
        assert (cpu["image"] - device["image"]).abs().mean() < tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decode needs a GPU (none here)")
def test_gpu_decode_matches_cpu(chexpert_shards: Path) -> None:
    cfg = config(chexpert_shards, split="val", image_size=64)
    on_gpu = eval_stream(replace(cfg, decode_device="cuda")).batches("cuda")
    for a, b in zip(eval_stream(cfg).batches("cuda"), on_gpu, strict=True):
        assert a["key"] == b["key"] and b["image"].device.type == "cuda"
        assert (a["image"] - b["image"]).abs().mean() < 0.05


def test_pin_memory_is_a_config_field_the_loader_uses(chexpert_shards: Path) -> None:
    assert train_stream(config(chexpert_shards)).loader.pin_memory is False
    assert train_stream(config(chexpert_shards, pin_memory=True)).loader.pin_memory is True
    assert eval_stream(config(chexpert_shards, split="val", decode_device="cuda")).loader.pin_memory is True


def jpeg_pixels(shards: Path, split: str) -> dict[str, np.ndarray]:
    """{key: decoded gray pixels} of the split's JPEGs, read with tarfile and Pillow."""
    found = {}
    for shard in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    image = Image.open(io.BytesIO(data)).convert("L")
                    found[member.name.split(".", 1)[0]] = np.asarray(image)
    return found


@pytest.mark.parametrize("workers", [0, 1])
def test_device_warp_host_batches_carry_everything_as_tensors(chexpert_shards: Path, workers: int) -> None:
    """warp_on=device: what crosses to the device is tensors only (pinned when pinning is on):
    the canvas and sizes, and the warp parameters collated per batch, not per-sample objects."""
    pixels = jpeg_pixels(chexpert_shards, "train")
    light = AugmentConfig.preset("light")
    # image_size = the packed short side: decoded at full size, comparable with Pillow's decode
    cfg = config(chexpert_shards, workers=workers, augment=light, warp_on="device", batch_size=5,
                 image_size=64)
    for batch in list(train_stream(cfg).host_batches())[:4]:
        n = len(batch["key"])
        assert len(batch["patient"]) == n  # plain strings beside the keys; everything else tensors
        plain = ("key", "patient")
        layout = {name: (tuple(v.shape[:1]), v.dtype) for name, v in batch.items() if name not in plain}
        assert layout == {
            "target": ((n,), torch.float32), "mask": ((n,), torch.float32), "theta": ((n,), torch.float32),
            "brightness": ((n,), torch.float32), "contrast": ((n,), torch.float32),
            "canvas": ((n,), torch.uint8), "sizes": ((n,), torch.int64)}
        assert batch["theta"].shape == (n, 2, 3)
        assert ((batch["brightness"] - 1).abs() <= light.brightness + 1e-6).all()
        assert (batch["theta"][:, 0, 1] == 0).all() and (batch["theta"][:, 0, 0] < 1).any(), "light: crops"
        for row, (key, size) in enumerate(zip(batch["key"], batch["sizes"].tolist(), strict=True)):
            want, (height, width) = pixels[key], size
            assert (height, width) == want.shape
            got = batch["canvas"][row].numpy()
            assert np.abs(got[:height, :width].astype(int) - want).mean() < 1.0, "the sample's own image"
            assert not got[height:].any() and not got[:, width:].any(), "zero padding"
    identity = next(iter(eval_stream(config(chexpert_shards, split="val", warp_on="device")).host_batches()))
    assert torch.equal(identity["theta"][0], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    assert (identity["brightness"] == 1).all() and (identity["contrast"] == 1).all()


def test_batches_handed_out_do_not_hold_the_loader_buffer(chexpert_shards: Path) -> None:
    """On the CPU a target that were a view of the batch's buffer would keep the whole canvas alive
    for as long as the caller keeps the target (an evaluation loop keeps them all)."""
    cfg = config(chexpert_shards, split="val", warp_on="device", with_lesion_masks=True)
    batch = next(iter(eval_stream(cfg).batches()))
    for name in ("target", "mask", "lesion"):
        assert batch[name].untyped_storage().nbytes() == batch[name].nbytes, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning and a side stream need a GPU (none here)")
def test_gpu_prefetched_batches_match_the_cpu_path(chexpert_shards: Path) -> None:
    light = AugmentConfig.preset("light")
    cfg = config(chexpert_shards, workers=1, augment=light, warp_on="device", pin_memory=True)
    on_cpu = run_epoch(train_stream(cfg))
    stream = train_stream(cfg)
    for cpu, gpu in zip(on_cpu, stream.batches("cuda"), strict=True):
        assert cpu["key"] == gpu["key"] and gpu["image"].device.type == "cuda"
        assert torch.allclose(cpu["image"], gpu["image"].cpu(), atol=1e-3)
        assert torch.equal(cpu["target"], gpu["target"].cpu())
    assert stream.state_dict()["epoch"] == 1


# --- 10. balancing and patient fraction ---------------------------------------------------------------

def positive_fraction(stream: Stream, index: int = 0) -> float:
    """Fraction of positives among the labelled (mask 1) entries seen in one epoch."""
    targets, masks = [], []
    for batch in stream.batches():
        targets.append(batch["target"][:, index])
        masks.append(batch["mask"][:, index])
    target, mask = torch.cat(targets), torch.cat(masks)
    return float(target[mask > 0].mean())


@pytest.mark.parametrize("policy", ["ignore", "ones"])
def test_balanced_resampling(chexpert_shards: Path, policy: str) -> None:
    # Edema: ~30% positive in the synthetic train split. (Pleural Effusion is already ~50% there,
    # so balancing could not move it closer to 0.5.)
    cfg = config(chexpert_shards, labels=("Edema",), samples_per_epoch=240,
                 policy=LabelPolicy(uncertain=policy))
    plain = positive_fraction(train_stream(cfg))
    balanced_stream = train_stream(replace(cfg, balance="Edema"))
    balanced = positive_fraction(balanced_stream)
    assert plain < 0.4, "precondition: an imbalanced label"
    assert abs(balanced - 0.5) < abs(plain - 0.5) and abs(balanced - 0.5) < 0.15
    assert balanced_stream.batches_per_epoch == train_stream(cfg).batches_per_epoch == 60


def test_patient_fraction_keeps_fewer_patients(chexpert_shards: Path) -> None:
    metadata = tar_samples(chexpert_shards, "train")
    everyone = {m["patient"] for m in metadata.values()}

    def patients(fraction: float, seed: int) -> set[str]:
        cfg = config(chexpert_shards, patient_fraction=fraction, samples_per_epoch=200, seed=seed)
        return {metadata[k]["patient"] for b in train_stream(cfg).batches() for k in b["key"]}

    half = patients(0.5, seed=0) | patients(0.5, seed=1)  # the kept subset does not depend on the seed
    assert half < everyone and len(half) <= 0.7 * len(everyone)
    assert len(patients(1.0, seed=0)) > len(half)
    default = train_stream(config(chexpert_shards, patient_fraction=0.5))
    assert default.batches_per_epoch == round(len(metadata) * 0.5) // 4


# --- 11. configuration errors -------------------------------------------------------------------------

def test_configuration_errors(chexpert_shards: Path, tmp_path: Path) -> None:
    for split in ("train", "val"):
        with pytest.raises(DataError, match=rf"split '{split}' has \d+ samples per epoch, fewer than one"):
            train_stream(config(chexpert_shards, split=split, batch_size=10_000))
    with pytest.raises(DataError, match="split 'train'"):
        train_stream(config(chexpert_shards, batch_size=16), 0, 4)  # 59 samples < 16 × 4 ranks
    with pytest.raises(DataError, match="no split 'holdout'"):
        eval_stream(config(chexpert_shards, split="holdout"))
    with pytest.raises(DataError, match="balance label"):
        train_stream(config(chexpert_shards, labels="competition5", balance="Fracture"))
    with pytest.raises(DataError, match="manifest"):
        train_stream(config(tmp_path))
    for bad in ({"views": "oblique"}, {"mean": (0.5, 0.5), "std": (0.2, 0.2)},
                {"mean": (0.5,), "std": (0.2,) * 3}, {"patient_fraction": 0.0}, {"batch_size": 0},
                {"decode_device": "tpu"}):
        with pytest.raises(ValueError):
            config(chexpert_shards, **bad)
    assert np.isfinite(train_stream(config(chexpert_shards)).pos_weight.numpy()).all()


@pytest.mark.parametrize("payload", [b'{"labels": {"Edema": 2}}', b'[1, 2]', b'{"labels": ["Edema"]}'])
def test_malformed_metadata_is_skipped_and_counted(chexpert_shards: Path, tmp_path: Path,
                                                   payload: bytes) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(chexpert_shards, copy)
    shard = copy / "val-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".json")).split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            body = payload if member.name == f"{victim}.json" else data
            member.size = len(body)
            tar.addfile(member, io.BytesIO(body))
    stream = eval_stream(config(copy, split="val"))
    keys = [key for batch in stream.batches() for key in batch["key"]]
    assert victim not in keys and stream.skipped == 1


def nearest_by_centres(bits: np.ndarray, size: int) -> np.ndarray:
    """The expected geometry written out: output pixel i samples the source pixel under its centre,
    floor((i + 0.5) * source / size), in integer arithmetic (no float rounding at the edges)."""
    rows = [(2 * i + 1) * bits.shape[0] // (2 * size) for i in range(size)]
    cols = [(2 * j + 1) * bits.shape[1] // (2 * size) for j in range(size)]
    return np.array([[bits[r, c] for c in cols] for r in rows], dtype=bits.dtype)


def test_lesion_masks_are_opt_in_per_label_and_follow_the_image_geometry(chexpert_shards: Path) -> None:
    """Off by default (batches unchanged); on, each label's plane is that label's bit of the packed
    mask, resized the way the image is (whole image squashed to size × size)."""
    assert "lesion" not in next(iter(eval_stream(config(chexpert_shards, split="val")).batches()))
    with pytest.raises(ValueError, match="augment none"):
        config(chexpert_shards, with_lesion_masks=True, augment=AugmentConfig.preset("light"))
    labels = ("Cardiomegaly", "Pleural Effusion", "Support Devices")
    cfg = config(chexpert_shards, split="val", labels=labels, with_lesion_masks=True, image_size=40)
    packed: dict[str, np.ndarray] = {}
    for shard in sorted(chexpert_shards.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "mask.png":
                    packed[key] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
    assert packed, "the fixture has lesion masks in val"
    seen = 0
    for batch in eval_stream(cfg).batches():
        assert batch["lesion"].shape == (len(batch["key"]), 3, 40, 40) and batch["lesion"].dtype == torch.bool
        for key, planes, target in zip(batch["key"], batch["lesion"], batch["target"], strict=True):
            if key not in packed:
                assert not planes.any()
                continue
            seen += 1
            bits = nearest_by_centres(packed[key], 40)
            for index, name in enumerate(labels):
                expected = (bits & (1 << CHEXPERT_LABELS.index(name))) != 0  # bit i: CheXpert column i
                assert np.array_equal(planes[index].numpy(), expected), (key, name)
                if planes[index].any():
                    assert target[index] == 1, "a marked finding is a positive label"
    assert seen == len(packed)
