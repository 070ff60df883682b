"""The talos-upgrade flow on the simulated homelab, against a real Prefect server."""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("prefect_api_url")

FAST = {"node_ready": 3, "etcd": 3, "osds_up": 3, "ceph_clean": 2, "lock": 60, "hook": 10, "upgrade": 30}
KNOBS = {"reboot_seconds": 0.4, "recovery_seconds": 0.2}
M720Q = ["m720q-1", "m720q-2", "m720q-3"]


def save_block(t: Any, **fields: Any) -> str:
    from twin.register import homelab_block

    block = homelab_block(t)
    for k, v in fields.items():
        setattr(block, k, v)
    name = f"twin-{uuid.uuid4().hex[:8]}"
    block.save(name, overwrite=True)
    return name


def upgrade(block: str, tmp_path: Path, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from flows.talos_upgrade import Deadlines, state_result, talos_upgrade

    kw.setdefault("require_approval", False)
    kw.setdefault("deadlines", Deadlines(**FAST))
    state = talos_upgrade(homelab=block, snapshot_dir=str(tmp_path / "snapshots"), return_state=True, **kw)
    return state, state_result(state)


def versions(t: Any, cluster: str = "m720q") -> dict[str, str]:
    with t.world.lock:
        return {h: n.talos_version for h, n in t.world.clusters[cluster].nodes.items()}


def disruptions(t: Any, node: str) -> int:
    return sum(1 for d in t.record.intervals() if d.node == node)


def noout_set(t: Any) -> bool:
    out, _, _ = t.ceph.run(["osd", "dump", "-f", "json"])
    import json

    return "noout" in json.loads(out).get("flags", "")


def test_upgrade_rolls_three_nodes_one_at_a_time(twin, tmp_path):
    t = twin(**KNOBS)
    state, res = upgrade(save_block(t), tmp_path)
    assert state.is_completed(), res["error"]
    assert res["status"] == "completed" and res["target_version"] == "v1.11.5"
    assert [(n["name"], n["from"], n["to"], n["action"]) for n in res["nodes"]] == [
        (h, "v1.11.4", "v1.11.5", "upgraded") for h in M720Q]
    assert res["max_disrupted"] == 1
    assert t.record.max_concurrent("m720q") == 1
    assert res["noout"] == "unset" and not noout_set(t)
    assert res["etcd_snapshot"] and Path(res["etcd_snapshot"]).stat().st_size > 0
    assert versions(t) == dict.fromkeys(M720Q, "v1.11.5")
    assert set(res) >= {"status", "target_version", "nodes", "max_disrupted", "noout", "etcd_snapshot", "error"}
    # The outcome table: each node's disruption window as the Node watch saw it, and the gates it passed.
    down = {d.node: d.end - d.start for d in t.record.intervals("m720q") if d.end is not None}
    for row in res["nodes"]:
        m = re.fullmatch(r"\d\d:\d\d:\d\dZ → \d\d:\d\d:\d\dZ \((\d+\.\d) s\)", row["disrupted"])
        assert m, [(r["name"], r["disrupted"]) for r in res["nodes"]]
        assert float(m.group(1)) >= round(down[row["name"]], 1) - 0.1, (row, down)  # cordoned before, Ready after
        assert row["gates passed"].split(", ") == [
            "all nodes Ready", "etcd healthy", "ceph ok-to-stop", "Talos v1.11.5", "Ready and uncordoned",
            "etcd healthy after", "talosctl health", "OSDs up", "ceph clean"], row


def test_dry_run_returns_the_plan_with_talosctl_argv_and_touches_nothing(twin, tmp_path):
    t = twin(**KNOBS)
    state, res = upgrade(save_block(t), tmp_path, dry_run=True)
    assert state.is_completed()
    assert res["status"] == "planned" and res["noout"] == "untouched" and res["etcd_snapshot"] is None
    assert [n["action"] for n in res["nodes"]] == ["would-upgrade"] * 3
    argv = res["plan"]["steps"][1]["argv"]
    assert argv[:4] == ["talosctl", "upgrade", "--nodes", "10.42.0.102"] and "--wait" in argv
    assert argv[argv.index("--image") + 1].endswith(":v1.11.5")
    assert t.record.intervals("m720q") == [] and versions(t) == dict.fromkeys(M720Q, "v1.11.4")


@pytest.mark.parametrize(("fault", "failed_node", "gate", "noout"), [
    ("not-ok-to-stop=m720q-2", "m720q-2", "ceph ok-to-stop", "unset"),
    # The installer failed after Talos had cordoned the node and stopped etcd and the kubelet: nothing
    # reboots it (docs/twin.md), so it is not up and noout stays.
    ("upgrade-fails=m720q-2", "m720q-2", "talosctl upgrade", "left-set"),
    ("node-never-ready=m720q-2", "m720q-2", "node Ready", "left-set"),
    ("ceph-stuck", "m720q-1", "Ceph clean", "unset"),
])
def test_fault_stops_the_run_before_the_next_node(twin, tmp_path, fault, failed_node, gate, noout):
    t = twin(faults=[fault], **KNOBS)
    state, res = upgrade(save_block(t), tmp_path)
    assert state.is_failed()
    assert res["status"] == "failed"
    actions = {n["name"]: n["action"] for n in res["nodes"]}
    assert actions[failed_node] == "failed"
    later = M720Q[M720Q.index(failed_node) + 1:]
    assert all(actions[h] == "not-started" for h in later)
    assert all(disruptions(t, h) == 0 for h in later)
    assert res["error"].startswith(f"{failed_node}: {gate} failed. Last seen: ")
    assert "Next step: " in res["error"] and res["error"] == state.message
    assert res["noout"] == noout and noout_set(t) == (noout == "left-set")
    if noout == "left-set":
        assert "noout is left set on purpose" in res["error"]
    if fault.startswith("node-never-ready"):  # it runs the target but is unhealthy: rollback is the way back
        assert "talosctl rollback --nodes 10.42.0.102" in res["error"]
    if fault.startswith("upgrade-fails"):  # it still runs the old image: a reboot is, a rollback is not
        assert "talosctl reboot --nodes 10.42.0.102" in res["error"] and "rollback" not in res["error"]
    assert t.record.max_concurrent("m720q") <= 1


def test_etcd_unhealthy_after_a_node_stops_the_run_before_the_next(twin, tmp_path):
    t = twin(**KNOBS)

    def inject_when_first_node_is_back() -> None:
        if t.world.wait_for(lambda: t.world.node("m720q-1").talos_version == "v1.11.5", 30):
            t.inject("etcd-unhealthy", "m720q-3")

    th = threading.Thread(target=inject_when_first_node_is_back, daemon=True)
    th.start()
    state, res = upgrade(save_block(t), tmp_path)
    th.join(5)
    assert state.is_failed()
    assert res["error"].startswith("m720q-1: etcd healthy failed. Last seen: etcd not healthy")
    assert "database space exceeded" in res["error"]
    assert [n["action"] for n in res["nodes"]] == ["failed", "not-started", "not-started"]
    assert disruptions(t, "m720q-2") == 0


def test_etcd_unhealthy_before_the_run_touches_nothing(twin, tmp_path):
    t = twin(faults=["etcd-unhealthy=m720q-2"], **KNOBS)
    state, res = upgrade(save_block(t), tmp_path)
    assert state.is_failed() and "preflight failed" in res["error"] and "etcd not healthy" in res["error"]
    assert t.record.intervals("m720q") == [] and res["noout"] == "untouched"


def test_rerun_after_a_failed_hook_continues_without_repeating_finished_nodes(twin, tmp_path):
    t = twin(**KNOBS)
    failing = save_block(t, pre_node_hook='test "$HOMELAB_NODE" != m720q-2')
    state, res = upgrade(failing, tmp_path)
    assert state.is_failed()
    assert res["error"].startswith("m720q-2: pre-hook failed.")
    assert [n["action"] for n in res["nodes"]] == ["upgraded", "failed", "not-started"]
    assert res["noout"] == "unset" and not noout_set(t)

    state, res = upgrade(save_block(t), tmp_path)
    assert state.is_completed(), res["error"]
    assert [n["action"] for n in res["nodes"]] == ["skipped", "upgraded", "upgraded"]
    assert {h: disruptions(t, h) for h in M720Q} == dict.fromkeys(M720Q, 1)
    assert t.record.max_concurrent("m720q") == 1


def test_hook_gets_node_in_environment_not_in_the_command(twin, tmp_path):
    t = twin(**KNOBS)
    out = tmp_path / "hook.log"
    block = save_block(t, post_node_hook=f'echo "$HOMELAB_NODE $HOMELAB_NODE_IP" >> {out}')
    state, res = upgrade(block, tmp_path, nodes=["m720q-3"])
    assert state.is_completed(), res["error"]
    assert out.read_text().splitlines() == ["m720q-3 10.42.0.103"]


def test_two_runs_started_together_never_overlap(twin, tmp_path):
    t = twin(**KNOBS)
    block = save_block(t)
    results: list[dict[str, Any]] = []

    def run() -> None:
        results.append(upgrade(block, tmp_path)[1])

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert sorted(r["status"] for r in results) == ["completed", "completed"]
    assert t.record.max_concurrent("m720q") == 1
    assert {h: disruptions(t, h) for h in M720Q} == dict.fromkeys(M720Q, 1)
    assert sorted(sum(n["action"] == "upgraded" for n in r["nodes"]) for r in results) == [0, 3]


@pytest.mark.parametrize(("to", "words"), [("v1.13.0", "skips a minor"), ("v1.11.3", "is a downgrade")])
def test_upgrade_refuses_skipped_minor_and_downgrade(twin, tmp_path, to, words):
    t = twin(**KNOBS)
    state, res = upgrade(save_block(t), tmp_path, to=to)
    assert state.is_failed() and res["status"] == "failed"
    assert words in res["error"] and t.record.intervals("m720q") == []


def test_closed_window_defers_the_run_unless_run_now(twin, tmp_path):
    from flows.talos_upgrade import MaintenanceWindow

    t = twin(**KNOBS)
    block = save_block(t)
    # Open one hour a year, on a date other than today.
    month = 6 if time.gmtime().tm_mon != 6 else 7
    window = MaintenanceWindow(cron=f"0 0 1 {month} *", hours=1, timezone="Europe/Berlin")
    state, res = upgrade(block, tmp_path, window=window)
    assert state.is_completed() and res["status"] == "deferred" and "next opens" in res["error"]
    assert t.record.intervals("m720q") == []
    state, res = upgrade(block, tmp_path, window=window, run_now=True, nodes=["m720q-1"])
    assert res["status"] == "completed", res["error"]
    assert [n["action"] for n in res["nodes"]] == ["upgraded"]


def test_refuses_to_upgrade_the_node_the_run_executes_on(twin, tmp_path, monkeypatch):
    t = twin(**KNOBS)
    monkeypatch.setenv("NODE_NAME", "m720q-2")
    state, res = upgrade(save_block(t), tmp_path)
    assert state.is_failed() and "this run executes on m720q-2 (NODE_NAME)" in res["error"]
    assert t.record.intervals("m720q") == []


def test_homelab_cluster_upgrades_without_ceph_gates(twin, tmp_path):
    t = twin(state="synced", **KNOBS)
    state, res = upgrade(save_block(t), tmp_path, cluster="homelab", to="v1.11.6")
    assert state.is_completed(), res["error"]
    assert [n["name"] for n in res["nodes"]] == ["homelab-cp-1", "homelab-worker-1"]
    assert all(n["action"] == "upgraded" for n in res["nodes"])
    assert res["noout"] == "untouched" and res["etcd_snapshot"]
    assert res["max_disrupted"] == 1 and t.record.max_concurrent("homelab") == 1
    assert versions(t, "homelab") == {"homelab-cp-1": "v1.11.6", "homelab-worker-1": "v1.11.6"}


def test_cli_dry_run_prints_the_plan_as_json_and_exits_0(prefect_api_url):
    import json

    from typer.testing import CliRunner

    from homelab.cli import app

    out = CliRunner().invoke(app, ["upgrade", "talos", "--twin", "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["status"] == "planned" and [n["action"] for n in res["nodes"]] == ["would-upgrade"] * 3


def test_cli_refused_plan_exits_1(prefect_api_url):
    import json

    from typer.testing import CliRunner

    from homelab.cli import app

    out = CliRunner().invoke(app, ["upgrade", "talos", "--twin", "--to", "v1.13.0", "--yes", "--json"])
    assert out.exit_code == 1, out.output
    assert "skips a minor" in json.loads(out.stdout.strip().splitlines()[-1])["error"]
