"""The training loop: `train(cfg, report=None)`, shared by `trainer/run.py` and the sweeps.

Accelerate owns devices, DDP/DeepSpeed, mixed precision and state saving; the shard streams own
the data (already split by rank, so the loaders are not `prepare`d). The learning rate is a pure
function of the optimizer step (no scheduler state to save or to step the wrong number of times).
What the loop runs on is built by `trainer/build.py`; a split is scored by `trainer/evaluation.py`;
what it leaves on disk is `trainer/rundir.py`'s format.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer import recipe, rundir, storage
from trainer.build import Run, plain_model, resume_point, setup
from trainer.config import Config, ConfigError
from trainer.distributed import make_accelerator, uses_deepspeed
from trainer.evaluation import evaluate, model_card, restore_weights, summary_line
from trainer.metrics import format_metric
from trainer.models import keep_frozen_norms_in_eval
from trainer.preemption import EXIT_REQUEUE, Preempted

Report = Callable[[dict], None]


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up, then cosine down to `floor` × lr: a pure function of the optimizer step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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
                    group["lr"] = run.recipe.effective_lr * group.get("lr_scale", 1.0) * run.lr_factor
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
                  "lr": run.recipe.effective_lr * run.lr_factor, "img_per_s": window["images"] / seconds,
                  "data_wait": window["wait"] / seconds}
        if torch.cuda.is_available():
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        run.tracker.log(record)
        window.update(loss=torch.zeros((), device=accelerator.device), batches=0, images=0, wait=0.0)
    if cfg.run.checkpoint_every and state.step % cfg.run.checkpoint_every == 0:
        save_checkpoint(run)
    requested, failed = run.stop.agreed(accelerator, state.step, run.writes.failure is not None)
    if failed:  # a metrics or checkpoint write failed on some rank: all stop here, in one line
        storage.check(accelerator, run.writes, run.checkpointer.stopped_at(state.step))
    if requested:
        save_checkpoint(run)
        if accelerator.is_main_process:
            with run.writes.guard(run.run_dir / rundir.PREEMPTED):
                rundir.write_preempted(run.run_dir, state.step, EXIT_REQUEUE)
        # No rank leaves before the marker exists: the launcher (or srun --kill-on-bad-exit) stops
        # the others as soon as one exits, and the requeue decision reads the marker. Without a
        # marker (a full disk) the run stops as a failure: not requeued.
        storage.check(accelerator, run.writes, run.checkpointer.stopped_at(state.step))
        accelerator.print(f"preempted: checkpoint at step {state.step} saved; exiting {EXIT_REQUEUE}")
        raise Preempted


def save_checkpoint(run: Run) -> None:
    run.state.stream = run.train.state_dict()
    extra = {"ema.safetensors": run.ema.state_dict()} if run.ema is not None else None
    run.checkpointer.save(run.state, extra, run.writes)


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
        if accelerator.is_main_process and not run.writes.skip():
            # A failed export leaves the previous best/ whole; the checkpoint below stops the run.
            with run.writes.guard(run.run_dir / rundir.BEST):
                rundir.export_best(run.run_dir, weights, cfg, model_card(run, metrics))
    save_checkpoint(run)
    accelerator.print(f"epoch {state.epoch}: val {cfg.run.metric}={format_metric(value)} "
                      f"(best {format_metric(state.best_metric)} at step {state.best_step})")
    if report is not None:
        report({**metrics, "checkpoint": str(run.checkpointer.root / f"step-{state.step:08d}")})


def train(cfg: Config, report: Report | None = None) -> dict:
    """Train (or resume), evaluate each epoch, export the best model, test it. Returns test metrics
    (or the best validation ones when run.test_at_end is off)."""
    run_dir = Path(cfg.run.dir)
    if cfg.run.resume == "never" and rundir.has_records(run_dir):
        # A fresh run would append to the old run's metrics and TensorBoard files and mix the two.
        # (Checked here, not in load_config: a run's config.yaml must still load back as it is.)
        raise ConfigError(f"run.dir: {cfg.run.dir} already holds a run ({rundir.METRICS}): continue it with "
                          "run.resume=auto, start over in place with run.resume=restart, or choose another "
                          "run.dir")
    accelerator = make_accelerator(cfg)
    resolved = recipe.resolve(cfg, accelerator.num_processes)  # a bad global batch stops here, unwritten
    cfg.data.batch_size = resolved.batch_size
    start = resume_point(cfg, accelerator)  # unusable checkpoints stop here, unwritten
    writes = storage.Writes()
    if accelerator.is_main_process:
        with writes.guard(run_dir):
            if cfg.run.resume == "restart" and start is None and (moved := rundir.set_aside(run_dir)):
                print(f"run.resume=restart: no usable checkpoint; the earlier attempt's files are in "
                      f"{moved}; training from scratch", flush=True)
            rundir.write_config(run_dir, cfg, resolved.to_dict())
            rundir.clear_preempted(run_dir)
    storage.check(accelerator, writes, "the run did not start: free space, then submit it again")
    run = setup(cfg, accelerator, start, writes)
    try:
        storage.check(accelerator, writes, run.checkpointer.stopped_at(run.state.step))
        result = _loop(run, report)
        run.tracker.close()
        storage.check(accelerator, writes, run.checkpointer.stopped_at(run.state.step))
        return result
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
        run.accelerator.wait_for_everyone()
        card = rundir.read_card(run.run_dir)
        if card:  # the best validation model is tested
            restore_weights(run, rundir.read_best_weights(run.run_dir))
        else:
            run.accelerator.print(f"no best model exported (val {cfg.run.metric} was never defined): "
                                  "testing the last weights")
        result = evaluate(run, "test", card.get("threshold") if run.binary else None)
        storage.check(run.accelerator, run.writes, run.checkpointer.stopped_at(state.step))
        run.accelerator.print(f"test: {summary_line(result)}")
        return result
    return {"best_metric": state.best_metric, "best_step": state.best_step}


def finish(exit_code: int = 0) -> None:
    """Leave without the occasional gloo abort at interpreter exit: the process group is torn down
    here, then the process ends without running interpreter finalizers that race with gloo."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(exit_code)


