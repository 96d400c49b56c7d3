"""WebDataset streams for training and evaluation, exact across ranks and DataLoader workers.

Shards are read by `shards.stream.tarread` (webdataset's sample format, a faster reader).

Training (`TrainBatches`): each (rank, worker) reads shards resampled with its own seeded RNG,
through a shuffle buffer, and yields whole batches. An epoch is a fixed number of batches per
rank (equal on every rank, so DDP never waits on a rank that ran dry). Batch `i` of an epoch is
produced by logical worker `i % W` as its `i // W`-th batch, and every random choice is a pure
function of (seed, epoch, rank, logical worker, position), so the stream position
(epoch, next batch) is the whole checkpoint: a resumed stream yields the same batches.

Evaluation (`EvalBatches`): the split's samples, in manifest order, are cut into contiguous
spans, one per (rank, worker); a consumer reads only the shards that overlap its span. Every
sample is seen exactly once, with no padding duplicates, and each batch carries its keys.

Workers yield uint8 images; `Stream.batches(device)` moves them and normalises on the device.
With `decode_device="cuda"` workers ship JPEG bytes and the decode + warp run on the GPU. A worker
batch crosses as one shared-memory buffer (`shards.stream.wire`): pixels, targets, masks and the warp
parameters as tensors (theta N×2×3, brightness, contrast), pinned in one piece when
`pin_memory` is set. On a CUDA device batch k+1 is staged on a side stream while the caller runs
step k (`shards.stream.staging`); the position still counts only batches handed out.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing as mp
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.errors import DataError
from shards.hashing import patient_unit
from shards.labels import RAW_VALUES, resolve_label_set
from shards.lesion import decode_lesion, label_planes, resize_nearest
from shards.manifest import Manifest, ShardInfo, load_manifest
from shards.stream.augment import (
    IDENTITY,
    AugmentConfig,
    WarpParams,
    batch_params,
    is_identity,
    normalize,
    pad_canvas,
    photometric,
    sample_params,
    warp,
    warp_cpu,
)
from shards.stream.decode import DecodeError, Scratch, decode_gray
from shards.stream.label_policy import LabelEncoder, LabelPolicy
from shards.stream.staging import stager
from shards.stream.tarread import TarFormatError, iter_samples
from shards.stream.wire import Packer, unpack

log = logging.getLogger("shards.stream")
IMAGENET_GRAY = ((0.449,), (0.226,))
"""ImageNet mean/std averaged over RGB: the input statistics of an in_chans=1 timm model."""


@dataclass(frozen=True)
class StreamConfig:
    """Everything a stream needs besides rank and world size."""

    shards: Path
    split: str = "train"
    batch_size: int = 32
    image_size: int = 224
    labels: str | tuple[str, ...] | None = None
    """A preset (chexpert14, competition5, pneumonia, nih14, mimic14), a list of names, or None: the
    manifest's."""
    policy: LabelPolicy = field(default_factory=LabelPolicy)
    views: Literal["all", "frontal", "lateral"] = "all"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mean: tuple[float, ...] = IMAGENET_GRAY[0]
    std: tuple[float, ...] = IMAGENET_GRAY[1]
    """len(mean) is the model's input channels: 1, or 3 to repeat the gray channel."""
    workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    pin_memory: bool = False
    """Pin the loader's host batches (the DataLoader's pin thread): set it when the model runs on a
    CUDA device, so every host→device copy is asynchronous. decode_device=cuda implies it."""
    decode_device: Literal["cpu", "cuda"] = "cpu"
    """cuda: workers ship JPEG bytes; decode (nvJPEG) and warp run on the GPU."""
    warp_on: Literal["worker", "device"] = "worker"
    """device: workers only decode; the augmentation warp runs batched where the model runs (a GPU),
    which leaves the loader cores little but the decode. Implied by decode_device=cuda."""
    balance: str | None = None
    """Train only: rejection-sample so this label is ~50% positive."""
    patient_fraction: float = 1.0
    """Train only: keep this fraction of patients (deterministic), for data-efficiency curves."""
    samples_per_epoch: int | None = None
    """Train only: defaults to the split's sample count (after the view and patient filters)."""
    with_lesion_masks: bool = False
    """Eval only (augment none): batches also carry `lesion`, bool N×labels×size×size, each label's
    lesion mask (`{key}.mask.png`, see shards.lesion) squashed to the image's geometry; all False
    where a sample has no mask. The explain job's ground truth."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.image_size < 1 or self.workers < 0:
            raise ValueError("batch_size and image_size must be ≥ 1, workers ≥ 0")
        if self.views not in ("all", "frontal", "lateral"):
            raise ValueError(f"views {self.views!r}: expected all, frontal or lateral")
        if not 0.0 < self.patient_fraction <= 1.0:
            raise ValueError(f"patient_fraction {self.patient_fraction}: expected 0 < f ≤ 1")
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ValueError("mean and std must both have 1 or 3 entries")
        if self.warp_on not in ("worker", "device") or self.decode_device not in ("cpu", "cuda"):
            raise ValueError("warp_on must be worker or device, decode_device cpu or cuda")
        if self.with_lesion_masks and self.augment.policy != "none":
            raise ValueError("with_lesion_masks follows the unaugmented geometry only: use augment none")


class _Shared:
    """Values the main process sets and persistent workers read at each epoch's start."""

    def __init__(self) -> None:
        self.epoch = mp.Value("q", 0, lock=False)
        self.start_batch = mp.Value("q", 0, lock=False)
        self.skipped = mp.Value("q", 0)

    def count_skip(self, reason: str, key: str) -> None:
        with self.skipped.get_lock():
            self.skipped.value += 1
        log.warning("skipped sample %s: %s", key, reason)


