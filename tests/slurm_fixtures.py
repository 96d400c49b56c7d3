"""The real local SLURM clusters the launch and fault tests submit to (tests/slurm_cluster.py), as
pytest fixtures: `slurm` (this host as one node, on loopback) and `two_nodes` (two nodes, each
slurmd in its own network namespace). Module-scoped: a test file starts its own cluster and
stops it when its tests are done. Registered for every test file by tests/conftest.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import typing
from collections.abc import Iterator

import pytest

from tests.slurm_cluster import LocalSlurm, missing_binaries

RESOURCE_FREE = "CXR_REQUIRE_SLURM"
"""Set (as .ci/run does) to fail instead of skip when SLURM cannot be started here."""


def unavailable(why: str) -> typing.NoReturn:
    """Skip a test that needs what this machine lacks; fail it where it must run (CI)."""
    if os.environ.get(RESOURCE_FREE) == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    why = None
    if missing := missing_binaries():
        why = f"SLURM/munge not installed ({', '.join(missing)}): apt-get install slurm-wlm munge"
    elif os.geteuid() != 0:
        why = "the local SLURM needs root (slurmd starts jobs as the submitting user)"
    if why:
        unavailable(why)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def two_nodes(slurm: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """Two real SLURM nodes on this machine: each slurmd in its own network namespace."""
    if not (shutil.which("ip") and shutil.which("nsenter")):
        unavailable("needs iproute2 (ip) and nsenter for network namespaces")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm2"), namespaces=2)
    try:
        cluster.start()
    except subprocess.CalledProcessError as err:  # no CAP_NET_ADMIN in this container
        cluster.stop()
        unavailable(f"cannot create network namespaces here: {err.stderr.decode(errors='replace').strip()}")
    try:
        yield cluster
    finally:
        cluster.stop()
