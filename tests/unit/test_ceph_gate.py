"""Reading Ceph's output and the gate verdicts, on real captures and crafted variants."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from homelab import ceph_gate
from homelab.ceph_gate import CephParseError, Verdict
from tasks.ceph import CephCli, CephCommandError, CephFlagError, CephUnavailable, CephWaitTimeout

REALWORLD = Path("/work/shared/realworld/ceph")
if not REALWORLD.is_dir():  # the captures also live beside the repository in some checkouts
    REALWORLD = Path(__file__).resolve().parents[3] / "shared" / "realworld" / "ceph"

# Captured from Ceph 16.2.15 (the RealCeph cluster: 3 hosts, pool size 3 / min_size 2).
PACIFIC_OK_TO_STOP_YES = (
    '{"ok_to_stop":true,"osds":[0],"num_ok_pgs":17,"num_not_ok_pgs":0,"ok_become_degraded":'
    '["1.0","1.1","1.2","1.3","1.4","1.5","1.6","1.7","1.8","1.9","1.a","1.b","1.c","1.d","1.e","1.f","2.0"]}\n'
)
PACIFIC_OK_TO_STOP_NO = (
    '{"ok_to_stop":false,"osds":[1],"num_ok_pgs":0,"num_not_ok_pgs":17,"bad_become_inactive":'
    '["1.0","1.1","1.2","1.3","1.4","1.5","1.6","1.7","1.8","1.9","1.a","1.b","1.c","1.d","1.e","1.f","2.0"]}\n'
)
PACIFIC_EBUSY = "Error EBUSY: unsafe to stop osd(s) at this time (17 PGs are or would become offline)\n"
PACIFIC_HEALTH_OSD_DOWN = (
    '{"status":"HEALTH_WARN","checks":{"OSD_DOWN":{"severity":"HEALTH_WARN","summary":{"message":"1 osds down",'
    '"count":1},"detail":[{"message":"osd.0 (root=default,host=m720q-1) is down"}],"muted":false},"OSD_HOST_DOWN":'
    '{"severity":"HEALTH_WARN","summary":{"message":"1 host (1 osds) down","count":1},"detail":[{"message":'
    '"host m720q-1 (root=default) (1 osds) is down"}],"muted":false}},"mutes":[]}'
)
PACIFIC_HEALTH_FLAGS = (
    '{"status":"HEALTH_WARN","checks":{"OSDMAP_FLAGS":{"severity":"HEALTH_WARN","summary":{"message":'
    '"noout,noscrub flag(s) set","count":13},"detail":[],"muted":false}},"mutes":[]}'
)
PACIFIC_PG_STAT_DEGRADED = (
    '{"pg_ready":true,"pg_summary":{"num_pg_by_state":[{"name":"active+undersized","num":1},'
    '{"name":"active+undersized+degraded","num":16}],"num_pgs":17,"num_bytes":4399128,'
    '"degraded_objects":1075,"degraded_total":3225,"degraded_ratio":0.33333333333333326}}\n'
)
PACIFIC_OSD_DUMP_FLAGS = {
    "epoch": 40,
    "flags": "noout,noscrub,sortbitwise,recovery_deletes,purged_snapdirs,pglog_hardlimit",
    "flags_set": [
        "noout",
        "noscrub",
        "pglog_hardlimit",
        "purged_snapdirs",
        "recovery_deletes",
        "sortbitwise",
    ],
}


def realworld(name: str) -> str:
    path = REALWORLD / name
    if not path.exists() and os.environ.get("CI") != "true":  # CI has ../shared: there it must be read
        pytest.skip(f"real-world capture {path} not present")
    return path.read_text()


def status_with(
    pgs: list[tuple[str, int]], checks: dict | None = None, health: str | None = None, osds=(3, 3, 3)
):
    checks = checks or {}
    return ceph_gate.parse_status(
        {
            "health": {"status": health or ("HEALTH_WARN" if checks else "HEALTH_OK"), "checks": checks},
            "osdmap": {"num_osds": osds[0], "num_up_osds": osds[1], "num_in_osds": osds[2]},
            "pgmap": {
                "num_pgs": sum(c for _, c in pgs),
                "pgs_by_state": [{"state_name": s, "count": c} for s, c in pgs],
            },
        }
    )


def flags_check(message: str) -> dict:
    return {"OSDMAP_FLAGS": {"severity": "HEALTH_WARN", "summary": {"message": message, "count": 13}}}


# ---- real-world status files ---------------------------------------------------------------


def test_nautilus_nested_osdmap_is_read_and_clean_cluster_opens_the_gate() -> None:
    st = ceph_gate.parse_status(realworld("rook__clusterdisruption__nautilus-health-ok.json"))
    assert (st.num_osds, st.num_up_osds, st.num_in_osds, st.num_pgs) == (3, 3, 3, 96)
    assert ceph_gate.cluster_clean(st).ok


def test_luminous_osd_down_refuses_and_names_the_stale_pgs() -> None:
    st = ceph_gate.parse_status(realworld("rook__status_test__luminous-health-warn-osd-down.json"))
    assert (st.num_osds, st.num_up_osds) == (2, 1)
    v = ceph_gate.cluster_clean(st)
    assert not v.ok
    assert "101 of 200 PGs not active+clean (101 stale+active+clean)" in v.reason
    assert "OSD_DOWN" in v.reason and "wait for the OSDs to come back up" in v.reason


def test_rewrapped_luminous_osdmap_reads_the_same_as_flat() -> None:
    nested = ceph_gate.parse_status(realworld("rook__clusterdisruption__health-warn-nested-osdmap.json"))
    flat = ceph_gate.parse_status(realworld("rook__status_test__luminous-health-warn-osd-down.json"))
    assert nested == flat


def test_reef_remapped_backfilling_is_health_ok_but_not_clean() -> None:
    st = ceph_gate.parse_status(realworld("rook__clusterdisruption__reef-remapped-backfilling.json"))
    assert st.health.status == "HEALTH_OK"
    v = ceph_gate.cluster_clean(st)
    assert not v.ok
    assert (
        "11 of 185 PGs not active+clean (10 active+remapped+backfilling, 1 active+clean+remapped)" in v.reason
    )


def test_proxmox_wrapped_status_with_odd_keys_is_read_and_nearfull_refuses() -> None:
    st = ceph_gate.parse_status(realworld("go-proxmox__pve8x__cluster-ceph-status-health-warn-nearfull.json"))
    assert (st.num_osds, st.num_pgs, st.unclean_pgs) == (21, 577, {})
    assert set(st.health.checks) == {"POOL_NEARFULL", "OSD_NEARFULL"}
    assert st.health.checks["OSD_NEARFULL"].details == (
        "osd.3 is near full",
        "osd.8 is near full",
        "osd.9 is near full",
    )
    v = ceph_gate.cluster_clean(st, tolerated_flags={"noout"})
    assert not v.ok and "OSD_NEARFULL" in v.reason and "POOL_NEARFULL" in v.reason


def test_trailing_colon_keys_are_normalised() -> None:
    data = ceph_gate.load(realworld("go-proxmox__pve8x__cluster-ceph-status-health-warn-nearfull.json"))
    assert "disallowed_leaders" in data["monmap"] and "removed_ranks" in data["monmap"]


def test_luminous_overall_status_alone_is_read() -> None:
    h = ceph_gate.parse_health({"overall_status": "HEALTH_WARN", "checks": {}})
    assert h.status == "HEALTH_WARN"
    assert not ceph_gate.health_verdict(h).ok


# ---- the clean gate --------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["active+clean", "active+clean+scrubbing", "active+clean+scrubbing+deep"])
def test_clean_gate_accepts_rooks_clean_states(state: str) -> None:
    assert ceph_gate.cluster_clean(status_with([("active+clean", 10), (state, 2)])).ok


@pytest.mark.parametrize(
    "state",
    ["active+undersized+degraded", "peering", "active+clean+remapped", "stale+active+clean", "unknown"],
)
def test_clean_gate_refuses_other_pg_states_and_names_them(state: str) -> None:
    v = ceph_gate.cluster_clean(status_with([("active+clean", 10), (state, 3)]))
    assert not v.ok and f"3 {state}" in v.reason and "3 of 13 PGs" in v.reason


def test_clean_gate_counts_unreported_pgs_as_unknown() -> None:
    st = ceph_gate.parse_status(
        {
            "health": {"status": "HEALTH_OK", "checks": {}},
            "osdmap": {"num_osds": 3, "num_up_osds": 3, "num_in_osds": 3},
            "pgmap": {"num_pgs": 17, "pgs_by_state": [{"state_name": "active+clean", "count": 12}]},
        }
    )
    v = ceph_gate.cluster_clean(st)
    assert not v.ok and "5 unknown" in v.reason


def test_noout_is_tolerated_only_by_a_caller_that_set_it() -> None:
    st = status_with([("active+clean", 17)], flags_check("noout flag(s) set"))
    refused = ceph_gate.cluster_clean(st)
    assert not refused.ok and "OSDMAP_FLAGS (noout flag(s) set)" in refused.reason
    assert ceph_gate.cluster_clean(st, tolerated_flags={"noout"}).ok


def test_noout_tolerance_does_not_cover_another_flag() -> None:
    st = ceph_gate.parse_status(
        {
            "health": json.loads(PACIFIC_HEALTH_FLAGS),
            "osdmap": {"num_osds": 3, "num_up_osds": 3, "num_in_osds": 3},
            "pgmap": {"num_pgs": 17, "pgs_by_state": [{"state_name": "active+clean", "count": 17}]},
        }
    )
    v = ceph_gate.cluster_clean(st, tolerated_flags={"noout"})
    assert not v.ok and "noscrub" in v.reason and "only these flags are tolerated: noout" in v.reason
    assert ceph_gate.cluster_clean(st, tolerated_flags={"noout", "noscrub"}).ok


def test_noout_tolerance_does_not_cover_other_checks() -> None:
    checks = {**flags_check("noout flag(s) set"), **json.loads(PACIFIC_HEALTH_OSD_DOWN)["checks"]}
    v = ceph_gate.cluster_clean(
        status_with([("active+clean", 17)], checks, osds=(3, 2, 3)), tolerated_flags={"noout"}
    )
    assert not v.ok and "OSD_DOWN" in v.reason and "OSDMAP_FLAGS" not in v.reason


def test_unreadable_flags_message_is_not_tolerated() -> None:
    st = status_with([("active+clean", 17)], flags_check("something new about noout"))
    assert not ceph_gate.cluster_clean(st, tolerated_flags={"noout"}).ok


def test_muted_checks_do_not_close_the_gate() -> None:
    checks = {
        "RECENT_CRASH": {
            "severity": "HEALTH_WARN",
            "summary": {"message": "1 daemons have recently crashed"},
            "muted": True,
        }
    }
    assert ceph_gate.cluster_clean(status_with([("active+clean", 4)], checks, health="HEALTH_OK")).ok


def test_warning_without_checks_refuses() -> None:
    v = ceph_gate.cluster_clean(status_with([("active+clean", 4)], health="HEALTH_WARN"))
    assert not v.ok and "without naming a check" in v.reason


def test_verdict_is_frozen_and_falsy_when_refused() -> None:
    v = Verdict(False, "x")
    assert not v
    with pytest.raises(AttributeError):
        v.ok = True  # type: ignore[misc]


# ---- ok-to-stop, pg stat, ls-tree, flags ------------------------------------------------------


def test_ok_to_stop_yes_from_pacific() -> None:
    a = ceph_gate.parse_ok_to_stop(PACIFIC_OK_TO_STOP_YES, 0)
    assert a.ok and a.osds == (0,) and len(a.ok_become_degraded) == 17
    v = ceph_gate.ok_to_stop_verdict(a, [0], host="m720q-1")
    assert v.ok and "m720q-1's OSDs [0] are ok to stop" in v.reason and "17 PGs will be degraded" in v.reason


def test_ok_to_stop_ebusy_still_carries_json_and_names_pgs() -> None:
    a = ceph_gate.parse_ok_to_stop(PACIFIC_OK_TO_STOP_NO, 16, PACIFIC_EBUSY)
    assert not a.ok and a.num_not_ok_pgs == 17 and a.message.startswith("Error EBUSY")
    v = ceph_gate.ok_to_stop_verdict(a, [1], host="m720q-2")
    assert not v.ok
    assert "17 PGs would become inactive (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7 and 9 more)" in v.reason


def test_ok_to_stop_text_output_of_old_ceph_is_kept_as_message() -> None:
    a = ceph_gate.parse_ok_to_stop("", 16, "Error EBUSY: 3 PGs are already degraded or might become unclean")
    v = ceph_gate.ok_to_stop_verdict(a, [2])
    assert not v.ok and "3 PGs are already degraded" in v.reason


def test_ok_to_stop_other_exit_codes_are_not_answers() -> None:
    with pytest.raises(CephParseError, match="exit 2"):
        ceph_gate.parse_ok_to_stop("", 2, "Error ENOENT: osd.9 does not exist")


def test_ok_to_stop_for_fewer_osds_than_asked_refuses() -> None:
    a = ceph_gate.parse_ok_to_stop(PACIFIC_OK_TO_STOP_YES, 0)
    assert not ceph_gate.ok_to_stop_verdict(a, [0, 3]).ok
    assert not ceph_gate.ok_to_stop_verdict(a, []).ok


def test_pg_stat_of_pacific_and_flat_older_shape() -> None:
    p = ceph_gate.parse_pg_stat(PACIFIC_PG_STAT_DEGRADED)
    assert p.num_pgs == 17 and not p.all_clean
    flat = ceph_gate.parse_pg_stat({"num_pg_by_state": [{"name": "active+clean", "num": 8}], "num_pgs": 8})
    assert flat.all_clean


def test_ls_tree_plain_lines_and_json() -> None:
    assert ceph_gate.parse_ls_tree("1\n4\n") == [1, 4]
    assert ceph_gate.parse_ls_tree("") == []
    assert ceph_gate.parse_ls_tree("[2, 5]") == [2, 5]
    with pytest.raises(CephParseError):
        ceph_gate.parse_ls_tree("Error ENOENT: node 'x' does not exist")


def test_osd_flags_from_flags_set_or_flags_string() -> None:
    assert {"noout", "noscrub"} <= ceph_gate.parse_osd_flags(PACIFIC_OSD_DUMP_FLAGS)
    assert ceph_gate.parse_osd_flags({"flags": "sortbitwise,noout"}) == {"sortbitwise", "noout"}


def test_garbage_is_a_parse_error_naming_the_command() -> None:
    with pytest.raises(CephParseError, match="ceph status"):
        ceph_gate.parse_status("Error initializing cluster client")


# ---- the CLI wrapper, with a fake `ceph` executable at the edge --------------------------------


def fake_ceph(tmp_path: Path, body: str) -> list[str]:
    """A `ceph` stand-in: a shell script whose `case "$*"` decides the reply."""
    exe = tmp_path / "ceph"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return [str(exe)]


def test_set_flag_that_does_not_stick_raises_naming_the_flag(tmp_path: Path) -> None:
    cmd = fake_ceph(
        tmp_path,
        """case "$*" in
  *"osd set noout"*) exit 0 ;;
  *"osd dump -f json"*) echo '{"flags":"sortbitwise"}' ;;
