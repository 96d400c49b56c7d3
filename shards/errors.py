"""Typed errors and the one-line CLI error contract shared by every `python -m shards.*` entry."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence


class DataError(Exception):
    """Input that cannot be used at all (wrong root, wrong layout, unusable shards).

    The message is one line that names the file or field and what was expected.
    """


class LeakageError(DataError):
    """The same patient appears in two splits after splitting: a bug, never tolerated."""


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI main, turning DataError (and Ctrl-C) into one stderr line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (finished work is kept; re-run to resume)", file=sys.stderr)
        return 130
