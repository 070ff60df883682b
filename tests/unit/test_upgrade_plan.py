"""The Talos and Kubernetes upgrade plans and the preflight gates: pure functions of data."""

from __future__ import annotations

import json

import pytest

from homelab.config import ProxmoxCluster, TalConfig
from homelab.gates import EtcdMember, EtcdStatus, NodeView
from homelab.upgrade import (
    PlanRefused,
    etcd_gate,
    failure_message,
    flux_gate,
    nodes_gate,
    plan_kubernetes_upgrade,
    plan_talos_upgrade,
    rollback_step,
    self_node_gate,
    supported_kubernetes,
)

I915 = {"customization": {"systemExtensions": {"officialExtensions": ["siderolabs/i915", "siderolabs/intel-ucode"]}}}
I915_ID = "4b3cd373a192c8469e859b7a0cfbed3ecc3577c4a2d346a37b0aeff9cd17cdb0"


def talconfig(version: str = "v1.11.5", workers: int = 1) -> TalConfig:
    nodes = [
        # a worker listed first: the plan must still put control planes first
        *({"hostname": f"w{i}", "ipAddress": f"10.42.0.{110 + i}", "controlPlane": False, "installDisk": "/dev/sda"}
          for i in range(1, workers + 1)),
        {"hostname": "m720q-1", "ipAddress": "10.42.0.101", "controlPlane": True, "installDisk": "/dev/nvme0n1",
         "schematic": I915},
        {"hostname": "m720q-2", "ipAddress": "10.42.0.102,fd00::2", "controlPlane": True, "installDisk": "/dev/nvme0n1",
         "schematic": I915},
        {"hostname": "m720q-3", "ipAddress": "10.42.0.103", "controlPlane": True, "installDisk": "/dev/nvme0n1",
         "talosImageURL": "registry.lan/talos/installer"},
    ]
    return TalConfig.model_validate({"clusterName": "m720q", "talosVersion": version, "kubernetesVersion": "v1.32.0",
                                     "endpoint": "https://10.42.0.101:6443", "nodes": nodes})


ALL_AT = {"m720q-1": "v1.11.4", "m720q-2": "v1.11.4", "m720q-3": "v1.11.4", "w1": "v1.11.4"}


# --- Talos plan -------------------------------------------------------------------------------


def test_plan_orders_control_planes_first_in_talconfig_order_then_workers():
    plan = plan_talos_upgrade(talconfig(), ALL_AT, None, None)
    assert [s.hostname for s in plan.steps] == ["m720q-1", "m720q-2", "m720q-3", "w1"]
    assert plan.target == "v1.11.5"
    assert all(s.action == "upgrade" for s in plan.steps)


def test_plan_builds_exact_upgrade_argv_with_factory_image_from_schematic():
    plan = plan_talos_upgrade(talconfig(), ALL_AT, None, None, talosctl="/opt/talosctl", timeout_s=900)
    step = plan.step("m720q-2")
    assert step.ip == "10.42.0.102"
    assert step.image == f"factory.talos.dev/installer/{I915_ID}:v1.11.5"
    assert step.argv == ("/opt/talosctl", "upgrade", "--nodes", "10.42.0.102", "--image", step.image,
                         "--wait", "--timeout", "900s")


def test_plan_uses_talos_image_url_and_stock_installer_where_configured():
    plan = plan_talos_upgrade(talconfig(), ALL_AT, None, None)
    assert plan.step("m720q-3").image == "registry.lan/talos/installer:v1.11.5"
    assert plan.step("w1").image == "ghcr.io/siderolabs/installer:v1.11.5"


def test_plan_skips_node_already_at_target():
    observed = {**ALL_AT, "m720q-1": "v1.11.5"}
    plan = plan_talos_upgrade(talconfig(), observed, None, None)
    step = plan.step("m720q-1")
    assert step.action == "skip" and step.argv == ()
    assert [s.hostname for s in plan.to_upgrade] == ["m720q-2", "m720q-3", "w1"]


def test_plan_selects_subset_in_plan_order_regardless_of_given_order():
    plan = plan_talos_upgrade(talconfig(), ALL_AT, None, ["w1", "m720q-2"])
    assert [s.hostname for s in plan.steps] == ["m720q-2", "w1"]


