"""The GPU path in one command: model-only and end-to-end training img/s, MFU, peak
memory, and the fixed costs of a run (compile, one evaluation pass, one checkpoint save).

On a GPU machine (one H100/H200; the lent machine has its own Python 3.12 + torch, no package
index), after `bash bench/gpu_wheels.sh` here has put the missing wheels in .whl/ (carry `.whl`),
one command from the repo root, about 7.5 minutes:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
        && python3 bench/gpu.py --out $OUT 2>&1 | tee $OUT/gpu.log

On a CPU, the same code paths with tiny models (the test suite runs this; not performance figures):

    python bench/gpu.py --smoke --out /tmp/gpu-smoke

Cases run in order of importance and the time budget (--budget-s) is checked before each one, so
on a slow machine the rest are recorded as `skipped: budget` instead of overrunning the call (a
case that overruns is interrupted). Order: all four models eager at batch 256; ResNet50 and
ViT-B/16 compiled; both end-to-end with 14 loader workers (CPU, then nvJPEG decode); their eval
pass and checkpoint save; DenseNet121 and Swin-B compiled; batch 128 eager; 8 loader workers;
batch 128 compiled. The goals' figures come first; the compiles, which cost minutes, come late.
`--out` gets gpu.json (rewritten after every case, so a killed run still leaves its figures) and
gpu.md; the table is printed too. The last line is
`gpu: <vit>=<img/s> <cnn>=<img/s> e2e_ratio=<f>` (`n/a` where not measured).

Definitions. A training step is the trainer's: bf16 autocast forward, masked BCE on 14 labels,
backward, grad-norm clip 1.0, AdamW (the trainer's parameter groups), zero_grad; channels_last for
CNNs; 224 px, in_chans=3, random init. Model-only timing uses CUDA events over `steps` steps after
warm-up, on one resident batch. MFU = forward FLOPs per image (FlopCounterMode on the meta
device) × 3 × img/s ÷ the chip's dense bf16 peak. End-to-end: the same step fed by
`shards.stream.train_stream` (warp_on=device, light augmentation) from a synthetic 320 px pack;
"GPU data wait" is the fraction of GPU time outside the model step (waiting for a batch, the copy,
the decode/warp on the device), from CUDA events; "host wait" is the time blocked in `next()`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's shards/trainer, not an installed copy
    sys.path.insert(1, str(ROOT))

NUM_LABELS = 14
PEAK_TFLOPS = 989.0
"""Dense bf16 peak of an H100/H200 SXM (datasheet). MFU is reported against it."""
GOALS = {"vit_img_s": 3500.0, "cnn_img_s": 4500.0, "e2e_ratio": 0.9}


@dataclass(frozen=True)
class Profile:
    """What one mode measures: the real GPU run, or the CPU smoke run of the same code paths."""

    name: str
    models: tuple[tuple[str, dict], ...]
    vit: str
    cnn: str
    image_size: int
    batches: tuple[int, int]
    """(main, small): every model at the main batch first, the small one later."""
    warmup: int
    steps: int
    compile: bool
    patients: int
    source_size: int
    e2e_workers: tuple[int, ...]
    e2e_warmup: int
    e2e_steps: int
    drain: bool
    """Warm up and time for longer than the loader's prefetch queue, so a full queue left over
    from start-up cannot flatter the end-to-end rate."""
    eval_workers: int
    amp: bool
    """bf16 autocast. Off in smoke: a CPU without native bf16 emulates it (30× slower here)."""
    estimates: dict[str, float] = field(default_factory=dict)
    """Seconds a case may take, to decide whether it still fits the budget."""


FULL = Profile(
    name="full",
    models=(("resnet50", {}), ("vit_base_patch16_224", {}), ("densenet121", {}),
            ("swin_base_patch4_window7_224", {})),
    vit="vit_base_patch16_224", cnn="resnet50", image_size=224, batches=(256, 128), warmup=5, steps=20,
    compile=True, patients=800, source_size=320, e2e_workers=(14, 8), e2e_warmup=10, e2e_steps=100,
    drain=True, eval_workers=8, amp=True,
    estimates={"eager": 15, "compile:resnet50": 90, "compile:vit_base_patch16_224": 70,
               "compile:densenet121": 150, "compile:swin_base_patch4_window7_224": 120, "compile": 120,
               "e2e": 30, "pack": 60, "eval": 15, "checkpoint": 10},
)
SMOKE = Profile(
    name="smoke",
    models=(("resnet10t", {}), ("vit_tiny_patch16_224", {"img_size": 64})),
    vit="vit_tiny_patch16_224", cnn="resnet10t", image_size=64, batches=(8, 4), warmup=1, steps=2,
    compile=False, patients=12, source_size=96, e2e_workers=(1,), e2e_warmup=1, e2e_steps=3,
    drain=False, eval_workers=1, amp=False,
)


class OutOfTimeError(Exception):
    """The budget ran out in the middle of a case."""


class Budget:
    """Seconds left of the whole run; a case starts only if its estimate fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the case (SIGALRM) when the budget is spent: a compile that runs long must not
    take the whole device call with it."""
    if seconds <= 0:
        raise OutOfTimeError

    def alarm(_signum: int, _frame: object) -> None:
        raise OutOfTimeError

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Clock:
    """CUDA events on a GPU (no host sync inside a timed loop), perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: object, end: object) -> float:
        if not self.cuda:
            return float(end) - float(start)  # type: ignore[arg-type]
        end.synchronize()  # type: ignore[attr-defined]
        return start.elapsed_time(end) / 1000.0  # type: ignore[attr-defined]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Bundle:
    """A model ready to train: the eager module, what is called (maybe compiled), its optimizer."""

    name: str
    module: torch.nn.Module
    model: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    compiled: bool
    amp: bool

    def resident_bytes(self) -> int:
        """Parameters and optimizer state: what stays allocated between steps."""
        total = sum(p.numel() * p.element_size() for p in self.module.parameters())
        for state in self.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        return total


