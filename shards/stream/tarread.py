"""Read WebDataset samples from an uncompressed tar, fast: the loader's innermost loop.

`webdataset.tarfile_samples` goes through Python's `tarfile`, which parses every 512-byte header
field by field and streams each member through buffered reads: about a quarter of a worker's
time per sample at 320 px (bench/loader.py). Shards here are plain ustar archives written by
`shards.pack`, so this reader walks the headers, checks each one's checksum, and reads only
the members the stream asks for (a lesion mask is never copied unless wanted). Members are
grouped into samples the WebDataset way: the key is the path up to the first dot of the base name.
Anything it does not understand (a bad checksum, a member past the end of the file, compressed
tars) raises TarFormatError, which the stream counts and skips like webdataset's handler does.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

BLOCK = 512
_SPACES = b" " * 8
_ADLER = 65521
_REGULAR = (b"0", b"\0", b"7")
_SKIPPED = (b"5", b"g")
"""Directories and global PAX headers carry no sample data."""


class TarFormatError(ValueError):
    """The bytes are not a readable tar (damaged, truncated or compressed)."""


def _number(field: bytes, path: Path, offset: int) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"{path}: not a tar header at byte {offset}") from None


def _check(header: bytes, offset: int, path: Path) -> None:
    """The header's byte sum (its checksum field counted as spaces) must equal the stored checksum.

    adler32's low half is 1 + the byte sum mod 65521, computed in C: a seventh of the cost of
    Python's `sum` over 512 bytes, a loop that ran three times per sample. A 512-byte header sums
    to at most 130,560 < 2 × 65,521, so the only sums this accepts besides the exact one differ
    from it by exactly 65,521.
    """
    stored = _number(header[148:156], path, offset)
    low = zlib.adler32(header[156:], zlib.adler32(_SPACES, zlib.adler32(header[:148]))) & 0xFFFF
    if not (0 <= stored <= BLOCK * 255 and (stored + 1) % _ADLER == low):
        raise TarFormatError(f"{path}: bad tar header checksum at byte {offset}")


def _pax_path(body: bytes) -> str | None:
    """The `path` record of a PAX extended header ("<len> path=<name>\\n" records)."""
    for record in body.decode("utf-8", "replace").splitlines():
        _, _, item = record.partition(" ")
        if item.startswith("path="):
            return item[5:]
    return None


def iter_members(path: Path, want: Callable[[str], bool] = lambda _: True,
                 ) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of each regular file in the tar, in order; bytes is None where `want` says no.

    Plain positioned reads, not mmap: a mapped shard's touched pages would count in the worker's
    resident memory, which would then grow with the shard size.
    """
    with path.open("rb", buffering=0) as handle:
        size = handle.seek(0, 2)
        offset, long_name = 0, None

        def read(start: int, length: int) -> bytes:
            handle.seek(start)
            return handle.read(length)

        while offset + BLOCK <= size:
            header = read(offset, BLOCK)
            if header.count(0) == BLOCK:
                return  # end-of-archive marker: the only clean way out of the loop
            _check(header, offset, path)
            length = _number(header[124:136], path, offset)
            start, offset = offset + BLOCK, offset + BLOCK + -(-length // BLOCK) * BLOCK
            if start + length > size:
                raise TarFormatError(f"{path}: truncated (a member runs past the end of the file)")
            kind = header[156:157]
            if kind == b"L":  # GNU long name for the next member
                long_name = read(start, length).split(b"\0", 1)[0].decode("utf-8")
            elif kind == b"x":  # PAX extended header for the next member
                long_name = _pax_path(read(start, length)) or long_name
            elif kind in _REGULAR:
                name = long_name
                if name is None:
                    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                    if header[257:262] == b"ustar" and prefix:
                        name = f"{prefix}/{name}"
                long_name = None
                yield name, read(start, length) if want(name) else None
            elif kind not in _SKIPPED:
                raise TarFormatError(f"{path}: unsupported tar member type {kind!r} at byte {offset}")
        if offset < size and read(offset, size - offset).strip(b"\0"):
            raise TarFormatError(f"{path}: truncated (a partial header at the end)")
        raise TarFormatError(f"{path}: truncated (no end-of-archive marker after byte {offset})")


def _split(name: str) -> tuple[str, str] | None:
    """WebDataset's naming: key = path up to the first dot of the base name, the rest is the extension."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name[:dot], name[dot + 1:]) if dot >= 0 else None


def iter_samples(path: Path, wanted: Collection[str] | None = None) -> Iterator[dict]:
    """Samples as webdataset gives them ({"__key__", "__url__", ext: bytes}), consecutive members grouped.

    `wanted`: the extensions to copy out; the others are skipped without being read.
    """

    def want(name: str) -> bool:
        parts = _split(name)
        return parts is not None and (wanted is None or parts[1] in wanted)

    sample: dict | None = None
    try:
        for name, body in iter_members(path, want):
            parts = _split(name)
            if parts is None:
                continue  # no extension: not part of a sample
            key, ext = parts
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": str(path)}
            if body is not None:
                sample[ext] = body
    except TarFormatError:
        # The sample read before the damage may be whole: hand it on (the stream checks that
        # it has its image and JSON), then report the damage.
        if sample is not None:
            yield sample
        raise
    if sample is not None:
        yield sample
