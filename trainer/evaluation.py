"""Scoring a split: every sample once across ranks, metrics, predictions and the model card.

Forwards are local (no collective), predictions are gathered by key and de-duplicated, and the
main rank writes `predictions_{split}.npz` with the patient of every row (trainer/rundir.py).
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate.utils import gather_object

from shards.stream import Stream
from trainer import rundir
from trainer.build import Run, plain_model, unsharded_copy
from trainer.data import stream_config
from trainer.distributed import zero_stage
from trainer.metrics import binary_metrics, format_metric, multilabel_metrics, youden_threshold
from trainer.models import model_family
from trainer.rundir import Predictions

FALLBACK_THRESHOLD = 0.5
"""The binary decision threshold when validation lacks one of the classes (no Youden point)."""


def predict(run: Run, stream: Stream) -> Predictions:
    """Every sample of the split scored once: local predictions gathered from all ranks, by key.
    The forwards are local (no collective), so ranks may hold different numbers of batches."""
    model = eval_model(run)
    same_buffers(model, run)
    model.eval()
    dtype = next(model.parameters()).dtype
    keys, patients, probs, targets, masks = [], [], [], [], []
    with torch.no_grad():
        for batch in stream.batches(run.accelerator.device):
            with run.accelerator.autocast():
                logits = model(batch["image"].to(dtype))
            keys += batch["key"]
            patients += batch["patient"]
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(batch["target"].cpu().numpy())
            masks.append(batch["mask"].cpu().numpy())
    empty = np.zeros((0, len(run.labels)), np.float32)
    local = (keys, patients, *(np.concatenate(a) if a else empty for a in (probs, targets, masks)))
    parts = gather_object([local]) if run.accelerator.num_processes > 1 else [local]
    return Predictions.merge(run.labels, parts)


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
        run.eval_copy = unsharded_copy(run)
    copy_parameters = dict(run.eval_copy.named_parameters())
    with deepspeed.zero.GatheredParameters(list(sharded.parameters()), modifier_rank=None):
        for name, parameter in sharded.named_parameters():
            copy_parameters[name].data.copy_(parameter.data)
    copy_buffers = dict(run.eval_copy.named_buffers())
    for name, buffer in sharded.named_buffers():
        copy_buffers[name].data.copy_(buffer.data)
    return run.eval_copy


def same_buffers(model: torch.nn.Module, run: Run) -> None:
    """Collective: rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts
    them at the start of each forward, but the last training forward then updates each rank's own
    copy from its own batch: without this, each rank would score its share of the split with
    slightly different statistics, and a run resumed from rank 0's checkpoint would not reproduce
    the uninterrupted run's evaluation. The model evaluated is then the one the checkpoint and
    best/ hold."""
    if run.accelerator.num_processes == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            torch.distributed.broadcast(buffer.data, src=0)


def restore_weights(run: Run, weights: dict[str, torch.Tensor]) -> None:
    """Put exported weights back into the (possibly ZeRO-3-sharded) model, on every rank."""
    target = run.ema.module if run.ema is not None else plain_model(run)
    if zero_stage(run.accelerator) == 3:
        import deepspeed  # noqa: PLC0415 - only with DeepSpeed

        with deepspeed.zero.GatheredParameters(list(target.parameters()), modifier_rank=0):
            target.load_state_dict(weights)
    else:
        target.load_state_dict(weights)


def evaluate(run: Run, split: str, threshold: float | None = None) -> dict:
    """Score `split`, log its record, write its predictions. A binary run decides at `threshold`
    (test: the one chosen on val), or at val's Youden point."""
    stream = run.val if split == "val" else run.test
    predictions = predict(run, stream)
    if run.binary:
        if threshold is None:
            threshold = youden_threshold(predictions.targets[:, 0], predictions.probs[:, 0])
        metrics = binary_metrics(predictions, FALLBACK_THRESHOLD if threshold is None else threshold)
    else:
        metrics = multilabel_metrics(run.labels, predictions)
    record = {"split": split, "epoch": run.state.epoch, "step": run.state.step,
              "images_seen": run.state.samples, "train_seconds": round(run.state.train_seconds, 3),
              **metrics}
    run.tracker.log(record)
    if run.accelerator.is_main_process and not run.writes.skip():
        # A failed write is held; the caller's next agreement stops the run.
        with run.writes.guard(rundir.predictions_path(run.run_dir, split)):
            rundir.write_predictions(run.run_dir, split, predictions)
    run.tracker.roc_curves(split, run.labels, predictions.probs, predictions.targets, predictions.masks,
                           run.state.step)
    return record


def model_card(run: Run, metrics: dict) -> dict:
    """What `best/model_card.json` says of the exported model: enough to use it without the code
    that trained it (inputs, labels, threshold), and the family the report compares it as."""
    cfg = run.cfg
    model = plain_model(run)
    stream = stream_config(cfg, model, "val")
    return {
        "model": cfg.model.name, "family": model_family(model), "labels": list(run.labels),
        "task": "binary" if run.binary else "multilabel",
        "input": {"channels": cfg.model.in_chans, "size": cfg.data.image_size, "mean": list(stream.mean),
                  "std": list(stream.std), "range": "grayscale 0..255 scaled to 0..1, then normalised"},
        "threshold": metrics.get("threshold"),
        "val_metrics": {k: metrics.get(k) for k in ("auroc_macro", "auroc_chexpert5")},
        "step": run.state.step, "data": cfg.data.shards,
        "parameters": {"trainable": run.parameters[0], "total": run.parameters[1]},
        "recipe": recipe_card(run),
        "intended_use": "Research on model comparison only. Not for clinical use.",
    }


def recipe_card(run: Run) -> dict:
    """How the exported model was trained, beyond config.yaml: the launch's global batch and
    effective lr, and the lr its lowest and highest trainable layer groups peaked at."""
    card = run.recipe.to_dict() if run.recipe is not None else {}
    if run.recipe is not None:
        card["lr_bottom"] = run.recipe.effective_lr * run.lr_scales[0]
        card["lr_top"] = run.recipe.effective_lr * run.lr_scales[1]
    return card


def summary_line(metrics: dict) -> str:
    parts = [f"auroc_macro={format_metric(metrics.get('auroc_macro'))}"]
    if "auroc_chexpert5" in metrics:
        parts.append(f"auroc_chexpert5={format_metric(metrics['auroc_chexpert5'])}")
    for key in ("accuracy", "sensitivity", "specificity", "f1"):
        if key in metrics:
            parts.append(f"{key}={format_metric(metrics[key])}")
    return " ".join(parts)
