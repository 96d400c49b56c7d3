"""`python -m trainer.demo`: the main job on the embedded default, on a CPU, in a few minutes.

Synthetic CheXpert (train.csv/valid.csv + JPEGs + lesion masks) → WebDataset shards → a tiny CNN
and a tiny ViT trained on the competition-5 labels → test AUROC per label, side by side, with
TensorBoard logs under <out>/runs → the report (<out>/report/index.html and index.md: per-label
AUROC with patient-bootstrap CIs, the paired CNN-vs-ViT test, calibration, figures). Re-running
reuses the data and retrains.

`--external` also validates both runs on other synthetic packs before the report (external
validation: trainer/demo_external.py says which packs), and the report gains that table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shards.errors import DataError
from shards.labels import COMPETITION5
from shards.pack import PackOptions, pack
from shards.synth import ChexpertOptions, generate_chexpert
from shards.synth.chexpert import DATASET_DIR
from trainer.config import ConfigError, load_config
from trainer.engine import train
from trainer.evaluate import EvaluateError
from trainer.metrics import format_metric

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = {"cnn": "demo_cpu.yaml", "vit": "demo_cpu_vit.yaml"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="working folder (default demo/)")
    parser.add_argument("--patients", type=int, default=400, help="synthetic train patients (default 400)")
    parser.add_argument("--epochs", type=int, default=None, help="override both configs' epochs")
    parser.add_argument("--external", action="store_true",
                        help="also score both runs on other synthetic packs (NIH/MIMIC layouts where this "
                             "checkout has them, else CheXpert drawn with another seed) and report it")
    parser.add_argument("--target", action="append", default=None, metavar="LAYOUT",
                        help="with --external: a layout to validate on (repeatable; default: see above)")
    return parser


def prepare_data(out: Path, patients: int) -> Path:
    source, shards = out / "source", out / "shards"
    if not (source / DATASET_DIR / "valid.csv").is_file():
        print(generate_chexpert(ChexpertOptions(out=source, patients=patients, size=128, workers=2)).line())
    pack(PackOptions(layout="chexpert", root=source, out=shards, size=96, shard_samples=128, workers=2))
    return shards


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets = []
    if args.external or args.target:
        from trainer.demo_external import external_targets  # noqa: PLC0415

        targets = external_targets(args.target)  # an unknown layout stops here, before training
    shards = prepare_data(args.out, args.patients)
    results = {}
    for short, config_name in MODELS.items():
        run_dir = args.out / "runs" / short
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo retrains from scratch each time
        overrides = [f"data.shards={shards}", f"run.dir={run_dir}"]
        if args.epochs:
            overrides.append(f"optim.epochs={args.epochs}")
        config = load_config(CONFIGS / config_name, overrides)
        print(f"\n== {short}: {config.model.name} ({CONFIGS / config_name}) ==")
        started = time.perf_counter()
        results[short] = (config.model.name, train(config), time.perf_counter() - started)
    print_comparison(results)
    print(f"\nTensorBoard: .venv/bin/tensorboard --logdir {args.out / 'runs'} --host 127.0.0.1")
    if targets:
        from trainer.demo_external import validate  # noqa: PLC0415

        validate(args.out, [args.out / "runs" / short for short in MODELS], targets, args.patients)
    # The paper-style comparison of the two runs: CIs, the paired test, calibration, figures.
    from trainer.report.__main__ import main as report  # noqa: PLC0415 - matplotlib only at the end

    return report(["--runs", str(args.out / "runs"), "--out", str(args.out / "report")])


def print_comparison(results: dict[str, tuple[str, dict, float]]) -> None:
    """Test AUROC per label, one column per model (other people's numbers are not ours)."""
    names = list(results)
    print("\nTest AUROC on synthetic CheXpert (competition-5 labels; not comparable to published "
          "CheXpert results)")
    print(f"{'label':<18}" + "".join(f"{results[n][0]:>24}" for n in names))
    for label in COMPETITION5:
        cells = [results[n][1].get("auroc", {}).get(label) for n in names]
        print(f"{label:<18}" + "".join(f"{format_metric(c, '.3f'):>24}" for c in cells))
    macro = [results[n][1].get("auroc_macro") for n in names]
    print(f"{'macro':<18}" + "".join(f"{format_metric(value, '.3f'):>24}" for value in macro))
    print(f"{'wall time':<18}" + "".join(f"{results[n][2]:>23.0f}s" for n in names))


if __name__ == "__main__":
    try:
        code = main()
    except (ConfigError, DataError, EvaluateError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    from trainer.engine import finish

    finish(code)
