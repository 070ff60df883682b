"""The pure drift comparisons: observed data in, findings out."""

from __future__ import annotations

from typing import Any

import pytest

from homelab.ceph_gate import CephStatus, Health, HealthCheck
from homelab.config import FluxTree, ProxmoxCluster, parse_flux_documents
from homelab.drift import (
    DriftReport,
    Finding,
    compare_ceph,
    compare_flux,
    compare_machine_config,
    compare_nodes,
    compare_vms,
    provisioned,
    repository_findings,
    revision_sha,
)
from homelab.gates import NodeView
from homelab.problems import Problem
from homelab.provision import GIB, ObservedVM

HEAD = "main@sha1:" + "a" * 40
OLD = "main@sha1:" + "b" * 40


def node(name: str, talos: str = "v1.11.5", kubelet: str = "v1.32.0") -> NodeView:
    return NodeView(name, True, False, f"Talos ({talos})", talos, kubelet, "1")


def tree(*names: str, suspended: tuple[str, ...] = ()) -> FluxTree:
    t = FluxTree(cluster="m720q")
    docs: list[Any] = [{"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                        "metadata": {"name": "flux-system", "namespace": "flux-system"},
                        "spec": {"url": "ssh://git@example/homelab", "ref": {"branch": "main"}}}]
    docs += [{"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
              "metadata": {"name": n, "namespace": "flux-system"},
              "spec": {"path": f"./k8s/{n}", "sourceRef": {"kind": "GitRepository", "name": "flux-system"},
                       **({"suspend": True} if n in suspended else {})}} for n in names]
    parse_flux_documents(docs, "clusters/m720q/flux.yaml", t)
    return t


def ready(status: str = "True", reason: str = "Succeeded", message: str = "") -> list[dict[str, Any]]:
    return [{"type": "Ready", "status": status, "reason": reason, "message": message}]


def gitrepo(revision: str = HEAD, **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": "flux-system", "namespace": "flux-system"}, "spec": dict(extra),
            "status": {"artifact": {"revision": revision}, "conditions": ready()}}


def ks(name: str, applied: str = HEAD, suspend: bool = False, conditions: Any = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"sourceRef": {"kind": "GitRepository", "name": "flux-system"}}
    if suspend:
        spec["suspend"] = True
    return {"metadata": {"name": name, "namespace": "flux-system"}, "spec": spec,
            "status": {"lastAppliedRevision": applied, "conditions": conditions if conditions is not None else ready()}}


# --- Talos and Kubernetes -------------------------------------------------------------------------


def test_nodes_at_the_desired_versions_are_not_drift() -> None:
    assert compare_nodes("m720q", "v1.11.5", "1.32.0", ["a", "b"], [node("a"), node("b")]) == []


def test_node_one_patch_behind_is_one_talos_finding_naming_both_versions() -> None:
    [f] = compare_nodes("m720q", "v1.11.5", "v1.32.0", ["a", "b"], [node("a"), node("b", talos="v1.11.4")])
    assert (f.area, f.object, f.desired, f.live, f.severity) == \
        ("talos", "m720q: node b", "v1.11.5", "v1.11.4", "warning")
    assert "homelab upgrade talos --cluster m720q --node b" in f.hint


def test_kubelet_behind_is_a_kubernetes_finding() -> None:
    [f] = compare_nodes("m720q", "v1.11.5", "v1.33.1", ["a"], [node("a", kubelet="v1.32.0")])
    assert (f.area, f.desired, f.live) == ("kubernetes", "v1.33.1", "v1.32.0")


def test_node_of_the_tree_without_node_object_is_an_error_and_an_unknown_node_a_warning() -> None:
    found = compare_nodes("m720q", "v1.11.5", "v1.32.0", ["a"], [node("z")])
    assert [(f.object, f.severity, f.live) for f in found] == [
        ("m720q: node a", "error", "no Node object"), ("m720q: node z", "warning", "registered")]


def test_machine_config_diff_is_a_finding_and_no_changes_is_none() -> None:
    assert compare_machine_config("m720q", "a", "m720q-a.yaml", False, "No changes.") is None
    f = compare_machine_config("m720q", "a", "m720q-a.yaml", True, "Config diff:\n--- live\n+++ new\n-x: 1\n+x: 2\n")
    assert f is not None and f.live == "differs (2 changed lines)"


# --- Flux -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rev,sha", [(HEAD, "a" * 40), ("master/" + "c" * 40, "c" * 40), ("d" * 40, "d" * 40),
                                     ("", "")])
def test_revision_sha_reads_every_revision_form(rev: str, sha: str) -> None:
    assert revision_sha(rev) == sha


def test_flux_in_sync_with_the_head_is_clean() -> None:
    assert compare_flux("m720q", tree("apps", "infra"), HEAD, [ks("apps"), ks("infra")], [], [gitrepo()]) == []


