"""The whole study in one command: every cell of a space's grid × N seeds, each trained on train,
selected on val and tested once, then the paper-style report over all of them:

    python -m sweeps.study --space sweeps/spaces/study_demo_cpu.yaml --seeds 2 --address local \\
        --name demo --storage runs/studies data.shards=demo/shards

Writes STORAGE/NAME/runs/<cell>-seed<k>/ (normal run directories: TensorBoard over runs/ compares
them all), STORAGE/NAME/status.json as it goes, and STORAGE/NAME/report/ (trainer.report, with
mean ± sd over seeds and the seed-aware CNN-vs-ViT comparison) at the end. The space's `search`
and `scheduler` are ignored (no early stopping: every run goes to the end). `--resume` continues
an interrupted study: finished runs are kept, unfinished ones resume from their checkpoints.
`--dry-run` prints the runs and a compute estimate and runs nothing. Exit status: 0 every run
finished and the report is written, 1 some run failed (the report covers the others), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shards.atomic import write_json
from shards.errors import DataError
from sweeps import study_plan, study_tuning
from sweeps.run import apply_arguments, check_space, init_ray
from sweeps.space import SearchSpace, SpaceError, load_space
from sweeps.study_plan import Cell
from sweeps.trial import TrialSetup, run_cell
from trainer import rundir
from trainer.config import ConfigError, load_config
from trainer.metrics import format_metric

PLAN = "study.json"
STATUS = "status.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sweeps.study", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--space", required=True, type=Path, help="sweep space YAML, run as a full grid")
    parser.add_argument("--seeds", type=int, default=3, help="replicates of every cell: run.seed 0..N-1 [3]")
    parser.add_argument("--address", default="local",
                        help="local (start Ray here), auto (join the cluster `ray start` made), or HOST:PORT")
    parser.add_argument("--name", help="study name [the space file's name]")
    parser.add_argument("--storage", type=Path, default=Path("runs/studies"), help="[runs/studies]")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study STORAGE/NAME")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and the compute; run nothing")
    parser.add_argument("--gpus-per-trial", type=float, help="[the space's resources.gpu]")
    parser.add_argument("--cpus-per-trial", type=float, help="[the space's resources.cpu]")
    parser.add_argument("--max-failures", type=int, default=2, help="retries of a failed run [2]")
    parser.add_argument("--resamples", type=int, default=1000, help="the report's bootstrap resamples [1000]")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.trials = None
    args.dashboard = False
    try:
        if args.seeds < 1:
            raise SpaceError(f"--seeds: expected ≥ 1, got {args.seeds}")
        space = load_space(args.space)
        apply_arguments(space, args)
        if space.search != "grid" or space.scheduler["type"] != "none":
            print(f"study: {args.space} search: {space.search}, scheduler: {space.scheduler['type']} "
                  "ignored: every cell of the grid runs to completion")
        overrides = [f"{k}={json.dumps(v)}" for k, v in space.fixed.items()] + list(args.overrides)
        check_space(space, overrides)
        if space.tune is not None:
            study_tuning.check(space, overrides)
        plan = study_plan.cells(space, args.seeds)
        out = (args.storage / (args.name or args.space.stem)).resolve()
        configs = [study_plan.cell_config(c, overrides, out / "runs" / c.run_name) for c in plan]
        if args.dry_run:
            return dry_run(space, plan, configs, overrides)
        check_storage(out, plan, overrides, args.resume, space)
    except (SpaceError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_study(space, plan, overrides, out, args)


def dry_run(space: SearchSpace, plan: list[Cell], configs: list, overrides: list[str]) -> int:
    table = study_plan.load_throughput()
    lines, hours, unknown = study_plan.estimate(plan, configs, table)
    tuned = ""
    if space.tune is not None:
        hours += _dry_run_tuning(space, overrides, table)
        tuned = ", each with its search's winning values"
    print(f"study: {len(plan)} runs{tuned}")
    for line in lines:
        print(f"  {line}")
    print(f"compute: ~{hours:.2f} H100-hours ({hours * 60:.0f} H100-minutes) in all (throughput from "
          f"{table['source']}, an H100 taken as "
          f"{table['h100_speedup']}x a {table['gpu']}; frozen backbones costed as full fine-tuning)")
    if unknown:
        print(f"not in sweeps/throughput.yaml, so not counted: {', '.join(unknown)}")
    return 0


def _dry_run_tuning(space: SearchSpace, overrides: list[str], table: dict) -> float:
    """Print the tuning stage's searches; their H100-hours (each trial costed as its config)."""
    tune = space.tune
    assert tune is not None
    hours = 0.0
    print(f"tuning: {len(study_tuning.searches(space))} searches × {tune.trials} trials ({tune.search}, "
          f"no early stopping, val only) over {', '.join(p.key for p in tune.params)}")
    for search in study_tuning.searches(space):
        cfg = load_config(search.base, [*overrides, *search.overrides])
        seconds = study_plan.gpu_seconds(cfg, table)
        spent = None if seconds is None else seconds * tune.trials / float(table["h100_speedup"])
        hours += (spent or 0.0) / 3600
        minutes = "?" if spent is None else f"{spent / 60:.1f}"
        print(f"  tuning {search.name}: {tune.trials} trials × {cfg.optim.epochs} epochs, "
              f"~{minutes} H100-minutes")
    return hours


