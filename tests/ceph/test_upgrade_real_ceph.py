"""The talos-upgrade flow with a real Ceph cluster behind the twin, shaped like the homelab's (3 mons,
2 mgrs, one OSD per node): real ok-to-stop, real mon quorum, real noout, real recovery, a real mgr
failover when the node of the active mgr reboots.

One real twin serves the whole module (a real cluster costs ~15 s to start): each test rewinds the
simulated nodes to the old Talos version and gets the cluster back to clean, with every daemon up.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from twin.state import PRE_UPGRADE_TALOS

pytestmark = pytest.mark.ceph

REPO = Path(__file__).resolve().parents[2]
M720Q = ["m720q-1", "m720q-2", "m720q-3"]
SLOW = {"node_ready": 15, "etcd": 10, "osds_up": 60, "ceph_clean": 120, "lock": 60, "upgrade": 60}


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def shared_twin(ceph_installed: None, prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # ceph_installed (tests/ceph/conftest.py) skips without the daemons, and fails instead in CI.
    from twin import Knobs, Twin

    t = Twin(REPO / "k8s", tmp_path_factory.mktemp("real-upgrade"), ceph="real",
             knobs=Knobs(reboot_seconds=0.5, recovery_seconds=0.1, flux_delay_seconds=0.05))
    try:
        yield t.start()
    finally:
        t.stop()
    assert not t.stop_leftovers, t.stop_leftovers


@pytest.fixture
def real_twin(shared_twin: Any) -> Any:
    """The shared twin, rewound: nodes at the old Talos version, every Ceph daemon up, the cluster clean."""
    t = shared_twin
    with t.world.lock:
        for n in t.world.clusters["m720q"].nodes.values():
            t.world.update(n, talos_version=PRE_UPGRADE_TALOS)
    for host in M720Q:
        t.ceph.node_up(host)
    ceph(t, "health", "unmute", "MON_DOWN", check=False)
    ceph(t, "osd", "pool", "set", t.ceph.pool, "min_size", "2")
    for flag in ("noout",):
        ceph(t, "osd", "unset", flag)
    ceph(t, "config-key", "rm", "homelab/noout-owner")
    wait_stably_clean(t, time.monotonic() + 120)
    return t


def ceph(t: Any, *args: str, check: bool = True) -> str:
    import subprocess

    proc = subprocess.run(["ceph", "--connect-timeout", "20", *args], env={**os.environ, **t.ceph.env()},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc.stdout


def upgrade(t: Any, tmp_path: Path, deadlines: dict[str, float] | None = None, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from flows.talos_upgrade import Deadlines, state_result, talos_upgrade
    from twin.register import homelab_block

    name = f"twin-{uuid.uuid4().hex[:8]}"
    homelab_block(t).save(name, overwrite=True)
    state = talos_upgrade(homelab=name, require_approval=False, deadlines=Deadlines(**{**SLOW, **(deadlines or {})}),
                          snapshot_dir=str(tmp_path / "snap"), return_state=True, **kw)
    return state, state_result(state)


def wait_stably_clean(t: Any, deadline: float, hold_s: float = 3.0) -> None:
    """Every PG active+clean, every mon in quorum, for hold_s without a break (re-peering and a mon's
    rejoining start a moment after the change)."""
    from tasks.ceph import CephCli, CephError

    cli = CephCli(t.ceph.command, t.ceph.env())
    since = None
    last = ""
    while time.monotonic() < deadline:
        try:
            v = cli.clean()
            last = v.reason
        except CephError as e:
            v, last = None, str(e)
        if v is not None and v.ok:
            since = since or time.monotonic()
            if time.monotonic() - since >= hold_s:
                return
        else:
            since = None
        time.sleep(0.25)
    raise AssertionError(f"Ceph did not settle clean; last seen: {last}")


def disruptions(t: Any, node: str) -> int:
    return sum(1 for d in t.record.intervals() if d.node == node)


def test_real_ceph_upgrade_rolls_three_nodes(real_twin, tmp_path):
    t = real_twin
    before = len(t.record.intervals("m720q"))
    state, res = upgrade(t, tmp_path)
    assert state.is_completed(), res["error"]
    assert [n["action"] for n in res["nodes"]] == ["upgraded"] * 3
    assert res["max_disrupted"] == 1 and t.record.max_concurrent("m720q") == 1
    assert len(t.record.intervals("m720q")) == before + 3
    assert res["noout"] == "unset"
    assert "noout" not in json.loads(ceph(t, "osd", "dump", "-f", "json"))["flags"]
    # m720q-1's reboot took the active mgr with it: the mon failed it over when it came back.
    assert t.ceph.active_mgr() in ("a", "b")
    assert t.ceph.health() == "HEALTH_OK"


def test_real_mon_down_with_mon_down_muted_refuses_the_node(real_twin, tmp_path):
    t = real_twin
    t.ceph.daemon_down("mon.c")
    # The other mons notice a stopped mon only after their lease timeouts and an election (10-30 s).
    deadline = time.monotonic() + 90
    while "MON_DOWN" not in json.loads(ceph(t, "health", "-f", "json"))["checks"]:
        assert time.monotonic() < deadline, "MON_DOWN never raised after stopping mon.c"
        time.sleep(0.5)
    ceph(t, "health", "mute", "MON_DOWN")
    assert t.ceph.health() == "HEALTH_OK"  # what a health-only gate would see
    before = disruptions(t, "m720q-3")
    try:
        state, res = upgrade(t, tmp_path, nodes=["m720q-3"])
    finally:
        t.ceph.daemon_up("mon.c")
    assert state.is_failed(), res
    assert "only 2 of 3 mons in quorum" in res["error"], res["error"]
    assert disruptions(t, "m720q-3") == before and res["noout"] == "untouched"


def test_real_min_size_three_makes_ok_to_stop_refuse_before_any_node(real_twin, tmp_path):
    t = real_twin
    ceph(t, "osd", "pool", "set", t.ceph.pool, "min_size", "3")
    wait_stably_clean(t, time.monotonic() + 90)  # the PGs re-peer; then clean again, but fragile
    before = len(t.record.intervals("m720q"))
    state, res = upgrade(t, tmp_path)
    assert state.is_failed()
    assert res["error"].startswith("m720q-1: ceph ok-to-stop failed. Last seen: Ceph says stopping m720q-1's OSDs")
    assert [n["action"] for n in res["nodes"]] == ["failed", "not-started", "not-started"]
    assert len(t.record.intervals("m720q")) == before and res["noout"] == "untouched"


def test_real_osd_stopped_behind_the_flows_back_stops_before_the_next_node(real_twin, tmp_path):
    t = real_twin
    m2, m3 = disruptions(t, "m720q-2"), disruptions(t, "m720q-3")

    def stop_other_osd() -> None:
        if t.world.wait_for(lambda: t.world.node("m720q-1").talos_version == "v1.11.5", 60):
            t.ceph.daemon_down(f"osd.{t.ceph.osd_of_host['m720q-3']}")

    th = threading.Thread(target=stop_other_osd, daemon=True)
    th.start()
    try:
        # The stopped OSD never comes back by itself: no need to wait a minute for it.
        state, res = upgrade(t, tmp_path, deadlines={"osds_up": 20, "ceph_clean": 20})
    finally:
        th.join(5)
        t.ceph.node_up("m720q-3")
    assert state.is_failed()
    actions = {n["name"]: n["action"] for n in res["nodes"]}
    assert actions["m720q-2"] in ("failed", "not-started") and actions["m720q-3"] == "not-started"
    assert disruptions(t, "m720q-2") == m2 and disruptions(t, "m720q-3") == m3
    assert "OSD" in res["error"] or "Ceph" in res["error"]
