"""`python -m trainer.evaluate --run RUN --shards PACK [--split test] [--out DIR]`: external validation.

Scores a trained run's `best/` model on another pack (another dataset, or another site of the
same one) exactly as the trainer evaluates: the run's image size, channels, normalisation and
views, no augmentation, every sample of the split once. Only the labels the two vocabularies
share with the same meaning are scored (`shards.labels.shared_labels`: NIH `Effusion` is CheXpert
`Pleural Effusion`; `No Finding` only within one vocabulary); the run's other labels are listed as
left out, never guessed.

Labels: the pack's raw labels go through the run's own label policy, label by label (a target label
gets the uncertain rule of the run label it stands for, and the run's blank rule), so the external
AUROC is computed the way the run's internal test AUROC was: under U-Ignore an uncertain target is
masked out of that label's AUROC, under U-Zeros/U-Ones it counts as 0/1. A label a sample does not
carry at all is masked out.

Writes `RUN/external/<pack folder name>/` (or `--out DIR`), whole or not at all (trainer/rundir.py):
external.json (the mapping, left-out labels, policy), metrics.jsonl (one record: per-label AUROC and
the macro mean), predictions_{split}.npz (keys, patients, the shared labels under the run's names).
Errors: one line naming the file or option, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shards.errors import DataError
from shards.labels import shared_labels
from shards.manifest import MANIFEST, load_manifest
from trainer import rundir
from trainer.config import ConfigError
from trainer.rundir import Predictions, RunDirError

if TYPE_CHECKING:  # torch is imported where the model runs: --help and the errors start without it
    import torch

    from shards.stream import LabelPolicy
    from trainer.explain.loading import LoadedRun


class EvaluateError(ValueError):
    """Input external validation cannot use, in one line naming the file or option."""


@dataclass(frozen=True)
class EvaluateOptions:
    run: Path
    shards: Path
    split: str = "test"
    out: Path | None = None
    """Default: RUN/external/<the pack folder's name>."""
    batch_size: int | None = None
    """Default: the run's data.batch_size."""
    workers: int = 1
    device: str = "auto"


def output_dir(options: EvaluateOptions) -> Path:
    return options.out or rundir.external_dir(options.run, Path(options.shards).resolve().name)


