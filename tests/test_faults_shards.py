"""Shards changed under a run: the run refuses with one line naming the shard, before training, on
every rank, and a checkpoint never continues on another pack (trainer/packcheck.py, shards/verify.py).

Real parts throughout: packs written by shards.pack (copies of the session's chexpert_shards, so
the damage stays in this test's tmp_path), the trainer as a subprocess (plain python, or
`accelerate launch` with two gloo ranks), and the changed shard at resume as an
`sbatch launch/h100_8gpu.sh` job on the local SLURM (tests/slurm_cluster.py). Nothing is mocked.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from shards.errors import DataError
from shards.manifest import load_manifest
from shards.pack import PackOptions, pack
from shards.verify import CHANGED_HINT, check_shard, pack_identity
from tests.slurm_cluster import LocalSlurm
from tests.test_launch import CPU_ALLOCATION, LAUNCH, job_env
from tests.trainer_helpers import DEMO, ROOT, records, train
from trainer import rundir
from trainer.packcheck import agree, my_checks

FAST = ["data.batch_size=4", "data.workers=0", "optim.epochs=1", "run.log_every=1", "optim.warmup_epochs=0"]
"""One short epoch (chexpert_shards: ~70 train images, 4 train shards)."""
TIMEOUT = 300


def copy_pack(shards: Path, to: Path) -> Path:
    shutil.copytree(shards, to)
    return to


def repack(root: Path, out: Path, salt: str) -> Path:
    """The fixture's source packed as conftest packs it, with another split salt: other shards."""
    pack(PackOptions(layout="chexpert", root=root, out=out, size=64, shard_samples=16, val_fraction=0.2,
                     workers=1, salt=salt), print_=lambda _: None)
    return out


def entry(shards: Path, name: str) -> dict:
    """A shard's manifest entry, read straight from the file the pack wrote."""
    manifest = json.loads((shards / "manifest.json").read_text())
    return next(s for split in manifest["splits"].values() for s in split["shards"] if s["name"] == name)