class _Samples:
    """Per-sample work shared by both streams: metadata, filters, decode, targets, warp."""

    def __init__(self, config: StreamConfig, manifest: Manifest, shared: _Shared) -> None:
        self.config, self.shared = config, shared
        self.fmt = manifest.image_format
        names = resolve_label_set(config.labels) if config.labels else manifest.label_names
        self.encoder = LabelEncoder(names, config.policy)
        self.on_device = config.decode_device == "cuda" and self.fmt == "jpg"
        self.warp_on_device = config.warp_on == "device"
        self.scratch = Scratch()
        """Decode memory of the batch being loaded (warp_on=device: images wait for collate)."""
        known = manifest.label_names
        self.lesion_bits = [known.index(name) if name in known else None for name in names] \
            if config.with_lesion_masks else None
        self.wanted = (self.fmt, "json", "mask.png") if config.with_lesion_masks else (self.fmt, "json")

    def read(self, shard: Path) -> Iterator[dict]:
        """Raw samples of one tar (image + JSON only); a damaged tar ends with a counted warning."""
        try:
            yield from iter_samples(shard, wanted=self.wanted)
        except (TarFormatError, OSError, UnicodeDecodeError) as err:
            self.shared.count_skip(f"unreadable tar data ({err})", str(shard))

    def metadata(self, raw: dict) -> dict | None:
        """Parsed JSON if the sample is complete and passes the view filter; None skips it."""
        try:
            meta = json.loads(raw["json"])
            _ = raw[self.fmt]
        except (KeyError, ValueError, TypeError) as err:
            reason = f"incomplete sample ({type(err).__name__}: {err})"
            self.shared.count_skip(reason, raw.get("__key__", "?"))
            return None
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if not isinstance(labels, dict) or not all(v in RAW_VALUES for v in labels.values()):
            self.shared.count_skip("malformed metadata (labels must map names to 1, 0, -1 or null)",
                                   raw.get("__key__", "?"))
            return None
        if self.config.views != "all" and meta.get("view") != self.config.views:
            return None
        return meta

    def load(self, raw: dict, meta: dict, params: WarpParams) -> dict | None:
        """Decode + warp on the CPU (or keep the bytes for the device); None if undecodable.

        Per-sample values stay plain Python/numpy here: `collate` writes them into the batch's
        one buffer, so no per-sample tensor is made.
        """
        item = {"key": meta.get("key", raw["__key__"]), "patient": str(meta.get("patient", "")),
                "labels": meta.get("labels", {}), "params": params}
        if self.lesion_bits is not None:
            item["lesion"] = self.lesion(raw, item["key"])
        if self.on_device:
            item["jpeg"] = raw["jpg"]
            return item
        try:
            pixels = decode_gray(raw[self.fmt], self.fmt, self.config.image_size,
                                 self.scratch if self.warp_on_device else None)
        except DecodeError as err:
            self.shared.count_skip(str(err), item["key"])
            return None
        if self.warp_on_device:
            item["pixels"] = pixels
        else:
            item["image"] = warp_cpu(pixels, params, self.config.image_size).numpy()
        return item

    def lesion(self, raw: dict, key: str) -> np.ndarray:
        """The sample's per-label lesion planes at the output size (identity geometry: the whole
        image squashed to size × size, as `warp_cpu`/`warp` do with IDENTITY)."""
        size = self.config.image_size
        assert self.lesion_bits is not None
        if "mask.png" not in raw:
            return np.zeros((len(self.lesion_bits), size, size), dtype=bool)
        try:
            bits = resize_nearest(decode_lesion(raw["mask.png"]), size, size)
        except (OSError, ValueError, SyntaxError) as err:
            log.warning("sample %s: unreadable lesion mask (%s); treated as no mask", key, err)
            return np.zeros((len(self.lesion_bits), size, size), dtype=bool)
        return label_planes(bits, self.lesion_bits)

    def collate(self, items: list[dict]) -> dict:
        """One packed batch (shards.stream.wire): keys as a list; targets, masks, warp parameters (theta,
        brightness, contrast), lesion planes and pixels in one buffer, written in place."""
        n, labels = len(items), len(self.encoder.names)
        fields: dict[str, tuple[type, tuple[int, ...]]] = {
            "target": (np.float32, (n, labels)), "mask": (np.float32, (n, labels)),
            "theta": (np.float32, (n, 2, 3)), "brightness": (np.float32, (n,)),
            "contrast": (np.float32, (n,)),
        }
        if self.lesion_bits is not None:
            size = self.config.image_size
            fields["lesion"] = (np.bool_, (n, len(self.lesion_bits), size, size))
        fields.update(self._pixel_fields(items))
        packer = Packer(fields)
        self.encoder.encode_into([item["labels"] for item in items], packer["target"], packer["mask"])
        for name, values in batch_params([item["params"] for item in items]).items():
            packer[name][...] = values.numpy()
        if self.lesion_bits is not None:
            for row, item in zip(packer["lesion"], items, strict=True):
                row[...] = item["lesion"]
        self._fill_pixels(items, packer)
        self.scratch.reset()  # the items' pixels are in the buffer now: their decode memory is free
        return packer.message(key=[item["key"] for item in items],
                              patient=[item["patient"] for item in items])

    def _pixel_fields(self, items: list[dict]) -> dict[str, tuple[type, tuple[int, ...]]]:
        n = len(items)
        if self.on_device:  # the JPEG bytes back to back, and where each one lies
            total = sum(len(item["jpeg"]) for item in items)
            return {"jpeg": (np.uint8, (total,)), "spans": (np.int64, (n, 2))}
        if self.warp_on_device:  # ragged decoded images in one zero-padded canvas
            height = max(item["pixels"].shape[0] for item in items)
            width = max(item["pixels"].shape[1] for item in items)
            return {"canvas": (np.uint8, (n, height, width)), "sizes": (np.int64, (n, 2))}
        return {"image": (np.uint8, (n, 1, self.config.image_size, self.config.image_size))}

    def _fill_pixels(self, items: list[dict], packer: Packer) -> None:
        if self.on_device:
            flat, spans, offset = packer["jpeg"], packer["spans"], 0
            for index, item in enumerate(items):
                length = len(item["jpeg"])
                flat[offset:offset + length] = np.frombuffer(item["jpeg"], dtype=np.uint8)
                spans[index] = offset, length
                offset += length
        elif self.warp_on_device:
            canvas, sizes = packer["canvas"], packer["sizes"]
            for index, item in enumerate(items):
                height, width = item["pixels"].shape
                canvas[index, :height, :width] = item["pixels"]
                canvas[index, :height, width:] = 0  # the buffer is uninitialised: zero the padding only
                canvas[index, height:] = 0
                sizes[index] = height, width
        else:
            images = packer["image"]
            for index, item in enumerate(items):
                images[index] = item["image"]


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainBatches(IterableDataset):
    """Yields `batches_per_epoch` full batches per epoch on this rank, resampled and shuffled."""

    def __init__(self, samples: _Samples, shards: list[ShardInfo], rank: int, batches_per_epoch: int,
                 accept: dict[float, float] | None, balance_index: int | None) -> None:
        self.samples, self.shards, self.rank = samples, shards, rank
        self.batches_per_epoch = batches_per_epoch
        self.accept, self.balance_index = accept, balance_index

    def __iter__(self) -> Iterator[dict]:
        config, shared = self.samples.config, self.samples.shared
        slot, workers = _worker_slot()
        epoch, start = shared.epoch.value, shared.start_batch.value
        # After a mid-epoch resume the loader still asks worker slot 0 first; rotating which
        # logical stream each slot plays makes slot 0 produce batch `start`.
        logical = (slot + start) % workers
        already = max(0, -(-(start - logical) // workers))
        indices = range(logical + already * workers, self.batches_per_epoch, workers)
        if not indices:
            return
        stream = self._shuffled(np.random.default_rng([config.seed, epoch, self.rank, logical, 1]))
        for _ in range(already * config.batch_size):  # skip without decoding: cheap
            next(stream)
        for batch_index in indices:
            # One augmentation generator per batch (creating one costs ~20 µs): still a pure
            # function of the stream position, which advances in whole batches.
            rng = np.random.default_rng([config.seed, epoch, self.rank, logical, 2, batch_index])
            items = []
            for _ in range(config.batch_size):
                raw, meta = next(stream)
                items.append(self.samples.load(raw, meta, sample_params(config.augment, rng)))
            yield self.samples.collate(self._fill_holes(items))

    @staticmethod
    def _fill_holes(items: list[dict | None]) -> list[dict]:
        """Replace undecodable samples by repeating good ones: shapes and positions stay fixed."""
        good = [item for item in items if item is not None]
        if not good:
            raise DataError("every sample of a training batch failed to decode: are the shards corrupt?")
        return [item if item is not None else good[i % len(good)] for i, item in enumerate(items)]

    def _shuffled(self, rng: np.random.Generator) -> Iterator[tuple[dict, dict]]:
        """Endless (raw, meta) pairs: shards drawn with replacement, through a shuffle buffer."""
        buffer: list[tuple[dict, dict]] = []
        size = max(1, self.samples.config.shuffle_buffer)
        for pair in self._filtered(rng):
            if len(buffer) < size:
                buffer.append(pair)
                continue
            index = int(rng.integers(size))
            out, buffer[index] = buffer[index], pair
            yield out

    def _filtered(self, rng: np.random.Generator) -> Iterator[tuple[dict, dict]]:
        config = self.samples.config
        empty_rounds = 0
        while True:
            shard = self.shards[int(rng.integers(len(self.shards)))]
            produced = False
            for raw in self.samples.read(shard.path):
                meta = self.samples.metadata(raw)
                if meta is None or not self._keep(meta, rng):
                    continue
                produced = True
                yield raw, meta
            empty_rounds = 0 if produced else empty_rounds + 1
            if empty_rounds > 10 * len(self.shards):
                raise DataError(f"no usable training samples in {config.shards} for split "
                                f"{config.split!r} (views={config.views})")

    def _keep(self, meta: dict, rng: np.random.Generator) -> bool:
        config = self.samples.config
        if config.patient_fraction < 1.0 and \
                patient_unit(str(meta.get("patient")), "cxrbench-fraction") >= config.patient_fraction:
            return False
        if self.accept is not None:
            target, mask = self.samples.encoder(meta.get("labels", {}))
            if mask[self.balance_index]:
                return bool(rng.random() < self.accept[float(target[self.balance_index])])
        return True


class EvalBatches(IterableDataset):
    """Every sample of the split exactly once across ranks × workers, in contiguous spans."""

    def __init__(self, samples: _Samples, shards: list[ShardInfo], rank: int, world_size: int) -> None:
        self.samples, self.shards, self.rank, self.world_size = samples, shards, rank, world_size

    def span(self, consumer: int, consumers: int) -> tuple[int, int]:
        total = sum(shard.samples for shard in self.shards)
        return consumer * total // consumers, (consumer + 1) * total // consumers

    def __iter__(self) -> Iterator[dict]:
        slot, workers = _worker_slot()
        begin, end = self.span(self.rank * workers + slot, self.world_size * workers)
        batch: list[dict] = []
        for raw in self._range(begin, end):
            meta = self.samples.metadata(raw)
            if meta is None:
                continue
            item = self.samples.load(raw, meta, IDENTITY)
            if item is None:
                continue
            batch.append(item)
            if len(batch) == self.samples.config.batch_size:
                yield self.samples.collate(batch)
                batch = []
        if batch:
            yield self.samples.collate(batch)

    def _range(self, begin: int, end: int) -> Iterator[dict]:
        """Raw samples with global index in [begin, end), reading only the shards that hold them."""
        offset = 0
        for shard in self.shards:
            first, offset = offset, offset + shard.samples
            if offset <= begin or first >= end:
                continue
            for index, raw in enumerate(self.samples.read(shard.path), start=first):
                if index >= end:
                    break
                if index >= begin:
                    yield raw


class Stream:
    """A DataLoader over one split plus what the trainer needs: position, device stage, counts."""

    def __init__(self, dataset: IterableDataset, samples: _Samples, config: StreamConfig,
                 batches_per_epoch: int | None, pos_weight: np.ndarray) -> None:
        self.dataset, self.samples, self.config = dataset, samples, config
        self.batches_per_epoch = batches_per_epoch
        self.pos_weight = torch.from_numpy(pos_weight)
        self.label_names = samples.encoder.names
        self._shared = samples.shared
        self.epoch, self.next_batch = 0, 0
        self.loader = DataLoader(
            dataset, batch_size=None, num_workers=config.workers,
            persistent_workers=config.workers > 0, worker_init_fn=_init_worker,
            pin_memory=config.pin_memory or config.decode_device == "cuda",
            prefetch_factor=4 if config.workers else None,
        )

    @property
    def skipped(self) -> int:
        """Samples skipped so far (corrupt, incomplete or unreadable), across all workers."""
        return int(self._shared.skipped.value)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (unless a loaded state says otherwise for it)."""
        if epoch != self.epoch:
            self.epoch, self.next_batch = epoch, 0

    def state_dict(self) -> dict:
        """The stream's checkpoint: the position of the next batch and what it depends on."""
        return {"epoch": self.epoch, "next_batch": self.next_batch, "seed": self.config.seed,
                "batch_size": self.config.batch_size, "workers": self.config.workers,
                "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
        layout = {k: v for k, v in self.state_dict().items() if k not in ("epoch", "next_batch")}
        same = all(state.get(k) == v for k, v in layout.items())
        if not same:
            log.warning("stream layout changed since the checkpoint (%s); the resumed epoch will not "
                        "repeat the original batches exactly", state)

    def host_batches(self) -> Iterator[dict]:
        """One epoch (train: from the saved position) of worker batches as named host tensors
        (views of the pinned buffer when pin_memory is on): the loader side, before any device."""
        self._shared.epoch.value = self.epoch
        self._shared.start_batch.value = self.next_batch
        for message in self.loader:
            batch = unpack(message)
            del message  # hands a worker's shared buffer back now, not one batch later
            yield batch

    def batches(self, device: torch.device | str = "cpu", prefetch: int | None = None) -> Iterator[dict]:
        """One epoch (train: from the saved position) of batches ready for the model on `device`.

        `prefetch`: batches staged on the device ahead of the one handed out; by default 1 on
        CUDA (copies, decode, warp and normalise of batch k+1 queued on a side stream while the
        caller runs step k) and 0 elsewhere. The position counts batches handed out, never the
        ones staged ahead: a checkpoint after step k resumes at batch k+1.
        """
        device = torch.device(device)
        staging = stager(functools.partial(self.to_device, device=device), device, prefetch)
        for batch in staging.batches(self.host_batches()):
            if self.batches_per_epoch is not None:
                self.next_batch += 1  # before yielding: a checkpoint taken after this step resumes after it
            yield batch
        if self.batches_per_epoch is not None:
            self.epoch, self.next_batch = self.epoch + 1, 0

    def to_device(self, batch: dict, device: torch.device) -> dict:
        """A host batch (`host_batches`) → model-ready tensors on `device`; decode and/or warp
        there when the workers did not. Every host tensor is pinned when the loader pins, so
        each copy is asynchronous; nothing here waits on the device."""
        if "jpeg" in batch:
            batch = self._decode_on_device(batch, device)
        # Whether to run the photometric step is asked of the host tensors: free, no device sync.
        adjust = not is_identity(batch["brightness"], batch["contrast"])
        if "canvas" in batch:
            image = warp(_moved(batch["canvas"], device), _moved(batch["sizes"], device),
                         _moved(batch["theta"], device), self.config.image_size)
        else:  # warped in the worker; brightness/contrast run here, batched, where the model runs
            image = _moved(batch["image"], device).float()
        if adjust:
            image = photometric(image, _moved(batch["brightness"], device), _moved(batch["contrast"], device))
        out = {"key": batch["key"], "patient": batch["patient"],
               "image": normalize(image, self.config.mean, self.config.std)}
        for name in ("target", "mask", "lesion"):
            if name in batch:  # a copy even on the CPU: a view would keep the whole host buffer alive
                out[name] = batch[name].to(device, non_blocking=device.type == "cuda", copy=True)
        return out

    def _decode_on_device(self, batch: dict, device: torch.device) -> dict:
        """nvJPEG decode of the whole batch into a canvas on `device`; if a JPEG is corrupt, decode
        one by one and drop the bad rows from the batch (skipped and counted, as on the CPU path)."""
        import torchvision.io as tvio  # noqa: PLC0415 - only the device path needs it

        jpegs = [batch["jpeg"][start:start + length] for start, length in batch["spans"].tolist()]
        try:
            images = tvio.decode_jpeg(jpegs, mode=tvio.ImageReadMode.GRAY, device=device)
        except RuntimeError:
            images, keep = self._decode_each(jpegs, batch["key"], device)
            batch = _rows(batch, keep)
        canvas, sizes = pad_canvas(images)
        return {**batch, "canvas": canvas, "sizes": sizes}

    def _decode_each(self, jpegs: list[torch.Tensor], keys: list[str],
                     device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
        """The decodable images and their rows; the others are counted as skipped."""
        import torchvision.io as tvio  # noqa: PLC0415 - only the device path needs it

        images, keep = [], []
        for index, data in enumerate(jpegs):
            try:
                images.append(tvio.decode_jpeg(data, mode=tvio.ImageReadMode.GRAY, device=device))
                keep.append(index)
            except RuntimeError as err:
                self._shared.count_skip(f"undecodable JPEG on {device} ({err})", keys[index])
        if not images:
            raise DataError(f"every JPEG of a batch failed to decode on {device}: are the shards corrupt?")
        return images, keep


_PER_SAMPLE = ("target", "mask", "theta", "brightness", "contrast", "lesion")
"""Host batch tensors with one row per sample."""


def _rows(batch: dict, keep: list[int]) -> dict:
    """The batch restricted to the samples `keep` (host tensors: plain indexing)."""
    out = {name: value[keep] for name, value in batch.items() if name in _PER_SAMPLE}
    return {**batch, **out, "key": [batch["key"][index] for index in keep],
            "patient": [batch["patient"][index] for index in keep]}


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from pinned memory to a GPU, an asynchronous copy."""
    return tensor.to(device, non_blocking=device.type == "cuda")


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # one decode pipeline per core; intra-op threads only oversubscribe
    # SLURM delivers the preemption warning (SIGUSR1) to every process of a job step: a worker
    # must survive it (its default action is to die) and leave the checkpoint to its rank.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _balance(config: StreamConfig, encoder: LabelEncoder, prevalence: dict) -> tuple[dict, int] | None:
    if config.balance is None:
        return None
    if config.balance not in encoder.names:
        raise DataError(f"balance label {config.balance!r} is not among the stream's labels")
    index = encoder.names.index(config.balance)
    weight = float(encoder.pos_weight(prevalence)[index])  # neg/pos after the policy
    return {1.0: min(1.0, weight), 0.0: min(1.0, 1.0 / weight) if weight > 0 else 1.0}, index


def train_stream(config: StreamConfig, rank: int = 0, world_size: int = 1, batch_multiple: int = 1) -> Stream:
    """The training stream of one rank: a fixed number of full batches per epoch, rounded down to
    a multiple of `batch_multiple` (the trainer's gradient accumulation: whole optimizer steps)."""
    manifest = load_manifest(config.shards)
    samples = _Samples(config, manifest, _Shared())
    per_epoch = config.samples_per_epoch
    if per_epoch is None:
        per_epoch = round(manifest.samples(config.split, config.views) * config.patient_fraction)
    batches = per_epoch // (config.batch_size * world_size) // batch_multiple * batch_multiple
    if batches < 1:
        steps = "one batch" if batch_multiple == 1 else f"{batch_multiple} batches (one optimizer step)"
        raise DataError(f"{config.shards}: split {config.split!r} has {per_epoch} samples per epoch, fewer "
                        f"than {steps} of {config.batch_size} on each of {world_size} rank(s)")
    prevalence = manifest.prevalence(config.split)
    balance = _balance(config, samples.encoder, prevalence)
    accept, index = balance if balance else (None, None)
    dataset = TrainBatches(samples, manifest.shards(config.split), rank, batches, accept, index)
    return Stream(dataset, samples, config, batches, samples.encoder.pos_weight(prevalence))


def eval_stream(config: StreamConfig, rank: int = 0, world_size: int = 1) -> Stream:
    """The evaluation stream of one rank: its exact share of the split, unaugmented."""
    manifest = load_manifest(config.shards)
    samples = _Samples(config, manifest, _Shared())
    dataset = EvalBatches(samples, manifest.shards(config.split), rank, world_size)
    pos_weight = samples.encoder.pos_weight(manifest.prevalence(config.split))
    return Stream(dataset, samples, config, None, pos_weight)
