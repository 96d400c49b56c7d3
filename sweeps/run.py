"""Sweep architectures × freeze strategies × hyperparameters on Ray Tune, Optuna (TPE) searching,
ASHA stopping bad trials early:

    python -m sweeps.run --space sweeps/spaces/demo_cpu.yaml --trials 4 --address local \\
        --name demo --storage runs/sweeps data.shards=demo/shards

Writes STORAGE/NAME/results.csv, results.md (sorted by the space's metric), best.yaml (a trainer
config for `trainer/run.py --config`) and trials/<trial>/ (each trial's run directory with its
TensorBoard logs). `--resume` continues an interrupted sweep (Tuner.restore): finished trials are
kept, unfinished ones resume from their last checkpoint.

A trial that raises or whose worker dies is restarted from its own last checkpoint, up to
--max-failures times; one that still fails is listed with status `error` and the reason (the
exception line of its last attempt) in results.csv/md, and the rest of the sweep goes on.

--dashboard (with --address local; needs ray[default]): Ray's dashboard on 127.0.0.1 only, its
address printed at start. It takes Ray's token (token authentication stays on): `ray
get-auth-token` prints it (kept in ~/.ray/auth_token, or $RAY_AUTH_TOKEN_PATH / $RAY_AUTH_TOKEN);
the web page asks for it once, API clients send `Authorization: Bearer <token>`. From another
machine: ssh -L 8265:127.0.0.1:8265 HOST, then http://127.0.0.1:8265.

Exit status: 0 done, with a best.yaml (also when some trials failed: a `warning:` line names
each, results.csv has the reason); 1 no trial produced a validation metric; 2 bad space/config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from shards.errors import DataError
from sweeps.failures import TrialError, trial_errors
from sweeps.space import CONFIG_PARAM, Param, SearchSpace, SpaceError, load_space
from sweeps.trial import ROOT, TrialSetup, run_trial, trial_overrides
from trainer.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.run",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--space", required=True, type=Path, help="search space YAML (sweeps/spaces/)")
    parser.add_argument("--trials", type=int, help="optuna: number of trials; grid: repeats [from the space]")
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPUs per trial; > 1 runs a trial on that many ranks [the space's resources.gpu]",
    )
    parser.add_argument("--cpus-per-trial", type=float, help="[the space's resources.cpu]")
    parser.add_argument(
        "--address",
        default="local",
        help="local (start Ray here), auto (join the cluster `ray start` made), or ray://host:port",
    )
    parser.add_argument("--name", help="sweep name [the space file's name]")
    parser.add_argument(
        "--storage", type=Path, default=Path("runs/sweeps"), help="where sweeps live [runs/sweeps]"
    )
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep STORAGE/NAME")
    parser.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial [2]")
    parser.add_argument("--seed", type=int, default=0, help="Optuna sampler seed [0]")
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="with --address local: start the Ray dashboard on 127.0.0.1:8265 (needs ray[default])",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="applied to every trial's config"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        space = load_space(args.space)
        apply_arguments(space, args)
        overrides = [f"{k}={json.dumps(v)}" for k, v in space.fixed.items()] + list(args.overrides)
        max_epochs = check_space(space, overrides)
        out = (args.storage / (args.name or args.space.stem)).resolve()
        _check_storage(out, args.resume)
    except (SpaceError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dashboard and (problem := _dashboard_problem(args.address)):
        print(f"error: --dashboard: {problem}", file=sys.stderr)
        return 2
    return sweep(space, overrides, out, max_epochs, args)


def apply_arguments(space: SearchSpace, args: argparse.Namespace) -> None:
    """The command line's --trials / --gpus-per-trial / --cpus-per-trial over the space's, and its
    config files resolved (sweeps.study shares it)."""
    if args.trials is not None:
        if args.trials < 1:
            raise SpaceError(f"--trials: expected ≥ 1, got {args.trials}")
        space.trials = args.trials
    if args.gpus_per_trial is not None:
        space.gpu = args.gpus_per_trial
    if args.cpus_per_trial is not None:
        space.cpu = args.cpus_per_trial
    space.base = _resolve(space.base) if space.base else None
    space.params = [
        Param(p.key, p.kind, tuple(_resolve(v) for v in p.values)) if p.key == CONFIG_PARAM else p
        for p in space.params
    ]


def _resolve(path: str) -> str:
    """Config files: as given from the current directory, else from the checkout (sweeps/spaces
    name the shipped presets as trainer/configs/...)."""
    here = Path(path)
    if not here.is_file() and (ROOT / path).is_file():
        here = ROOT / path
    if not here.is_file():
        raise SpaceError(f"config file {path}: not found (from {Path.cwd()} or {ROOT})")
    return str(here.resolve())


def check_space(space: SearchSpace, overrides: list[str]) -> int:
    """Every listed value and both bounds of every range through the trainer's own validation,
    before a single trial starts. Returns the longest trial's epochs (ASHA's max_t)."""
    bases = next((list(p.values) for p in space.params if p.key == CONFIG_PARAM), [space.base])
    epochs = 1
    for base in bases:
        load_config(base, overrides)
        for param in space.params:
            if param.key == CONFIG_PARAM:
                continue
            for value in param.extremes():
                _, extra = trial_overrides({param.key: value})
                try:
                    cfg = load_config(base, [*overrides, *extra])
                except ConfigError as err:
                    raise SpaceError(f"{space.path}: params.{param.key} = {value!r}: {err}") from None
                epochs = max(epochs, cfg.optim.epochs)
        epochs = max(epochs, load_config(base, overrides).optim.epochs)
    return epochs


def _dashboard_problem(address: str) -> str:
    """Why --dashboard cannot work here ('' when it can): checked before Ray starts, where Ray
    itself would log a traceback and raise."""
    if address != "local":
        return f"only with --address local (the cluster at {address} has its own, or none)"
    try:
        import ray.dashboard.optional_deps  # noqa: F401, PLC0415 - what Ray imports to decide the same
    except ImportError as err:
        return f"needs ray[default] ({err}): bash launch/setup_env.sh dashboard"
    return ""


def _check_storage(out: Path, resume: bool) -> None:
    state = out / "tuner.pkl"
    if resume and not state.exists():
        raise SpaceError(f"--resume: no sweep to continue at {out} (no tuner.pkl)")
    if not resume and state.exists():
        raise SpaceError(f"sweep {out} exists: pass --resume to continue it, or another --name")


def sweep(
    space: SearchSpace, overrides: list[str], out: Path, max_epochs: int, args: argparse.Namespace
) -> int:
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a killed driver loses ≤ 2 s of sweep state
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray  # noqa: PLC0415 - heavy; after the space and configs are known to be good
    from ray import tune  # noqa: PLC0415

    init_ray(ray, args)
    ranks = space.ranks or (int(space.gpu) if space.gpu > 1 else 1)
    setup = TrialSetup(
        base=space.base,
        overrides=tuple(overrides),
        trials_dir=str(out / "trials"),
        metric=space.metric,
        cwd=str(Path.cwd()),
        ranks=ranks,
        cpus=max(1, int(space.cpu)),
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"cpu": space.cpu, "gpu": space.gpu}
    )
    if args.resume:
        tuner = tune.Tuner.restore(str(out), trainable=trainable, resume_errored=True)
        print(f"resuming sweep {out}")
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.tune_space(),
            tune_config=_tune_config(space, max_epochs, args.seed),
            run_config=tune.RunConfig(
                name=out.name,
                storage_path=str(out.parent),
                verbose=getattr(args, "verbose", 1),  # the study's tuning stage: 0
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    grid = tuner.fit()
    times = {
        str(r.metrics["trial_id"]): float(r.metrics.get("time_total_s") or 0.0)
        for r in grid
        if r.metrics and "trial_id" in r.metrics and "time_total_s" in r.metrics  # not a trial that never ran
    }
    return _write_outputs(out, space, times, trial_errors(grid))


def init_ray(ray, args: argparse.Namespace) -> None:
    """Ray for a sweep or a study: a fresh local cluster (`local`), or the one at `args.address`
    (once per process: a study's tuning searches and its grid share it)."""
    if ray.is_initialized():
        return
    if args.address == "local":
        dashboard = (
            {"include_dashboard": True, "dashboard_host": "127.0.0.1"}
            if args.dashboard
            else {"include_dashboard": False}
        )
        # address="local": always a fresh cluster here, never one left running by someone else.
        context = ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            object_store_memory=256 * 2**20,
            log_to_driver=False,
            configure_logging=True,
            logging_level=logging.WARNING,
            **dashboard,
        )
        keep_token_private()
        if args.dashboard:
            print(dashboard_access(context.dashboard_url), flush=True)
    else:
        ray.init(address=args.address, log_to_driver=False, logging_level=logging.WARNING)


