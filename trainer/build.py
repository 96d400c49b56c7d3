"""Everything a run needs, built once and in the order a GPU node needs it: `setup(cfg, accelerator)`.

The shards checked against their manifest first (trainer/packcheck.py: a changed pack stops every
rank before anything is built), then model and streams on the host, `accelerator.prepare` (device,
DDP/DeepSpeed), then compile and EMA from the prepared model (trainer/distributed.py says why that
order), then the checkpoint to resume from, once RUN/pack.json shows it was trained on this pack.
The result is a `Run`, which the loop (engine.py) and evaluation (evaluation.py) share.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

from shards.stream import Stream
from trainer.checkpoint import Checkpointer, TrainState, problem
from trainer.config import Config, ConfigError
from trainer.data import build_streams, run_labels
from trainer.distributed import compile_prepared, uses_deepspeed, zero_stage
from trainer.models import build_model, plan_parameters, to_memory_format
from trainer.optimizers import build_optimizer
from trainer.packcheck import same_pack, verify_pack
from trainer.preemption import StopRequest
from trainer.recipe import Resolved, resolve
from trainer.storage import Writes, stop
from trainer.tracking import Tracker


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
    recipe: Resolved | None = None
    """The launch's global batch and effective lr (trainer/recipe.py)."""
    lr_scales: tuple[float, float] = (1.0, 1.0)
    """The smallest and largest layer-wise lr scale among trainable groups (bottom, top)."""
    eval_copy: torch.nn.Module | None = None
    """ZeRO-3 only: an unsharded copy of the model that evaluation runs on (evaluation.eval_model)."""
    writes: Writes = dataclasses.field(default_factory=Writes)
    """This rank's failed write, if any, until the ranks agree to stop (trainer/storage.py)."""

    @property
    def binary(self) -> bool:
        return self.labels == ("Pneumonia",)


def setup(cfg: Config, accelerator: Accelerator, start: Path | None = None,
          writes: Writes | None = None) -> Run:
    """Build everything the loop needs (see the module docstring for the order), continuing from
    the checkpoint `start` (`resume_point`'s choice) if any."""
    writes = writes or Writes()
    run_dir = Path(cfg.run.dir)
    labels = run_labels(cfg)
    if cfg.optim.ema and zero_stage(accelerator) == 3:
        raise ConfigError("optim.ema: not supported under DeepSpeed ZeRO-3 (the weights are sharded); "
                          "use ZeRO-2 or DDP")
    verify_pack(cfg, accelerator)
    same_pack(cfg, start, accelerator)  # before loading: never continue on another pack
    set_seed(cfg.run.seed)
    model = build_model(cfg.model, num_classes=len(labels), image_size=cfg.data.image_size)
    plan = plan_parameters(model, cfg.model.freeze, cfg.model.layer_decay, cfg.optim.weight_decay,
                           mode=cfg.model.layer_decay_mode)
    accelerator.print(f"model {cfg.model.name}: {plan.trainable:,} of {plan.total:,} parameters trainable "
                      f"(freeze={cfg.model.freeze})")
    # DeepSpeed flattens parameters into buffers: it needs them contiguous, not channels_last.
    to_memory_format(model, cfg.model.channels_last and not uses_deepspeed(accelerator))
    train, val, test = build_streams(cfg, model, accelerator)
    optimizer = build_optimizer(plan.groups, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    input_dtype = match_deepspeed_dtype(model, accelerator)
    model = compile_prepared(model, accelerator, cfg.model.compile)
    ema = build_ema(accelerator.unwrap_model(model, keep_torch_compile=False), cfg.optim.ema)
    pos_weight = train.pos_weight.to(accelerator.device) if cfg.optim.pos_weight else None
    checkpointer = Checkpointer(run_dir, accelerator, cfg.run.keep_last)
    state, resumed = resume(start, checkpointer, train, ema, accelerator)
    # A run continuing (auto) without a checkpoint starts over: what an attempt that stopped before
    # its first checkpoint logged is cut, as a resume cuts what came after its checkpoint.
    cut_to = state.step if resumed else (0 if cfg.run.resume in ("auto", "restart") else None)
    tracker = Tracker(run_dir, accelerator.is_main_process, cut_to, writes)
    tracker.text("parameters", f"trainable {plan.trainable} / total {plan.total}", state.step)
    resolved = resolve(cfg, accelerator.num_processes)
    scales = [group["lr_scale"] for group in plan.groups] or [1.0]
    accelerator.print(f"global batch {resolved.global_batch} ({resolved.processes} processes × "
                      f"{resolved.batch_size} × accumulation {resolved.grad_accum}): effective lr "
                      f"{resolved.effective_lr:.3g} (optim.lr {resolved.lr:.3g}, "
                      f"scaling {resolved.lr_scaling})")
    tracker.text("recipe", json.dumps(resolved.to_dict()), state.step)
    return Run(cfg, accelerator, run_dir, model, optimizer, train, val, test, labels, pos_weight, ema,
               checkpointer, tracker, state, StopRequest(cfg.run.signal_check_every), input_dtype,
               (plan.trainable, plan.total), recipe=resolved, lr_scales=(min(scales), max(scales)),
               writes=writes)


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


def resume_point(cfg: Config, accelerator: Accelerator) -> Path | None:
    """Collective, before anything is written: the checkpoint to continue from (run.resume).
    never: none. auto: the newest usable one in run.dir, passing over damaged ones with a warning
    each; stops (exit 2) when there are checkpoints and none is usable. restart: the same, except
    that with none usable it returns None and the run starts over (trainer/engine.py sets the old
    files aside). A path: that checkpoint, which must be usable."""
    mode = cfg.run.resume
    if mode == "never":
        return None
    checkpointer = Checkpointer(Path(cfg.run.dir), accelerator, cfg.run.keep_last)
    if mode in ("auto", "restart"):
        return checkpointer.latest(refuse_unusable=mode == "auto")
    path = Path(mode)
    reason = problem(path)  # the same answer on every rank: the same files
    if reason is not None:
        stop(accelerator, f"run.resume={mode}: checkpoint unusable: {reason}", 2)
    return path


def resume(resume_from: Path | None, checkpointer: Checkpointer, train: Stream, ema: object | None,
           accelerator: Accelerator) -> tuple[TrainState, bool]:
    """Load `resume_from` (if any) into the prepared run: the state to continue from."""
    if resume_from is None:
        return TrainState(), False
    state = checkpointer.load(resume_from)
    train.load_state_dict(state.stream)
    if ema is not None:
        ema.load_state_dict(load_file(str(resume_from / "ema.safetensors")))
    accelerator.print(f"resumed from {resume_from} (step {state.step}, epoch {state.epoch})")
    return state, True


def plain_model(run: Run) -> torch.nn.Module:
    """The model without DDP and torch.compile wrappers: its names are the timm model's."""
    return run.accelerator.unwrap_model(run.model, keep_torch_compile=False)


def unsharded_copy(run: Run) -> torch.nn.Module:
    """A plain model of the same architecture on the run's device and dtype, without weights."""
    spec = dataclasses.replace(run.cfg.model, pretrained=False, weights=None)
    return build_model(spec, num_classes=len(run.labels), image_size=run.cfg.data.image_size).to(
        run.accelerator.device, run.input_dtype)