def flip_byte(path: Path, offset: int = 3000) -> None:
    """Change one byte in place: same size, other sha256 (offset 3000 is inside the first sample)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int = 10240) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def one_line(shard: Path, problem: str, more: int = 0) -> str:
    tail = f", and {more} more shard(s) fail the check" if more else ""
    return f"error: {shard}: {problem}{tail} ({CHANGED_HINT})"


# --- one shard against its manifest entry (fast) -----------------------------------------------------


def test_check_shard_finds_each_damage_and_size_mode_skips_the_hash(chexpert_shards: Path,
                                                                    tmp_path: Path) -> None:
    pack_dir = copy_pack(chexpert_shards, tmp_path / "pack")
    shards = {s.path.name: s for s in load_manifest(pack_dir).shards("train")}
    names = sorted(shards)
    assert len(names) >= 4
    assert all(check_shard(shards[name], "sha256") is None for name in names), "an intact pack passes"
    flip_byte(pack_dir / names[0])
    (pack_dir / names[1]).unlink()
    truncate(pack_dir / names[2])
    recorded = entry(chexpert_shards, names[2])["bytes"]
    for mode in ("sha256", "size"):
        assert check_shard(shards[names[1]], mode) == "missing"
        assert check_shard(shards[names[2]], mode) == f"10240 bytes, manifest.json says {recorded}"
        assert check_shard(shards[names[3]], mode) is None
    assert check_shard(shards[names[0]], "sha256") == "sha256 does not match manifest.json"
    assert check_shard(shards[names[0]], "size") is None, "size mode reads no bytes"


def test_a_manifest_without_sizes_or_checksums_gets_the_existence_check(chexpert_shards: Path,
                                                                      tmp_path: Path) -> None:
    """Packs written before manifests recorded bytes and sha256."""
    pack_dir = copy_pack(chexpert_shards, tmp_path / "pack")
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["bytes"], shard["sha256"]
    (pack_dir / "manifest.json").write_text(json.dumps(manifest))
    first, second = load_manifest(pack_dir).shards("train")[:2]
    flip_byte(first.path)
    truncate(first.path)
    second.path.unlink()
    assert check_shard(first, "sha256") is None
    assert check_shard(second, "sha256") == "missing"


def test_pack_identity_follows_the_data_not_the_path_or_the_packing_time(
        chexpert_root: Path, chexpert_shards: Path, tmp_path: Path) -> None:
    original = pack_identity(load_manifest(chexpert_shards))
    copy = copy_pack(chexpert_shards, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["created"], manifest["command"] = "2030-01-01T00:00:00+0000", "re-packed elsewhere"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert pack_identity(load_manifest(copy)) == original
    other = repack(chexpert_root, tmp_path / "other-salt", salt="another split")
    assert pack_identity(load_manifest(other)) != original
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert pack_identity(load_manifest(copy)) != original, "one shard's checksum changes the identity"


def test_hashing_is_spread_over_ranks_and_every_node_checks_every_shard() -> None:
    """2 nodes × 3 ranks, 14 shards: each shard hashed by exactly one rank; on each node every
    shard checked by one of its ranks (hashed there, or existence and size)."""
    shards, world, per_node = 14, 6, 3
    plans = {rank: my_checks(shards, "sha256", rank, world, rank % per_node, per_node)
             for rank in range(world)}
    hashed = [i for plan in plans.values() for i, how in plan.items() if how == "sha256"]
    assert sorted(hashed) == list(range(shards))
    for node in range(world // per_node):
        ranks = range(node * per_node, (node + 1) * per_node)
        checked = [i for rank in ranks for i in plans[rank]]
        assert sorted(checked) == list(range(shards)), f"node {node} checks each shard once"
    loads = [sum(1 for how in plan.values() if how == "sha256") for plan in plans.values()]
    assert max(loads) - min(loads) <= 1
    size_only = my_checks(shards, "size", 4, world, 1, per_node)
    assert set(size_only.values()) == {"size"} and sorted(size_only) == list(range(1, shards, per_node))


def test_ranks_agree_on_the_first_bad_shard_and_on_the_pack(chexpert_shards: Path) -> None:
    manifest = load_manifest(chexpert_shards)
    shards = manifest.shards("train") + manifest.shards("val")
    same = pack_identity(manifest)
    reports = [{"rank": 0, "identity": same, "problems": [(5, "missing")]},
               {"rank": 1, "identity": same, "problems": [(2, "sha256 does not match manifest.json")]}]
    with pytest.raises(DataError) as raised:
        agree(reports, shards, manifest)
    assert f"error: {raised.value}" == one_line(shards[2].path, "sha256 does not match manifest.json", more=1)
    reports[1] = {"rank": 1, "identity": "f" * 64, "problems": []}
    with pytest.raises(DataError, match="rank 1 reads another pack than rank 0"):
        agree(reports, shards, manifest)


# --- the trainer: refusals before training ----------------------------------------------------------


def assert_refused_before_training(run_dir: Path) -> None:
    assert not records(run_dir, "train", running=True), "no training step was taken"
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / rundir.PACK).exists(), "a pack that failed its check is not recorded"


@pytest.mark.slow
def test_changed_shard_two_ranks_refuse_with_the_same_line(chexpert_shards: Path, tmp_path: Path) -> None:
    """Same size, other bytes: only the checksum can tell. Both ranks print the line and exit 2."""
    pack_dir = copy_pack(chexpert_shards, tmp_path / "pack")
    victim = pack_dir / "train-000003.tar"
    flip_byte(victim)
    assert victim.stat().st_size == entry(chexpert_shards, victim.name)["bytes"]
    run_dir = tmp_path / "run"
    result = train(DEMO, [f"data.shards={pack_dir}", f"run.dir={run_dir}", *FAST], processes=2,
                   timeout=TIMEOUT)
    assert result.returncode != 0
    line = one_line(victim, "sha256 does not match manifest.json")
    assert result.stderr.splitlines().count(line) == 2, result.stderr[-3000:]
    assert len(re.findall(r"exitcode\s*:\s*2 ", result.stderr)) == 2, "both ranks exit 2"
    assert_refused_before_training(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sha256", "size"])
def test_verify_modes_on_a_flipped_a_missing_and_a_truncated_shard(chexpert_shards: Path, tmp_path: Path,
                                                                  mode: str) -> None:
    """sha256 stops at the first shard (flipped); size mode never hashes, so it passes the flipped
    shard and stops at the missing one, still counting the truncated one."""
    pack_dir = copy_pack(chexpert_shards, tmp_path / "pack")
    flip_byte(pack_dir / "train-000000.tar")
    (pack_dir / "train-000001.tar").unlink()
    truncate(pack_dir / "train-000002.tar")
    run_dir = tmp_path / "run"
    result = train(DEMO, [f"data.shards={pack_dir}", f"run.dir={run_dir}", f"data.verify_shards={mode}",
                          *FAST], timeout=TIMEOUT)
    assert result.returncode == 2
    expected = {"sha256": one_line(pack_dir / "train-000000.tar", "sha256 does not match manifest.json", 2),
                "size": one_line(pack_dir / "train-000001.tar", "missing", 1)}[mode]
    assert result.stderr.strip() == expected
    assert_refused_before_training(run_dir)


# --- the trainer: resuming ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(chexpert_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory, its pack): one epoch on two ranks, ending in a checkpoint; shared read-only
    (tests resume copies of it)."""
    base = tmp_path_factory.mktemp("trained")
    pack_dir = copy_pack(chexpert_shards, base / "pack")
    run_dir = base / "run"
    result = train(DEMO, [f"data.shards={pack_dir}", f"run.dir={run_dir}", *FAST], processes=2,
                   timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "verified by sha256 on 2 process(es)" in result.stdout
    record = json.loads((run_dir / rundir.PACK).read_text())
    assert record["shards"] == str(pack_dir) and record["identity"] == pack_identity(load_manifest(pack_dir))
    return run_dir, pack_dir


def copy_run(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    run_dir = shutil.copytree(trained[0], tmp_path / "run")
    assert list((run_dir / "checkpoints").glob("step-*"))
    return run_dir


@pytest.mark.slow
def test_missing_shard_at_resume_is_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir = copy_run(trained, tmp_path)
    before = (run_dir / rundir.METRICS).read_text()
    pack_dir = copy_pack(trained[1], tmp_path / "pack")
    (pack_dir / "train-000002.tar").unlink()
    result = train(DEMO, [f"data.shards={pack_dir}", f"run.dir={run_dir}", "run.resume=auto", *FAST],
                   timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.strip() == one_line(pack_dir / "train-000002.tar", "missing")
    assert "resumed from" not in result.stdout
    assert (run_dir / rundir.METRICS).read_text() == before, "nothing logged"


@pytest.mark.slow
def test_resume_on_another_pack_is_refused_and_on_a_copy_continues(
        trained: tuple[Path, Path], chexpert_root: Path, tmp_path: Path) -> None:
    run_dir = copy_run(trained, tmp_path)
    before = (run_dir / rundir.METRICS).read_text()
    other = tmp_path / "other"
    repack(chexpert_root, other, salt="re-split")
    result = train(DEMO, [f"data.shards={other}", f"run.dir={run_dir}", "run.resume=auto", *FAST],
                   timeout=TIMEOUT)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith(f"error: {run_dir / rundir.PACK}: "), line
    assert f"at {trained[1]} (identity " in line and f"data.shards={other} holds another pack" in line
    assert (run_dir / rundir.METRICS).read_text() == before, "nothing logged"

    copy = copy_pack(trained[1], tmp_path / "copy")  # the same pack at another path: the same data
    result = train(DEMO, [f"data.shards={copy}", f"run.dir={run_dir}", "run.resume=auto", *FAST],
                   processes=2, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in result.stdout
    assert json.loads((run_dir / rundir.PACK).read_text())["shards"] == str(trained[1]), "the record stays"


@pytest.mark.slow
def test_sbatch_changed_shard_at_resume_fails_once_without_requeue(
        slurm: LocalSlurm, trained: tuple[Path, Path], tmp_path: Path) -> None:
    """The same fault through the launch script a cluster runs (2 gloo ranks on a CPU allocation):
    the job ends FAILED, is not requeued, and its log holds the line from each rank."""
    run_dir = copy_run(trained, tmp_path)
    before = (run_dir / rundir.METRICS).read_text()
    pack_dir = copy_pack(trained[1], tmp_path / "pack")
    victim = pack_dir / "val-000000.tar"
    flip_byte(victim)
    job = slurm.sbatch([*CPU_ALLOCATION, str(LAUNCH / "h100_8gpu.sh")],
                       env=job_env(DEMO, run_dir, pack_dir, " ".join(FAST)), cwd=ROOT)
    info = slurm.wait(job, timeout=TIMEOUT)
    log = LocalSlurm.log(job)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), log[-3000:]
    assert log.splitlines().count(one_line(victim, "sha256 does not match manifest.json")) == 2, log[-3000:]
    assert "resumed from" not in log and "requeueing" not in log
    assert (run_dir / rundir.METRICS).read_text() == before, "nothing logged"