def keep_token_private() -> None:
    """Ray 2.60 writes the token it creates for a local cluster to ~/.ray/auth_token readable by
    everyone (0644); whoever reads it can run code on this Ray as you. Owner-only, as ssh keys."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    with contextlib.suppress(OSError):  # none (auth disabled, or the token in $RAY_AUTH_TOKEN), or not ours
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


def dashboard_access(url: str) -> str:
    """How to reach the dashboard safely: the URL (on 127.0.0.1 only), the tunnel from another
    machine, and where the token is (never the token itself: this goes to logs)."""
    port = url.rsplit(":", 1)[-1]
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        token = ("warning: RAY_AUTH_MODE=disabled: no token asked, so anyone with a shell on this "
                 "machine can submit work to this Ray as you")
    else:
        where = ("$RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN")
                 else os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token")
        token = (f"token: `ray get-auth-token` prints it (from {where}); the page asks for it once, "
                 "API clients send 'Authorization: Bearer <token>'")
    return (f"Ray dashboard: http://{url} (this machine only; from another: "
            f"ssh -L {port}:127.0.0.1:{port} {socket.gethostname()}); {token}")


def _tune_config(space: SearchSpace, max_epochs: int, seed: int):
    from ray import tune  # noqa: PLC0415
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: PLC0415

    search = None
    if space.search == "optuna":
        import optuna  # noqa: PLC0415
        from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415

        search = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
    if space.scheduler["type"] == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_epochs,
            grace_period=min(max_epochs, space.scheduler["grace_period"]),
            reduction_factor=space.scheduler["reduction_factor"],
        )
    else:
        scheduler = FIFOScheduler()
    # As many trials at once as the cluster's CPUs/GPUs allow for each trial's resources.
    return tune.TuneConfig(
        metric=space.metric,
        mode="max",
        search_alg=search,
        scheduler=scheduler,
        num_samples=space.trials,
        reuse_actors=False,
    )


def _write_outputs(out: Path, space: SearchSpace, times: dict[str, float],
                   errors: dict[str, TrialError] | None = None) -> int:
    from sweeps.results import collect, write_best, write_tables  # noqa: PLC0415

    rows = collect(out / "trials", space.metric, errors)
    write_tables(rows, out, space.metric, times)
    best = write_best(rows, out, out.name, space.search)
    stopped = sum(r.status == "stopped early" for r in rows)
    failed = [r for r in rows if r.status == "error"]
    print(f"sweep {out.name}: {len(rows)} trials, {stopped} stopped early by ASHA, {len(failed)} failed; "
          f"table {out / 'results.md'}")
    for row in failed:
        print(f"warning: trial {row.trial} failed on every attempt: {row.reason} (logs: {row.run_dir})",
              file=sys.stderr)
    if best is None:
        print("no trial produced a validation metric: no best.yaml", file=sys.stderr)
        return 1
    print(f"best: {rows[0].trial} val {space.metric}={rows[0].best:.4f} → {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