def label_mapping(run_labels: Sequence[str], pack_labels: Sequence[str],
                  manifest: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(run name, pack name) pairs and the run's left-out labels; an error when nothing is shared."""
    pairs, left_out = shared_labels(tuple(run_labels), tuple(pack_labels))
    if not pairs:
        raise EvaluateError(f"{manifest}: label_names share no label with the run's "
                            f"({', '.join(run_labels)}; the pack has {', '.join(pack_labels)})")
    return pairs, left_out


def target_policy(uncertain: str, blank: str, pairs: Sequence[tuple[str, str]]) -> LabelPolicy:
    """The run's label policy restated on the pack's names: each target label gets the uncertain
    rule of the run label it stands for (`mixed` is per label), and the run's blank rule."""
    from shards.stream import LabelPolicy  # noqa: PLC0415 - imports torch

    run_policy = LabelPolicy(uncertain=uncertain, blank=blank)
    return LabelPolicy(uncertain=uncertain, blank=blank,
                       per_label={target: run_policy.for_label(source) for source, target in pairs})


def evaluate_external(options: EvaluateOptions) -> tuple[Path, dict]:
    """Score the run on the pack and write the result; (its directory, the metrics record)."""
    import torch  # noqa: PLC0415 - see the imports

    from trainer.explain.loading import ExplainError, load_best_model  # noqa: PLC0415 - imports timm
    from trainer.metrics import multilabel_metrics  # noqa: PLC0415 - imports scikit-learn

    run_dir, shards = Path(options.run), Path(options.shards)
    if not run_dir.is_dir():
        raise EvaluateError(f"--run {run_dir}: no such directory")
    if not (run_dir / rundir.BEST).is_dir():
        raise EvaluateError(f"--run {run_dir}: no {rundir.BEST}/ (the run exports its model at its first "
                            "validation)")
    out = output_dir(options)
    if out.is_dir() and not (out / rundir.EXTERNAL_RECORD).is_file() and any(out.iterdir()):
        raise EvaluateError(f"--out {out}: a folder that is not an external result (no "
                            f"{rundir.EXTERNAL_RECORD}): refusing to replace it")
    try:
        manifest = load_manifest(shards)
    except DataError as err:
        raise EvaluateError(str(err)) from None
    if options.split not in manifest.data["splits"]:
        raise EvaluateError(f"--split {options.split}: {shards / MANIFEST} has no such split (it has "
                            f"{', '.join(manifest.data['splits'])})")
    device = resolve_device(options.device)
    try:
        loaded = load_best_model(run_dir, shards)
    except ExplainError as err:
        raise EvaluateError(str(err)) from None
    pairs, left_out = label_mapping(loaded.labels, manifest.label_names, shards / MANIFEST)
    data = loaded.config.data
    policy = target_policy(data.uncertain, data.blank, pairs)
    predictions, skipped = predict(loaded, shards, options, pairs, policy, device)
    if not len(predictions.keys):
        raise EvaluateError(f"--shards {shards}: split {options.split!r} has no sample with views="
                            f"{data.views} (the run's data.views)")
    names = tuple(source for source, _ in pairs)
    metrics = multilabel_metrics(names, predictions)
    record = {"split": options.split, "dataset": out.name, "shards": str(shards.resolve()),
              "skipped": skipped, **metrics}
    info = {
        "run": str(run_dir.resolve()), "model": loaded.config.model.name,
        "best_step": rundir.read_card(run_dir).get("step"), "shards": str(shards.resolve()),
        "dataset": manifest.data.get("dataset"), "split": options.split,
        "labels": [{"run": source, "target": target} for source, target in pairs],
        "left_out": left_out,
        "target_unused": [n for n in manifest.label_names if n not in {t for _, t in pairs}],
        "policy": {"uncertain": data.uncertain, "blank": data.blank, "per_label": dict(policy.per_label),
                   "note": "the run's own policy, applied to each target label as to the run label it "
                           "stands for"},
        "views": data.views, "image_size": data.image_size, "samples": len(predictions.keys),
        "skipped": skipped, "device": str(device), "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rundir.write_external(out, info, record, predictions)
    return out, record


def resolve_device(name: str) -> torch.device:
    import torch  # noqa: PLC0415 - see the imports

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluateError(f"--device {name}: torch sees no CUDA device here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise EvaluateError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None


def predict(loaded: LoadedRun, shards: Path, options: EvaluateOptions, pairs: Sequence[tuple[str, str]],
            policy: LabelPolicy, device: torch.device) -> tuple[Predictions, int]:
    """Every sample of the split once, through the run's own eval stream config (trainer.data),
    reading the pack's names of the shared labels; the model's outputs reduced to those labels.
    Returns (Predictions under the run's names, samples the stream skipped as corrupt)."""
    import torch  # noqa: PLC0415 - see the imports

    from shards.stream import eval_stream  # noqa: PLC0415
    from trainer.data import stream_config  # noqa: PLC0415

    config = stream_config(loaded.config, loaded.model, options.split, pin_memory=device.type == "cuda")
    config = replace(config, shards=shards, labels=tuple(target for _, target in pairs), policy=policy,
                     workers=options.workers, batch_size=options.batch_size or config.batch_size)
    if device.type != "cuda":  # a GPU run's decode on the GPU (nvJPEG) becomes the CPU's, same pixels
        config = replace(config, decode_device="cpu", warp_on="worker")
    columns = [loaded.labels.index(source) for source, _ in pairs]
    model = loaded.model.to(device).eval()
    stream = eval_stream(config)
    keys, patients, probs, targets, masks = [], [], [], [], []
    with torch.no_grad():
        for batch in stream.batches(device):
            logits = model(batch["image"].float())
            keys += batch["key"]
            patients += batch["patient"]
            probs.append(torch.sigmoid(logits.float())[:, columns].cpu().numpy())
            targets.append(batch["target"].cpu().numpy())
            masks.append(batch["mask"].cpu().numpy())
    empty = np.zeros((0, len(pairs)), np.float32)
    part = (keys, patients, *(np.concatenate(a) if a else empty for a in (probs, targets, masks)))
    names = tuple(source for source, _ in pairs)
    return Predictions.merge(names, [part]), stream.skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run directory (reads its best/)")
    parser.add_argument("--shards", type=Path, required=True,
                        help="another pack (a folder written by python -m shards.pack)")
    parser.add_argument("--split", default="test", help="the pack's split to score (default test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default RUN/external/<pack folder name>, where the report "
                             "finds it)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size")
    parser.add_argument("--workers", type=int, default=1, help="loader processes (default 1)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.batch_size is not None and args.batch_size < 1) or args.workers < 0:
        print("error: --batch-size must be ≥ 1 and --workers ≥ 0", file=sys.stderr)
        return 2
    from trainer.metrics import format_metric  # noqa: PLC0415

    options = EvaluateOptions(args.run, args.shards, args.split, args.out, args.batch_size, args.workers,
                              args.device)
    try:
        out, record = evaluate_external(options)
    except (EvaluateError, DataError, ConfigError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"external: {args.run} on {args.shards} ({args.split}, {record['samples']} images): "
          f"auroc_macro={format_metric(record['auroc_macro'], '.4f')} over {record['auroc_labels']} of "
          f"{len(record['auroc'])} shared labels → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