def test_source_behind_the_head_is_one_finding_not_one_per_kustomization() -> None:
    found = compare_flux("m720q", tree("apps", "infra"), HEAD, [ks("apps", OLD), ks("infra", OLD)], [],
                         [gitrepo(OLD)])
    assert [(f.object, f.desired, f.live) for f in found] == [
        ("m720q: GitRepository flux-system/flux-system", HEAD, OLD)]


def test_kustomization_behind_its_source_is_a_stale_revision() -> None:
    [f] = compare_flux("m720q", tree("apps"), HEAD, [ks("apps", OLD)], [], [gitrepo()])
    assert (f.object, f.desired, f.live) == ("m720q: Kustomization flux-system/apps", HEAD, OLD)


def test_suspended_kustomization_is_one_finding_even_when_its_revision_lags() -> None:
    [f] = compare_flux("m720q", tree("apps"), HEAD, [ks("apps", OLD, suspend=True)], [], [gitrepo()])
    assert (f.desired, f.live, f.severity) == ("not suspended", "suspended", "warning")


def test_suspension_declared_in_git_is_not_drift() -> None:
    assert compare_flux("m720q", tree("apps", suspended=("apps",)), HEAD, [ks("apps", OLD, suspend=True)], [],
                        [gitrepo()]) == []


def test_kustomization_not_ready_is_an_error_with_the_controllers_message() -> None:
    failing = ks("apps", conditions=ready("False", "ReconciliationFailed", "dry-run failed"))
    [f] = compare_flux("m720q", tree("apps"), HEAD, [failing], [], [gitrepo()])
    assert f.severity == "error"
    assert f.live == "Ready=False (ReconciliationFailed): dry-run failed"


def test_kustomizations_missing_from_the_cluster_and_extra_in_it() -> None:
    found = compare_flux("m720q", tree("apps"), HEAD, [ks("manual")], [], [gitrepo()])
    assert sorted((f.object, f.desired, f.live) for f in found) == [
        ("m720q: Kustomization flux-system/apps", "present (./k8s/apps)", "absent"),
        ("m720q: Kustomization flux-system/manual", "absent (not in git)", "present")]


def test_helmrelease_suspended_or_not_ready_is_drift() -> None:
    hr_ok = {"metadata": {"name": "cilium", "namespace": "kube-system"}, "spec": {}, "status": {"conditions": ready()}}
    hr_susp = {"metadata": {"name": "rook", "namespace": "rook-ceph"}, "spec": {"suspend": True}, "status": {}}
    hr_bad = {"metadata": {"name": "grafana", "namespace": "monitoring"}, "spec": {}, "status": {}}
    found = compare_flux("m720q", tree(), HEAD, [], [hr_ok, hr_susp, hr_bad], [gitrepo()])
    assert [(f.object, f.live) for f in found] == [
        ("m720q: HelmRelease monitoring/grafana", "no Ready condition"),
        ("m720q: HelmRelease rook-ceph/rook", "suspended")]


def test_gitrepository_of_the_tree_missing_from_the_cluster_is_an_error() -> None:
    found = compare_flux("m720q", tree(), HEAD, [], [], [])
    assert [(f.object, f.severity) for f in found] == [("m720q: GitRepository flux-system/flux-system", "error")]


# --- Proxmox ----------------------------------------------------------------------------------------


def cluster_yaml() -> ProxmoxCluster:
    return ProxmoxCluster.model_validate({
        "cluster": {"name": "homelab", "endpoint": "https://10.42.0.161:6443", "talosVersion": "v1.11.5",
                    "kubernetesVersion": "v1.32.0"},
        "proxmox": {"endpoint": "https://pve.lan:8006", "node": "pve", "storage": "local-lvm",
                    "template": {"vmid": 9000, "name": "talos"}},
        "network": {"gateway": "10.42.0.1", "prefix": 24},
        "vms": [{"name": "homelab-cp-1", "vmid": 201, "role": "controlplane", "cores": 4, "memory": 8192, "disk": 64,
                 "ip": "10.42.0.161", "mac": "BC:24:11:00:01:61"}]})


def listed(vmid: int, name: str, cores: int = 4, mem: int = 8192, disk: int = 64, status: str = "running",
           **extra: Any) -> ObservedVM:
    return ObservedVM.from_api({"vmid": vmid, "name": name, "status": status, "cpus": cores,
                                "maxmem": mem * 1024 * 1024, "maxdisk": disk * GIB, **extra}, None, "pve")


def test_vms_as_cluster_yaml_says_are_clean() -> None:
    cfg = cluster_yaml()
    assert compare_vms(cfg, [listed(201, "homelab-cp-1"), listed(9000, "talos", template=1)]) == []


