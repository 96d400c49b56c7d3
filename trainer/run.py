"""Train one model: `accelerate launch trainer/run.py --config CONFIG.yaml [key.sub=value ...]`.

Also runs as plain `python trainer/run.py ...` (one process). Exit status: 0 finished, 2 bad
config or no usable checkpoint to resume from (one line, nothing written), 74 a write failed, a
full disk above all (one line; the earlier checkpoints and best/ are intact; not requeued: free
space, then resubmit with `run.resume=auto`), 75 preempted after a checkpoint (requeue;
`run.resume=auto` continues), 1 otherwise: a crash (traceback) or a peer lost (one line).
Under a launch script each failing rank also says which in $CXR_FAILURE_DIR (trainer/failures.py),
so that a lost node is requeued and a failure of the run is not.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python trainer/run.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.errors import DataError
from trainer.config import ConfigError, load_config
from trainer.failures import PEER_LOST, record_failure
from trainer.rundir import RunDirError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML config (trainer/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides, e.g. run.dir=runs/x model.freeze=head optim.lr=3e-4")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        from trainer.engine import train  # noqa: PLC0415 - keeps --help and config errors fast
        from trainer.preemption import Preempted  # noqa: PLC0415
        from trainer.storage import Stopped  # noqa: PLC0415

        try:
            train(config)
        except Preempted as stop:
            return int(stop.code)
        except Stopped as stop:  # the line saying why is already out (main rank)
            record_failure(stop)  # an error of the run's own (a full disk): not requeued
            return int(stop.code)
    except (ConfigError, DataError, RunDirError) as err:
        record_failure(err)
        # One write, line and newline together: every rank prints it into one log (accelerate
        # launch runs python -u), and print's two writes interleave there ("...)error: ...").
        sys.stderr.write(f"error: {err}\n")
        return 2
    except Exception as err:
        if record_failure(err) == PEER_LOST:  # a node died or froze: the launcher may requeue
            cause = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            sys.stderr.write(f"error: lost contact with another rank ({cause}); the last complete "
                             "checkpoint is kept for a resume\n")
            return 1
        raise
    return 0


if __name__ == "__main__":
    code = main()
    from trainer.engine import finish

    finish(code)
