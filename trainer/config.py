"""One typed config tree (data, model, optim, run): YAML file, then dotted `key=value` overrides.

Every mistake is found before anything is written and reported as one ConfigError line naming
the key and what was expected. The resolved tree is saved as `config.yaml` in the run directory
and can be fed straight back with `--config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shards.atomic import write_text

METRICS: tuple[str, ...] = ("auroc_macro", "auroc_chexpert5", "accuracy", "f1", "sensitivity", "specificity")
"""Validation metrics that can pick the best checkpoint (all: higher is better)."""


RESOLVED = "resolved"
"""config.yaml's block of what the launch made of the config (trainer/recipe.py): a record, not a setting."""


RESUME_MODES: tuple[str, ...] = ("never", "auto", "restart")
"""run.resume's words; anything else is a checkpoint directory."""


class ConfigError(ValueError):
    """A config mistake, in one line that names the key."""


@dataclass
class DataConfig:
    shards: str = ""
    """Directory written by `python -m shards.pack` (holds manifest.json)."""
    labels: str | list[str] = "chexpert14"
    """chexpert14, competition5, pneumonia, nih14, mimic14, or a list of label names."""
    image_size: int = 224
    batch_size: int = 32
    """Per process; the global batch is batch_size × processes × optim.grad_accum."""
    global_batch: int | None = None
    """Images per optimizer step, pinned: the per-process batch is then global ÷ processes ÷
    optim.grad_accum (and batch_size is ignored), so a recipe trains the same on 1 GPU or 8 (a
    sweep's best.yaml sets it to the winning trial's). Unset: batch_size × processes × grad_accum."""
    workers: int = 4
    views: Literal["all", "frontal", "lateral"] = "frontal"
    uncertain: Literal["ignore", "zeros", "ones", "mixed"] = "ignore"
    blank: Literal["zeros", "ignore"] = "zeros"
    augment: Literal["none", "light", "strong"] = "light"
    balance: str | None = None
    patient_fraction: float = 1.0
    """Fraction of training patients kept (data-efficiency curves)."""
    samples_per_epoch: int | None = None
    shuffle_buffer: int = 1000
    warp_on: Literal["worker", "device"] = "worker"
    decode_device: Literal["cpu", "cuda"] = "cpu"
    verify_shards: Literal["sha256", "size"] = "sha256"
    """Before training, every shard the run reads must still be the one manifest.json describes, or
    the run stops with one line naming it (trainer/packcheck.py). sha256: existence, size and
    checksum, the hashing spread over the ranks (reads the whole pack once per start); size:
    existence and size only (instant, but misses a shard rewritten to the same size)."""