def build_bundle(name: str, kwargs: dict, device: torch.device, compiled: bool, amp: bool) -> Bundle:
    """The model, memory format and optimizer groups exactly as trainer.engine.setup makes them."""
    from trainer.config import ModelConfig
    from trainer.models import build_model, plan_parameters, to_memory_format

    module = build_model(ModelConfig(name=name, pretrained=False, in_chans=3, kwargs=dict(kwargs)),
                         NUM_LABELS)
    plan = plan_parameters(module, "full", 0.75, 0.05)
    to_memory_format(module, True)
    module.to(device).train()
    optimizer = torch.optim.AdamW(plan.groups, lr=1e-4)
    # dynamic=False: one static graph per batch size, as a trainer run with a fixed batch gets.
    model = torch.compile(module, dynamic=False) if compiled else module
    return Bundle(name, module, model, optimizer, compiled, amp)


def train_step(bundle: Bundle, images: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
    """One optimizer step of trainer.engine.train_epoch (single process, no accumulation)."""
    from trainer.engine import loss_fn

    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bundle.amp):
        logits = bundle.model(images)
    loss = loss_fn(logits, target, mask, None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(bundle.module.parameters(), 1.0)
    bundle.optimizer.step()
    bundle.optimizer.zero_grad(set_to_none=True)


def forward_flops(name: str, kwargs: dict, size: int) -> float:
    """Forward FLOPs per image, counted by FlopCounterMode on the meta device: no memory, no
    kernels, and attention is counted (it runs as matmuls there; the CPU's fused kernel is not)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.config import ModelConfig
    from trainer.models import build_model

    with torch.device("meta"):
        module = build_model(ModelConfig(name=name, pretrained=False, in_chans=3, kwargs=dict(kwargs)),
                             NUM_LABELS)
        counter = FlopCounterMode(display=False)
        with counter:
            module(torch.empty(2, 3, size, size))
    return counter.get_total_flops() / 2


def mfu(fwd_flops: float | None, img_s: float, peak_tflops: float) -> float | None:
    """Model FLOPs utilisation: a training step costs about 3× the forward pass."""
    if not fwd_flops:
        return None
    return 3.0 * fwd_flops * img_s / (peak_tflops * 1e12)


def preflight() -> str | None:
    """Import the whole chain now: a wheel missing on the GPU machine costs one line, not a
    failure minutes into a device call."""
    import importlib

    for module in ("timm", "accelerate", "simplejpeg", "webdataset", "shards.stream", "shards.pack",
                   "shards.synth", "trainer.models", "trainer.rundir", "trainer.engine",
                   "trainer.checkpoint"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            return (f"gpu: cannot import {module} ({err}); on a machine without a package index, "
                    "carry the wheels that `bash bench/gpu_wheels.sh` downloads (see its header)")
    return None


def machine_info(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info: dict = {"python": platform.python_version(), "platform": platform.platform(),
                  "cpus": os.cpu_count(), "device": device.type, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    for package in ("timm", "torchvision", "accelerate", "simplejpeg", "webdataset", "numpy"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    return info


class Bench:
    """Runs the cases in order, within the budget, and keeps the JSON current after each one."""

    def __init__(self, profile: Profile, device: torch.device, budget: Budget, out: Path,
                 peak_tflops: float) -> None:
        self.profile, self.device, self.budget, self.out = profile, device, budget, out
        self.peak_tflops = peak_tflops
        self.clock = Clock(device)
        self.kwargs = dict(profile.models)
        self.results: dict[str, list[dict]] = {"model_only": [], "end_to_end": [], "eval": [],
                                               "checkpoint": []}
        self.kept: dict[tuple[str, bool], Bundle] = {}
        """Bundles of the end-to-end models at the main batch, reused by the stream cases (a
        compiled one keeps its compiled graphs: no second compile)."""
        self.flops: dict[str, float | None] = {}
        self.shards: Path | None = None
        self.meta: dict = {}

    # ---- bookkeeping -------------------------------------------------------------------------

    def run(self, section: str, case: dict, estimate: float, work: Callable[[], dict]) -> None:
        """One case: skipped if it does not fit, interrupted if it overruns, errors recorded."""
        left = self.budget.left()
        if case.get("status"):
            pass
        elif left < estimate:
            case["status"] = f"skipped: budget ({max(0.0, left):.0f} s left, needs ~{estimate:.0f} s)"
        else:
            started = time.perf_counter()
            try:
                with deadline(left):
                    case.update(work())
                case["status"] = "ok"
            except OutOfTimeError:
                case["status"] = "skipped: budget (interrupted when the budget ran out)"
            except Exception as err:  # one case failing (OOM, a missing decoder) must not end the run
                traceback.print_exc()
                message = (str(err).splitlines() or [""])[0]
                case["status"] = f"error: {type(err).__name__}: {message}"
            case["wall_s"] = round(time.perf_counter() - started, 2)
            self.release()
        self.results[section].append(case)
        print(progress_line(section, case), flush=True)
        self.write_json()

    def release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def write_json(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        report = self.report()
        tmp = self.out / ".gpu.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.out / "gpu.json")

    def report(self) -> dict:
        model_only, e2e = self.results["model_only"], self.results["end_to_end"]
        compile_costs = [{k: c.get(k) for k in ("model", "batch", "compile_s", "first_step_s", "status")}
                         for c in model_only if c.get("compile")]
        return {
            "schema": 1, **self.meta, "elapsed_s": round(self.budget.elapsed(), 1),
            "model_only": model_only, "end_to_end": e2e,
            "fixed_costs": {"compile": compile_costs, "eval": self.results["eval"],
                            "checkpoint": self.results["checkpoint"]},
            "goals": goals(self.profile, model_only, e2e),
        }

    # ---- model-only ----------------------------------------------------------------------------

    def fwd_flops(self, name: str) -> float | None:
        if name not in self.flops:
            try:
                self.flops[name] = forward_flops(name, self.kwargs[name], self.profile.image_size)
            except Exception as err:  # an op without a meta kernel: MFU becomes n/a, nothing else
                print(f"flops: {name}: {type(err).__name__}: {err}", file=sys.stderr)
                self.flops[name] = None
        return self.flops[name]

    def bundle(self, name: str, compiled: bool, batch: int) -> tuple[Bundle, bool]:
        """(bundle, kept): a kept one is reused; a new one is kept if the stream cases need it."""
        key = (name, compiled)
        if key in self.kept:
            return self.kept[key], True
        bundle = build_bundle(name, self.kwargs[name], self.device, compiled, self.profile.amp)
        keep = name in (self.profile.cnn, self.profile.vit) and batch == self.profile.batches[0]
        if keep:
            self.kept[key] = bundle
        return bundle, keep

    def model_only(self, name: str, batch: int, compiled: bool) -> dict:
        size, device = self.profile.image_size, self.device
        flops = self.fwd_flops(name)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        bundle, kept = self.bundle(name, compiled, batch)
        if kept and device.type == "cuda":
            base -= bundle.resident_bytes()  # already allocated: count it as this case's memory
        generator = torch.Generator(device=device).manual_seed(0)
        images = torch.randn(batch, 3, size, size, device=device, generator=generator)
        target = (torch.rand(batch, NUM_LABELS, device=device, generator=generator) < 0.3).float()
        mask = torch.ones(batch, NUM_LABELS, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.clock.sync()
        started = time.perf_counter()
        train_step(bundle, images, target, mask)  # compiles (if compiled): timed on its own
        self.clock.sync()
        first = time.perf_counter() - started
        for _ in range(self.profile.warmup):
            train_step(bundle, images, target, mask)
        self.clock.sync()
        start = self.clock.mark()
        for _ in range(self.profile.steps):
            train_step(bundle, images, target, mask)
        seconds = self.clock.seconds(start, self.clock.mark())
        step_s = seconds / self.profile.steps
        img_s = batch / step_s
        result = {"img_s": round(img_s, 1), "step_ms": round(1000 * step_s, 2),
                  "fwd_gflop_per_img": None if flops is None else round(flops / 1e9, 4),
                  "mfu": _sig(mfu(flops, img_s, self.peak_tflops)), "first_step_s": round(first, 2),
                  "peak_mem_gib": None}
        if device.type == "cuda":
            result["peak_mem_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 2)
        if compiled:
            result["compile_s"] = round(first - step_s, 2)
        del images, target, mask
        if not kept:
            del bundle
        return result

    # ---- end-to-end ----------------------------------------------------------------------------

    def pack(self) -> Path:
        """A synthetic CheXpert pack at source_size px (bench/_data.py; cached between runs)."""
        if self.shards is None:
            from _data import packed, source_tree

            started = time.perf_counter()
            root = source_tree(self.profile.patients, self.profile.source_size)
            self.shards = packed(root, self.profile.source_size)
            print(f"pack: {self.shards} ({time.perf_counter() - started:.1f} s)", flush=True)
        return self.shards

    def stream_config(self, bundle: Bundle, split: str, workers: int, decode: str, batches: int | None,
                      train: bool) -> object:
        from shards.stream import AugmentConfig, StreamConfig

        cfg = bundle.module.pretrained_cfg
        batch = self.profile.batches[0]
        kwargs: dict = {
            "shards": self.pack(), "split": split, "batch_size": batch, "image_size": self.profile.image_size,
            "augment": AugmentConfig.preset("light" if train else "none"),
            "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            "workers": workers, "warp_on": "device", "decode_device": decode,
            "samples_per_epoch": batch * batches if batches else None,
        }
        if "pin_memory" in {f.name for f in dataclasses.fields(StreamConfig)}:  # a newer StreamConfig
            kwargs["pin_memory"] = self.device.type == "cuda"
        return StreamConfig(**kwargs)

    def e2e_bundle(self, name: str) -> Bundle:
        """The compiled bundle if its model-only case succeeded, else the eager one."""
        for compiled in (True, False):
            if (name, compiled) in self.kept and self.model_only_rate(name, compiled) is not None:
                return self.kept[(name, compiled)]
        bundle, _ = self.bundle(name, False, self.profile.batches[0])
        return bundle

    def model_only_rate(self, name: str, compiled: bool) -> float | None:
        for case in self.results["model_only"]:
            if (case["model"], case["batch"], case["compile"]) == (name, self.profile.batches[0], compiled) \
                    and case.get("status") == "ok":
                return case["img_s"]
        return None

    def end_to_end(self, name: str, workers: int, decode: str) -> dict:
        from shards.stream import train_stream

        bundle = self.e2e_bundle(name)
        batch, profile = self.profile.batches[0], self.profile
        # An epoch longer than the run (it is only a count); the generator is closed when done.
        stream = train_stream(self.stream_config(bundle, "train", workers, decode, 100_000, True))
        depth = workers * (stream.loader.prefetch_factor or 0) if profile.drain else 0
        warm = profile.e2e_warmup + depth
        steps = max(profile.e2e_steps, 2 * depth)
        batches = stream.batches(self.device)
        started = time.perf_counter()
        for _ in range(warm):
            item = next(batches)
            train_step(bundle, item["image"], item["target"], item["mask"])
        self.clock.sync()
        warm_s = time.perf_counter() - started
        marks, waited = [], 0.0
        wall = time.perf_counter()
        start = self.clock.mark()
        for _ in range(steps):
            tick = time.perf_counter()
            item = next(batches)
            waited += time.perf_counter() - tick
            ready = self.clock.mark()
            train_step(bundle, item["image"], item["target"], item["mask"])
            marks.append((ready, self.clock.mark()))
        window = self.clock.seconds(start, marks[-1][1])
        wall = time.perf_counter() - wall
        busy = sum(self.clock.seconds(a, b) for a, b in marks)
        batches.close()
        del batches, stream, item
        img_s = steps * batch / window
        baseline = self.model_only_rate(name, bundle.compiled)
        return {"compile": bundle.compiled, "img_s": round(img_s, 1), "steps": steps, "warmup_steps": warm,
                "warmup_s": round(warm_s, 2), "model_only_img_s": baseline,
                "ratio": None if baseline is None else round(img_s / baseline, 3),
                "gpu_data_wait": round(max(0.0, 1.0 - busy / window), 3),
                "host_wait": round(waited / wall, 3)}

    # ---- fixed costs ---------------------------------------------------------------------------

    def eval_pass(self, name: str) -> dict:
        """One exact-once evaluation pass as trainer.engine.predict runs it (eager model, bf16)."""
        from shards.stream import eval_stream

        bundle = self.kept.get((name, False)) or self.e2e_bundle(name)
        module = bundle.module
        # The pack's train split: the same exact-once EvalBatches path as val, with enough images
        # to show a rate (the synthetic val split is a batch or two).
        config = self.stream_config(bundle, "train", self.profile.eval_workers, "cpu", None, False)
        stream = eval_stream(config)
        module.eval()
        images, first = 0, None
        self.clock.sync()
        started = time.perf_counter()
        try:
            with torch.no_grad():
                for batch in stream.batches(self.device):
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bundle.amp):
                        logits = module(batch["image"])
                    torch.sigmoid(logits.float()).cpu()
                    images += len(batch["key"])
                    if first is None:
                        first = time.perf_counter() - started
            seconds = time.perf_counter() - started
        finally:
            module.train()
        del stream
        return {"split": "train", "images": images, "seconds": round(seconds, 2),
                "first_batch_s": round(first or 0.0, 2), "img_s": round(images / seconds, 1)}

    def checkpoint(self, name: str) -> dict:
        """One `trainer.checkpoint.Checkpointer.save` (accelerate save_state: model, optimizer, RNG)."""
        from accelerate import Accelerator

        from trainer.checkpoint import Checkpointer, TrainState

        bundle = self.kept.get((name, False)) or self.e2e_bundle(name)
        if not bundle.optimizer.state:  # a fresh model: one step, so AdamW's moments are saved too
            images = torch.randn(2, 3, self.profile.image_size, self.profile.image_size, device=self.device)
            train_step(bundle, images, torch.zeros(2, NUM_LABELS, device=self.device),
                       torch.ones(2, NUM_LABELS, device=self.device))
        # device_placement=False, no mixed precision: prepare() must leave the shared module as it is.
        accelerator = Accelerator(cpu=self.device.type == "cpu", device_placement=False)
        accelerator.prepare(bundle.module, bundle.optimizer)
        with tempfile.TemporaryDirectory(prefix="cxr-gpu-ckpt-") as tmp:
            checkpointer = Checkpointer(Path(tmp), accelerator, keep_last=1)
            self.clock.sync()
            started = time.perf_counter()
            saved = checkpointer.save(TrainState(step=1))
            seconds = time.perf_counter() - started
            size = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
        accelerator.free_memory()
        return {"seconds": round(seconds, 2), "mib": round(size / 2**20, 1)}

    # ---- the plan ------------------------------------------------------------------------------

    def plan(self) -> Iterator[tuple[str, dict, float, Callable[[], dict]]]:
        """Cases by importance: the goals' figures first, the nice-to-have last."""
        profile, est = self.profile, self.profile.estimates
        big, small = profile.batches
        names = [name for name, _ in profile.models]
        head = [profile.cnn, profile.vit]
        rest = [name for name in names if name not in head]
        decoders = ("cpu", "cuda")

        def model_case(name: str, batch: int, compiled: bool) -> tuple[str, dict, float, Callable[[], dict]]:
            case: dict = {"model": name, "batch": batch, "compile": compiled}
            if compiled and not profile.compile:
                case["status"] = "skipped: smoke (a CPU inductor compile costs ~30 s)"
            estimate = est.get(f"compile:{name}", est.get("compile", 0)) if compiled else est.get("eager", 0)
            return "model_only", case, estimate, lambda: self.model_only(name, batch, compiled)

        def e2e_case(name: str, workers: int, decode: str) -> tuple[str, dict, float, Callable[[], dict]]:
            case: dict = {"model": name, "batch": big, "workers": workers, "decode": decode}
            if decode == "cuda" and self.device.type != "cuda":
                case["status"] = "skipped: needs CUDA (nvJPEG decode)"
            estimate = est.get("e2e", 0) + (est.get("pack", 0) if self.shards is None else 0)
            return "end_to_end", case, estimate, lambda: self.end_to_end(name, workers, decode)

        for name in names:
            yield model_case(name, big, False)
        for name in head:
            yield model_case(name, big, True)
        for name in head:
            for decode in decoders:
                yield e2e_case(name, profile.e2e_workers[0], decode)
        for name in head:
            yield "eval", {"model": name}, est.get("eval", 0), lambda name=name: self.eval_pass(name)
            yield ("checkpoint", {"model": name}, est.get("checkpoint", 0),
                   lambda name=name: self.checkpoint(name))
        for name in rest:
            yield model_case(name, big, True)
        for name in names:
            yield model_case(name, small, False)
        for workers in profile.e2e_workers[1:]:
            for name in head:
                for decode in decoders:
                    yield e2e_case(name, workers, decode)
        for name in names:
            yield model_case(name, small, True)

    def run_all(self) -> None:
        for section, case, estimate, work in self.plan():
            self.run(section, case, estimate, work)
        self.kept.clear()
        self.release()


# ---- reports -------------------------------------------------------------------------------------


def _sig(value: float | None, digits: int = 4) -> float | None:
    """Significant digits: a smoke run's MFU is ~1e-7 and must not round to 0."""
    return None if value is None else float(f"{value:.{digits}g}")


def best(cases: list[dict], model: str, key: str = "img_s") -> dict | None:
    measured = [c for c in cases
                if c["model"] == model and c.get("status") == "ok" and c.get(key) is not None]
    return max(measured, key=lambda c: c[key]) if measured else None


def goals(profile: Profile, model_only: list[dict], e2e: list[dict]) -> list[dict]:
    """Each goal with the best measured figure (any batch/compile; best loader setting)."""
    rows = []
    for model, target in ((profile.vit, GOALS["vit_img_s"]), (profile.cnn, GOALS["cnn_img_s"])):
        top = best(model_only, model)
        where = f"batch {top['batch']}, {'compiled' if top['compile'] else 'eager'}" if top else None
        rows.append({"goal": f"{model} model-only img/s", "target": target,
                     "value": top["img_s"] if top else None, "where": where})
    ratios = [best(e2e, model, "ratio") for model in (profile.cnn, profile.vit)]
    worst = min((r for r in ratios if r), key=lambda c: c["ratio"], default=None)
    where = f"{worst['model']}, {worst['workers']} workers, {worst['decode']} decode" if worst else None
    rows.append({"goal": "end-to-end / model-only (every model, its best loader setting)",
                 "target": GOALS["e2e_ratio"], "value": worst["ratio"] if worst else None, "where": where})
    for row in rows:
        row["met"] = None if row["value"] is None else row["value"] >= row["target"]
    return rows


def progress_line(section: str, case: dict) -> str:
    what = " ".join(f"{k}={case[k]}" for k in ("model", "batch", "compile", "workers", "decode") if k in case)
    if case.get("status") != "ok":
        return f"{section}: {what}: {case.get('status')}"
    shown = ("img_s", "step_ms", "peak_mem_gib", "mfu", "compile_s", "ratio", "gpu_data_wait", "host_wait",
             "seconds", "images", "mib")
    return f"{section}: {what}: " + " ".join(f"{k}={case[k]}" for k in shown if case.get(k) is not None)


def _cell(value: object) -> str:
    return "–" if value is None else str(value)


def table(header: str, rows: list[list[object]]) -> list[str]:
    """A markdown table; `header` is `name:align|...` with align l or r."""
    names, aligns = zip(*(column.split(":") for column in header.split("|")), strict=True)
    rule = "|" + "|".join("---:" if align == "r" else "---" for align in aligns) + "|"
    lines = ["| " + " | ".join(names) + " |", rule]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def _onoff(flag: bool | None) -> str | None:
    return None if flag is None else ("on" if flag else "off")


def _num(value: float | None, digits: int = 0) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    machine = report["machine"]
    where = machine.get("gpu") or "CPU only"
    lines = [
        f"# GPU path benchmark ({report['mode']})", "",
        f"Machine: {where}, {machine['cpus']} CPUs; Python {machine['python']}, torch {machine['torch']} "
        f"(CUDA {machine['cuda']}), timm {machine['timm']}. Command: `{report['command']}` "
        f"({report['elapsed_s']} s).",
        f"Training step: {report['precision']}, masked BCE on {NUM_LABELS} labels, grad clip 1.0, AdamW; "
        f"{report['image_size']} px, in_chans=3. MFU against {report['peak_tflops']:g} TFLOP/s.", "",
    ]
    if report["mode"] == "smoke":
        lines += ["**Smoke run: tiny models on a CPU. These are not performance figures.**", ""]
    met = {None: "n/a", True: "met", False: "not met"}
    lines += ["## Goals", "", *table("goal:l|target:r|measured:r|where:l|met:l", [
        [g["goal"], f"≥ {g['target']:g}", _num(g["value"], 0 if g["value"] and g["value"] > 10 else 2),
         g["where"], met[g["met"]]] for g in report["goals"]])]
    lines += ["", "## Model-only training", "", *table(
        "model:l|batch:r|compile:l|img/s:r|ms/step:r|peak GiB:r|fwd GFLOP/img:r|MFU:r|compile s:r|status:l",
        [[c["model"], c["batch"], _onoff(c["compile"]), _num(c.get("img_s")), c.get("step_ms"),
          c.get("peak_mem_gib"), c.get("fwd_gflop_per_img"), c.get("mfu"), c.get("compile_s"),
          c.get("status")] for c in report["model_only"]])]
    lines += ["", "## End-to-end (shards.stream, warp_on=device, light augmentation)", "", *table(
        "model:l|compile:l|workers:r|decode:l|img/s:r|model-only img/s:r|ratio:r|GPU data wait:r|host wait:r|"
        "status:l",
        [[c["model"], _onoff(c.get("compile")), c["workers"], c["decode"], _num(c.get("img_s")),
          _num(c.get("model_only_img_s")), c.get("ratio"), c.get("gpu_data_wait"), c.get("host_wait"),
          c.get("status")] for c in report["end_to_end"]])]
    fixed = report["fixed_costs"]
    rows: list[list[object]] = []
    rows += [["compile (first step − steady step)", f"{c['model']} b{c['batch']}", c.get("compile_s"),
              f"first step {_cell(c.get('first_step_s'))} s", c.get("status")] for c in fixed["compile"]]
    rows += [["evaluation pass", c["model"], c.get("seconds"),
              f"{c['images']} images, {c['img_s']:.0f} img/s, first batch {c['first_batch_s']} s"
              if c.get("status") == "ok" else None, c.get("status")] for c in fixed["eval"]]
    rows += [["checkpoint save", c["model"], c.get("seconds"),
              f"{c['mib']} MiB" if c.get("status") == "ok" else None, c.get("status")]
             for c in fixed["checkpoint"]]
    lines += ["", "## Fixed costs per run", "", *table("cost:l|model:l|seconds:r|detail:l|status:l", rows)]
    return "\n".join(lines) + "\n"


def summary_line(report: dict, profile: Profile) -> str:
    def rate(model: str) -> str:
        top = best(report["model_only"], model)
        return f"{top['img_s']:.0f}" if top else "n/a"

    e2e = report["goals"][-1]["value"]
    return (f"gpu: {profile.vit}={rate(profile.vit)} {profile.cnn}={rate(profile.cnn)} "
            f"e2e_ratio={'n/a' if e2e is None else f'{e2e:.2f}'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The GPU path in one command: img/s, MFU, "
                                     "memory, end-to-end and fixed costs; see the module docstring.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "gpu")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting cases after this many seconds (the device call is 8 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models on the CPU: the code paths, not figures")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="the chip's dense bf16 peak")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    profile = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        print("gpu: no CUDA device here; on a CPU run `python bench/gpu.py --smoke`", file=sys.stderr)
        return 2
    problem = preflight()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.smoke else "cpu")
    if args.smoke:  # two intra-op threads on a busy 2-core machine spin-wait: 10× slower steps
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 where fp32 remains
    bench = Bench(profile, device, budget, args.out, args.peak_tflops)
    bench.meta = {"mode": profile.name, "command": " ".join(["python", *sys.argv]),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(device),
                  "budget_s": args.budget_s, "peak_tflops": args.peak_tflops,
                  "image_size": profile.image_size, "steps": profile.steps, "warmup": profile.warmup,
                  "precision": "bf16 autocast" if profile.amp else "fp32 (no autocast)"}
    bench.run_all()
    report = bench.report()
    bench.write_json()
    table = markdown(report)
    (args.out / "gpu.md").write_text(table, encoding="utf-8")
    print(table)
    print(summary_line(report, profile), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