def test_plan_refuses_unknown_node_and_names_known_ones():
    with pytest.raises(PlanRefused) as e:
        plan_talos_upgrade(talconfig(), ALL_AT, None, ["m720q-9"])
    assert "m720q-9" in str(e.value) and "m720q-1, m720q-2, m720q-3, w1" in str(e.value)


def test_plan_refuses_skipped_minor():
    observed = {**ALL_AT, "m720q-1": "v1.10.7"}
    with pytest.raises(PlanRefused) as e:
        plan_talos_upgrade(talconfig("v1.12.0"), {**observed, "m720q-2": "v1.11.5", "m720q-3": "v1.11.5",
                                                  "w1": "v1.11.5"}, None, None)
    assert len(e.value.reasons) == 1
    assert "m720q-1" in e.value.reasons[0] and "v1.10 -> v1.11 -> v1.12" in e.value.reasons[0]


def test_plan_allows_skipped_minor_when_asked():
    plan = plan_talos_upgrade(talconfig("v1.12.0"), {**ALL_AT, "m720q-1": "v1.10.7"}, None, None,
                              allow_minor_skip=True)
    assert plan.step("m720q-1").action == "upgrade"


def test_plan_refuses_downgrade_unless_allowed():
    with pytest.raises(PlanRefused) as e:
        plan_talos_upgrade(talconfig(), ALL_AT, "v1.11.3", None)
    assert len(e.value.reasons) == 4 and all("downgrade" in r for r in e.value.reasons)
    plan = plan_talos_upgrade(talconfig(), ALL_AT, "v1.11.3", None, allow_downgrade=True)
    assert plan.step("w1").image == "ghcr.io/siderolabs/installer:v1.11.3"


def test_plan_refuses_downgrade_across_minors_even_when_downgrade_allowed():
    with pytest.raises(PlanRefused, match="skips a minor"):
        plan_talos_upgrade(talconfig(), ALL_AT, "v1.9.0", None, allow_downgrade=True)


def test_plan_reports_every_reason_at_once():
    observed = {"m720q-1": "v1.10.0", "m720q-2": "v1.12.0", "w1": "v1.11.4"}
    with pytest.raises(PlanRefused) as e:
        plan_talos_upgrade(talconfig("v1.12.1"), observed, None, ["m720q-1", "m720q-2", "m720q-3", "nope"])
    text = str(e.value)
    assert "nope" in text and "m720q-1" in text and "m720q-3: no Talos version observed" in text
    assert len(e.value.reasons) == 3  # m720q-2 is a patch upgrade: fine


def test_plan_accepts_major_boundary_only_with_minor_skip():
    with pytest.raises(PlanRefused, match="skips a minor"):
        plan_talos_upgrade(talconfig("v2.0.0"), {**ALL_AT}, None, ["w1"])


def test_plan_image_override_gets_target_tag_and_mismatched_tag_is_refused():
    plan = plan_talos_upgrade(talconfig(), ALL_AT, None, ["w1"], images={"w1": "my.reg/installer"})
    assert plan.step("w1").image == "my.reg/installer:v1.11.5"
    with pytest.raises(PlanRefused, match="tagged v1.11.4 but the target is v1.11.5"):
        plan_talos_upgrade(talconfig(), ALL_AT, None, ["w1"], images={"w1": "my.reg:5000/installer:v1.11.4"})
    with pytest.raises(PlanRefused, match="image override for unknown node ghost"):
        plan_talos_upgrade(talconfig(), ALL_AT, None, None, images={"ghost": "x:v1.11.5"})


def test_plan_target_without_v_prefix_is_normalised():
    plan = plan_talos_upgrade(talconfig(), ALL_AT, "1.11.5", ["w1"])
    assert plan.target == "v1.11.5" and plan.step("w1").argv[5].endswith(":v1.11.5")


def test_plan_refuses_unparseable_target():
    with pytest.raises(PlanRefused, match="target version"):
        plan_talos_upgrade(talconfig(), ALL_AT, "latest", None)


def test_plan_rows_and_json_carry_the_commands():
    plan = plan_talos_upgrade(talconfig(), {**ALL_AT, "w1": "v1.11.5"}, None, None)
    rows = plan.to_rows()
    assert rows[0]["node"] == "m720q-1" and rows[0]["command"].startswith("talosctl upgrade --nodes 10.42.0.101")
    assert rows[-1]["action"] == "skip" and rows[-1]["command"] == "-"
    data = json.loads(plan.to_json())
    assert data["target"] == "v1.11.5" and data["steps"][0]["argv"][:2] == ["talosctl", "upgrade"]


