"""The writing half of `shards`: a dataset tree on disk → WebDataset tar shards + manifest.json.

In the order a pack runs: `sources` (read records) → `split` (by patient, leakage audit) →
`encode` (source image → the bytes a shard stores) → `shardio` (crash-safe tar files, resume
journal) → `job` (all of it, resumable). `python -m shards.pack` is the command line. What a pack
writes is read back by the other half, `shards.stream`.
"""

from shards.pack.job import PackOptions, pack

__all__ = ["PackOptions", "pack"]
