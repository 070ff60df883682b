"""The `twin` fixture: a factory that starts the simulated homelab in-process and stops it after the test.

    def test_x(twin):
        t = twin(state="synced", faults=["upgrade-fails=m720q-2"], reboot_seconds=0.3)

Knobs default to fast ones for tests. Teardown asserts that nothing the twin started is left running.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# tests/twin/ (no __init__.py) would otherwise shadow the twin package as a namespace package.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
TREE = REPO / "k8s"
# Short knobs: a dependent Kustomization is requeued after 0.5 s, not kustomize-controller's 30 s.
FAST = {"reboot_seconds": 0.2, "recovery_seconds": 0.1, "flux_delay_seconds": 0.05, "requeue_dependency_seconds": 0.5}


def missing_package(message: str) -> None:
    """A system package a test needs is not installed: skip with the install hint, except in CI
    (CI=true), where every test must run and its absence is a failure."""
    import os

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: these tests must run, not skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def require_package() -> Callable[[str], None]:
    """missing_package for fixtures in other directories, which cannot import this conftest."""
    return missing_package


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    from twin import Knobs, Twin

    if not (TREE / "clusters").is_dir():
        pytest.skip(f"the GitOps tree {TREE} is not there yet")
    started: list[Any] = []
    threads_before = set(threading.enumerate())

    def make(state: str = "pre-upgrade", faults: tuple[str, ...] | list[str] = (), ceph: str = "sim",
             **knobs: float) -> Any:
        t = Twin(TREE, tmp_path / f"twin{len(started)}", state=state, faults=faults,
                 knobs=Knobs(**{**FAST, **knobs}), ceph=ceph)
        started.append(t)
        return t.start()

    yield make
    for t in started:
        t.stop()
        assert not t.stop_leftovers, f"twin parts still running after stop(): {t.stop_leftovers}"
        assert t.proxmox is None or not t.proxmox.running, "the fake Proxmox process outlived stop()"
    # Server connection threads end just after their socket closes; give them a moment.
    deadline_threads = [th for th in threading.enumerate() if th not in threads_before
                        and th.name.startswith(("twin-", "kubeapi", "fake-proxmox"))]
    for th in deadline_threads:
        th.join(2.0)
    alive = [th.name for th in deadline_threads if th.is_alive()]
    assert not alive, f"threads of the twin still alive after stop(): {alive}"