def test_plan_works_from_proxmox_cluster_yaml():
    cluster = ProxmoxCluster.model_validate({
        "cluster": {"name": "homelab", "endpoint": "https://10.42.0.161:6443", "talosVersion": "v1.11.5",
                    "kubernetesVersion": "v1.32.0"},
        "proxmox": {"endpoint": "https://pve.lan:8006", "node": "pve", "storage": "local-lvm",
                    "template": {"vmid": 9000, "name": "talos"}},
        "network": {"gateway": "10.42.0.1", "prefix": 24},
        "vms": [{"name": "hl-w1", "vmid": 171, "role": "worker", "cores": 2, "memory": 4096, "disk": 32,
                 "ip": "10.42.0.171", "mac": "BC:24:11:00:01:71"},
                {"name": "hl-cp1", "vmid": 161, "role": "controlplane", "cores": 2, "memory": 4096, "disk": 32,
                 "ip": "10.42.0.161", "mac": "BC:24:11:00:01:61"}]})
    plan = plan_talos_upgrade(cluster, {"hl-cp1": "v1.11.4", "hl-w1": "v1.11.5"}, None, None)
    assert plan.cluster == "homelab"
    assert [(s.hostname, s.action) for s in plan.steps] == [("hl-cp1", "upgrade"), ("hl-w1", "skip")]


# --- Kubernetes plan --------------------------------------------------------------------------


def test_k8s_plan_builds_upgrade_and_dry_run_argv():
    plan = plan_kubernetes_upgrade("v1.11.5", {"a": "v1.32.0", "b": "v1.32.0"}, "v1.33.1", node="10.42.0.101")
    assert plan.action == "upgrade"
    assert plan.argv == ("talosctl", "upgrade-k8s", "--nodes", "10.42.0.101", "--to", "1.33.1")
    assert plan.dry_run_argv == plan.argv + ("--dry-run",)
    assert plan.behind == ["a", "b"]


def test_k8s_plan_refuses_skipped_minor():
    with pytest.raises(PlanRefused, match="skips a Kubernetes minor.*upgrade to v1.33 first"):
        plan_kubernetes_upgrade("v1.11.5", {"a": "v1.32.0", "b": "v1.33.0"}, "v1.34.0")


def test_k8s_plan_refuses_downgrade():
    with pytest.raises(PlanRefused, match="downgrade from v1.32.3"):
        plan_kubernetes_upgrade("v1.11.5", {"a": "v1.32.3"}, "v1.32.0")


def test_k8s_plan_refuses_target_talos_does_not_support():
    with pytest.raises(PlanRefused, match=r"Talos v1.11 supports Kubernetes v1.29–v1.34, not v1.35.0"):
        plan_kubernetes_upgrade("v1.11.5", {"a": "v1.34.2"}, "v1.35.0")
    with pytest.raises(PlanRefused, match="not in the support table"):
        plan_kubernetes_upgrade("v1.1.0", {"a": "v1.24.0"}, "v1.24.1")


def test_k8s_plan_skips_when_every_kubelet_is_at_target():
    assert plan_kubernetes_upgrade("v1.11.5", {"a": "v1.32.0"}, "v1.32.0").action == "skip"


def test_k8s_support_table_matches_talos_matrix():
    assert supported_kubernetes("v1.12.0") == ((1, 30), (1, 35))
    assert supported_kubernetes("v1.11.5") == ((1, 29), (1, 34))
    assert supported_kubernetes("v1.8.4") == ((1, 26), (1, 31))
    assert supported_kubernetes("v1.6.0") == ((1, 24), (1, 29))


# --- gates ------------------------------------------------------------------------------------


def node(name: str, ready: bool = True, cordoned: bool = False) -> NodeView:
    return NodeView(name, ready, cordoned, "Talos (v1.11.5)", "v1.11.5", "v1.32.0", "1")


@pytest.mark.parametrize(("nodes", "ok", "needle"), [
    ([node("a"), node("b")], True, "all 2 nodes"),
    ([node("a"), node("b", ready=False)], False, "b is NotReady"),
    ([node("a", cordoned=True)], False, "a is cordoned"),
    ([], False, "no Node objects"),
])
def test_nodes_gate_requires_every_node_ready_and_schedulable(nodes, ok, needle):
    v = nodes_gate(nodes)
    assert v.ok is ok and needle in v.reason