def check_storage(out: Path, plan: list[Cell], overrides: list[str], resume: bool,
                  space: SearchSpace | None = None) -> None:
    """A study is started once and continued with --resume, always with the same runs."""
    record = {"runs": [c.run_name for c in plan], "overrides": overrides,
              "cells": {c.run_name: [c.base, *c.overrides] for c in plan}}
    if space is not None and space.tune is not None:
        record["tuning"] = {"searches": [s.name for s in study_tuning.searches(space)],
                            "trials": space.tune.trials, "params": [p.key for p in space.tune.params]}
    path = out / PLAN
    if not resume:
        if path.exists():
            raise SpaceError(f"study {out} exists: pass --resume to continue it, or another --name")
        write_json(path, record)
        return
    if not path.is_file():
        raise SpaceError(f"--resume: no study to continue at {out} (no {PLAN})")
    if json.loads(path.read_text(encoding="utf-8")) != record:
        raise SpaceError(f"--resume: {out / PLAN} lists other runs or overrides than this command "
                         "(same --space, --seeds and key=value as the first run)")


def run_study(space: SearchSpace, plan: list[Cell], overrides: list[str], out: Path,
              args: argparse.Namespace) -> int:
    runs_dir = out / "runs"
    todo = [c for c in plan if not study_plan.finished(runs_dir / c.run_name)]
    for cell in todo:  # an unfinished run with no checkpoint to resume from starts again, clean
        run_dir = runs_dir / cell.run_name
        if run_dir.exists() and not list((run_dir / "checkpoints").glob("step-*")):
            shutil.rmtree(run_dir)
    progress = Progress(out, plan, [c for c in plan if c not in todo])
    print(f"study {out.name}: {len(plan)} runs, {len(plan) - len(todo)} already finished, {len(todo)} to run")
    failed: list[str] = []
    extra: dict[str, list[str]] = {}
    if space.tune is not None and todo:
        import ray  # noqa: PLC0415 - heavy; only when something runs

        init_ray(ray, args)
        winners = study_tuning.run_searches(space, overrides, out, args)
        extra = {c.run_name: study_tuning.cell_overrides(c, space, winners) for c in todo}
    if todo:
        failed = _tune(space, todo, overrides, out, args, progress, extra)
    progress.write()
    from trainer.report.__main__ import main as report  # noqa: PLC0415

    code = report(["--runs", str(runs_dir), "--out", str(out / "report"), "--resamples", str(args.resamples)])
    if failed:
        print(f"study {out.name}: {len(failed)} runs failed ({', '.join(failed)}): see their run directories",
              file=sys.stderr)
        return 1
    return 0 if code == 0 else 1


def _tune(space: SearchSpace, todo: list[Cell], overrides: list[str], out: Path, args: argparse.Namespace,
          progress: Progress, extra: dict[str, list[str]]) -> list[str]:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray  # noqa: PLC0415 - heavy; after the space and configs are known to be good
    from ray import tune  # noqa: PLC0415

    init_ray(ray, args)
    ranks = space.ranks or (int(space.gpu) if space.gpu > 1 else 1)
    setup = TrialSetup(base=None, overrides=tuple(overrides), trials_dir=str(out / "runs"),
                       metric=space.metric, cwd=str(Path.cwd()), ranks=ranks, cpus=max(1, int(space.cpu)))
    trainable = tune.with_resources(tune.with_parameters(run_cell, setup=setup),
                                    {"cpu": space.cpu, "gpu": space.gpu})
    cells = [{"run": c.run_name, "base": c.base, "overrides": [*c.overrides, *extra.get(c.run_name, [])],
              "seed": c.seed} for c in todo]
    attempts = out / "tune"
    attempt = f"attempt-{len(list(attempts.glob('attempt-*'))) if attempts.is_dir() else 0}"
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search(cells)},
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=False),
        run_config=tune.RunConfig(name=attempt, storage_path=str(attempts), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  callbacks=[progress.callback()]),
    )
    tuner.fit()
    return [c.run_name for c in todo if not study_plan.finished(out / "runs" / c.run_name)]


