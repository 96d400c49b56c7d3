"""Where a run executes: the Accelerator, the GPU-or-CPU decision, DeepSpeed's settings, compile.

One place says the order that matters on a GPU node:
1. decide GPU or CPU *before* anything starts: a launch that asked for GPUs on a node whose CUDA
   does not work stops with one line (it used to fall back to gloo and train for hours on the CPU);
2. `accelerator.prepare` (DDP/DeepSpeed wrap the plain timm module);
3. compile the *prepared* model: DDP's optimizer then splits the graph at its buckets, so gradient
   all-reduces overlap the backward, and `unwrap_model` strips `_orig_mod` before DDP, so the
   exported names are timm's (compiled first, DDP(OptimizedModule) exported `_orig_mod.` names);
   DeepSpeed compiles its engine in place. ZeRO-3 gathers every module's weights in hooks the
   compiler cannot trace: compile is off there, with one logged line.
"""

from __future__ import annotations

import datetime
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from trainer.config import Config, ConfigError
from trainer.recipe import per_process_batch

EXPECT_GPUS = "CXR_EXPECT_GPUS"
"""GPUs per node the launch allocated (launch/node.sh sets it; 0 = a CPU run on purpose)."""


class DeviceError(ConfigError):
    """The launch asked for GPUs that this node does not have (one line, exit 2)."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def expected_gpus(cfg: Config) -> tuple[int, str] | None:
    """(GPUs per node, who asked) when the launch asked for GPUs; None for a CPU run on purpose
    (run.cpu, ACCELERATE_USE_CPU, CXR_EXPECT_GPUS=0) or a plain single process (CPU or GPU)."""
    declared = os.environ.get(EXPECT_GPUS, "").strip()
    if cfg.run.cpu or _truthy("ACCELERATE_USE_CPU") or declared == "0":
        return None
    if declared:
        if not declared.isdigit():
            raise ConfigError(f"{EXPECT_GPUS}={declared!r}: expected a number of GPUs per node")
        return int(declared), f"{EXPECT_GPUS}={declared} (launch/node.sh, GPUS_PER_NODE)"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if _truthy("ACCELERATE_USE_DEEPSPEED"):
        return 1, "a DeepSpeed accelerate config"
    if world > 1:
        return 1, f"accelerate launch with {world} processes and no CPU flag"
    return None


def check_gpus(cfg: Config) -> None:
    """Stop before anything is written when the launch asked for GPUs this node cannot give."""
    expected = expected_gpus(cfg)
    if expected is None:
        return
    wanted, source = expected
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if found == 0 or found < wanted or local_rank >= found:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
        raise DeviceError(
            f"expected {wanted} GPU(s) per node ({source}) but torch sees {found} CUDA device(s) "
            f"(local rank {local_rank}, {where}); for a CPU run on purpose set run.cpu=true or "
            f"GPUS_PER_NODE=0 ({EXPECT_GPUS}=0)")


def make_accelerator(cfg: Config) -> Accelerator:
    """DDP by default; DeepSpeed when launched with a DeepSpeed accelerate config
    (launch/accelerate/zero*.yaml), whose batch size, accumulation and clipping come from `cfg`."""
    check_gpus(cfg)
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # A lost peer fails every collective after run.collective_timeout instead of torch's default.
    timeout = datetime.timedelta(seconds=cfg.run.collective_timeout)
    if distributed and (cfg.run.cpu or not torch.cuda.is_available()):
        # gloo said explicitly: DeepSpeed would ask for NCCL.
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timeout))
    else:
        handlers.append(InitProcessGroupKwargs(timeout=timeout))
    accelerator = Accelerator(mixed_precision=cfg.run.precision, cpu=cfg.run.cpu,
                              gradient_accumulation_steps=cfg.optim.grad_accum, kwargs_handlers=handlers)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # The streams are not `prepare`d (they split by rank themselves), so DeepSpeed cannot
        # infer the micro-batch from a DataLoader: say it explicitly.
        micro_batch = per_process_batch(cfg, accelerator.num_processes)  # data.global_batch may set it
        plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "train_batch_size": micro_batch * cfg.optim.grad_accum * accelerator.num_processes,
            "gradient_clipping": cfg.optim.clip_grad or 0.0,
        })
        if plugin.zero_stage == 3:  # the best-model export needs whole weights gathered on rank 0
            plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if accelerator.device.type == "cuda":
        # TF32 matmuls/convolutions for the float32 parts (bf16 autocast leaves some in float32).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def compile_prepared(model: torch.nn.Module, accelerator: Accelerator, wanted: bool) -> torch.nn.Module:
    """torch.compile around the prepared (DDP/DeepSpeed) model; off under ZeRO-3 (see above)."""
    if not wanted:
        return model
    if zero_stage(accelerator) == 3:
        accelerator.print("model.compile: off under DeepSpeed ZeRO-3 (its per-module weight gathering "
                          "breaks the graph at every module)")
        return model
    if uses_deepspeed(accelerator):
        model.compile()  # DeepSpeedEngine.compile: in place, on the module its hooks know
        return model
    return torch.compile(model)