@dataclass
class ModelConfig:
    name: str = "resnet50"
    """Any timm model name."""
    pretrained: bool = False
    """Load ImageNet weights: from `weights` if set, else the HF cache (offline)."""
    weights: str | None = None
    """A local .safetensors/.pth file with the timm model's weights."""
    in_chans: Literal[1, 3] = 3
    """1: adapt the stem to grayscale (timm sums the RGB filters); 3: repeat the gray channel."""
    freeze: Literal["head", "head+last_block", "full", "layer_decay"] = "full"
    layer_decay: float = 0.75
    """Per-block LR factor for freeze=layer_decay (the head gets the full LR); how far down it
    compounds is `layer_decay_mode`."""
    layer_decay_mode: Literal["group", "depth"] = "group"
    """freeze=layer_decay: `group` (timm's, as before) multiplies the lr by layer_decay once per timm
    coarse group from the head down, so the stem gets layer_decay^(groups-1): 0.75^13 ≈ 0.024 for
    ViT-B/16 (14 groups) but 0.75^5 ≈ 0.24 for ResNet-50 (6). `depth` normalises by depth: every
    architecture's stem gets layer_decay^13 (ViT-B/16's own, so ViT-B is unchanged and the usual
    ViT values 0.65-0.75 keep their meaning), the head 1, the groups between evenly spaced in
    exponent (trainer.models.layer_scales): the fair setting for comparing families."""
    drop_path: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm.create_model arguments (tiny variants: depth, embed_dim, img_size, ...). They win
    over what data.image_size implies (ViTs: img_size; Swin: img_size and window_size = size / 32;
    CNNs: nothing; trainer.models.resolution_kwargs)."""
    channels_last: bool = True
    """For CNNs: NHWC memory format (faster convolutions on GPUs)."""
    compile: bool = False


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "lamb", "lion"] = "adamw"
    """Built by timm's optimizer factory (trainer/optimizers.py); sgd is Nesterov momentum."""
    lr: float | None = None
    """Peak learning rate at `lr_ref_batch` images per step (see lr_scaling); unset, the optimizer's
    own starting point (optimizers.DEFAULT_LR)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """How lr follows the actual global batch (trainer/recipe.py): none (lr as given, at any batch:
    the default, as before), linear (× global/ref), sqrt (× √(global/ref))."""
    lr_ref_batch: int = 256
    """The global batch at which optim.lr is defined (used by linear and sqrt)."""
    weight_decay: float = 0.01
    betas: list[float] | None = None
    """adamw, lamb, lion; unset, the optimizer's own ((0.9, 0.999); lion (0.9, 0.99))."""
    momentum: float = 0.9
    """sgd."""
    epochs: int = 3
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01
    """Cosine schedule floor, as a fraction of lr."""
    grad_accum: int = 1
    clip_grad: float | None = 1.0
    pos_weight: bool = True
    """Weight positives by neg/pos from the manifest's prevalence (BCE pos_weight)."""
    ema: float | None = None
    """EMA decay of the weights (e.g. 0.999); evaluation and the export then use the EMA."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = False
    """Force the CPU even where a GPU is present."""
    metric: str = "auroc_macro"
    """Validation metric that picks the best checkpoint (higher is better)."""
    checkpoint_every: int = 0
    """Optimizer steps between checkpoints (0: at epoch ends only)."""
    keep_last: int = 2
    resume: str = "never"
    """never; auto: the newest usable checkpoint in dir/checkpoints (damaged ones are passed over with
    a warning each; when there are checkpoints and none is usable the run stops, exit 2, rather than
    start over); restart: the same, but with none usable it trains from scratch here, the earlier
    attempt's files moved to dir/set-aside/ (never deleted; safe to keep for a requeued job: with a
    usable checkpoint it resumes); or a checkpoint path."""
    log_every: int = 10
    collective_timeout: int = 600
    """Seconds a rank waits in a collective (all-reduce, barrier) for its peers before it fails:
    how long a run whose node died or froze can hang. The launch scripts set 120 (CPU) / 180 (GPU)
    through COLLECTIVE_TIMEOUT; the first step of a compiled model must fit in it."""
    signal_check_every: int = 10
    """Optimizer steps between the ranks' agreement on a preemption signal (an all-reduce and a
    host sync: not paid every step). SLURM's warning comes minutes before the kill."""
    test_at_end: bool = True
    """Evaluate the best model on the test split when training ends."""
    image_grid: bool = True
    """Log a grid of training images to TensorBoard once."""
    tuning: dict[str, Any] = field(default_factory=dict)
    """How this recipe's hyperparameters were chosen, as a record (written by sweeps.run's best.yaml
    and sweeps.study's tuning stage: trials, search, sweep); empty: set by hand. The report's recipe
    card shows it, and flags compared runs whose tuning budgets differ."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        """Written whole or not at all: a run directory's config.yaml is what every reader opens first."""
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# --- building from YAML and overrides --------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                environment: bool = True) -> Config:
    """File (if any), then `a.b=value` overrides (values parsed as YAML), then validation.

    `environment=False` reads a record of a run (a run directory's config.yaml, read by the report
    on another machine, months later): types and ranges are checked, not whether its shards,
    weights file or timm model exist here."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, optim, run)")
        raw.pop(RESOLVED, None)  # what a past launch made of the config: recomputed by every launch
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.strip(), value)
    config = _build(Config, raw, "")
    validate(config)
    if environment:
        check_environment(config)
    return config


def _set_dotted(tree: dict, key: str, value: object) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part!r} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: object, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        expected = ", ".join(sorted(names))
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (expected one of: {expected})")
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: object, kind: object, key: str) -> object:
    """Check one value against its type hint (converting int or numeric text to float)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` (run.precision=no) as false
            value = "no"
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, args[0], key) for item in value] if args else value
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if kind is float and not isinstance(value, bool) and isinstance(value, int | str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string; users write it that way
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind in (int, float, str) and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _coerce_union(value: object, args: tuple, key: str) -> object:
    if value is None and type(None) in args:
        return None
    problems = []
    for option in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, option, key)
        except ConfigError as err:
            problems.append(str(err))
    raise ConfigError(problems[-1] if problems else f"{key}: {value!r} is not allowed")


def validate(config: Config) -> None:
    """Checks that need more than a type: ranges and names of choices."""
    data, model, optim, run = config.data, config.model, config.optim, config.run
    positive = {"data.image_size": data.image_size, "data.batch_size": data.batch_size,
                "optim.epochs": optim.epochs, "optim.grad_accum": optim.grad_accum,
                "optim.lr_ref_batch": optim.lr_ref_batch,
                "data.global_batch": 1 if data.global_batch is None else data.global_batch,
                "run.keep_last": run.keep_last, "run.log_every": run.log_every,
                "run.signal_check_every": run.signal_check_every,
                "run.collective_timeout": run.collective_timeout}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be ≥ 1, got {value}")
    if data.workers < 0 or run.checkpoint_every < 0:
        raise ConfigError("data.workers and run.checkpoint_every must be ≥ 0")
    if not 0 < data.patient_fraction <= 1:
        raise ConfigError(f"data.patient_fraction: expected 0 < f ≤ 1, got {data.patient_fraction}")
    if optim.lr is None:  # resolved here, so config.yaml records the lr a run used
        from trainer.optimizers import DEFAULT_LR  # noqa: PLC0415

        optim.lr = DEFAULT_LR[optim.name]
    if optim.betas is not None and (len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas)):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {optim.betas}")
    if optim.lr <= 0 or optim.weight_decay < 0 or not 0 < model.layer_decay <= 1:
        raise ConfigError("optim.lr must be > 0, optim.weight_decay ≥ 0, model.layer_decay in (0, 1]")
    if optim.ema is not None and not 0 < optim.ema < 1:
        raise ConfigError(f"optim.ema: expected a decay in (0, 1), got {optim.ema}")
    if run.metric not in METRICS:
        raise ConfigError(f"run.metric: {run.metric!r} is not one of {', '.join(METRICS)}")


def check_environment(config: Config) -> None:
    """What must exist on this machine for the config to run: the shards, the model, weights."""
    data, model, run = config.data, config.model, config.run
    if not data.shards:
        raise ConfigError("data.shards: not set (a directory written by python -m shards.pack)")
    if not (Path(data.shards) / "manifest.json").is_file():
        raise ConfigError(f"data.shards: {data.shards}/manifest.json not found "
                          "(run python -m shards.pack first)")
    import timm  # noqa: PLC0415 - heavy; only once the cheap checks passed

    if not timm.is_model(model.name):
        close = timm.list_models(f"*{model.name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.name: {model.name!r} is not a timm model{hint}")
    if "." in model.name and model.name not in timm.list_pretrained(model.name):
        arch = model.name.split(".", 1)[0]
        tags = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(f"model.name: {model.name!r}: timm has no pretrained tag "
                          f"{model.name.split('.', 1)[1]!r} for {arch} (it has: "
                          f"{', '.join(tags[:8]) + (', ...' if len(tags) > 8 else '') or 'none'})")
    if "img_size" not in model.kwargs:  # a size the architecture cannot take stops here, not on the node
        from trainer.models import resolution_kwargs  # noqa: PLC0415

        resolution_kwargs(model.name, data.image_size)
    if model.weights is not None and not Path(model.weights).is_file():
        raise ConfigError(f"model.weights: {model.weights} not found")
    _check_resume(run)


def _check_resume(run: RunConfig) -> None:
    if run.resume not in RESUME_MODES and not Path(run.resume).is_dir():
        raise ConfigError(f"run.resume: {run.resume!r} is neither {', '.join(RESUME_MODES)} nor a checkpoint "
                          "directory")