def test_nodes_gate_fails_for_expected_node_without_node_object():
    v = nodes_gate([node("a")], expected=["a", "b"])
    assert not v.ok and "b has no Node object" in v.reason


def member(i: int, learner: bool = False) -> EtcdMember:
    return EtcdMember(f"id{i}", f"m{i}", (f"https://10.0.0.{i}:2380",), (f"https://10.0.0.{i}:2379",), learner)


def status(i: int, errors: str = "", leader: str = "id1") -> EtcdStatus:
    return EtcdStatus(f"10.0.0.{i}", f"id{i}", "3 MB", "1 MB (30%)", leader, 10, 2, 10, False, errors)


@pytest.mark.parametrize(("members", "rows", "ok", "needle"), [
    ([member(1), member(2), member(3)], [status(1), status(2), status(3)], True, "3 members"),
    ([member(1), member(2)], [status(1), status(2)], False, "2 etcd members (m1, m2) but 3 control planes"),
    ([member(1), member(2), member(3)], [status(1), status(2, "etcdserver: no leader"), status(3)], False,
     "reports: etcdserver: no leader"),
    ([member(1), member(2), member(3)], [status(1), status(2)], False, "m3 (id3) did not answer"),
    ([member(1), member(2), member(3, learner=True)], [status(1), status(2), status(3)], False, "learner"),
    ([member(1), member(2), member(3)], [status(1), status(2), status(3, leader="id3")], False, "disagree"),
])
def test_etcd_gate_requires_every_member_healthy(members, rows, ok, needle):
    v = etcd_gate(members, rows, control_planes=3)
    assert v.ok is ok and needle in v.reason


def ks(name: str, *, requested: str | None = None, handled: str | None = None, reconciling: bool = False,
       gen: int = 1, observed: int = 1, path: str = "") -> dict:
    obj = {"metadata": {"name": name, "namespace": "flux-system", "generation": gen,
                        "annotations": {"reconcile.fluxcd.io/requestedAt": requested} if requested else {}},
           "spec": {"path": path},
           "status": {"observedGeneration": observed, "conditions": [{"type": "Ready", "status": "True"}]}}
    if handled:
        obj["status"]["lastHandledReconcileAt"] = handled
    if reconciling:
        obj["status"]["conditions"].append({"type": "Reconciling", "status": "True", "message": "applying"})
    return obj


@pytest.mark.parametrize(("objs", "ok", "needle"), [
    ([ks("rook-ceph"), ks("rook-ceph-cluster")], True, "no rook-ceph"),
    ([ks("rook-ceph-cluster", reconciling=True)], False, "Reconciling: applying"),
    ([ks("rook-ceph", requested="2025-01-01T00:00:00Z", handled="2024-12-31T00:00:00Z")], False, "not handled yet"),
    ([ks("rook-ceph", requested="2025-01-01T00:00:00Z", handled="2025-01-01T00:00:00Z")], True, "no rook-ceph"),
    ([ks("storage", path="./infrastructure/rook-ceph/cluster", gen=3, observed=2)], False, "generation 3"),
    ([ks("apps", reconciling=True)], True, "no rook-ceph"),
])
def test_flux_gate_refuses_while_rook_ceph_reconciles(objs, ok, needle):
    v = flux_gate(objs)
    assert v.ok is ok and needle in v.reason


def test_self_node_gate_refuses_node_the_flow_runs_on_and_says_why():
    v = self_node_gate("m720q-2", "m720q-2")
    assert not v.ok and "NODE_NAME" in v.reason and "another node" in v.reason
    assert self_node_gate("m720q-1", "m720q-2").ok
    assert self_node_gate(None, "m720q-2").ok


def test_failure_message_names_node_gate_last_state_and_next_step():
    msg = failure_message("m720q-2", "node Ready", "NotReady (KubeletNotReady), Talos (v1.11.4)",
                          rollback_step("10.42.0.102"))
    assert msg == ("m720q-2: node Ready failed. Last seen: NotReady (KubeletNotReady), Talos (v1.11.4). "
                   "Next step: talosctl rollback --nodes 10.42.0.102")
