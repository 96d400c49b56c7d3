"""The pack a run reads is the pack it started with: checked before training, on every rank.

Two faults, one rule (training never mixes two packs without a word):
- **A shard changed under the run** (rewritten, truncated, deleted): `verify_pack` checks every
  shard of the splits the run reads against manifest.json (data.verify_shards: sha256 or size).
  Hashing a full CheXpert pack reads tens of GB, so shard i is hashed by global rank i % world
  (the ranks read the same shared file system); existence and size are checked on every node,
  split over its local ranks, so a node whose copy lacks a shard is caught too. The ranks
  all-gather what they found, and every rank stops with the same one line naming the first bad
  shard (in split order, then manifest order).
- **A checkpoint resumed on another pack** (data.shards now names a different pack):
  `same_pack` compares the pack's identity with RUN/pack.json, which records the pack the run's
  checkpoints were trained on (written when a run starts from scratch; trainer/rundir.py).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from shards.errors import DataError
from shards.manifest import MANIFEST, Manifest, ShardInfo, load_manifest
from shards.verify import VerifyMode, check_shard, describe, pack_identity
from trainer import rundir
from trainer.config import Config
from trainer.rundir import RunDirError


def read_splits(cfg: Config) -> tuple[str, ...]:
    """The splits a training run reads: train, val, and test when it is tested at the end."""
    return ("train", "val", "test") if cfg.run.test_at_end else ("train", "val")


def my_checks(count: int, mode: VerifyMode, rank: int, world: int, local_rank: int,
              local_world: int) -> dict[int, VerifyMode]:
    """Which of `count` shards this rank checks, and how: shard i hashed by global rank i % world,
    else its existence and size by local rank i % local_world (torchrun numbers a node's ranks
    contiguously, so that is the hashing rank on its own node and every node checks every shard)."""
    mine: dict[int, VerifyMode] = {}
    for index in range(count):
        if mode == "sha256" and index % world == rank:
            mine[index] = "sha256"
        elif index % local_world == local_rank:
            mine[index] = "size"
    return mine


def _on_this_node(accelerator: Accelerator) -> tuple[int, int]:
    """(local rank, processes on this node), from torchrun's LOCAL_WORLD_SIZE (accelerate launch
    starts through it); without it, as if every process shared one node."""
    declared = os.environ.get("LOCAL_WORLD_SIZE", "")
    if declared.isdigit() and int(declared) > 0:
        return accelerator.local_process_index, int(declared)
    return accelerator.process_index, accelerator.num_processes


def verify_pack(cfg: Config, accelerator: Accelerator) -> None:
    """Collective: every rank calls it before training; all stop with the same line, or none does."""
    manifest = load_manifest(Path(cfg.data.shards))
    shards = [shard for split in read_splits(cfg) for shard in manifest.shards(split)]
    local_rank, local_world = _on_this_node(accelerator)
    mine = my_checks(len(shards), cfg.data.verify_shards, accelerator.process_index,
                     accelerator.num_processes, local_rank, local_world)
    started = time.perf_counter()
    with ThreadPoolExecutor(max(1, cfg.data.workers)) as pool:  # the loader's cores are idle yet
        found = pool.map(lambda index: check_shard(shards[index], mine[index]), list(mine))
        problems = [(index, problem) for index, problem in zip(mine, found, strict=True) if problem]
    hashed = sum(shards[i].bytes or 0 for i, how in mine.items() if how == "sha256")
    report = {"rank": accelerator.process_index, "identity": pack_identity(manifest), "problems": problems,
              "seconds": time.perf_counter() - started, "hashed": hashed}
    reports = gather_object([report]) if accelerator.num_processes > 1 else [report]
    agree(reports, shards, manifest)
    accelerator.print(summary(cfg, shards, reports))


def summary(cfg: Config, shards: list[ShardInfo], reports: list[dict]) -> str:
    """One line: what was verified, how, and how long it took (the slowest rank's time)."""
    slowest = max(r["seconds"] for r in reports)
    total = sum(shard.bytes or 0 for shard in shards)
    line = (f"data.shards: {len(shards)} shards ({total / 1e6:.1f} MB) of {', '.join(read_splits(cfg))} "
            f"verified by {cfg.data.verify_shards} on {len(reports)} process(es) in {slowest:.3g} s")
    if cfg.data.verify_shards == "sha256":
        line += f" ({sum(r['hashed'] for r in reports) / 1e6 / max(slowest, 1e-9):.0f} MB/s hashed)"
    return line


def agree(reports: list[dict], shards: list[ShardInfo], manifest: Manifest) -> None:
    """The same verdict on every rank, from everyone's reports."""
    identities = {r["identity"] for r in reports}
    if len(identities) > 1:
        first = reports[0]
        other = next(r for r in reports if r["identity"] != first["identity"])
        raise DataError(f"{manifest.root / MANIFEST}: rank {other['rank']} reads another pack than rank "
                        f"{first['rank']} (identity {other['identity'][:12]} vs {first['identity'][:12]}): "
                        "every node must see the same data.shards")
    problems = sorted(problem for r in reports for problem in r["problems"])
    if problems:
        index, problem = problems[0]
        raise DataError(describe(shards[index], problem, others=len(problems) - 1))


def pack_record(shards_dir: Path) -> dict:
    """What RUN/pack.json holds about a pack (rundir.py's layout)."""
    manifest = load_manifest(shards_dir)
    return {"shards": str(shards_dir.resolve()), "identity": pack_identity(manifest),
            "dataset": manifest.data.get("dataset"),
            "shards_count": sum(len(split["shards"]) for split in manifest.data["splits"].values()),
            "samples": sum(int(split.get("samples", 0)) for split in manifest.data["splits"].values())}


def same_pack(cfg: Config, resume_from: Path | None, accelerator: Accelerator) -> None:
    """Collective: record the pack when the run starts from scratch (`resume_from` None); refuse to
    resume a checkpoint that was trained on another pack. Rank 0 decides, every rank stops alike."""
    verdict: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            verdict[0] = _check_and_record(Path(cfg.run.dir), Path(cfg.data.shards), resume_from,
                                           accelerator)
        except (DataError, RunDirError) as err:
            verdict[0] = str(err)
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict)
    if verdict[0]:
        raise DataError(verdict[0])


def _check_and_record(run_dir: Path, shards_dir: Path, resume_from: Path | None,
                      accelerator: Accelerator) -> str | None:
    current = pack_record(shards_dir)
    trained_in = rundir.run_of_checkpoint(resume_from) if resume_from is not None else None
    recorded = rundir.read_pack(trained_in) if trained_in is not None else None
    if recorded is not None and recorded["identity"] != current["identity"]:
        return (f"{trained_in / rundir.PACK}: the checkpoint {resume_from.name} was trained on the pack at "
                f"{recorded['shards']} (identity {recorded['identity'][:12]}), but data.shards="
                f"{current['shards']} holds another pack (identity {current['identity'][:12]}): resume "
                f"with data.shards={recorded['shards']} (or an identical copy), or train in a new run.dir")
    if resume_from is None or rundir.read_pack(run_dir) is None:
        if resume_from is not None and recorded is None:
            accelerator.print(f"{run_dir / rundir.PACK}: no record of the pack {resume_from} was trained on "
                              f"(a run from before pack records); recording {current['shards']}")
        rundir.write_pack(run_dir, current)
    return None
