"""The training loop: `train(cfg, report=None)`, shared by `trainer/run.py` and the sweeps.

Accelerate owns devices, DDP/DeepSpeed, mixed precision and state saving; the shard streams own
the data (already split by rank, so the loaders are not `prepare`d). The learning rate is a pure
function of the optimizer step (no scheduler state to save or to step the wrong number of times).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from shards.atomic import write_json
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
from trainer.checkpoint import Checkpointer, TrainState, export_best
from trainer.config import Config, ConfigError
from trainer.distributed import compile_prepared, make_accelerator, uses_deepspeed, zero_stage
from trainer.metrics import Predictions, binary_metrics, choose_threshold, multilabel_metrics
from trainer.models import build_model, keep_frozen_norms_in_eval, plan_parameters, to_memory_format
from trainer.tracking import Tracker

log = logging.getLogger("trainer")

EXIT_REQUEUE = 75
"""Exit status after a preemption checkpoint (EX_TEMPFAIL): requeue me. `run_dir/preempted.json`
says the same for launchers that cannot see the status (accelerate launch reports 1 for any
non-zero child exit)."""

Report = Callable[[dict], None]


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


class StopRequest:
    """SIGUSR1 (SLURM's warning signal) or SIGTERM set a flag; ranks agree on it every `every`
    optimizer steps (the same steps on every rank, so all stop at the same step). Agreeing costs
    an all-reduce and a host sync: on a GPU, not something to pay at every step."""

    def __init__(self, every: int = 1) -> None:
        self.requested = False
        self.every = every
        if threading.current_thread() is not threading.main_thread():
            return  # a Ray Tune trial runs in a thread: Tune stops and restores trials itself
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.requested = True
        log.warning("signal %s: checkpointing at the next step, then exiting %d", signum, EXIT_REQUEUE)

    def agreed(self, accelerator: Accelerator, step: int) -> bool:
        """True on every rank if any rank was signalled (one tiny all-reduce every `every` steps)."""
        if accelerator.num_processes == 1:
            return self.requested  # nothing to agree on: no collective, no device sync
        if step % self.every:
            return False
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class Run:
    """What the loop needs, built once (see `setup`)."""

    cfg: Config
    accelerator: Accelerator
    run_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train: Stream
    val: Stream
    test: Stream | None
    labels: tuple[str, ...]
    pos_weight: torch.Tensor | None
    ema: object | None
    checkpointer: Checkpointer
    tracker: Tracker
    state: TrainState
    stop: StopRequest
    input_dtype: torch.dtype = torch.float32
    """float32, or the model's own dtype under DeepSpeed bf16 (it casts weights, not activations)."""
    parameters: tuple[int, int] = (0, 0)
    """(trainable, total) parameter counts under the freeze strategy, for the model card."""
    clock: float = 0.0
    """perf_counter() when training time was last added to state.train_seconds."""
    lr_factor: float = 1.0
    """The schedule's factor at the last optimizer step (logged as lr × factor)."""
    eval_copy: torch.nn.Module | None = None
    """ZeRO-3 only: an unsharded copy of the model that evaluation runs on (see `eval_model`)."""

    @property
    def binary(self) -> bool:
        return self.labels == ("Pneumonia",)


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up, then cosine down to `floor` × lr: a pure function of the optimizer step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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


def setup(cfg: Config, accelerator: Accelerator) -> Run:
    """Build everything the loop needs, in the order a GPU node needs it (trainer/distributed.py):
    model and streams on the host, `prepare` (device, DDP/DeepSpeed), then compile and EMA from
    the prepared model, then the checkpoint to resume from."""
    run_dir = Path(cfg.run.dir)
    labels = run_labels(cfg)
    if cfg.optim.ema and zero_stage(accelerator) == 3:
        raise ConfigError("optim.ema: not supported under DeepSpeed ZeRO-3 (the weights are sharded); "
                          "use ZeRO-2 or DDP")
    set_seed(cfg.run.seed)
    model = build_model(cfg.model, num_classes=len(labels))
    plan = plan_parameters(model, cfg.model.freeze, cfg.model.layer_decay, cfg.optim.weight_decay)
    accelerator.print(f"model {cfg.model.name}: {plan.trainable:,} of {plan.total:,} parameters trainable "
                      f"(freeze={cfg.model.freeze})")
    # DeepSpeed flattens parameters into buffers: it needs them contiguous, not channels_last.
    to_memory_format(model, cfg.model.channels_last and not uses_deepspeed(accelerator))
    train, val, test = build_streams(cfg, model, accelerator)
    optimizer = torch.optim.AdamW(plan.groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    model, optimizer = accelerator.prepare(model, optimizer)
    input_dtype = match_deepspeed_dtype(model, accelerator)
    model = compile_prepared(model, accelerator, cfg.model.compile)
    ema = build_ema(accelerator.unwrap_model(model, keep_torch_compile=False), cfg.optim.ema)
    pos_weight = train.pos_weight.to(accelerator.device) if cfg.optim.pos_weight else None
    checkpointer = Checkpointer(run_dir, accelerator, cfg.run.keep_last)
    state, resumed = resume(cfg, checkpointer, train, ema, accelerator)
    tracker = Tracker(run_dir, accelerator.is_main_process, state.step if resumed else None)
    tracker.text("parameters", f"trainable {plan.trainable} / total {plan.total}", state.step)
    return Run(cfg, accelerator, run_dir, model, optimizer, train, val, test, labels, pos_weight, ema,
               checkpointer, tracker, state, StopRequest(cfg.run.signal_check_every), input_dtype,
               (plan.trainable, plan.total))


def run_labels(cfg: Config) -> tuple[str, ...]:
    manifest = load_manifest(Path(cfg.data.shards))
    labels = resolve_label_set(cfg.data.labels) if cfg.data.labels else manifest.label_names
    if cfg.run.metric == "auroc_chexpert5" and not set(COMPETITION5) <= set(labels):
        raise ConfigError("run.metric: auroc_chexpert5 needs the five competition labels in data.labels")
    return tuple(labels)


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


def match_deepspeed_dtype(model: torch.nn.Module, accelerator: Accelerator) -> torch.dtype:
    """The dtype inputs must have: float32, or the parameters' own dtype under DeepSpeed bf16
    (it casts the parameters, does not autocast, and leaves buffers alone: BatchNorm needs the
    buffers cast too)."""
    if not uses_deepspeed(accelerator):
        return torch.float32
    dtype = next(model.parameters()).dtype
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    return dtype


def build_ema(model: torch.nn.Module, decay: float | None) -> object | None:
    """EMA of the prepared (plain, unwrapped) model: on the model's device, kept in float32 even
    when the model is bf16 (DeepSpeed bf16), since 1 − decay ≈ 1e-3 updates vanish in bf16."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3  # noqa: PLC0415 - optional feature

    return ModelEmaV3(model, decay=decay, dtype=torch.float32)


def resume(cfg: Config, checkpointer: Checkpointer, train: Stream, ema: object | None,
           accelerator: Accelerator) -> tuple[TrainState, bool]:
    """The state to continue from (run.resume: never, auto or a checkpoint path)."""
    resume_from = checkpointer.latest() if cfg.run.resume == "auto" else (
        Path(cfg.run.resume) if cfg.run.resume != "never" else None)
    if resume_from is None:
        return TrainState(), False
    state = checkpointer.load(resume_from)
    train.load_state_dict(state.stream)
    if ema is not None:
        ema.load_state_dict(load_file(str(resume_from / "ema.safetensors")))
    accelerator.print(f"resumed from {resume_from} (step {state.step}, epoch {state.epoch})")
    return state, True


def loss_fn(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
            pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Masked BCE: U-Ignore (and missing) labels contribute nothing, not a zero target."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, weight=mask, pos_weight=pos_weight,
                                              reduction="sum")
    return loss / mask.sum().clamp(min=1.0)


def train_epoch(run: Run, epoch: int, total_steps: int, warmup: int) -> None:
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    run.model.train()
    keep_frozen_norms_in_eval(run.model)
    run.train.set_epoch(epoch)
    bar = tqdm(total=run.train.batches_per_epoch, initial=run.train.next_batch, desc=f"epoch {epoch}",
               disable=not (accelerator.is_local_main_process and sys.stderr.isatty()), leave=False)
    window = {"loss": torch.zeros((), device=accelerator.device), "batches": 0, "images": 0, "wait": 0.0}
    started = tick = run.clock = time.perf_counter()
    for batch in run.train.batches(accelerator.device):
        window["wait"] += time.perf_counter() - tick
        if cfg.run.image_grid and state.step == 0 and accelerator.is_main_process:
            run.tracker.images("train/images", batch["image"], 0)
        with accelerator.accumulate(run.model):
            if accelerator.sync_gradients:  # set before backward: DeepSpeed steps inside it
                run.lr_factor = lr_factor(state.step, warmup, total_steps, cfg.optim.min_lr_ratio)
                for group in run.optimizer.param_groups:
                    group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0) * run.lr_factor
            # forward under autocast (DeepSpeed casts the model instead: cast the input to match)
            with accelerator.autocast():
                logits = run.model(batch["image"].to(run.input_dtype))
            loss = loss_fn(logits, batch["target"], batch["mask"], run.pos_weight)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.clip_grad and not uses_deepspeed(accelerator):
                accelerator.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_grad)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        window["loss"] += loss.detach()  # summed on the device: no sync per step
        window["batches"] += 1
        window["images"] += len(batch["key"]) * accelerator.num_processes
        bar.update(1)
        if accelerator.sync_gradients:
            after_optimizer_step(run, window, started)
            if window["batches"] == 0:
                started = time.perf_counter()
        tick = time.perf_counter()
    bar.close()


def after_optimizer_step(run: Run, window: dict, started: float) -> None:
    """EMA, logging, periodic checkpoint, preemption: everything that happens per optimizer step."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    state.step += 1
    now = time.perf_counter()
    state.train_seconds += now - run.clock
    run.clock = now
    state.samples += cfg.data.batch_size * accelerator.num_processes * cfg.optim.grad_accum
    if run.ema is not None:
        run.ema.update(plain_model(run), step=state.step)
    if state.step % cfg.run.log_every == 0:
        mean_loss = accelerator.reduce(window["loss"] / window["batches"], reduction="mean").item()
        seconds = max(1e-9, time.perf_counter() - started)
        record = {"split": "train", "epoch": state.epoch, "step": state.step, "loss": mean_loss,
                  "lr": cfg.optim.lr * run.lr_factor, "img_per_s": window["images"] / seconds,
                  "data_wait": window["wait"] / seconds}
        if torch.cuda.is_available():
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        run.tracker.log(record)
        window.update(loss=torch.zeros((), device=accelerator.device), batches=0, images=0, wait=0.0)
    if cfg.run.checkpoint_every and state.step % cfg.run.checkpoint_every == 0:
        save_checkpoint(run)
    if run.stop.agreed(accelerator, state.step):
        save_checkpoint(run)
        if accelerator.is_main_process:
            write_json(run.run_dir / "preempted.json", {"step": state.step, "exit_code": EXIT_REQUEUE})
        # No rank leaves before the marker exists: the launcher (or srun --kill-on-bad-exit) stops
        # the others as soon as one exits, and the requeue decision reads the marker.
        accelerator.wait_for_everyone()
        accelerator.print(f"preempted: checkpoint at step {state.step} saved; exiting {EXIT_REQUEUE}")
        raise Preempted


def plain_model(run: Run) -> torch.nn.Module:
    """The model without DDP and torch.compile wrappers: its names are the timm model's."""
    return run.accelerator.unwrap_model(run.model, keep_torch_compile=False)


def save_checkpoint(run: Run) -> None:
    run.state.stream = run.train.state_dict()
    extra = {"ema.safetensors": run.ema.state_dict()} if run.ema is not None else None
    run.checkpointer.save(run.state, extra)


def predict(run: Run, stream: Stream) -> Predictions:
    """Every sample of the split scored once: local predictions gathered from all ranks, by key.
    The forwards are local (no collective), so ranks may hold different numbers of batches."""
    model = eval_model(run)
    model.eval()
    dtype = next(model.parameters()).dtype
    keys, probs, targets, masks = [], [], [], []
    with torch.no_grad():
        for batch in stream.batches(run.accelerator.device):
            with run.accelerator.autocast():
                logits = model(batch["image"].to(dtype))
            keys += batch["key"]
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(batch["target"].cpu().numpy())
            masks.append(batch["mask"].cpu().numpy())
    empty = np.zeros((0, len(run.labels)), np.float32)
    local = (keys, *(np.concatenate(a) if a else empty for a in (probs, targets, masks)))
    parts = gather_object([local]) if run.accelerator.num_processes > 1 else [local]
    return Predictions.merge(parts)


def eval_model(run: Run) -> torch.nn.Module:
    """The module evaluation runs on: the EMA, the plain (uncompiled, unwrapped) model, or under
    ZeRO-3 an unsharded copy. ZeRO-3's module hooks gather and re-partition weights around every
    forward (collectives), even inside GatheredParameters: ranks with different numbers of
    evaluation batches would wait on each other forever. Every rank gathers the weights once, at
    the same point, into a plain copy whose forwards are local."""
    if run.ema is not None:
        return run.ema.module
    if zero_stage(run.accelerator) != 3:
        return plain_model(run)
    import deepspeed  # noqa: PLC0415 - only with DeepSpeed

    sharded = plain_model(run)
    if run.eval_copy is None:
        spec = dataclasses.replace(run.cfg.model, pretrained=False, weights=None)
        run.eval_copy = build_model(spec, num_classes=len(run.labels)).to(
            run.accelerator.device, run.input_dtype)
    copy_parameters = dict(run.eval_copy.named_parameters())
    with deepspeed.zero.GatheredParameters(list(sharded.parameters()), modifier_rank=None):
        for name, parameter in sharded.named_parameters():
            copy_parameters[name].data.copy_(parameter.data)
    copy_buffers = dict(run.eval_copy.named_buffers())
    for name, buffer in sharded.named_buffers():
        copy_buffers[name].data.copy_(buffer.data)
    return run.eval_copy


def save_predictions(path: Path, labels: tuple[str, ...], predictions: Predictions) -> None:
    """Per-sample scores for the report's paired tests (plain arrays: np.load needs no pickle)."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, keys=np.array(predictions.keys, dtype=str), labels=np.array(labels, dtype=str),
                        probs=predictions.probs, targets=predictions.targets, masks=predictions.masks)
    tmp.replace(path)


def load_weights(run: Run, weights: dict[str, torch.Tensor]) -> None:
    """Put exported weights back into the (possibly ZeRO-3-sharded) model, on every rank."""
    target = run.ema.module if run.ema is not None else plain_model(run)
    if zero_stage(run.accelerator) == 3:
        import deepspeed  # noqa: PLC0415 - only with DeepSpeed

        with deepspeed.zero.GatheredParameters(list(target.parameters()), modifier_rank=0):
            target.load_state_dict(weights)
    else:
        target.load_state_dict(weights)


def evaluate(run: Run, split: str, threshold: float | None = None) -> dict:
    stream = run.val if split == "val" else run.test
    predictions = predict(run, stream)
    if run.binary:
        threshold = choose_threshold(predictions.probs[:, 0], predictions.targets[:, 0]) \
            if threshold is None else threshold
        metrics = binary_metrics(predictions, threshold)
    else:
        metrics = multilabel_metrics(run.labels, predictions)
    record = {"split": split, "epoch": run.state.epoch, "step": run.state.step,
              "train_seconds": round(run.state.train_seconds, 3), **metrics}
    run.tracker.log(record)
    if run.accelerator.is_main_process:
        save_predictions(run.run_dir / f"predictions_{split}.npz", run.labels, predictions)
    run.tracker.roc_curves(split, run.labels, predictions.probs, predictions.targets, predictions.masks,
                           run.state.step)
    return record


def end_of_epoch(run: Run, report: Report | None) -> None:
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    metrics = evaluate(run, "val")
    value = metrics.get(cfg.run.metric)
    improved = value is not None and (state.best_metric is None or value > state.best_metric)
    state.epoch += 1
    if improved:
        state.best_metric, state.best_step = float(value), state.step
        # Collective under ZeRO-3 (the weights are gathered to the main rank): every rank calls it.
        if run.ema is not None:
            weights = run.ema.module.state_dict()
        elif uses_deepspeed(accelerator):
            weights = accelerator.get_state_dict(run.model)  # gathers ZeRO-3 shards to rank 0
        else:
            weights = plain_model(run).state_dict()
        if accelerator.is_main_process:
            export_best(run.run_dir, weights, cfg, model_card(run, metrics))
    save_checkpoint(run)
    accelerator.print(f"epoch {state.epoch}: val {cfg.run.metric}={_fmt(value)} "
                      f"(best {_fmt(state.best_metric)} at step {state.best_step})")
    if report is not None:
        report({**metrics, "checkpoint": str(run.checkpointer.root / f"step-{state.step:08d}")})


def model_card(run: Run, metrics: dict) -> dict:
    cfg = run.cfg
    stream = stream_config(cfg, plain_model(run), "val")
    return {
        "model": cfg.model.name, "labels": list(run.labels), "task": "binary" if run.binary else "multilabel",
        "input": {"channels": cfg.model.in_chans, "size": cfg.data.image_size, "mean": list(stream.mean),
                  "std": list(stream.std), "range": "grayscale 0..255 scaled to 0..1, then normalised"},
        "threshold": metrics.get("threshold"), "val_metrics": {k: metrics.get(k) for k in ("auroc_macro",
                                                                                           "auroc_chexpert5")},
        "step": run.state.step, "data": cfg.data.shards,
        "parameters": {"trainable": run.parameters[0], "total": run.parameters[1]},
        "intended_use": "Research on model comparison only. Not for clinical use.",
    }


def train(cfg: Config, report: Report | None = None) -> dict:
    """Train (or resume), evaluate each epoch, export the best model, test it. Returns test metrics
    (or the best validation ones when run.test_at_end is off)."""
    if cfg.run.resume == "never" and (Path(cfg.run.dir) / "metrics.jsonl").is_file():
        # A fresh run would append to the old run's metrics and TensorBoard files and mix the two.
        # (Checked here, not in load_config: a run's config.yaml must still load back as it is.)
        raise ConfigError(f"run.dir: {cfg.run.dir} already holds a run (metrics.jsonl): continue it with "
                          "run.resume=auto, or choose another run.dir")
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        cfg.save(Path(cfg.run.dir) / "config.yaml")
        (Path(cfg.run.dir) / "preempted.json").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    run = setup(cfg, accelerator)
    try:
        return _loop(run, report)
    finally:
        run.tracker.close()


def _loop(run: Run, report: Report | None) -> dict:
    cfg, state = run.cfg, run.state
    steps_per_epoch = max(1, run.train.batches_per_epoch // cfg.optim.grad_accum)
    total = steps_per_epoch * cfg.optim.epochs
    warmup = min(total - 1, round(cfg.optim.warmup_epochs * steps_per_epoch)) if total > 1 else 0
    while state.epoch < cfg.optim.epochs:
        train_epoch(run, state.epoch, total, max(1, warmup))
        end_of_epoch(run, report)
    if cfg.run.test_at_end and run.test is not None:
        best = run.run_dir / "best" / "model.safetensors"
        run.accelerator.wait_for_everyone()
        if best.is_file():
            load_weights(run, load_file(str(best)))
        threshold = None
        if run.binary:
            card = json.loads((run.run_dir / "best" / "model_card.json").read_text())
            threshold = card.get("threshold")
        result = evaluate(run, "test", threshold)
        run.accelerator.print(f"test: {summary_line(result)}")
        return result
    return {"best_metric": state.best_metric, "best_step": state.best_step}


def summary_line(metrics: dict) -> str:
    parts = [f"auroc_macro={_fmt(metrics.get('auroc_macro'))}"]
    if "auroc_chexpert5" in metrics:
        parts.append(f"auroc_chexpert5={_fmt(metrics['auroc_chexpert5'])}")
    for key in ("accuracy", "sensitivity", "specificity", "f1"):
        if key in metrics:
            parts.append(f"{key}={_fmt(metrics[key])}")
    return " ".join(parts)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def finish(exit_code: int = 0) -> None:
    """Leave without the occasional gloo abort at interpreter exit (platform-facts.md)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(exit_code)


