"""The Ceph gate against real Ceph daemons in the homelab's shape: 3 mons, 2 mgrs, one OSD per host."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from homelab import ceph_gate
from tasks.ceph import CephCli, CephUnavailable, CephWaitTimeout
from twin.ceph_real import RealCeph, free_port
from twin.ceph_sim import SimCeph

LABELS = {h: h for h in ("m720q-1", "m720q-2", "m720q-3")}


def shape(out: str, err: str, code: int) -> tuple[list[str], int, str]:
    """Keys in order, exit code, stderr with its counts blanked: what the simulated reply must share."""
    return list(json.loads(out)), code, re.sub(r"\d+", "N", err)


def real_ok_to_stop(cluster: RealCeph, osd: int) -> tuple[list[str], int, str]:
    proc = subprocess.run(["ceph", "--connect-timeout", "10", "osd", "ok-to-stop", str(osd), "-f", "json"],
                          env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=60)
    return shape(proc.stdout, proc.stderr, proc.returncode)

pytestmark = pytest.mark.ceph


def wait_for(cli: CephCli, check: str, timeout_s: float = 30) -> ceph_gate.CephStatus:
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        st = cli.status()
        seen = sorted(st.health.checks)
        if check in st.health.checks:
            return st
        time.sleep(0.25)
    raise AssertionError(f"health check {check} not raised within {timeout_s} s; last checks: {seen}")


@pytest.fixture
def healthy(real_ceph: RealCeph, cli: CephCli) -> RealCeph:
    """Every test starts from (and is given back) a clean cluster: all OSDs up, no flags."""
    for host in real_ceph.hosts:
        real_ceph.node_up(host)
    for flag in ("noout", "noscrub"):
        if flag in cli.flags():
            cli.unset_flag(flag)
    cli.run("osd", "pool", "set", real_ceph.pool, "min_size", "2")
    cli.wait_clean(time.monotonic() + 90)
    return real_ceph


def test_healthy_cluster_lets_one_host_stop(healthy: RealCeph, cli: CephCli) -> None:
    osds = cli.osds_of("m720q-1")
    assert osds == [healthy.osd_of_host["m720q-1"]]
    answer = cli.ok_to_stop(osds)
    verdict = ceph_gate.ok_to_stop_verdict(answer, osds, host="m720q-1")
    assert answer.ok and verdict.ok, verdict.reason
    assert cli.clean().ok
    # The node gate reads the homelab's shape off the real daemons: mon.a and mgr.a live on m720q-1.
    gate = cli.node_gate("m720q-1", LABELS, time.monotonic() + 60)
    assert gate.ok and gate.osds == (0,) and gate.mons == ("a",), gate.reason
    assert "quorum should be preserved (b,c) after stopping [a]" in gate.reason
    # The simulated Ceph answers in the same shape.
    sim = SimCeph(list(LABELS), 0.1)
    assert shape(*sim.run(["osd", "ok-to-stop", "0", "-f", "json"])) == real_ok_to_stop(healthy, 0)


def test_stopped_osd_degrades_pgs_and_closes_the_gate_for_another_host(
    healthy: RealCeph, cli: CephCli
) -> None:
    # The OSD alone: m720q-1's node also holds a mgr, possibly the active one, whose failover is
    # another test's subject.
    healthy.daemon_down("osd.0")
    assert healthy.osd_pid("m720q-1") is None
    assert "OSD_DOWN" in cli.status().health.checks  # a SIGTERMed OSD says it goes
    st = wait_for(cli, "PG_DEGRADED")

    other = cli.osds_of("m720q-2")
    answer = cli.ok_to_stop(other)
    assert not answer.ok
    assert answer.bad_become_inactive, answer
    sim = SimCeph(list(LABELS), 0.1)
    sim.daemon_down("osd.0")
    assert shape(*sim.run(["osd", "ok-to-stop", "1", "-f", "json"])) == real_ok_to_stop(healthy, 1)
    verdict = ceph_gate.ok_to_stop_verdict(answer, other, host="m720q-2")
    assert not verdict.ok and "would become inactive" in verdict.reason

    gate = ceph_gate.cluster_clean(st)
    assert not gate.ok
    assert "degraded" in gate.reason and "PGs not active+clean" in gate.reason
    assert "OSD_DOWN" in gate.reason and "OSDs up 2/3" in gate.reason


def test_gate_tolerates_its_own_noout_and_nothing_more(healthy: RealCeph, cli: CephCli) -> None:
    cli.set_flag("noout")
    try:
        st = wait_for(cli, "OSDMAP_FLAGS")
        assert not ceph_gate.cluster_clean(st).ok, "noout must not pass a gate that did not set it"
        assert ceph_gate.cluster_clean(st, tolerated_flags={"noout"}).ok

        cli.set_flag("noscrub")
        deadline = time.monotonic() + 20
        while "noscrub" not in st.health.checks["OSDMAP_FLAGS"].message and time.monotonic() < deadline:
            time.sleep(0.25)
            st = cli.status()
        refused = ceph_gate.cluster_clean(st, tolerated_flags={"noout"})
        assert not refused.ok and "noscrub" in refused.reason
    finally:
        cli.unset_flag("noscrub")
        cli.unset_flag("noout")
    assert not {"noout", "noscrub"} & cli.flags()


def test_gate_opens_again_once_restarted_osd_is_clean(healthy: RealCeph, cli: CephCli) -> None:
    healthy.daemon_down("osd.2")  # the OSD alone; a whole node's mon takes an election to return
    wait_for(cli, "PG_DEGRADED")
    with pytest.raises(CephWaitTimeout) as refused:
        cli.wait_clean(time.monotonic() + 1)
    assert "degraded" in str(refused.value)

    healthy.daemon_up("osd.2")
    done = cli.wait_clean(time.monotonic() + 60)
    assert done.verdict.ok
    assert len(done.history) >= 2 and not done.history[0].ok
    assert cli.pg_stat().all_clean
    assert healthy.health() == "HEALTH_OK"


def test_min_size_three_makes_any_stop_unsafe_on_a_healthy_cluster(healthy: RealCeph, cli: CephCli) -> None:
    cli.run("osd", "pool", "set", healthy.pool, "min_size", "3")
    try:
        osds = cli.osds_of("m720q-2")
        answer = cli.ok_to_stop(osds)
        assert not answer.ok
        assert not ceph_gate.ok_to_stop_verdict(answer, osds, host="m720q-2").ok
    finally:
        cli.run("osd", "pool", "set", healthy.pool, "min_size", "2")


def test_failing_over_the_active_mgr_moves_it_to_the_standby(healthy: RealCeph, cli: CephCli) -> None:
    before = healthy.active_mgr()
    assert before in ("a", "b") and cli.mgr_stat().num_standby == 1
    cli.run("mgr", "fail", before)
    deadline = time.monotonic() + 60
    while (healthy.active_mgr() in (None, before) or cli.mgr_stat().num_standby < 1) and time.monotonic() < deadline:
        time.sleep(0.25)
    after = cli.mgr_stat()
    assert after.active not in (None, before) and after.num_standby == 1, after
    # The node of the new active mgr still opens: the failed one came back as its standby.
    node = next(h for h, m in healthy.mgr_of_host.items() if m == after.active)
    gate = cli.node_gate(node, LABELS, time.monotonic() + 60)
    assert gate.ok, gate.reason
    assert f"mgr {after.active} active on {node}, with 1 standby" in gate.reason


def test_cli_without_a_mon_is_unavailable_not_a_hang(tmp_path: Path, ceph_installed: None) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon_host = 127.0.0.1:{free_port()}\nauth_client_required = none\n")
    cli = CephCli(["ceph"], {"CEPH_CONF": str(conf)}, timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(CephUnavailable):
        cli.status()
    assert time.monotonic() - t0 < 5


def test_stop_leaves_no_ceph_process_and_no_directory(real_ceph: RealCeph) -> None:
    # Runs last: it ends the session's cluster (the fixture's own stop() is then a no-op).
    pids = list(real_ceph.pids().values())
    assert len(pids) == 3 + 2 + len(real_ceph.hosts)  # mons a b c, mgrs a b, an OSD per host
    t0 = time.monotonic()
    real_ceph.stop()
    assert time.monotonic() - t0 < 10
    assert not real_ceph.workdir.exists()
    alive = [p for p in pids if os.path.exists(f"/proc/{p}") and _not_zombie(p)]
    assert alive == []
    left = subprocess.run(["pgrep", "-f", str(real_ceph.workdir)], capture_output=True, text=True).stdout
    assert left == ""


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
