"""The fast tar reader gives exactly what webdataset gives, and fails loudly on damaged tars."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from shards.stream.tarread import TarFormatError, iter_samples


def wds_samples(path: Path) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in wds.tarfile_samples([{"url": str(path)}])]


def ours(path: Path, wanted: tuple[str, ...] | None = None) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(path, wanted)]


def test_same_samples_as_webdataset(chexpert_shards: Path) -> None:
    shards = sorted(chexpert_shards.glob("*.tar"))
    assert len(shards) > 3
    for shard in shards:
        assert ours(shard) == wds_samples(shard)


def test_unwanted_members_are_not_copied(chexpert_shards: Path) -> None:
    shard = next(chexpert_shards.glob("train-*.tar"))
    samples = ours(shard, wanted=("jpg", "json"))
    assert samples and all(set(s) == {"__key__", "jpg", "json"} for s in samples)


def write_tar(path: Path, members: dict[str, bytes], fmt: int) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5  # a float mtime makes Python write PAX headers
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_and_header_formats(tmp_path: Path, fmt: int) -> None:
    """Tars written by other tools: PAX and GNU long names, ustar prefixes, directories."""
    deep = "d" * 60 + "/" + "e" * 60
    members = {f"{deep}/a.jpg": b"1", f"{deep}/a.json": b"{}", "b.seg.png": b"22", "README": b"x"}
    path = tmp_path / "t.tar"
    write_tar(path, members, fmt)
    assert ours(path) == [{"__key__": f"{deep}/a", "jpg": b"1", "json": b"{}"},
                          {"__key__": "b", "seg.png": b"22"}]


def test_truncated_tar_yields_what_precedes_the_cut(chexpert_shards: Path, tmp_path: Path) -> None:
    shard = next(chexpert_shards.glob("train-*.tar"))
    complete = ours(shard)
    damaged = tmp_path / "cut.tar"
    damaged.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    got = []
    with pytest.raises(TarFormatError, match="truncated"):
        for sample in iter_samples(damaged):
            got.append({k: v for k, v in sample.items() if k != "__url__"})
    assert 0 < len(got) < len(complete) and got == complete[: len(got)]


def test_corrupt_header_and_compressed_tar(chexpert_shards: Path, tmp_path: Path) -> None:
    shard = next(chexpert_shards.glob("train-*.tar"))
    data = bytearray(shard.read_bytes())
    data[0:5] = b"XXXXX"  # the first member's name: the checksum no longer matches
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(TarFormatError, match="checksum"):
        ours(bad)
    gz = tmp_path / "x.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(shard, arcname="a.jpg")
    with pytest.raises(TarFormatError, match=r"checksum|not a tar header"):  # gzip bytes vary
        ours(gz)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(TarFormatError, match="no end-of-archive marker"):
        ours(empty)


@pytest.mark.parametrize(("where", "delta"), [(100, 1), (300, -1), (150, 1), (511, 7)])
def test_any_header_byte_off_by_a_little_fails_the_checksum(chexpert_shards: Path, tmp_path: Path,
                                                            where: int, delta: int) -> None:
    """One byte of the second member's header changed (mode, the checksum field itself, the ustar
    fields, the padding): the sum no longer matches, whatever the byte's field."""
    shard = next(chexpert_shards.glob("train-*.tar"))
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        second = tar.getmembers()[1].offset
    if where == 150:  # the checksum field: an octal digit one higher
        digit = data[second + 150]
        data[second + 150] = digit + 1 if digit < ord("7") else digit - 1
    else:
        data[second + where] = (data[second + where] + delta) % 256
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(TarFormatError, match="checksum"):
        ours(bad)