class Progress:
    """One line per finished run, a running total with the time left, and status.json."""

    def __init__(self, out: Path, plan: list[Cell], done: list[Cell]) -> None:
        self.out, self.plan = out, plan
        self.metric = None
        self.state = {c.run_name: "finished" if c in done else "waiting" for c in plan}
        self.started: dict[str, float] = {}
        self.seconds: list[float] = []
        self.parallel = 1
        """The most runs seen at once: how many the cluster fits side by side."""
        self.runs: dict[str, dict] = {c.run_name: _scores(out / "runs" / c.run_name) for c in done}

    def callback(self):
        from ray.tune import Callback  # noqa: PLC0415

        progress = self

        class StudyProgress(Callback):
            def on_trial_start(self, iteration, trials, trial, **info) -> None:
                progress.start(trial.config["cell"]["run"])

            def on_trial_complete(self, iteration, trials, trial, **info) -> None:
                progress.end(trial.config["cell"]["run"], "finished")

            def on_trial_error(self, iteration, trials, trial, **info) -> None:
                progress.end(trial.config["cell"]["run"], "failed")

        return StudyProgress()

    def start(self, run: str) -> None:
        self.state[run] = "running"
        self.started[run] = time.monotonic()
        self.parallel = max(self.parallel, self.counts()["running"])
        self.write()

    def end(self, run: str, state: str) -> None:
        seconds = time.monotonic() - self.started.get(run, time.monotonic())
        tested = study_plan.finished(self.out / "runs" / run)
        self.state[run] = "finished" if state == "finished" and tested else "failed"
        scores = _scores(self.out / "runs" / run) | {"seconds": round(seconds, 1)}
        self.runs[run] = scores
        if self.state[run] == "finished":
            self.seconds.append(seconds)
        counts = self.counts()
        val, test = format_metric(scores.get("val")), format_metric(scores.get("test"))
        print(f"{self.state[run]} {run}: val {val}, test {test} ({seconds:.0f} s) | "
              f"{counts['finished']} done, {counts['running']} running, {counts['waiting']} left, "
              f"{_eta(self.eta())}", flush=True)
        self.write()

    def counts(self) -> dict[str, int]:
        states = list(self.state.values())
        return {name: states.count(name) for name in ("finished", "running", "waiting", "failed")}

    def eta(self) -> float | None:
        """Seconds left: the mean run time so far × the runs still to finish, over the most runs
        seen at once."""
        if not self.seconds:
            return None
        counts = self.counts()
        left = counts["running"] + counts["waiting"]
        return sum(self.seconds) / len(self.seconds) * left / max(1, min(self.parallel, left))

    def write(self) -> None:
        write_json(self.out / STATUS, {
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "counts": self.counts(),
            "eta_seconds": None if self.eta() is None else round(self.eta(), 1),
            "runs": {name: {"state": self.state[name], **self.runs.get(name, {})} for name in self.state},
        })


def _scores(run_dir: Path) -> dict:
    """The run's best val and its test value of the metric it selects on."""
    try:
        metric = rundir.read_config(run_dir).run.metric
        records = rundir.read_records(run_dir, tolerant=True)
    except rundir.RunDirError:
        return {}
    val = [r.get(metric) for r in records if r["split"] == "val" and isinstance(r.get(metric), int | float)]
    test = [r.get(metric) for r in records if r["split"] == "test" and isinstance(r.get(metric), int | float)]
    return {"metric": metric, "val": max(val) if val else None, "test": test[-1] if test else None}


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "time left unknown yet"
    return f"~{seconds / 60:.0f} min left" if seconds >= 90 else f"~{seconds:.0f} s left"


if __name__ == "__main__":
    sys.exit(main())
