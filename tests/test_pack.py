"""Packing: real tars round-trip the source; limits, workers, resume, no-op, rejects, bad roots."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import shards.pack.job
from shards.errors import DataError
from shards.labels import CHEXPERT_LABELS
from shards.pack import PackOptions, pack
from shards.pack.sources import read_chexpert

QUIET = {"print_": lambda _: None}


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} read with the standard library, independently of webdataset."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def all_samples(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        samples |= tar_samples(out / shard["name"])
    return samples


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def copy_source(root: Path, tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(root, source)
    return source


def test_round_trip(chexpert_root: Path, chexpert_shards: Path) -> None:
    manifest = json.loads((chexpert_shards / "manifest.json").read_text())
    source = read_chexpert(chexpert_root)
    by_key = {r.key: r for r in source.train_pool + source.test}
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        info = manifest["splits"][split]
        samples = all_samples(chexpert_shards, split)
        assert len(samples) == info["samples"] == sum(s["samples"] for s in info["shards"])
        for shard in info["shards"]:
            digest = hashlib.sha256((chexpert_shards / shard["name"]).read_bytes()).hexdigest()
            assert digest == shard["sha256"]
            assert (chexpert_shards / shard["name"]).stat().st_size == shard["bytes"]
        patients = set()
        for key, sample in samples.items():
            meta = json.loads(sample["json"])
            record = by_key[key]
            assert meta["labels"] == record.labels and meta["patient"] == record.patient
            assert meta["view"] == record.view and meta["split"] == split
            assert set(meta["labels"]) == set(CHEXPERT_LABELS)
            image = Image.open(io.BytesIO(sample["jpg"]))
            assert image.mode == "L" and min(image.size) == 64
            mask_file = (chexpert_root / "masks" / record.relpath).with_suffix(".png")
            assert ("mask.png" in sample) == mask_file.is_file()
            if "mask.png" in sample:
                mask = Image.open(io.BytesIO(sample["mask.png"]))
                assert mask.size == image.size and mask.mode == "I;16", "label bits survive the resize"
                source = np.asarray(Image.open(mask_file))
                assert set(np.unique(np.asarray(mask))) <= set(np.unique(source))
            assert not set(sample) - {"jpg", "json", "mask.png"}, "nothing but images, masks and JSON"
            patients.add(meta["patient"])
            assert seen.setdefault(meta["patient"], split) == split, "a patient in two splits"
        assert info["patients"] == len(patients)
    assert manifest["leakage"]["overlapping_patients"] == 0 and manifest["rejects"] == 0
    assert manifest["label_names"] == list(CHEXPERT_LABELS)
    total = sum(manifest["splits"][s]["samples"] for s in ("train", "val", "test"))
    assert total == len(by_key)


def test_manifest_prevalence_counts_raw_labels(chexpert_shards: Path) -> None:
    manifest = json.loads((chexpert_shards / "manifest.json").read_text())
    samples = all_samples(chexpert_shards, "train")
    prevalence = manifest["splits"]["train"]["prevalence"]
    for name in ("Cardiomegaly", "Pleural Effusion"):
        values = [json.loads(s["json"])["labels"][name] for s in samples.values()]
        counts = prevalence[name]
        assert [counts["pos"], counts["neg"], counts["uncertain"], counts["blank"]] == [
            values.count(1), values.count(0), values.count(-1), values.count(None)]


def test_shard_limits(chexpert_root: Path, tmp_path: Path) -> None:
    manifest = pack(PackOptions(layout="chexpert", root=chexpert_root, out=tmp_path / "n", size=48,
                                shard_samples=7), **QUIET)
    counts = [s["samples"] for split in manifest["splits"].values() for s in split["shards"]]
    assert max(counts) == 7 and sum(counts) == sum(split["samples"] for split in manifest["splits"].values())
    limit = 30_720  # three 10 KiB tar records
    manifest = pack(PackOptions(layout="chexpert", root=chexpert_root, out=tmp_path / "b", size=48,
                                shard_bytes=limit), **QUIET)
    sizes = [s["bytes"] for split in manifest["splits"].values() for s in split["shards"]]
    assert len(sizes) > 3 and max(sizes) <= limit


def test_workers_do_not_change_the_bytes(chexpert_root: Path, tmp_path: Path) -> None:
    for workers in (1, 2):
        pack(PackOptions(layout="chexpert", root=chexpert_root, out=tmp_path / f"w{workers}", size=48,
                         shard_samples=10, workers=workers), **QUIET)
    assert shard_digests(tmp_path / "w1") == shard_digests(tmp_path / "w2")


def test_interrupted_pack_resumes_to_the_same_bytes(chexpert_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"layout": "chexpert", "root": chexpert_root, "size": 48, "shard_samples": 10}
    pack(PackOptions(out=tmp_path / "clean", **options), **QUIET)

    real = shards.pack.job._encode_chunk
    calls = {"n": 0}

    def crash_on_third_chunk(*args: object, **kwargs: object) -> list:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C or a preemption looks like to the pack
        return real(*args, **kwargs)

    monkeypatch.setattr(shards.pack.job, "_encode_chunk", crash_on_third_chunk)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        pack(PackOptions(out=out, **options), **QUIET)
    assert not (out / "manifest.json").exists(), "an interrupted pack must not look finished"
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished, "shards finished before the crash are kept"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(shards.pack.job, "_encode_chunk", real)
    lines: list[str] = []
    pack(PackOptions(out=out, **options), print_=lines.append)
    assert any(line.startswith(f"resuming: {len(finished)} finished shard") for line in lines)
    assert shard_digests(out) == shard_digests(tmp_path / "clean")
    assert not (out / ".pack-journal.jsonl").exists()


def test_finished_pack_is_a_no_op_and_other_options_are_refused(chexpert_root: Path, tmp_path: Path) -> None:
    options = PackOptions(layout="chexpert", root=chexpert_root, out=tmp_path, size=48)
    pack(options, **QUIET)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    lines: list[str] = []
    pack(options, print_=lines.append)
    assert lines == [f"{tmp_path}: already packed with these options; nothing to do"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    with pytest.raises(DataError, match="other options"):
        pack(PackOptions(layout="chexpert", root=chexpert_root, out=tmp_path, size=40), **QUIET)
    manifest = pack(PackOptions(layout="chexpert", root=chexpert_root, out=tmp_path, size=40, overwrite=True),
                    **QUIET)
    assert manifest["image"]["size"] == 40


def test_a_changed_shard_is_repacked(chexpert_root: Path, tmp_path: Path) -> None:
    options = PackOptions(layout="chexpert", root=chexpert_root, out=tmp_path, size=48, shard_samples=20)
    pack(options, **QUIET)
    before = shard_digests(tmp_path)
    victim = tmp_path / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:1000])
    lines: list[str] = []
    pack(options, print_=lines.append)
    assert "train-000001.tar: missing or changed since packing; re-packing" in lines
    assert shard_digests(tmp_path) == before


def test_bad_inputs_are_rejected_and_counted(chexpert_root: Path, tmp_path: Path) -> None:
    source = copy_source(chexpert_root, tmp_path)
    base = source / "CheXpert-v1.0-small"
    with (base / "train.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    missing, corrupt, truncated = rows[1][0], rows[2][0], rows[3][0]
    (source / missing).unlink()
    (source / corrupt).write_bytes(b"this is not a jpeg")
    data = (source / truncated).read_bytes()
    (source / truncated).write_bytes(data[: len(data) // 3])
    bad_label = [rows[4][0].replace("view1", "view9"), *rows[4][1:-1], "yes"]
    with (base / "train.csv").open("a", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([bad_label, rows[5][:3]])
    lines: list[str] = []
    manifest = pack(PackOptions(layout="chexpert", root=source, out=tmp_path / "out", size=48),
                    print_=lines.append)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    kinds = sorted(r["kind"] for r in rejects)
    assert kinds == ["bad_label", "corrupt_image", "corrupt_image", "malformed_row", "missing_file"]
    assert manifest["rejects"] == 5 == sum(manifest["rejects_by_kind"].values())
    by_kind = {r["kind"]: r for r in rejects}
    assert by_kind["missing_file"]["where"] == missing and by_kind["corrupt_image"]["where"] == corrupt
    assert any(line.startswith("rejected 5 input(s)") for line in lines)
    packed = set().union(*(all_samples(tmp_path / "out", s) for s in ("train", "val", "test")))
    rejected_keys = {r["key"] for r in rejects if r["key"]}
    assert not packed & rejected_keys
    assert len(packed) == len(rows) - 1 + len(read_chexpert(source).test) - 3


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_lossless_formats(chexpert_root: Path, tmp_path: Path, fmt: str) -> None:
    manifest = pack(PackOptions(layout="chexpert", root=chexpert_root, out=tmp_path, size=48, fmt=fmt),
                    **QUIET)
    assert manifest["image"]["format"] == fmt
    sample = next(iter(all_samples(tmp_path, "test").values()))
    if fmt == "png":
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
    else:
        pixels = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    assert pixels.dtype == np.uint8 and pixels.ndim == 2 and min(pixels.shape) == 48


def test_pneumonia_pack(pneumonia_root: Path, pneumonia_shards: Path) -> None:
    manifest = json.loads((pneumonia_shards / "manifest.json").read_text())
    assert manifest["label_names"] == ["Pneumonia"] and manifest["leakage"]["overlapping_patients"] == 0
    files = list((pneumonia_root / "chest_xray").rglob("*.jpeg"))
    assert sum(manifest["splits"][s]["samples"] for s in ("train", "val", "test")) == len(files)
    test_keys = set(all_samples(pneumonia_shards, "test"))
    assert test_keys == {f"test-{p.parent.name}-{p.stem}" for p in files
                         if p.parts[-3] == "test"}
    for sample in all_samples(pneumonia_shards, "train").values():
        meta = json.loads(sample["json"])
        assert meta["labels"]["Pneumonia"] in (0, 1)
        assert ("mask.png" in sample) == (meta["labels"]["Pneumonia"] == 1)


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_cli_wrong_root_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_module("shards.pack", "--layout", "chexpert", "--root", str(tmp_path), "--out",
                        str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: --root")
    assert "train.csv" in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_pack_and_help(pneumonia_root: Path, tmp_path: Path) -> None:
    result = run_module("shards.pack", "--layout", "pneumonia", "--root", str(pneumonia_root), "--out",
                        str(tmp_path), "--size", "48", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "leakage: 0 patients in two splits" in result.stdout
    assert (tmp_path / "manifest.json").is_file() and (tmp_path / "rejects.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["test-000000.tar", "train-000000.tar",
                                                               "val-000000.tar"]
    for module in ("shards.pack", "shards.synth", "shards.demo"):
        help_text = run_module(module, "--help")
        assert help_text.returncode == 0 and "usage: python -m " + module in help_text.stdout
    bad = run_module("shards.pack", "--layout", "chexpert", "--root", ".", "--out", str(tmp_path),
                     "--quality", "0")
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid option value for --quality")
