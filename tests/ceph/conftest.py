"""The real Ceph cluster of the ceph tests: one per session (3 mons, 2 mgrs, 3 OSDs: ~15-25 s to start, ~0.9 GB)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tasks.ceph import CephCli
from twin.ceph_real import INSTALL_HINT, RealCeph, missing_daemons

HOSTS = ["m720q-1", "m720q-2", "m720q-3"]


@pytest.fixture(scope="session")
def ceph_installed(require_package: Callable[[str], None]) -> None:
    """Skip without the Debian daemons; in CI (CI=true) their absence is a failure."""
    missing = missing_daemons()
    if missing:
        require_package(f"real Ceph tests need {', '.join(missing)}: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def real_ceph(tmp_path_factory: pytest.TempPathFactory, ceph_installed: None) -> Iterator[RealCeph]:
    cluster = RealCeph(tmp_path_factory.mktemp("ceph") / "cluster", HOSTS)
    try:
        cluster.start()
        print(f"\nreal Ceph cluster HEALTH_OK after {cluster.start_seconds} s")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cli(real_ceph: RealCeph) -> CephCli:
    return CephCli(real_ceph.command, real_ceph.env(), timeout_s=15)