esac
""",
    )
    with pytest.raises(CephFlagError, match="'noout': expected it set"):
        CephCli(cmd, {}, timeout_s=5).set_flag("noout")


def test_unset_flag_verified_by_reading_back(tmp_path: Path) -> None:
    cmd = fake_ceph(
        tmp_path,
        """case "$*" in
  *"osd unset noout"*) exit 0 ;;
  *"osd dump -f json"*) echo '{"flags":"sortbitwise,noout"}' ;;
esac
""",
    )
    with pytest.raises(CephFlagError, match="expected it unset"):
        CephCli(cmd, {}, timeout_s=5).unset_flag("noout")


def test_ok_to_stop_ebusy_is_an_answer_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "no.json").write_text(PACIFIC_OK_TO_STOP_NO)
    cmd = fake_ceph(
        tmp_path, f"""cat {tmp_path / "no.json"}; echo "{PACIFIC_EBUSY.strip()}" >&2; exit 16\n"""
    )
    a = CephCli(cmd, {}, timeout_s=5).ok_to_stop([1])
    assert not a.ok and len(a.bad_become_inactive) == 17


def test_cli_argv_bounds_the_connection(tmp_path: Path) -> None:
    cmd = fake_ceph(tmp_path, 'echo "$@" >&2; exit 22\n')
    with pytest.raises(CephCommandError, match="--connect-timeout 4 osd ls-tree m720q-1"):
        CephCli(cmd, {}, timeout_s=5).osds_of("m720q-1")


def test_hanging_cli_is_unavailable_within_the_timeout(tmp_path: Path) -> None:
    cmd = fake_ceph(tmp_path, "exec sleep 5\n")
    with pytest.raises(CephUnavailable, match="no answer within 0.3 s"):
        CephCli(cmd, {}, timeout_s=0.3).status()


def test_unreachable_cluster_is_retryable_and_bad_command_is_not(tmp_path: Path) -> None:
    cmd = fake_ceph(
        tmp_path, 'echo "[errno 110] RADOS timed out (error connecting to the cluster)" >&2; exit 1\n'
    )
    with pytest.raises(CephUnavailable) as e:
        CephCli(cmd, {}, timeout_s=5).status()
    assert e.value.retryable
    with pytest.raises(CephCommandError) as e2:
        CephCli([str(tmp_path / "missing")], {}, timeout_s=5).status()
    assert not e2.value.retryable


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


class ScriptedCli(CephCli):
    """The protocol edge replaced by a script of `ceph status` replies."""

    def __init__(self, replies: list[dict]):
        super().__init__(["ceph"], {}, timeout_s=5)
        self.replies = replies
        self.statuses = 0  # how often the mon was asked

    def pg_stat(self):  # type: ignore[override]
        # Each poll asks the active mgr first: the next reply of the script, its PG states.
        self.current = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        by_state = [{"name": s["state_name"], "num": s["count"]} for s in self.current["pgmap"]["pgs_by_state"]]
        return ceph_gate.parse_pg_stat({"pg_ready": True, "pg_summary": {"num_pg_by_state": by_state,
                                                                          "num_pgs": self.current["pgmap"]["num_pgs"]}})

    def status(self):  # type: ignore[override]
        self.statuses += 1
        return ceph_gate.parse_status(self.current)


def raw_status(pgs: list[tuple[str, int]], checks: dict | None = None) -> dict:
    return {
        "health": {"status": "HEALTH_WARN" if checks else "HEALTH_OK", "checks": checks or {}},
        "osdmap": {"num_osds": 3, "num_up_osds": 3, "num_in_osds": 3},
        "pgmap": {
            "num_pgs": sum(c for _, c in pgs),
            "pgs_by_state": [{"state_name": s, "count": c} for s, c in pgs],
        },
    }


def test_wait_clean_returns_history_when_pgs_recover() -> None:
    clock = FakeClock()
    degraded = raw_status(
        [("active+undersized+degraded", 16)], {"PG_DEGRADED": {"summary": {"message": "x"}}}
    )
    cli = ScriptedCli([degraded, degraded, raw_status([("peering", 16)]), raw_status([("active+clean", 16)])])
    done = cli.wait_clean(10.0, clock=clock, sleep=clock.sleep)
    assert done.verdict.ok and [v.ok for v in done.history] == [False, False, True]
    assert done.seconds == pytest.approx(0.75)


def test_wait_clean_times_out_naming_the_last_state_and_next_step() -> None:
    clock = FakeClock()
    cli = ScriptedCli(
        [raw_status([("active+undersized+degraded", 16)], {"PG_DEGRADED": {"summary": {"message": "x"}}})]
    )
    with pytest.raises(CephWaitTimeout) as e:
        cli.wait_clean(2.0, clock=clock, sleep=clock.sleep)
    assert "16 active+undersized+degraded" in str(e.value) and "then run again" in str(e.value)
    assert clock.now == pytest.approx(2.0)


# ---- the homelab's shape: mons, mgrs, CRUSH names, EAGAIN, noout ownership ----------------------

REAL = json.loads((Path(__file__).resolve().parent / "data" / "ceph-16.2.15.json").read_text())
# The real capture's nodes: kubernetes.io/hostname equals the node name, one of them a dotted name.
LABELS = {"m720q-1": "m720q-1", "m720q-2": "m720q-2", "m720q-3.lan": "m720q-3.lan"}


def real(name: str) -> str:
    return REAL[name]["stdout"]


def test_ok_to_stop_eagain_is_undecided_not_a_refusal() -> None:
    r = REAL["ok_to_stop_eagain"]
    a = ceph_gate.parse_ok_to_stop(r["stdout"], r["rc"], r["stderr"])
    assert a.undecided and not a.ok and a.returncode == 11 and len(a.unknown_pgs) == 17
    v = ceph_gate.ok_to_stop_verdict(a, [1], host="m720q-2")
    assert not v.ok and "17 PGs have unknown state" in v.reason and "ask again" in v.reason


def test_ok_to_stop_names_already_inactive_and_more_degraded_pgs() -> None:
    r = REAL["ok_to_stop_already_inactive"]
    a = ceph_gate.parse_ok_to_stop(r["stdout"], r["rc"], r["stderr"])
    v = ceph_gate.ok_to_stop_verdict(a, [0], host="m720q-1")
    assert not v.ok and "17 PGs are already inactive" in v.reason and "17 PGs would become inactive" in v.reason
    r = REAL["ok_to_stop_more_degraded"]
    b = ceph_gate.parse_ok_to_stop(r["stdout"], r["rc"], r["stderr"])
    assert len(b.ok_become_more_degraded) == 16 and b.bad_become_inactive == ("2.0",)
    assert "1 PGs would become inactive (2.0)" in ceph_gate.ok_to_stop_verdict(b, [1]).reason


def test_crush_host_name_turns_dots_into_dashes_as_rook_does() -> None:
    assert ceph_gate.crush_host_name("m720q-3.lan") == "m720q-3-lan"
    assert ceph_gate.crush_host_name("m720q-1") == "m720q-1"


def test_osds_of_a_dotted_hostname_are_found_under_rooks_crush_name() -> None:
    tree = ceph_gate.parse_osd_tree(real("osd_tree_fqdn"))
    assert tree.hosts == {"m720q-1": (0,), "m720q-2": (1,), "m720q-3-lan": (2,)}
    placed = ceph_gate.node_osds("m720q-3.lan", LABELS, tree, ceph_gate.parse_node_ls(real("node_ls")))
    assert placed.verdict.ok and placed.osds == (2,) and placed.bucket == "m720q-3-lan"
    # By CRUSH alone (no `ceph node ls`), too.
    assert ceph_gate.node_osds("m720q-3.lan", LABELS, tree).osds == (2,)


def test_node_without_osds_needs_no_osd_gate_and_says_so() -> None:
    tree = ceph_gate.parse_osd_tree(real("osd_tree_fqdn"))
    labels = {**LABELS, "m720q-4": "m720q-4"}
    placed = ceph_gate.node_osds("m720q-4", labels, tree, ceph_gate.parse_node_ls(real("node_ls")))
    assert placed.verdict.ok and placed.osds == ()
    assert "holds no OSDs" in placed.verdict.reason and "no OSD gate needed" in placed.verdict.reason


def test_node_osds_refuses_when_an_osd_sits_under_a_host_no_node_matches() -> None:
    # The label of m720q-3.lan is not known (say, the Node was renamed): its OSD could be anyone's.
    tree = ceph_gate.parse_osd_tree(real("osd_tree_fqdn"))
    labels = {"m720q-1": "m720q-1", "m720q-2": "m720q-2", "m720q-4": "m720q-4"}
    placed = ceph_gate.node_osds("m720q-4", labels, tree)
    assert not placed.verdict.ok and "CRUSH hosts m720q-3-lan match no node" in placed.verdict.reason


def test_node_osds_include_those_whose_daemon_names_the_node_outside_its_bucket() -> None:
    tree = ceph_gate.parse_osd_tree({"nodes": [{"id": -1, "name": "default", "type": "root", "children": [-3]},
                                               {"id": -3, "name": "m720q-1", "type": "host", "children": []},
                                               {"id": 5, "name": "osd.5", "type": "osd"}], "stray": []})
    daemons = ceph_gate.Daemons(osds={"m720q-1": (5,)})
    placed = ceph_gate.node_osds("m720q-1", {"m720q-1": "m720q-1"}, tree, daemons)
    assert placed.verdict.ok and placed.osds == (5,)


def test_mon_gate_reads_a_muted_mon_down_from_the_quorum_itself() -> None:
    daemons = ceph_gate.parse_node_ls(real("node_ls"))
    down = ceph_gate.parse_quorum_status(real("quorum_status_mon_down"))
    assert down.out == ("c",)
    v, mons = ceph_gate.mon_gate(down, "m720q-1", daemons)
    assert not v.ok and mons == ("a",) and "mon(s) c out of quorum (quorum a,b of a,b,c)" in v.reason
    ok, mons = ceph_gate.mon_gate(ceph_gate.parse_quorum_status(real("quorum_status_ok")), "m720q-2", daemons)
    assert ok.ok and mons == ("b",)


def test_clean_gate_refuses_a_muted_mon_down() -> None:
    st = ceph_gate.parse_status(real("status_mon_down_muted"))
    assert st.health.status == "HEALTH_OK" and st.quorum_names == ("a", "b") and st.num_mons == 3
    v = ceph_gate.cluster_clean(st)
    assert not v.ok and "only 2 of 3 mons in quorum (a,b)" in v.reason
    assert v.reason.endswith("start the mons that are out of quorum (`ceph quorum_status`; `kubectl -n rook-ceph "
                             "get pods -l app=rook-ceph-mon`), then run again")


def test_mon_ok_to_stop_answers_are_the_real_texts() -> None:
    ok = ceph_gate.parse_mon_ok_to_stop(0, REAL["mon_ok_to_stop_ok"]["stderr"], ["b"])
    assert ok.ok and "quorum should be preserved (a,c) after stopping [b]" in ok.reason
    no = ceph_gate.parse_mon_ok_to_stop(16, REAL["mon_ok_to_stop_ebusy"]["stderr"], ["a"])
    assert not no.ok and "not enough monitors would be available (b) after stopping mons [a]" in no.reason
    with pytest.raises(CephParseError):
        ceph_gate.parse_mon_ok_to_stop(2, "Error ENOENT", ["a"])


def test_mgr_gate_needs_an_active_mgr_and_a_standby_for_the_active_ones_node() -> None:
    daemons = ceph_gate.parse_node_ls(real("node_ls"))
    stat = ceph_gate.parse_mgr_stat(real("mgr_stat"))
    assert stat == ceph_gate.MgrStat(available=True, active="a", num_standby=1)
    assert ceph_gate.mgr_gate(stat, "m720q-1", daemons).ok
    alone = ceph_gate.MgrStat(available=True, active="a", num_standby=0)
    assert not ceph_gate.mgr_gate(alone, "m720q-1", daemons).ok
    assert ceph_gate.mgr_gate(alone, "m720q-2", daemons).ok  # the node's mgr is not the active one
    v = ceph_gate.mgr_gate(ceph_gate.MgrStat(available=False, active=None, num_standby=1), "m720q-3.lan", daemons)
    assert not v.ok and "no active mgr" in v.reason


def test_pg_stat_of_a_new_mgr_without_reports_is_not_clean() -> None:
    unknown = ceph_gate.parse_pg_stat({"pg_ready": False, "pg_summary": {
        "num_pg_by_state": [{"name": "unknown", "num": 17}], "num_pgs": 17}})
    st = ceph_gate.parse_status(real("status_ok"))
    assert ceph_gate.cluster_clean(st).ok  # the mon's digest says clean ...
    v = ceph_gate.cluster_clean(st, pgs=unknown)  # ... the active mgr does not know yet
    assert not v.ok and "knows no PG state yet" in v.reason


def owner(**kw: str) -> str:
    return ceph_gate.NooutOwner(**{"flow": "talos-upgrade", "flow_run_id": "run-1", "cluster": "m720q",
                                   "node": "m720q-2", "set_at": "2025-01-01T00:00:00+00:00", **kw}).to_json()


@pytest.mark.parametrize(("record", "own", "words"), [
    (owner(), True, "noout is this flow's own: set by talos-upgrade run run-1 on cluster m720q before m720q-2"),
    (owner(cluster="homelab"), False, "it was set by talos-upgrade run run-1 on cluster homelab"),
    (owner(flow="kubernetes-upgrade"), False, "it was set by kubernetes-upgrade run run-1"),
    (None, False, "nobody recorded setting it (no `ceph config-key get homelab/noout-owner`)"),
    ("maintenance by alice", False, "homelab/noout-owner holds something else: 'maintenance by alice'"),
])
def test_noout_is_own_only_when_its_record_names_this_flow_and_cluster(record, own, words) -> None:
    v, is_own = ceph_gate.noout_verdict(frozenset({"noout", "sortbitwise"}), record, "talos-upgrade", "m720q")
    assert (v.ok, is_own) == (own, own) and words in v.reason
    assert ceph_gate.noout_verdict(frozenset({"sortbitwise"}), owner(), "talos-upgrade", "m720q") == (
        Verdict(True, "noout is not set"), False)


# ---- the CLI wrapper against a stateful fake `ceph` -------------------------------------------

FAKE_CEPH = r'''#!{python} -S
"""A `ceph` stand-in with state in files beside it: flags, config-keys, and scripted ok-to-stop replies."""
import json, os, pathlib, sys
here = pathlib.Path(sys.argv[0]).parent
args = [a for a in sys.argv[1:] if a not in ("-f", "json")]
while args and args[0] == "--connect-timeout":
    args = args[2:]
state = json.loads((here / "state.json").read_text())
real = json.loads(pathlib.Path({samples!r}).read_text())
def reply(name):
    r = real[name]
    sys.stdout.write(r["stdout"]); sys.stderr.write(r["stderr"]); sys.exit(r["rc"])
def save():  # atomically: other calls of the same gate read the state meanwhile
    tmp = here / ("state.%d.tmp" % os.getpid())
    tmp.write_text(json.dumps(state)); tmp.replace(here / "state.json")
cmd = " ".join(args[:2])
if cmd in ("osd set", "osd unset"):
    flags = set(state["flags"]); (flags.add if args[1] == "set" else flags.discard)(args[2])
    state["flags"] = sorted(flags); save(); sys.stderr.write(args[2] + " is " + args[1] + "\n")
elif cmd == "osd dump":
    print(json.dumps({{"flags": ",".join(state["flags"] + ["sortbitwise"])}}))
elif args[:2] == ["config-key", "get"]:
    if args[2] not in state["keys"]:
        sys.stderr.write("Error ENOENT: \n"); sys.exit(2)
    sys.stdout.write(state["keys"][args[2]])
elif args[:2] == ["config-key", "set"]:
    if not state.get("keys_broken"):
        state["keys"][args[2]] = args[3]; save()
    sys.stderr.write("set " + args[2] + "\n")
elif args[:2] == ["config-key", "rm"]:
    if not state.get("rm_broken"):
        state["keys"].pop(args[2], None); save()
    sys.stderr.write("key deleted\n")
elif cmd == "osd ok-to-stop":
    script = state["ok_to_stop"]
    state["ok_to_stop"] = script[1:] or script; save(); reply(script[0])
elif cmd == "quorum_status":
    reply("quorum_status_ok")
elif cmd == "mgr stat":
    reply("mgr_stat")
elif cmd == "node ls":
    reply("node_ls")
elif cmd == "osd tree":
    reply("osd_tree_fqdn")
elif cmd == "mon ok-to-stop":
    reply("mon_ok_to_stop_ok")
else:
    sys.stderr.write("unexpected: " + " ".join(args) + "\n"); sys.exit(22)
'''


def stateful_ceph(tmp_path: Path, **state: object) -> CephCli:
    import sys

    exe = tmp_path / "ceph"
    exe.write_text(FAKE_CEPH.format(python=sys.executable, samples=str(Path(__file__).parent / "data" / "ceph-16.2.15.json")))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "state.json").write_text(json.dumps({"flags": [], "keys": {}, "ok_to_stop": ["ok_to_stop_ok"], **state}))
    return CephCli([str(exe)], {}, timeout_s=10)


def saved(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "state.json").read_text())


def test_node_gate_asks_again_after_eagain_and_opens(tmp_path: Path) -> None:
    cli = stateful_ceph(tmp_path, ok_to_stop=["ok_to_stop_eagain", "ok_to_stop_eagain", "ok_to_stop_ok"])
    waits: list[Verdict] = []
    gate = cli.node_gate("m720q-1", LABELS, time.monotonic() + 30, interval_s=0.01, on_wait=waits.append)
    assert gate.ok and gate.waited == 2 and gate.osds == (0,) and gate.mons == ("a",)
    assert all("unknown state" in w.reason for w in waits)
    assert [v.reason.split(":")[0] for v in gate.checks][-2:] == ["Ceph says mon(s) a may stop",
                                                                  "Ceph says m720q-1's OSDs [0] are ok to stop; 17 PGs will be degraded meanwhile"]


def test_node_gate_gives_up_at_the_deadline_naming_the_unknown_pgs(tmp_path: Path) -> None:
    cli = stateful_ceph(tmp_path, ok_to_stop=["ok_to_stop_eagain"])
    with pytest.raises(CephWaitTimeout, match="17 PGs have unknown state"):
        cli.node_gate("m720q-1", LABELS, time.monotonic() + 0.5, interval_s=0.05)


def test_node_gate_refuses_ebusy_at_once(tmp_path: Path) -> None:
    cli = stateful_ceph(tmp_path, ok_to_stop=["ok_to_stop_ebusy_one_down", "ok_to_stop_ok"])
    gate = cli.node_gate("m720q-2", LABELS, time.monotonic() + 30, interval_s=0.01)
    assert not gate.ok and gate.waited == 0 and "would become inactive" in gate.reason


def test_set_noout_records_its_owner_and_unset_removes_both(tmp_path: Path) -> None:
    cli = stateful_ceph(tmp_path)
    me = ceph_gate.NooutOwner("talos-upgrade", "run-1", "m720q", "m720q-1", "2025-01-01T00:00:00+00:00")
    cli.set_noout(me)
    assert "noout" in saved(tmp_path)["flags"]
    assert ceph_gate.parse_noout_owner(saved(tmp_path)["keys"][ceph_gate.NOOUT_OWNER_KEY]) == me
    # The next run of the same flow takes it over, recording itself.
    cli.set_noout(ceph_gate.NooutOwner("talos-upgrade", "run-2", "m720q", "m720q-2"))
    assert '"run-2"' in saved(tmp_path)["keys"][ceph_gate.NOOUT_OWNER_KEY]
    cli.unset_noout()
    assert saved(tmp_path)["flags"] == [] and saved(tmp_path)["keys"] == {}


def test_set_noout_does_not_take_over_someone_elses(tmp_path: Path) -> None:
    cli = stateful_ceph(tmp_path, flags=["noout"])
    with pytest.raises(CephFlagError, match="noout is set, but not by talos-upgrade on m720q: nobody recorded"):
        cli.set_noout(ceph_gate.NooutOwner("talos-upgrade", "run-1", "m720q"))
    assert saved(tmp_path)["flags"] == ["noout"] and saved(tmp_path)["keys"] == {}


def test_set_noout_that_cannot_be_recorded_is_taken_back(tmp_path: Path) -> None:
    cli = stateful_ceph(tmp_path, keys_broken=True)
    with pytest.raises(CephFlagError, match="noout was unset again"):
        cli.set_noout(ceph_gate.NooutOwner("talos-upgrade", "run-1", "m720q"))
    assert saved(tmp_path)["flags"] == []


def test_unset_noout_whose_record_stays_behind_raises_naming_it(tmp_path: Path) -> None:
    cli = stateful_ceph(tmp_path, rm_broken=True)
    cli.set_noout(ceph_gate.NooutOwner("talos-upgrade", "run-1", "m720q"))
    with pytest.raises(CephFlagError, match="noout is unset, but its owner record homelab/noout-owner is still"):
        cli.unset_noout()
    assert saved(tmp_path)["flags"] == []


def test_clean_reads_the_mon_again_once_the_pgs_are_clean_and_not_while_they_move() -> None:
    degraded = raw_status([("active+undersized+degraded", 16)], {"OSD_DOWN": {"summary": {"message": "1 osds down"}}})
    clean = raw_status([("active+clean", 16)])

    cli = ScriptedCli([degraded, degraded, degraded, clean])
    verdicts = [cli.clean() for _ in range(4)]
    assert [v.ok for v in verdicts] == [False, False, False, True]
    assert "OSD_DOWN" in verdicts[2].reason  # the mon's view of the first read, reused for the message
    assert cli.statuses == 2  # the first read, and the confirmation once the PGs are clean


def test_clean_reads_the_mon_on_every_poll_once_only_the_pgs_are_left() -> None:
    # OSDs all up, only PG_DEGRADED: the PGs may turn clean any moment, and the mon's view is wanted then.
    recovering = raw_status([("active+recovering+degraded", 16)], {"PG_DEGRADED": {"summary": {"message": "x"}}})
    clean = raw_status([("active+clean", 16)])

    cli = ScriptedCli([recovering, recovering, clean])
    assert [cli.clean().ok for _ in range(3)] == [False, False, True]
    assert cli.statuses == 3
