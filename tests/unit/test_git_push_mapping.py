"""homelab.git_push: changed paths → Kustomizations (+ dependents), version changes → approved upgrades."""

from __future__ import annotations

from pathlib import Path

import pytest

from homelab import git_push as gp
from homelab.config import load_tree

REPO = Path(__file__).resolve().parents[2]
TREE = REPO / "k8s"


@pytest.fixture(scope="module")
def world() -> tuple[dict, dict[str, str], list[str]]:
    tree = load_tree(TREE)
    files = [str(p.relative_to(REPO)) for p in TREE.rglob("*") if p.is_file()]
    texts = {str(Path(f).parent): (REPO / f).read_text() for f in files if Path(f).name == "kustomization.yaml"}
    return {c: cl.flux for c, cl in tree.clusters.items()}, texts, files


def reconciled(plan: gp.PushPlan) -> dict[str, set[str]]:
    return {c: {k[1] for k in why} for c, why in plan.reconcile.items()}


def test_a_base_change_reaches_every_overlay_that_includes_it_and_their_dependents(world) -> None:
    trees, texts, files = world
    plan = gp.map_paths(trees, ["k8s/infrastructure/core/base/cilium/helmrelease.yaml"], texts, files)
    core = {("flux-system", "infrastructure-core")}
    assert reconciled(plan) == {c: {k[1] for k in trees[c].dependents(core)} for c in ("m720q", "homelab")}
    assert {"infrastructure-core", "api-proxy", "rook-ceph-operator", "smokeping"} <= reconciled(plan)["m720q"]
    assert not {"sources", "flux-system"} & reconciled(plan)["m720q"]
    assert plan.reconcile["m720q"][("flux-system", "infrastructure-core")].startswith("applies k8s/infrastructure")
    assert plan.reconcile["m720q"][("flux-system", "smokeping")] == "depends on rook-ceph-cluster"
    assert plan.paths["k8s/infrastructure/core/base/cilium/helmrelease.yaml"] == [
        "homelab/infrastructure-core", "m720q/infrastructure-core"]


def test_an_app_change_reconciles_only_that_app(world) -> None:
    trees, texts, files = world
    plan = gp.map_paths(trees, ["k8s/apps/base/smokeping/deployment.yaml"], texts, files)
    assert reconciled(plan) == {"m720q": {"smokeping"}}


def test_a_flux_kustomization_manifest_is_applied_by_the_clusters_flux_system(world) -> None:
    trees, texts, files = world
    plan = gp.map_paths(trees, ["k8s/clusters/m720q/flux-kustomizations/smokeping.yaml"], texts, files)
    assert reconciled(plan) == {"m720q": {"flux-system"}}


def test_talconfig_and_unlisted_files_reach_no_kustomization(world) -> None:
    trees, texts, files = world
    plan = gp.map_paths(trees, ["k8s/clusters/m720q/talos/talconfig.yaml", "README.md"], texts, files)
    assert plan.reconcile == {}
    assert plan.paths == {"k8s/clusters/m720q/talos/talconfig.yaml": [], "README.md": []}


def test_a_spec_path_without_kustomization_yaml_applies_everything_below_it() -> None:
    cov = gp.coverage("k8s/plain", {}, ["k8s/plain/a.yaml", "k8s/plain/sub/b.yaml", "k8s/other/c.yaml"])
    assert cov.covers("k8s/plain/sub/b.yaml") and cov.covers("k8s/plain/new.yaml")
    assert not cov.covers("k8s/other/c.yaml") and not cov.covers("k8s/plainer/x.yaml")


def test_generator_files_and_patches_count_as_inputs() -> None:
    texts = {"app": "configMapGenerator:\n- name: x\n  files: [conf=files/app.conf]\npatches:\n- path: p.yaml\n"
                    "resources: [https://example.com/x.yaml]\n"}
    cov = gp.coverage("app", texts, ["app/kustomization.yaml", "app/files/app.conf", "app/p.yaml", "app/unused.yaml"])
    assert cov.covers("app/files/app.conf") and cov.covers("app/p.yaml") and cov.covers("app/kustomization.yaml")
    assert not cov.covers("app/unused.yaml")


def test_talos_version_change_starts_the_upgrade_with_approval_required() -> None:
    starts = gp.version_starts("m720q", ("v1.11.4", "v1.32.0"), ("v1.11.5", "v1.32.0"), "t.yaml")
    assert [(s.deployment, s.parameters) for s in starts] == [
        ("talos-upgrade/talos-upgrade", {"cluster": "m720q", "require_approval": True})]
    assert "v1.11.4 -> v1.11.5" in starts[0].reason


def test_kubernetes_version_change_starts_kubernetes_upgrade_never_unapproved() -> None:
    starts = gp.version_starts("m720q", ("v1.11.5", "v1.32.0"), ("v1.11.5", "v1.33.1"), "t.yaml")
    assert [s.deployment for s in starts] == ["kubernetes-upgrade/kubernetes-upgrade"]
    assert all(s.parameters["require_approval"] is True for s in starts)


def test_both_versions_changed_start_one_cluster_upgrade_talos_first_never_unapproved() -> None:
    starts = gp.version_starts("m720q", ("v1.11.4", "v1.32.0"), ("v1.11.5", "v1.33.0"), "t.yaml")
    assert [(s.deployment, s.parameters) for s in starts] == [
        ("cluster-upgrade/cluster-upgrade", {"cluster": "m720q", "require_approval": True})]
    assert starts[0].reason == "t.yaml: talosVersion v1.11.4 -> v1.11.5, then kubernetesVersion v1.32.0 -> v1.33.0"


def test_a_new_talconfig_starts_one_cluster_upgrade() -> None:
    [start] = gp.version_starts("homelab", None, ("v1.11.5", "v1.33.0"), "t.yaml")
    assert start.deployment == "cluster-upgrade/cluster-upgrade" and start.parameters["require_approval"] is True


def test_unchanged_versions_start_nothing() -> None:
    assert gp.version_starts("m720q", ("v1.11.5", "v1.32.0"), ("v1.11.5", "v1.32.0"), "t.yaml") == []


def test_cluster_yaml_change_starts_provision_in_plan_mode() -> None:
    s = gp.provision_start("homelab", "k8s/clusters/homelab/cluster.yaml")
    assert (s.deployment, s.parameters) == ("provision/provision", {"cluster": "homelab", "plan_only": True})


def test_pushes_to_other_branches_and_deletions_are_ignored() -> None:
    sha = "a" * 40
    assert gp.ignore_reason("refs/heads/main", "main", sha) is None
    assert "not the branch Flux follows" in (gp.ignore_reason("refs/heads/feature", "main", sha) or "")
    assert "not the branch" in (gp.ignore_reason("refs/tags/v1", "main", sha) or "")
    assert "deleted" in (gp.ignore_reason("refs/heads/main", "main", "0" * 40) or "")


@pytest.mark.parametrize("value", [["b", "a"], '["a", "b"]', "['a', 'b']", "a,b"])
def test_changed_paths_arrive_as_a_list_or_its_rendering(value) -> None:
    assert gp.parse_changed_paths(value) == ["a", "b"]


def test_absent_changed_paths_are_none() -> None:
    assert gp.parse_changed_paths(None) is None and gp.parse_changed_paths("") is None
