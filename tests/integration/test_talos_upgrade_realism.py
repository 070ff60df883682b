"""The talos-upgrade flow where Talos behaves as Talos does: failed, fallen-back and late upgrades,
schematics and the Image Factory, Talos's compatibility rules, `talosctl health` after each node, Talos's
own cordon mark, etcd before each node, a flaky API and an endpoint without a VIP, partial multi-node
replies, the talosctl options, and where the etcd snapshots go. Simulated homelab, real Prefect server."""

from __future__ import annotations

import json
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("prefect_api_url")

FAST = {"node_ready": 4, "etcd": 3, "osds_up": 3, "ceph_clean": 3, "lock": 60, "hook": 10, "upgrade": 30,
        "health": 5}
KNOBS = {"reboot_seconds": 0.3, "recovery_seconds": 0.1}
M720Q = ["m720q-1", "m720q-2", "m720q-3"]


def save_block(t: Any, **fields: Any) -> str:
    from twin.register import homelab_block

    block = homelab_block(t)
    for k, v in fields.items():
        setattr(block, k, v)
    name = f"twin-{uuid.uuid4().hex[:8]}"
    block.save(name, overwrite=True)
    return name


def upgrade(t: Any, tmp_path: Path, block: str | None = None, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from flows.talos_upgrade import Deadlines, state_result, talos_upgrade

    kw.setdefault("require_approval", False)
    kw["deadlines"] = Deadlines(**{**FAST, **kw.get("deadlines", {})})
    kw.setdefault("snapshot_dir", str(tmp_path / "snapshots"))
    state = talos_upgrade(homelab=block or save_block(t), return_state=True, **kw)
    return state, state_result(state)


def actions(res: dict[str, Any]) -> list[str]:
    return [n["action"] for n in res["nodes"]]


def noout_set(t: Any) -> bool:
    out, _, _ = t.ceph.run(["osd", "dump", "-f", "json"])
    return "noout" in json.loads(out).get("flags", "")


def disruptions(t: Any, node: str) -> int:
    return sum(1 for d in t.record.intervals() if d.node == node)


def when_marked(node: str, step: str, then: Any, timeout: float = 60) -> threading.Thread:
    """Run `then()` once the flow marks `step` of `node` (flows._upgrade.TIMELINE)."""
    from flows._upgrade import TIMELINE

    start = len(TIMELINE)

    def wait() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(n == node and s == step for _, n, s in TIMELINE[start:]):
                then()
                return
            time.sleep(0.01)

    th = threading.Thread(target=wait, daemon=True)
    th.start()
    return th


# --- a failed or timed-out talosctl upgrade -----------------------------------------------------


def test_installer_failure_leaves_the_node_stuck_and_the_error_says_talosctl_reboot_not_rollback(twin, tmp_path):
    t = twin(faults=["upgrade-fails=m720q-2"], **KNOBS)
    state, res = upgrade(t, tmp_path, debug=True)
    assert state.is_failed() and actions(res) == ["upgraded", "failed", "not-started"]
    err = res["error"]
    assert err.startswith("m720q-2: talosctl upgrade failed. Last seen: ") and "stuck mid-sequence" in err
    assert "stage rebooting" in err and "etcd stopped" in err
    assert "`talosctl reboot --nodes 10.42.0.102`" in err and "rollback" not in err
    # The node is cordoned and its kubelet silent: noout stays, said so.
    assert res["noout"] == "left-set" and noout_set(t) and "noout is left set on purpose" in err
    assert disruptions(t, "m720q-3") == 0
    # --debug: talosctl's report with the node's console is in the run's logs.
    logs = run_logs(state)
    assert 'console logs for nodes ["10.42.0.102"]' in logs and "upgrade sequence: failed" in logs


def run_logs(state: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)  # the run's logs reach the server in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return "\n".join(x.message for x in logs)


def test_an_upgrade_refused_before_anything_changed_says_so_and_unsets_noout(twin, tmp_path):
    t = twin(**KNOBS)
    # Between the gates and the call a member turns unhealthy: Talos's own etcd check refuses the upgrade.
    th = when_marked("m720q-2", "pre-hook", lambda: t.inject("etcd-unhealthy", "m720q-3"))
    state, res = upgrade(t, tmp_path, save_block(t, pre_node_hook="sleep 1"))
    th.join(5)
    assert state.is_failed() and actions(res) == ["upgraded", "failed", "not-started"]
    err = res["error"]
    assert "error validating etcd for upgrade" in err and "refused before anything changed" in err
    assert "nothing changed on m720q-2" in err and "rollback" not in err
    assert res["noout"] == "unset" and not noout_set(t) and disruptions(t, "m720q-2") == 0


def test_a_node_that_fell_back_to_the_old_image_is_reported_without_suggesting_rollback(twin, tmp_path):
    t = twin(faults=["upgrade-falls-back=m720q-1"], **KNOBS)
    state, res = upgrade(t, tmp_path)
    assert state.is_failed() and actions(res) == ["failed", "not-started", "not-started"]
    err = res["error"]
    assert err.startswith("m720q-1: verify version failed.") and "fell back to the old one" in err
    assert "`talosctl rollback` would boot the image that just failed" in err
    assert res["noout"] == "unset"  # the node is back, Ready, its OSD up


def test_a_node_that_finishes_after_talosctl_gave_up_is_carried_on_with(twin, tmp_path):
    t = twin(faults=["upgrade-slow=m720q-2"], **KNOBS)
    state, res = upgrade(t, tmp_path, nodes=["m720q-2"], deadlines={"upgrade": 1})
    assert state.is_completed(), res["error"]
    assert actions(res) == ["upgraded"] and t.world.node("m720q-2").talos_version == "v1.11.5"


# --- schematics -------------------------------------------------------------------------------


def _edit_talconfig(t: Any, old: str, new: str, count: int = 1) -> None:
    path = t.git.tree / "clusters" / "m720q" / "talos" / "talconfig.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


def test_a_schematic_change_at_the_same_version_upgrades_the_node_registered_first(twin, tmp_path):
    t = twin(state="synced", **KNOBS)
    # m720q-2 gains an extension in talconfig: its second schematic entry of the file.
    path = t.git.tree / "clusters" / "m720q" / "talos" / "talconfig.yaml"
    text = path.read_text()
    first = text.index("            - siderolabs/intel-ucode", text.index("hostname: m720q-2"))
    path.write_text(text[:first] + "            - siderolabs/iscsi-tools\n" + text[first:])
    state, res = upgrade(t, tmp_path)
    assert state.is_completed(), res["error"]
    assert [(n["name"], n["from"], n["to"], n["action"]) for n in res["nodes"]] == [
        ("m720q-1", "v1.11.5", "v1.11.5", "skipped"), ("m720q-2", "v1.11.5", "v1.11.5", "upgraded"),
        ("m720q-3", "v1.11.5", "v1.11.5", "skipped")]
    n = t.world.node("m720q-2")
    assert "iscsi-tools" in n.extensions and n.schematic_id in t.world.schematics
    assert ("POST", "/schematics", 201) in t.image_factory.requests
    assert disruptions(t, "m720q-1") == disruptions(t, "m720q-3") == 0


def test_an_image_that_would_drop_a_running_extension_is_refused_at_plan(twin, tmp_path):
    t = twin(**KNOBS)
    _edit_talconfig(t, "            - siderolabs/i915\n", "", count=3)
    state, res = upgrade(t, tmp_path, dry_run=True)
    assert state.is_failed() and "carries no i915, which m720q-1 runs now" in res["error"]
    state, res = upgrade(t, tmp_path, dry_run=True, allow_extension_removal=True)
    assert state.is_completed() and actions(res) == ["would-upgrade"] * 3


def test_an_unregistered_schematic_stops_the_run_before_the_first_node(twin, tmp_path):
    t = twin(**KNOBS)
    image = f"{t.image_factory.registry}/installer/{'0' * 64}"
    state, res = upgrade(t, tmp_path, images={"m720q-1": image})
    assert state.is_failed() and res["error"].startswith("m720q-1: register schematic failed. Last seen: ")
    assert "schematic not found" in res["error"] and "nothing was changed" in res["error"]
    assert t.record.intervals("m720q") == [] and res["noout"] == "untouched" and res["etcd_snapshot"] is None


# --- Talos's rules at plan time ----------------------------------------------------------------


def test_a_target_that_does_not_run_the_clusters_kubernetes_and_a_host_too_old_are_refused_at_plan(twin, tmp_path):
    t = twin(**KNOBS)
    for n in t.world.clusters["m720q"].nodes.values():
        t.world.update(n, kubelet_version="v1.29.4")
    t.world.update(t.world.node("m720q-3"), talos_version="v1.9.2")
    state, res = upgrade(t, tmp_path, to="v1.12.0", allow_minor_skip=True, dry_run=True)
    assert state.is_failed() and res["error"].startswith("plan refused: ")
    assert "m720q-3: host version 1.9.2 is too old to upgrade to Talos 1.12.0" in res["error"]
    assert "Talos v1.12.0 does not run the cluster's Kubernetes: version of Kubernetes 1.29.4 is too old" in res["error"]


def test_a_node_missing_from_a_multi_node_reply_did_not_answer(twin, tmp_path):
    t = twin(**KNOBS)
    t.world.update(t.world.node("m720q-3"), phase="off")
    state, res = upgrade(t, tmp_path, dry_run=True)
    assert state.is_failed()
    assert "m720q-3: no Talos version observed" in res["error"] and "it did not answer" in res["error"]
    assert "no route to host" in res["error"] and "m720q-1" not in res["error"]


def test_reboot_mode_stage_and_debug_are_in_the_plan_and_the_dry_runs_argv(twin, tmp_path):
    t = twin(**KNOBS)
    state, res = upgrade(t, tmp_path, dry_run=True, reboot_mode="powercycle", stage=True, debug=True)
    assert state.is_completed()
    for s in res["plan"]["steps"]:
        argv = s["argv"]
        assert argv[argv.index("--reboot-mode") + 1] == "powercycle" and "--stage" in argv and "--debug" in argv


def test_a_staged_upgrade_runs_and_completes(twin, tmp_path):
    t = twin(**KNOBS)
    state, res = upgrade(t, tmp_path, nodes=["m720q-3"], stage=True)
    assert state.is_completed(), res["error"]
    assert t.world.node("m720q-3").talos_version == "v1.11.5"


# --- after each node, before each node ----------------------------------------------------------


def test_talosctl_health_runs_after_each_node_and_its_failure_stops_the_run(twin, tmp_path):
    from flows._upgrade import TIMELINE

    t = twin(faults=["static-pod-missing=m720q-2"], **KNOBS)
    start = len(TIMELINE)
    state, res = upgrade(t, tmp_path, deadlines={"health": 1})
    assert state.is_failed() and actions(res) == ["upgraded", "failed", "not-started"]
    assert res["error"].startswith("m720q-2: talosctl health failed. Last seen: ")
    assert "missing static pods on node 10.42.0.102: [kube-system/kube-scheduler]" in res["error"]
    steps = [(n, s) for _, n, s in TIMELINE[start:]]
    assert steps.index(("m720q-1", "talos-health")) < steps.index(("m720q-2", "upgrade"))
    assert disruptions(t, "m720q-3") == 0


def test_a_node_the_flow_uncordons_keeps_no_talos_cordon_mark_and_snapshots_stay_private(twin, tmp_path,
                                                                                          monkeypatch):
    from flows import upgrade_steps

    # Talos would lift its own cordon only after a minute: the flow does it, mark and all.
    monkeypatch.setattr(upgrade_steps, "TALOS_UNCORDON_GRACE_S", 0.2)
    t = twin(talos_uncordon_seconds=60, **KNOBS)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    for i in range(3):
        (snaps / f"m720q-etcd-2026010{i}T000000Z.db").write_bytes(b"old")
        time.sleep(0.01)
    state, res = upgrade(t, tmp_path, nodes=["m720q-2"], snapshot_dir=str(snaps), snapshot_keep=2)
    assert state.is_completed(), res["error"]
    node = t.stores["m720q"].get("v1", "Node", None, "m720q-2")
    assert not node["spec"].get("unschedulable")
    assert "talos.dev/cordoned" not in node["metadata"].get("annotations", {})
    assert not t.world.node("m720q-2").talos_cordoned
    snapshot = Path(res["etcd_snapshot"])
    assert snapshot.parent == snaps and stat.S_IMODE(snaps.stat().st_mode) == 0o700
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    assert sorted(p.name for p in snaps.iterdir()) == ["m720q-etcd-20260102T000000Z.db", snapshot.name]


def test_etcd_failing_during_the_pause_stops_the_run_before_the_next_node(twin, tmp_path):
    t = twin(**KNOBS)
    th = when_marked("m720q-1", "done", lambda: t.inject("etcd-unhealthy", "m720q-3"))
    state, res = upgrade(t, tmp_path, pause_seconds=1.0)
    th.join(5)
    assert state.is_failed() and actions(res) == ["upgraded", "failed", "not-started"]
    assert res["error"].startswith("m720q-2: etcd healthy before the node failed. Last seen: etcd not healthy")
    assert "nothing was changed on this node" in res["error"]
    assert disruptions(t, "m720q-2") == 0 and res["noout"] == "unset"


# --- the API ------------------------------------------------------------------------------------


def test_the_upgrade_completes_with_a_flaky_api_and_the_endpoint_api_gone_while_its_node_reboots(twin, tmp_path):
    t = twin(faults=["kube-flaky=0.3"], **KNOBS)
    server, seen, done = t.kube["m720q"], set(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            if t.world.node("m720q-1").phase == "rebooting":
                seen.add(server.available)
            done.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        state, res = upgrade(t, tmp_path, deadlines={"node_ready": 20, "etcd": 10, "osds_up": 10, "ceph_clean": 10,
                                                     "health": 20})
    finally:
        done.set()
        th.join(5)
    assert state.is_completed(), res["error"]
    assert actions(res) == ["upgraded"] * 3 and t.record.max_concurrent("m720q") == 1
    assert False in seen  # while m720q-1 rebooted, https://10.42.0.101:6443 answered nothing
    assert server.count("fault") > 0  # and the flaky share of requests was refused along the way


def test_the_command_line_passes_the_talosctl_options_and_refuses_an_unknown_reboot_mode(prefect_api_url):
    from typer.testing import CliRunner

    from homelab.cli import app

    out = CliRunner().invoke(app, ["upgrade", "talos", "--twin", "--dry-run", "--json", "--node", "m720q-2",
                                   "--reboot-mode", "powercycle", "--stage", "--debug"])
    assert out.exit_code == 0, out.output
    [step] = [s for s in json.loads(out.stdout.strip().splitlines()[-1])["plan"]["steps"] if s["argv"]]
    assert step["argv"][-4:] == ["--reboot-mode", "powercycle", "--stage", "--debug"]
    out = CliRunner().invoke(app, ["upgrade", "talos", "--twin", "--dry-run", "--reboot-mode", "kexec"])
    assert out.exit_code == 2 and "--reboot-mode" in out.output
