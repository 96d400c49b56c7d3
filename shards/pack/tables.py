"""CSV tables of the NIH and MIMIC downloads, plain or gzip-compressed, read row by row.

A table whose header lacks a needed column is not the file it claims to be: one-line DataError.
A row with the wrong number of cells is a `malformed_row` Reject and reading goes on.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from shards.errors import DataError
from shards.pack.sources import Reject


class RowError(ValueError):
    """One row (or image) that cannot be used; `kind` goes to rejects.jsonl."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def find_table(folder: Path, name: str) -> Path | None:
    """`name` as downloaded (`.csv.gz`) or unpacked by the user (`.csv`); None if neither exists."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


@contextmanager
def open_text(path: Path) -> Iterator[TextIO]:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", newline="", encoding="utf-8") as handle:
            yield handle
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            yield handle


def table_rows(path: Path, required: Sequence[str], what: str, rejects: list[Reject],
               malformed: set[str] | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, {column: cell}) for each well-formed row; `where` is `<folder>/<file>:<line>`.

    `malformed` collects the first cell of each malformed row (what it names is then not reported
    a second time, as an image without a row)."""
    with open_text(path) as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
        except (csv.Error, OSError, EOFError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: unreadable ({err})") from None
        if header is None:
            raise DataError(f"{path}: empty file (expected a {what} header row)")
        header = [column.strip() for column in header]
        missing = [column for column in required if column not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (not a {what})")
        label = f"{path.parent.name}/{path.name}"
        try:
            for row in reader:
                if not row:
                    continue
                where = f"{label}:{reader.line_num}"
                if len(row) != len(header):
                    rejects.append(Reject(where, f"malformed row: {len(row)} fields, expected {len(header)}",
                                          "malformed_row"))
                    if malformed is not None:
                        malformed.add(row[0].strip())
                    continue
                yield where, dict(zip(header, row, strict=True))
        except (csv.Error, OSError, EOFError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: unreadable after line {reader.line_num} ({err})") from None


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a plain list file."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line.strip()