def test_missing_vm_is_drift_and_the_cluster_not_provisioned() -> None:
    cfg = cluster_yaml()
    only_template = [listed(9000, "talos", template=1)]
    [f] = compare_vms(cfg, only_template)
    assert (f.object, f.desired, f.live) == ("homelab: VM 201 (homelab-cp-1)", "4 cores, 8192 MiB, 64 GiB", "absent")
    assert not provisioned(cfg, only_template)
    assert provisioned(cfg, [listed(201, "homelab-cp-1")])


def test_each_differing_field_and_power_is_its_own_finding() -> None:
    found = compare_vms(cluster_yaml(), [listed(201, "homelab-cp-1", cores=2, mem=4096, disk=80, status="stopped")])
    assert [(f.object, f.desired, f.live) for f in found] == [
        ("homelab: VM 201 (homelab-cp-1) cores", "4", "2"),
        ("homelab: VM 201 (homelab-cp-1) memory", "8192 MiB", "4096 MiB"),
        ("homelab: VM 201 (homelab-cp-1) disk", "64 GiB", "80 GiB"),
        ("homelab: VM 201 (homelab-cp-1) power", "running", "stopped")]


def test_vm_of_the_cluster_not_in_cluster_yaml_is_extra_and_a_stranger_is_ignored() -> None:
    found = compare_vms(cluster_yaml(), [listed(201, "homelab-cp-1"), listed(300, "homelab-old"),
                                         listed(400, "router")])
    assert [(f.object, f.desired) for f in found] == [("homelab: VM 300 (homelab-old)", "absent (not in cluster.yaml)")]


# --- Ceph -------------------------------------------------------------------------------------------


def ceph(status: str = "HEALTH_OK", **checks: tuple[str, str]) -> CephStatus:
    hc = {name: HealthCheck(name, sev, msg) for name, (sev, msg) in checks.items()}
    return CephStatus(Health(status, hc), 3, 3, 3, 33, (("active+clean", 33),))


def test_healthy_ceph_with_only_always_on_flags_is_clean() -> None:
    assert compare_ceph("m720q", ceph(), {"sortbitwise", "recovery_deletes", "purged_snapdirs"}) == []


def test_noout_left_set_is_one_finding_and_its_warning_is_not_another() -> None:
    status = ceph("HEALTH_WARN", OSDMAP_FLAGS=("HEALTH_WARN", "noout flag(s) set"))
    [f] = compare_ceph("m720q", status, {"noout", "sortbitwise"})
    assert (f.area, f.object, f.desired, f.live) == ("ceph", "m720q: flag noout", "unset", "set")


def test_health_checks_the_flags_do_not_explain_are_findings_with_their_severity() -> None:
    status = ceph("HEALTH_ERR", OSD_DOWN=("HEALTH_WARN", "1 osds down"), PG_AVAILABILITY=("HEALTH_ERR", "3 pgs down"))
    found = compare_ceph("m720q", status, set())
    assert [(f.object, f.severity) for f in found] == [("m720q: health OSD_DOWN", "warning"),
                                                       ("m720q: health PG_AVAILABILITY", "error")]


# --- the repository and the report -----------------------------------------------------------------


def test_each_validate_problem_is_a_repository_error() -> None:
    [f] = repository_findings([Problem("k8s/apps/x.yaml", "kind", "Secret outside a *.sops.yaml file")])
    assert (f.area, f.object, f.live, f.severity) == ("repository", "k8s/apps/x.yaml: kind",
                                                      "Secret outside a *.sops.yaml file", "error")


def test_report_result_counts_severities_and_markdown_has_a_section_per_area() -> None:
    report = DriftReport([Finding("talos", "m720q: node a", "v1.11.5", "v1.11.4", "warning", "upgrade", "m720q"),
                          Finding("ceph", "m720q: flag noout", "unset", "set", "warning", "unset | it", "m720q"),
                          Finding("repository", "k8s/x: f", "valid", "bad", "error")],
                         notes=["homelab: not provisioned"], revision=HEAD)
    assert report.result() == {"status": "drifted", "counts": {"warning": 2, "error": 1}, "findings": [
        {"area": "talos", "object": "m720q: node a", "desired": "v1.11.5", "live": "v1.11.4", "severity": "warning"},
        {"area": "ceph", "object": "m720q: flag noout", "desired": "unset", "live": "set", "severity": "warning"},
        {"area": "repository", "object": "k8s/x: f", "desired": "valid", "live": "bad", "severity": "error"}]}
    assert report.counts_by_cluster() == {"m720q": {"warning": 2}, "": {"error": 1}}
    md = report.markdown()
    for title in ("## Talos", "## Kubernetes", "## Flux", "## Proxmox", "## Ceph", "## Repository", "## Notes"):
        assert title in md
    assert "| area | object | desired | live | severity | hint |" in md
    assert "unset \\| it" in md
    assert "- homelab: not provisioned" in md


def test_empty_report_is_clean() -> None:
    assert DriftReport().result() == {"status": "clean", "counts": {}, "findings": []}
