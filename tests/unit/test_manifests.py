"""The GitOps tree's manifests, and the prefect app's permissions pinned rule by rule: a later widening, a
wildcard or a new binding fails here and has to be argued for."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from homelab.validate import validate

K8S = Path(__file__).resolve().parents[2] / "k8s"
APP_DIRS = (K8S / "apps/base/prefect", K8S / "apps/overlays/m720q/prefect")
TALOS = K8S / "clusters/m720q/talos"
SA = ("prefect", "homelab-flows")

Rule = tuple[str, str, str, str, str, str]  # (role kind, namespace, apiGroup, resource, verb, resourceName or "")

# Each line is a call the flows make (see the header of k8s/apps/base/prefect/rbac.yaml).
EXPECTED_RULES: set[Rule] = {
    *{("ClusterRole", "", "", "nodes", v, "") for v in ("get", "list", "watch", "patch")},
    *{("ClusterRole", "", g, r, v, "")
      for g, r in (("kustomize.toolkit.fluxcd.io", "kustomizations"), ("helm.toolkit.fluxcd.io", "helmreleases"),
                   ("source.toolkit.fluxcd.io", "gitrepositories"))
      for v in ("get", "list", "watch")},
    ("Role", "flux-system", "kustomize.toolkit.fluxcd.io", "kustomizations", "patch", ""),
    ("Role", "flux-system", "source.toolkit.fluxcd.io", "gitrepositories", "patch", ""),
    ("Role", "rook-ceph", "apps", "deployments", "get", "rook-ceph-tools"),
    ("Role", "rook-ceph", "", "pods", "list", ""),
    ("Role", "rook-ceph", "", "pods/exec", "create", ""),
}


def documents(paths: tuple[Path, ...] | list[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    for root in paths:
        for path in sorted(root.rglob("*.yaml")) if root.is_dir() else [root]:
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict):
                    yield path, doc


@functools.cache
def _app() -> tuple[tuple[Path, dict[str, Any]], ...]:
    return tuple(documents(APP_DIRS))


def app_docs(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _app() if d.get("kind") == kind]


def wildcards(doc: dict[str, Any]) -> list[str]:
    """Every '*' in a Role's or ClusterRole's rules, as `name: rules[i].field`."""
    found = []
    for i, rule in enumerate(doc.get("rules") or []):
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            if any("*" in str(v) for v in rule.get(field) or []):
                found.append(f"{doc['metadata']['name']}: rules[{i}].{field}")
    return found


def flatten(doc: dict[str, Any]) -> set[Rule]:
    kind, ns = doc["kind"], doc["metadata"].get("namespace", "")
    return {(kind, ns, g, r, v, n)
            for rule in doc.get("rules") or []
            for g in rule.get("apiGroups") or [""]
            for r in rule.get("resources") or []
            for v in rule.get("verbs") or []
            for n in rule.get("resourceNames") or [""]}


def roles() -> list[dict[str, Any]]:
    return app_docs("Role") + app_docs("ClusterRole")


def test_every_manifest_under_k8s_parses() -> None:
    paths = sorted(K8S.rglob("*.yaml"))
    assert len(paths) > 50
    for path in paths:
        list(yaml.safe_load_all(path.read_text()))  # raises on the first broken file, naming it


def test_homelab_validate_passes_on_the_tree() -> None:
    assert [str(p) for p in validate(K8S, "k8s")] == []


def test_wildcard_check_finds_a_star_in_any_field() -> None:
    bad = {"kind": "ClusterRole", "metadata": {"name": "wide"},
           "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
                     {"apiGroups": ["*"], "resources": ["pods/*"], "verbs": ["*"]}]}
    assert wildcards(bad) == ["wide: rules[1].apiGroups", "wide: rules[1].resources", "wide: rules[1].verbs"]


def test_prefect_app_rbac_has_no_wildcard() -> None:
    assert roles(), "no Role or ClusterRole found in the prefect app"
    assert [w for doc in roles() for w in wildcards(doc)] == []


def test_prefect_app_rbac_is_exactly_the_calls_the_flows_make() -> None:
    granted = set().union(*(flatten(doc) for doc in roles()))
    assert sorted(granted - EXPECTED_RULES) == [], "granted beyond what the flows call"
    assert sorted(EXPECTED_RULES - granted) == [], "a call the flows make is not granted"


def test_every_binding_binds_only_the_flows_serviceaccount_to_this_apps_roles() -> None:
    defined = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in roles()}
    bindings = app_docs("RoleBinding") + app_docs("ClusterRoleBinding")
    assert len(bindings) == len(defined)
    for b in bindings:
        ns = b["metadata"].get("namespace", "")
        ref = b["roleRef"]
        assert (ref["kind"], ns if ref["kind"] == "Role" else "", ref["name"]) in defined, b["metadata"]["name"]
        assert [(s["kind"], s["namespace"], s["name"]) for s in b["subjects"]] == [("ServiceAccount", *SA)]
    [sa] = [d for d in app_docs("ServiceAccount") if d["apiVersion"] == "v1"]
    assert (sa["metadata"]["namespace"], sa["metadata"]["name"]) == SA


def test_talos_serviceaccount_has_the_role_the_machine_feature_allows() -> None:
    [talos_sa] = [d for _, d in _app()
                  if d.get("apiVersion") == "talos.dev/v1alpha1" and d.get("kind") == "ServiceAccount"]
    # talosctl upgrade and upgrade-k8s are os:admin-only in Talos's RBAC.
    assert talos_sa["spec"]["roles"] == ["os:admin"]
    feature = yaml.safe_load((TALOS / "patches/talos-api-access.yaml").read_text())
    access = feature["machine"]["features"]["kubernetesTalosAPIAccess"]
    assert access["enabled"] is True
    assert access["allowedRoles"] == talos_sa["spec"]["roles"]
    assert access["allowedKubernetesNamespaces"] == [talos_sa["metadata"]["namespace"]]


def test_talconfig_applies_the_talos_api_access_patch_to_control_planes() -> None:
    talconfig = yaml.safe_load((TALOS / "talconfig.yaml").read_text())
    assert "@./patches/talos-api-access.yaml" in talconfig["controlPlane"]["patches"]


def test_flux_kustomization_applies_the_overlay_after_infrastructure_with_sops() -> None:
    flux = K8S / "clusters/m720q/flux-kustomizations"
    [ks] = [d for _, d in documents([flux / "prefect.yaml"])]
    assert ks["spec"]["path"] == "./k8s/apps/overlays/m720q/prefect"
    assert ks["spec"]["dependsOn"] == [{"name": "infrastructure"}]
    assert ks["spec"]["decryption"]["provider"] == "sops"
    assert "prefect.yaml" in yaml.safe_load((flux / "kustomization.yaml").read_text())["resources"]
    assert "prefect.yaml" in yaml.safe_load((K8S / "infrastructure/sources/kustomization.yaml").read_text())["resources"]


def test_helmreleases_use_the_prefect_helm_repository_and_the_self_hosted_api() -> None:
    [repo] = [d for _, d in documents([K8S / "infrastructure/sources/prefect.yaml"])]
    assert repo["spec"]["url"] == "https://prefecthq.github.io/prefect-helm"
    releases = {d["metadata"]["name"]: d for d in app_docs("HelmRelease") if "chart" in d["spec"]}
    assert set(releases) == {"prefect-server", "prefect-worker"}
    for r in releases.values():
        assert r["spec"]["chart"]["spec"]["sourceRef"] == {"kind": "HelmRepository", "name": "prefect",
                                                          "namespace": "flux-system"}
    server = releases["prefect-server"]["spec"]["values"]
    assert server["postgresql"]["enabled"] is True
    assert server["server"]["basicAuth"] == {"enabled": True, "existingSecret": "prefect-basic-auth"}
    worker = releases["prefect-worker"]["spec"]["values"]["worker"]
    assert worker["config"]["type"] == "kubernetes"
    assert worker["apiConfig"] == "selfHostedServer"
    assert worker["selfHostedServerApiConfig"]["apiUrl"] == "http://prefect-server.prefect.svc.cluster.local:4200/api"


def test_webhook_receiver_takes_its_secrets_from_secret_refs_only() -> None:
    [deploy] = app_docs("Deployment")
    [container] = deploy["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["homelab", "webhook", "serve", "--host", "0.0.0.0", "--port", "8780"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HOMELAB_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "homelab-webhook", "key": "secret"}
    assert env["PREFECT_API_URL"]["value"] == "http://prefect-server.prefect.svc.cluster.local:4200/api"
    secret_names = {d["metadata"]["name"] for d in app_docs("Secret")}
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] in secret_names, f"{e['name']} reads a Secret the app does not ship"


@pytest.mark.parametrize("name", ["homelab-webhook", "prefect-server"])
def test_tailscale_ingress_tags_base_and_m720q_overlay(name: str) -> None:
    tags = {path.parent.name if "overlays" not in path.parts else "m720q":
            d["metadata"]["annotations"]["tailscale.com/tags"]
            for path, d in _app() if d.get("kind") == "Ingress" and d["metadata"]["name"] == name}
    assert tags == {"prefect": "tag:k8s", "m720q": "tag:k8s,tag:k8s-m720q"}
