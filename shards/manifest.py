"""manifest.json: what a pack wrote, read back by streams, the trainer and reports.

Stream code trusts the manifest's per-shard sample counts (to give every rank an exact share of
the eval set), so `load_manifest` checks its shape and fails with one line when it is unusable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shards.errors import DataError
from shards.labels import RawLabel

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
PREVALENCE_STATES: dict[RawLabel, str] = {1: "pos", 0: "neg", -1: "uncertain", None: "blank"}
"""How a split's `prevalence` counts name each raw label value: the pack writes them, the stream's
pos_weight reads them."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    samples: int
    bytes: int | None = None
    """The size the pack wrote (None in packs that did not record it)."""
    sha256: str | None = None
    """The checksum the pack wrote (None in packs that did not record it): shards/verify.py."""


@dataclass(frozen=True)
class Manifest:
    """The parts of manifest.json that streaming needs, validated."""

    root: Path
    data: dict

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.data["label_names"])

    @property
    def image_format(self) -> str:
        return self.data["image"]["format"]

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.data["splits"]:
            raise DataError(f"{self.root / MANIFEST}: no split {split!r} "
                            f"(have {', '.join(self.data['splits'])})")
        shards = [ShardInfo(self.root / s["name"], int(s["samples"]),
                            int(s["bytes"]) if s.get("bytes") is not None else None, s.get("sha256"))
                  for s in self.data["splits"][split]["shards"]]
        if not shards:
            raise DataError(f"{self.root / MANIFEST}: split {split!r} has no shards")
        return shards

    def samples(self, split: str, view: str = "all") -> int:
        info = self.data["splits"][split]
        return int(info["samples"]) if view == "all" else int(info["views"].get(view, 0))

    def prevalence(self, split: str) -> dict[str, dict[str, int]]:
        return self.data["splits"][split]["prevalence"]


def load_manifest(shards_dir: Path) -> Manifest:
    """Read and check SHARDS/manifest.json; one clear line if it is missing or malformed."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: missing (expected the output folder of `python -m shards.pack`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        version = data["format_version"]
        for split in data["splits"].values():
            for shard in split["shards"]:
                _ = shard["name"], int(shard["samples"])
                if shard.get("bytes") is not None:
                    int(shard["bytes"])
                if shard.get("sha256") is not None and not isinstance(shard["sha256"], str):
                    raise TypeError(f"{shard['name']}: sha256 is not a string")
        _ = data["label_names"], data["image"]["format"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from None
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version}, this cxrbench reads {FORMAT_VERSION}")
    return Manifest(Path(shards_dir), data)
