"""What a trainer config reads: its label set and its train/val/test shard streams.

One place turns a `Config` into `StreamConfig`s, so training, evaluation and the explain job
read a split identically (same normalisation, same views, same label policy).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from shards.labels import COMPETITION5, resolve_label_set
from shards.manifest import load_manifest
from shards.stream import (
    IMAGENET_GRAY,
    AugmentConfig,
    LabelPolicy,
    Stream,
    StreamConfig,
    eval_stream,
    train_stream,
)
from trainer.config import Config, ConfigError


def run_labels(cfg: Config) -> tuple[str, ...]:
    """The model's output labels, in output order: data.labels, or every label of the pack."""
    manifest = load_manifest(Path(cfg.data.shards))
    labels = resolve_label_set(cfg.data.labels) if cfg.data.labels else manifest.label_names
    if cfg.run.metric == "auroc_chexpert5" and not set(COMPETITION5) <= set(labels):
        raise ConfigError("run.metric: auroc_chexpert5 needs the five competition labels in data.labels")
    return tuple(labels)


def stream_config(cfg: Config, model: torch.nn.Module, split: str, pin_memory: bool = False) -> StreamConfig:
    """How a trainer config reads a split; `pin_memory` when batches go to a GPU (async copies)."""
    data = cfg.data
    if cfg.model.in_chans == 1:
        mean, std = IMAGENET_GRAY
    else:  # a gray image repeated into the RGB statistics the model was trained with
        mean = tuple(model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(model.pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
    train = split == "train"
    return StreamConfig(
        shards=Path(data.shards), split=split, batch_size=data.batch_size, image_size=data.image_size,
        labels=tuple(data.labels) if isinstance(data.labels, list) else data.labels,
        policy=LabelPolicy(uncertain=data.uncertain, blank=data.blank), views=data.views,
        augment=AugmentConfig.preset(data.augment if train else "none"), mean=mean, std=std,
        workers=data.workers, shuffle_buffer=data.shuffle_buffer, seed=cfg.run.seed,
        decode_device=data.decode_device, warp_on=data.warp_on,
        balance=data.balance if train else None, patient_fraction=data.patient_fraction if train else 1.0,
        samples_per_epoch=data.samples_per_epoch if train else None, pin_memory=pin_memory,
    )


def build_streams(cfg: Config, model: torch.nn.Module,
                  accelerator: Accelerator) -> tuple[Stream, Stream, Stream | None]:
    """This rank's train/val/test streams. An epoch is a whole number of optimizer steps: a batch
    left over would carry its gradient into the next epoch, past the epoch-end checkpoint (lost
    on resume), and make epochs differ in length."""
    rank, world = accelerator.process_index, accelerator.num_processes
    pin = accelerator.device.type == "cuda"
    train = train_stream(stream_config(cfg, model, "train", pin), rank, world,
                         batch_multiple=cfg.optim.grad_accum)
    val = eval_stream(stream_config(cfg, model, "val", pin), rank, world)
    test = eval_stream(stream_config(cfg, model, "test", pin), rank, world) if cfg.run.test_at_end else None
    return train, val, test
