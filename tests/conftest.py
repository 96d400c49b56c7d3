"""Session-wide synthetic datasets and packs: generated once, shared read-only by the tests.

Tests that damage data (corrupt files, interrupted packs) copy these first, into their own tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.pack import PackOptions, pack
from shards.synth import (
    ChexpertOptions,
    MimicOptions,
    NihOptions,
    PneumoniaOptions,
    generate_chexpert,
    generate_mimic,
    generate_nih,
    generate_pneumonia,
)

pytest_plugins = ["tests.slurm_fixtures"]  # the `slurm` and `two_nodes` clusters

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


NIH_FOLDER_IMAGES = 40
"""Images per images_NNN/ folder in the NIH fixture (10,000 in the download): several folders."""


@pytest.fixture(scope="session")
def nih_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic NIH ChestX-ray14 (Kaggle flavour) at 64 px: 40 patients, ~100 images in 3
    images_NNN/ folders, 8 test patients; BBox_List_2017.csv boxes every boxed finding drawn on a
    test image (about a third of them)."""
    root = tmp_path_factory.mktemp("nih-src")
    generate_nih(NihOptions(out=root, patients=40, size=64, seed=7, folder_images=NIH_FOLDER_IMAGES,
                            box_fraction=1.0))
    return root


@pytest.fixture(scope="session")
def mimic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic MIMIC-CXR-JPG 2.0.0 at 64 px: 32 subjects, ~110 images (4 test, 4 validate subjects)."""
    root = tmp_path_factory.mktemp("mimic-src")
    generate_mimic(MimicOptions(out=root, patients=32, size=64, seed=7))
    return root


@pytest.fixture(scope="session")
def nih_shards(nih_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack("nih", nih_root, tmp_path_factory.mktemp("nih-shards"))


@pytest.fixture(scope="session")
def mimic_shards(mimic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack("mimic", mimic_root, tmp_path_factory.mktemp("mimic-shards"))


# A larger synthetic CheXpert (400 patients) where a tiny model has something to learn: the
# trainer, sweep and explain tests share it.
@pytest.fixture(scope="session")
def learn_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("learn-src")
    generate_chexpert(ChexpertOptions(out=root, patients=400, size=128, seed=0))
    return root


def pack_to(root: Path, out: Path) -> Path:
    pack(PackOptions(layout="chexpert", root=root, out=out, size=96, shard_samples=128, workers=2),
         print_=lambda _: None)
    return out


@pytest.fixture(scope="session")
def learn_shards(learn_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_to(learn_source, tmp_path_factory.mktemp("learn-shards"))


@pytest.fixture(scope="session")
def cnn_run(learn_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo CNN trained 3 epochs on two processes, tested at the end: shared read-only by the
    trainer tests that read a finished run and the explain tests that score its heatmaps."""
    from tests.trainer_helpers import DEMO, train

    run_dir = tmp_path_factory.mktemp("cnn-run") / "cnn"
    result = train(DEMO, [f"data.shards={learn_shards}", f"run.dir={run_dir}", "optim.epochs=3"], processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir
