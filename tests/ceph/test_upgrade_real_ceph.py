"""The talos-upgrade flow with a real Ceph cluster behind the twin: real ok-to-stop, real noout, real recovery."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

M720Q = ["m720q-1", "m720q-2", "m720q-3"]
SLOW = {"node_ready": 15, "etcd": 10, "osds_up": 60, "ceph_clean": 120, "lock": 60, "upgrade": 60}


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def real_twin(ceph_installed: None, twin: Any, prefect_server: None) -> Any:
    # ceph_installed (tests/ceph/conftest.py) skips without the daemons, and fails instead in CI.
    return twin(ceph="real", reboot_seconds=0.5)


def upgrade(t: Any, tmp_path: Path, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from flows.talos_upgrade import Deadlines, state_result, talos_upgrade
    from twin.register import homelab_block

    name = f"twin-{uuid.uuid4().hex[:8]}"
    homelab_block(t).save(name, overwrite=True)
    state = talos_upgrade(homelab=name, require_approval=False, deadlines=Deadlines(**SLOW),
                          snapshot_dir=str(tmp_path / "snap"), return_state=True, **kw)
    return state, state_result(state)


def wait_stably_clean(t: Any, deadline: float, hold_s: float = 3.0) -> None:
    """Every PG active+clean for hold_s without a break (re-peering starts a moment after the change)."""
    from tasks.ceph import CephCli

    cli = CephCli(t.ceph.command, t.ceph.env())
    since = None
    while time.monotonic() < deadline:
        if cli.clean().ok:
            since = since or time.monotonic()
            if time.monotonic() - since >= hold_s:
                return
        else:
            since = None
        time.sleep(0.25)
    raise AssertionError("Ceph did not settle clean after the pool change")


def disruptions(t: Any, node: str) -> int:
    return sum(1 for d in t.record.intervals() if d.node == node)


def test_real_ceph_upgrade_rolls_three_nodes(real_twin, tmp_path):
    t = real_twin
    state, res = upgrade(t, tmp_path)
    assert state.is_completed(), res["error"]
    assert [n["action"] for n in res["nodes"]] == ["upgraded"] * 3
    assert res["max_disrupted"] == 1 and t.record.max_concurrent("m720q") == 1
    assert res["noout"] == "unset"
    assert "noout" not in t.ceph.ceph("osd", "dump", "-f", "json")
    assert t.ceph.health() == "HEALTH_OK"


def test_real_min_size_three_makes_ok_to_stop_refuse_before_any_node(real_twin, tmp_path):
    t = real_twin
    t.ceph.ceph("osd", "pool", "set", t.ceph.pool, "min_size", "3")
    wait_stably_clean(t, time.monotonic() + 90)  # the PGs re-peer; then clean again, but fragile
    state, res = upgrade(t, tmp_path)
    assert state.is_failed()
    assert res["error"].startswith("m720q-1: ceph ok-to-stop failed. Last seen: Ceph says stopping m720q-1's OSDs")
    assert [n["action"] for n in res["nodes"]] == ["failed", "not-started", "not-started"]
    assert t.record.intervals("m720q") == [] and res["noout"] == "untouched"


def test_real_osd_stopped_behind_the_flows_back_stops_before_the_next_node(real_twin, tmp_path):
    t = real_twin

    def stop_other_osd() -> None:
        if t.world.wait_for(lambda: t.world.node("m720q-1").talos_version == "v1.11.5", 60):
            t.ceph.node_down("m720q-3")

    th = threading.Thread(target=stop_other_osd, daemon=True)
    th.start()
    try:
        state, res = upgrade(t, tmp_path)
    finally:
        th.join(5)
        t.ceph.node_up("m720q-3")
    assert state.is_failed()
    actions = {n["name"]: n["action"] for n in res["nodes"]}
    assert actions["m720q-2"] in ("failed", "not-started") and actions["m720q-3"] == "not-started"
    assert disruptions(t, "m720q-2") == 0 and disruptions(t, "m720q-3") == 0
    assert "OSD" in res["error"] or "Ceph" in res["error"]
