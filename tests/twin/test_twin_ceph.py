"""The twin's ceph command and the simulated Ceph seam: the homelab's 3 mons and 2 mgrs, degraded while a
node is down, recovery, mgr failover, faults; and its replies against real Ceph 16.2.15 replies."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from twin.ceph_sim import SimCeph

HOSTS = ["m720q-1", "m720q-2", "m720q-3"]
REAL = json.loads((Path(__file__).resolve().parents[1] / "unit" / "data" / "ceph-16.2.15.json").read_text())


def sim(recovery: float = 0.05, faults: set[tuple[str, str | None]] | None = None, hosts: list[str] = HOSTS,
        **timing: float) -> SimCeph:
    active = faults or set()
    return SimCeph(hosts, recovery, lambda name, arg=None: (name, arg) in active, **timing)


def status(c: SimCeph) -> dict:
    out, err, code = c.run(["status", "-f", "json"])
    assert code == 0, err
    return json.loads(out)


def test_a_node_down_degrades_every_pg_until_recovery_seconds_after_it_is_back():
    c = sim(recovery=0.1, mon_down_detect_s=0.2)
    assert status(c)["health"]["status"] == "HEALTH_OK"
    c.node_down("m720q-2")
    st = status(c)
    assert st["osdmap"]["num_up_osds"] == 2 and st["osdmap"]["num_in_osds"] == 3
    # mon.b went with the node: until the others re-elect, they commit nothing, the PG digest neither.
    assert set(st["health"]["checks"]) == {"OSD_DOWN", "OSD_HOST_DOWN"}
    time.sleep(0.25)
    st = status(c)
    assert set(st["health"]["checks"]) == {"MON_DOWN", "OSD_DOWN", "OSD_HOST_DOWN", "PG_DEGRADED"}
    assert st["pgmap"]["pgs_by_state"] == [{"state_name": "active+undersized+degraded", "count": st["pgmap"]["num_pgs"]}]
    c.node_up("m720q-2")
    assert status(c)["pgmap"]["pgs_by_state"][0]["state_name"] == "active+recovering+degraded"
    time.sleep(0.15)
    assert status(c)["health"]["status"] == "HEALTH_OK"
    c.stop()


def test_map_changes_wait_while_a_stopped_mon_still_counts_in_the_quorum():
    c = sim(mon_down_detect_s=0.4)
    c.daemon_down("mon.c")
    t0 = time.monotonic()
    assert c.run(["osd", "set", "noout"]) == ("", "noout is set\n", 0)
    assert 0.35 <= time.monotonic() - t0 < 2
    t0 = time.monotonic()
    assert c.run(["osd", "unset", "noout"])[2] == 0 and time.monotonic() - t0 < 0.2  # re-elected by now
    c.stop()


def test_ok_to_stop_is_ebusy_while_another_hosts_osd_is_down():
    c = sim()
    out, err, code = c.run(["osd", "ok-to-stop", "1", "-f", "json"])
    assert code == 0 and json.loads(out)["ok_to_stop"] is True
    c.node_down("m720q-3")  # holds mon c, no mgr
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
    assert json.loads(clean)["pg_summary"]["num_pg_by_state"] == [{"name": "active+clean", "num": 33}]
    c.node_down("m720q-3")
    summary = json.loads(c.run(["pg", "stat", "-f", "json"])[0])["pg_summary"]
    assert summary["degraded_objects"] * 3 == summary["degraded_total"]
    assert not parse_pg_stat(c.run(["pg", "stat", "-f", "json"])[0]).all_clean
    text = c.run(["pg", "stat"])[0]
    assert text.startswith("33 pgs: 33 active+undersized+degraded; ") and "objects degraded (33.333%)" in text


def test_ls_tree_of_a_dotted_hostname_is_enoent_as_real_ceph_says_it():
    c = sim(hosts=["m720q-1", "m720q-2", "m720q-3.lan"])
    real = REAL["ls_tree_fqdn_enoent"]
    assert c.run(["osd", "ls-tree", "m720q-3.lan"]) == ("", real["stderr"], real["rc"])
    assert c.run(["osd", "ls-tree", "m720q-3-lan"]) == (REAL["ls_tree_crush_name"]["stdout"], "", 0)
    assert [n["name"] for n in json.loads(c.run(["osd", "tree", "-f", "json"])[0])["nodes"] if n["type"] == "host"] == [
        "m720q-1", "m720q-2", "m720q-3-lan"]


def test_homelab_shape_three_mons_two_mgrs_each_on_its_node():
    c = sim(hosts=["m720q-1", "m720q-2", "m720q-3.lan"])
    q = json.loads(c.run(["quorum_status", "-f", "json"])[0])
    assert q["quorum_names"] == ["a", "b", "c"] and [m["name"] for m in q["monmap"]["mons"]] == ["a", "b", "c"]
    assert set(q["monmap"]) == set(json.loads(REAL["quorum_status_ok"]["stdout"])["monmap"])
    assert json.loads(c.run(["node", "ls", "-f", "json"])[0]) == {
        "mon": {"m720q-1": ["a"], "m720q-2": ["b"], "m720q-3.lan": ["c"]},
        "osd": {"m720q-1": [0], "m720q-2": [1], "m720q-3.lan": [2]},
        "mgr": {"m720q-1": ["a"], "m720q-2": ["b"]}}
    stat = json.loads(c.run(["mgr", "stat", "-f", "json"])[0])
    assert (stat["active_name"], stat["num_standby"], stat["available"]) == ("a", 1, True)
    assert set(stat) == set(json.loads(REAL["mgr_stat"]["stdout"]))


def test_reboot_of_the_active_mgrs_node_fails_over_with_a_window_of_unknown_pgs():
    c = sim(stats_seconds=0.3)
    before = status(c)["pgmap"]["pgs_by_state"]
    c.node_down("m720q-1")
    # The mon still counts the dead mgr active (beacon grace), and repeats the last PG digest it had.
    assert json.loads(c.run(["mgr", "stat", "-f", "json"])[0])["active_name"] == "a"
    st = status(c)
    assert st["pgmap"]["pgs_by_state"] == before and "PG_DEGRADED" not in st["health"]["checks"]
    assert {"OSD_DOWN", "OSD_HOST_DOWN"} <= set(st["health"]["checks"])
    c.node_up("m720q-1")  # the active mgr restarts: it is dropped, and re-selected as a new instance
    out, err, code = c.run(["osd", "ok-to-stop", "1", "-f", "json"])
    assert code == 11 and err == "Error EAGAIN: 33 pgs have unknown state; cannot draw any conclusions\n"
    assert list(json.loads(out)) == list(json.loads(REAL["ok_to_stop_eagain"]["stdout"]))
    pg = json.loads(c.run(["pg", "stat", "-f", "json"])[0])
    assert pg["pg_ready"] is False and pg["pg_summary"]["num_pg_by_state"] == [{"name": "unknown", "num": 33}]
    time.sleep(0.35)
    assert c.run(["osd", "ok-to-stop", "1", "-f", "json"])[2] in (0, 16)  # known again: an answer
    c.stop()


def test_mgr_commands_wait_for_a_dead_active_mgr_until_the_mon_fails_it_over():
    c = sim(stats_seconds=0.0, mgr_beacon_grace_s=0.4)
    c.daemon_down("mgr.a")
    t0 = time.monotonic()
    assert c.run(["pg", "stat"])[2] == 0
    assert 0.35 <= time.monotonic() - t0 < 2
    assert json.loads(c.run(["mgr", "stat", "-f", "json"])[0])["active_name"] == "b"
    c.stop()


def test_a_stopped_mon_leaves_the_quorum_only_once_the_others_notice():
    c = sim(mon_down_detect_s=0.3)
    c.daemon_down("mon.c")
    assert status(c)["quorum_names"] == ["a", "b", "c"] and "MON_DOWN" not in status(c)["health"]["checks"]
    time.sleep(0.35)
    st = status(c)
    assert st["quorum_names"] == ["a", "b"]
    assert st["health"]["checks"]["MON_DOWN"]["summary"]["message"] == "1/3 mons down, quorum a,b"
    assert c.run(["mon", "ok-to-stop", "a"]) == ("", REAL["mon_ok_to_stop_ebusy"]["stderr"], 16)
    assert c.run(["mon", "ok-to-stop", "c"]) == ("", REAL["mon_ok_to_stop_own_down"]["stderr"], 0)
    # A muted MON_DOWN makes health OK, as on the real mons, while the quorum still lacks mon.c.
    assert c.run(["health", "mute", "MON_DOWN"]) == ("", "", 0)
    muted = status(c)
    real = json.loads(REAL["status_mon_down_muted"]["stdout"])
    assert muted["health"]["status"] == real["health"]["status"] == "HEALTH_OK"
    assert muted["health"]["checks"]["MON_DOWN"] == real["health"]["checks"]["MON_DOWN"]
    assert muted["health"]["mutes"] == real["health"]["mutes"] and muted["quorum_names"] == ["a", "b"]
    c.daemon_up("mon.c")
    assert status(c)["health"] == {"status": "HEALTH_OK", "checks": {}, "mutes": []}  # the mute went with it
    c.stop()


def test_mon_rm_leaves_a_complete_quorum_that_cannot_lose_a_mon():
    c = sim()
    assert c.run(["mon", "rm", "c"]) == ("", "", 0)
    q = json.loads(c.run(["quorum_status", "-f", "json"])[0])
    assert q["quorum_names"] == ["a", "b"] and [m["name"] for m in q["monmap"]["mons"]] == ["a", "b"]
    assert status(c)["health"]["status"] == "HEALTH_OK"
    assert c.run(["mon", "ok-to-stop", "a"])[2] == 16


def _shape(reply: tuple[str, str, int] | dict[str, Any]) -> tuple[list[str], int, str]:
    """Keys in order, exit code, and stderr with its counts blanked: what must match the real reply."""
    out, err, code = (reply["stdout"], reply["stderr"], reply["rc"]) if isinstance(reply, dict) else reply
    return list(json.loads(out)), code, re.sub(r"\d+", "N", err)


def test_ok_to_stop_replies_have_the_shape_of_the_real_ones():
    c = sim(recovery=5.0, stats_seconds=0.0)
    assert _shape(c.run(["osd", "ok-to-stop", "0", "-f", "json"])) == _shape(REAL["ok_to_stop_ok"])
    assert _shape(c.run(["osd", "ok-to-stop", "0", "--max", "3", "-f", "json"])) == _shape(REAL["ok_to_stop_max"])
    assert _shape(c.run(["osd", "ok-to-stop", "7", "-f", "json"])) == _shape(REAL["ok_to_stop_unknown_osd"])
    c.daemon_down("osd.2")
    assert _shape(c.run(["osd", "ok-to-stop", "1", "-f", "json"])) == _shape(REAL["ok_to_stop_ebusy_one_down"])
    # min_size 1 on the block pool: its PGs may go on, more degraded; the mgr's pool (min_size 2) may not.
    assert c.run(["osd", "pool", "set", "ceph-blockpool", "min_size", "1"])[2] == 0
    more = c.run(["osd", "ok-to-stop", "1", "-f", "json"])
    assert _shape(more) == _shape(REAL["ok_to_stop_more_degraded"])
    assert json.loads(more[0])["bad_become_inactive"] == ["1.0"]
    c.run(["osd", "pool", "set", "ceph-blockpool", "min_size", "2"])
    c.daemon_down("osd.1")
    assert _shape(c.run(["osd", "ok-to-stop", "0", "-f", "json"])) == _shape(REAL["ok_to_stop_already_inactive"])
    c.stop()


def test_purged_osd_leaves_an_empty_host_and_crush_rm_removes_it():
    c = sim(hosts=["m720q-1", "m720q-2", "m720q-3", "m720q-4"], recovery=0.1)
    assert c.run(["osd", "purge", "3", "--yes-i-really-mean-it"])[1] == "Error EBUSY: osd.3 is not `down`.\n"
    c.daemon_down("osd.3")
    assert c.run(["osd", "purge", "3", "--yes-i-really-mean-it"]) == ("", "purged osd.3\n", 0)
    assert c.run(["osd", "ls-tree", "m720q-4"]) == ("", "", 0)
    assert c.run(["osd", "crush", "rm", "m720q-4"])[2] == 0
    assert c.run(["osd", "ls-tree", "m720q-4"])[2] == 2
    assert json.loads(c.run(["node", "ls", "osd", "-f", "json"])[0]) == {"m720q-1": [0], "m720q-2": [1], "m720q-3": [2]}
    assert any("backfilling" in s["state_name"] for s in status(c)["pgmap"]["pgs_by_state"])
    time.sleep(0.15)
    assert status(c)["health"]["status"] == "HEALTH_OK" and c.clean()
    c.node_down("m720q-4")  # no OSD there: nothing changes for the PGs
    assert c.clean()
    c.stop()


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
