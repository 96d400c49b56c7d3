"""Session-wide synthetic datasets and packs: generated once, shared read-only by the tests.

Tests that damage data (corrupt files, interrupted packs) copy these first, into their own tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.pack import PackOptions, pack
from shards.synth import ChexpertOptions, PneumoniaOptions, generate_chexpert, generate_pneumonia

SIZE = 96
"""Small images keep the suite fast; every code path is the same at 320 px."""


@pytest.fixture(scope="session")
def chexpert_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CheXpert-v1.0-small tree: 40 train patients (~90 images), 6 valid patients."""
    root = tmp_path_factory.mktemp("chexpert-src")
    generate_chexpert(ChexpertOptions(out=root, patients=40, valid_patients=6, size=SIZE, seed=7))
    return root


@pytest.fixture(scope="session")
def pneumonia_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pneumonia-src")
    generate_pneumonia(PneumoniaOptions(out=root, patients=40, size=SIZE, seed=7))
    return root


def _pack(layout: str, root: Path, out: Path) -> Path:
    """Small shards (16 samples) so ranks × workers always have several to split."""
    pack(PackOptions(layout=layout, root=root, out=out, size=64, shard_samples=16, val_fraction=0.2,
                     workers=1), print_=lambda _: None)
    return out


@pytest.fixture(scope="session")
def chexpert_shards(chexpert_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack("chexpert", chexpert_root, tmp_path_factory.mktemp("chexpert-shards"))


@pytest.fixture(scope="session")
def pneumonia_shards(pneumonia_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack("pneumonia", pneumonia_root, tmp_path_factory.mktemp("pneumonia-shards"))
