"""The twin's ceph command and the simulated Ceph seam: degraded while a node is down, recovery, faults."""

from __future__ import annotations

import json
import threading
import time

import pytest

from twin.ceph_sim import SimCeph

HOSTS = ["m720q-1", "m720q-2", "m720q-3"]


def sim(recovery: float = 0.05, faults: set[tuple[str, str | None]] | None = None) -> SimCeph:
    active = faults or set()
    return SimCeph(HOSTS, recovery, lambda name, arg=None: (name, arg) in active)


def status(c: SimCeph) -> dict:
    out, err, code = c.run(["status", "-f", "json"])
    assert code == 0, err
    return json.loads(out)


def test_a_node_down_degrades_every_pg_until_recovery_seconds_after_it_is_back():
    c = sim(recovery=0.1)
    assert status(c)["health"]["status"] == "HEALTH_OK"
    c.node_down("m720q-2")
    st = status(c)
    assert st["osdmap"]["num_up_osds"] == 2 and st["osdmap"]["num_in_osds"] == 3
    assert set(st["health"]["checks"]) == {"OSD_DOWN", "OSD_HOST_DOWN", "PG_DEGRADED"}
    assert st["pgmap"]["pgs_by_state"] == [{"state_name": "active+undersized+degraded", "count": st["pgmap"]["num_pgs"]}]
    c.node_up("m720q-2")
    assert status(c)["pgmap"]["pgs_by_state"][0]["state_name"] == "active+recovering+degraded"
    time.sleep(0.15)
    assert status(c)["health"]["status"] == "HEALTH_OK"
    c.stop()


def test_ok_to_stop_is_ebusy_while_another_hosts_osd_is_down():
    c = sim()
    out, err, code = c.run(["osd", "ok-to-stop", "1", "-f", "json"])
    assert code == 0 and json.loads(out)["ok_to_stop"] is True
    c.node_down("m720q-1")
    out, err, code = c.run(["osd", "ok-to-stop", "1", "-f", "json"])
    assert code == 16
    assert json.loads(out)["ok_to_stop"] is False
    assert err.startswith("Error EBUSY: unsafe to stop osd(s) at this time (") and "PGs are or would become offline" in err


def test_not_ok_to_stop_fault_refuses_that_hosts_osds_only():
    c = sim(faults={("not-ok-to-stop", "m720q-3")})
    assert c.run(["osd", "ok-to-stop", "2", "-f", "json"])[2] == 16
    assert c.run(["osd", "ok-to-stop", "0", "-f", "json"])[2] == 0


def test_ceph_stuck_never_recovers():
    c = sim(recovery=0.01, faults={("ceph-stuck", None)})
    c.node_down("m720q-1")
    c.node_up("m720q-1")
    time.sleep(0.05)
    assert status(c)["health"]["status"] == "HEALTH_WARN"
    assert c.run(["osd", "ok-to-stop", "1"])[2] == 16
    c.stop()


def test_noout_raises_osdmap_flags_and_shows_in_osd_dump():
    c = sim()
    assert c.run(["osd", "set", "noout"]) == ("", "noout is set\n", 0)
    st = status(c)
    assert st["health"]["checks"]["OSDMAP_FLAGS"]["summary"]["message"] == "noout flag(s) set"
    assert "noout" in json.loads(c.run(["osd", "dump", "-f", "json"])[0])["flags"].split(",")
    c.run(["osd", "unset", "noout"])
    assert status(c)["health"]["status"] == "HEALTH_OK"


def test_ls_tree_lists_a_hosts_osd_ids_and_health_detail_has_checks():
    c = sim()
    assert c.run(["osd", "ls-tree", "m720q-2"])[0] == "1\n"
    assert c.run(["osd", "ls-tree", "nope"])[2] == 2
    c.node_down("m720q-3")
    detail = json.loads(c.run(["health", "detail", "-f", "json"])[0])
    assert set(detail) == {"status", "checks", "mutes"} and detail["checks"]["OSD_DOWN"]["detail"]
    assert json.loads(c.run(["osd", "stat", "-f", "json"])[0])["num_up_osds"] == 2


def test_pg_stat_prints_the_pacific_shape_with_degraded_objects():
    from homelab.ceph_gate import parse_pg_stat

    c = sim()
    clean = c.run(["pg", "stat", "-f", "json"])[0]
    # Ceph 16.2.15 frames this one JSON object with a leading newline and a bare closing brace.
    assert clean.startswith('\n{"pg_ready":true,"pg_summary":{"num_pg_by_state":[') and clean.endswith("}\n}")
    assert json.loads(clean)["pg_summary"]["num_pg_by_state"] == [{"name": "active+clean", "num": 65}]
    c.node_down("m720q-3")
    summary = json.loads(c.run(["pg", "stat", "-f", "json"])[0])["pg_summary"]
    assert summary["degraded_objects"] * 3 == summary["degraded_total"]
    assert not parse_pg_stat(c.run(["pg", "stat", "-f", "json"])[0]).all_clean
    text = c.run(["pg", "stat"])[0]
    assert text.startswith("65 pgs: 65 active+undersized+degraded; ") and "objects degraded (33.333%)" in text


def test_unknown_host_is_a_clear_error():
    with pytest.raises(ValueError, match="no host 'm720q-9'"):
        sim().node_down("m720q-9")


def test_a_talos_reboot_takes_the_osd_down_and_the_cephcluster_follows(twin):
    from twin import talos
    t = twin(reboot_seconds=0.4, recovery_seconds=0.2)
    seen: list[str] = []
    back = threading.Event()

    def on_event(ev: str, o: dict) -> None:
        if o.get("kind") == "CephCluster":
            seen.append(o["status"]["ceph"]["health"])
            if seen[-1] == "HEALTH_OK" and "HEALTH_WARN" in seen:
                back.set()
    t.stores["m720q"].subscribe(on_event)
    out, err, code = talos.run(t.world, ["-n", "10.42.0.103", "upgrade", "--image",
                                         "ghcr.io/siderolabs/installer:v1.11.5", "--wait=false"],
                               {"TALOSCONFIG": str(t.talosconfig)})
    assert code == 0
    assert t.world.wait_for(lambda: t.ceph.status()["osdmap"]["num_up_osds"] == 2, 1)
    assert t.world.wait_for(lambda: t.world.node("m720q-3").ready, 2)
    assert back.wait(3), f"CephCluster health went {seen}"
    assert seen[0] == "HEALTH_WARN"
