"""The twin's Kubernetes side through the real clients: Nodes, Flux controllers, Rook, faults."""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client, config, watch

KS = ("kustomize.toolkit.fluxcd.io", "v1", "flux-system", "kustomizations")


def api(t: Any, cluster: str = "m720q") -> client.ApiClient:
    return config.new_client_from_config(str(t.kubeconfig), context=f"admin@{cluster}")


def request_reconcile(t: Any, name: str, kind: tuple[str, str, str, str] = KS) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    client.CustomObjectsApi(api(t)).patch_namespaced_custom_object(
        *kind[:3], kind[3], name, {"metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": stamp}}})
    return stamp


def settled(obj: dict[str, Any]) -> bool:
    """The controller is done with its attempt: no Reconciling, or one that only says it will retry."""
    rec = next((c for c in obj["status"].get("conditions") or [] if c["type"] == "Reconciling"), None)
    return rec is None or rec["reason"] == "ProgressingWithRetry"


def wait_handled(t: Any, name: str, stamp: str, kind: tuple[str, str, str, str] = KS,
                 until: Any = settled, timeout: float = 3) -> dict[str, Any]:
    done = threading.Event()
    result: dict[str, Any] = {}
    store = t.stores["m720q"]
    kind_name = {"kustomizations": "Kustomization", "gitrepositories": "GitRepository",
                 "helmreleases": "HelmRelease"}[kind[3]]

    def check(*_: Any) -> None:
        obj = store.get(f"{kind[0]}/{kind[1]}", kind_name, kind[2], name)
        st = obj.get("status") or {}
        if st.get("lastHandledReconcileAt") == stamp and until(obj):
            result.update(obj)
            done.set()
    unsub = store.subscribe(check)
    check()
    assert done.wait(timeout), f"{name} never handled {stamp}"
    unsub()
    return result


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")


def test_nodes_have_complete_status_for_the_typed_client(twin):
    t = twin()
    nodes = client.CoreV1Api(api(t)).list_node().items
    assert [n.metadata.name for n in nodes] == ["m720q-1", "m720q-2", "m720q-3"]
    info = nodes[0].status.node_info
    assert info.os_image == "Talos (v1.11.4)" and info.kubelet_version == "v1.32.0"
    assert info.kernel_version and info.container_runtime_version


def test_kubectl_sees_nodes_and_cordon_reaches_talos_health(twin):
    t = twin()
    env = t.subprocess_env()
    out = subprocess.run(["kubectl", "get", "nodes"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "m720q-1   Ready" in out.stdout
    out = subprocess.run(["kubectl", "cordon", "m720q-2"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert t.world.wait_for(lambda: t.world.node("m720q-2").unschedulable, 2)


def _follow_reboot(t: Any) -> list[tuple[str, str, str]]:
    """Upgrade m720q-2 and watch its Node: (Ready status, osImage, bootID) of every event until it is back.
    Not m720q-1: its address is the cluster's API endpoint (no VIP), so the API is gone while it reboots."""
    from twin import talos
    core = client.CoreV1Api(api(t))
    rv = core.list_node().metadata.resource_version
    seen: list[tuple[str, str, str]] = []

    def follow() -> None:
        for ev in watch.Watch().stream(core.list_node, resource_version=rv, field_selector="metadata.name=m720q-2",
                                       timeout_seconds=5):
            node = ev["object"]
            cond = next(c.status for c in node.status.conditions if c.type == "Ready")
            seen.append((cond, node.status.node_info.os_image, node.status.node_info.boot_id))
            if cond == "True" and node.status.node_info.os_image == "Talos (v1.11.5)":
                return
    th = threading.Thread(target=follow)
    th.start()
    _, err, code = talos.run(t.world, ["-n", "10.42.0.102", "upgrade", "--image", "ghcr.io/siderolabs/installer:v1.11.5"],
                             {"TALOSCONFIG": str(t.talosconfig)})
    assert code == 0, err
    th.join(5)
    return seen


def test_a_reboot_longer_than_the_grace_period_shows_unknown_then_ready_with_the_new_osimage(twin):
    t = twin(reboot_seconds=0.4, node_monitor_grace_seconds=0.1)
    boot = t.world.node("m720q-2").boot_id
    seen = _follow_reboot(t)
    statuses = [s for s, _, _ in seen]
    assert "Unknown" in statuses and seen[-1][:2] == ("True", "Talos (v1.11.5)")
    assert statuses.index("Unknown") < len(statuses) - 1
    unknown = next(i for i, (s, _, _) in enumerate(seen) if s == "Unknown")
    assert seen[unknown][1:] == ("Talos (v1.11.4)", boot)  # the lifecycle controller keeps what was last posted
    assert seen[-1][2] != boot


def test_a_reboot_within_the_grace_period_never_shows_the_node_not_ready(twin):
    # node-monitor-grace-period is 50 s: a node that is back sooner only changes bootID and osImage.
    t = twin(reboot_seconds=0.3)
    boot = t.world.node("m720q-2").boot_id
    seen = _follow_reboot(t)
    assert {s for s, _, _ in seen} == {"True"}
    assert seen[-1][1:] != ("Talos (v1.11.4)", boot) and seen[-1][2] != boot


def test_kustomization_reconcile_honours_requested_at(twin):
    t = twin()
    stamp = request_reconcile(t, "infrastructure-core")
    obj = wait_handled(t, "infrastructure-core", stamp)
    head = t.git.head()
    assert ready(obj)["status"] == "True" and ready(obj)["message"] == f"Applied revision: main@sha1:{head}"
    assert obj["status"]["lastAppliedRevision"] == f"main@sha1:{head}"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    [rec] = t.record.reconciles_of("Kustomization", "infrastructure-core")
    assert rec.ok and rec.end - rec.start >= 0.05


def condition_of(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj["status"].get("conditions") or [] if c["type"] == ctype), None)


def test_a_failed_apply_keeps_reconciling_with_retry_and_does_not_observe_the_generation(twin):
    # kustomize-controller finalizeStatus: Ready=False with the error, Reconciling stays (reason
    # ProgressingWithRetry), observedGeneration moves only on success -- the realworld describe sample.
    t = twin(faults=["flux-fails=smokeping"])
    store = t.stores["m720q"]
    store.mutate("kustomize.toolkit.fluxcd.io/v1", "Kustomization", "flux-system", "smokeping",
                 lambda o: o["spec"].update(timeout="4m30s"))  # a new generation to (not) observe
    stamp = request_reconcile(t, "smokeping")
    obj = wait_handled(t, "smokeping", stamp)
    assert ready(obj)["status"] == "False" and ready(obj)["reason"] == "ReconciliationFailed"
    assert "dry-run failed" in ready(obj)["message"]
    rec = condition_of(obj, "Reconciling")
    assert rec is not None and rec["status"] == "True" and rec["reason"] == "ProgressingWithRetry"
    assert rec["message"].startswith("Detecting drift for revision main@sha1:") and "timeout of 4m30s" in rec["message"]
    assert obj["metadata"]["generation"] == 2 and obj["status"]["observedGeneration"] == 1
    assert obj["status"]["lastAttemptedRevision"] == t.git.revision()
    assert [c["type"] for c in obj["status"]["conditions"]][:2] == ["Ready", "Reconciling"]


def test_a_dependent_of_a_failing_dependency_is_dependency_not_ready_and_requeued_on_the_interval(twin):
    t = twin(faults=["flux-fails=rook-ceph-cluster"], requeue_dependency_seconds=0.4)
    stamp = request_reconcile(t, "rook-ceph-cluster")
    wait_handled(t, "rook-ceph-cluster", stamp)
    stamp = request_reconcile(t, "smokeping")
    obj = wait_handled(t, "smokeping", stamp)
    first_answer = time.monotonic()
    assert ready(obj)["status"] == "False" and ready(obj)["reason"] == "DependencyNotReady"
    assert ready(obj)["message"] == "dependency 'flux-system/rook-ceph-cluster' is not ready"
    assert condition_of(obj, "Reconciling") is None  # the dependency check comes before any work
    assert not t.record.reconciles_of("Kustomization", "smokeping")  # nothing was applied
    t.clear("flux-fails")
    request_reconcile(t, "rook-ceph-cluster")
    store = t.stores["m720q"]
    assert t.world.wait_for(lambda: ready(store.get("kustomize.toolkit.fluxcd.io/v1", "Kustomization", "flux-system",
                                                    "smokeping"))["status"] == "True", 3)
    # Nothing tells the dependent its dependency is ready: it looks again after --requeue-dependency.
    [rec] = t.record.reconciles_of("Kustomization", "smokeping")
    assert rec.start - first_answer >= 0.35
    last_dep = max(r.end for r in t.record.reconciles_of("Kustomization", "rook-ceph-cluster"))
    assert rec.start >= last_dep


def test_requested_at_is_read_when_a_reconcile_starts_and_a_later_request_runs_it_again(twin):
    t = twin(flux_delay_seconds=0.4)
    first = request_reconcile(t, "api-proxy")
    store = t.stores["m720q"]
    assert t.world.wait_for(lambda: t.record.reconciles_of("Kustomization", "api-proxy"), 2)
    second = request_reconcile(t, "api-proxy")  # while the first attempt runs
    seen: list[str] = []

    def note(ev: str, obj: dict[str, Any]) -> None:
        if obj.get("kind") == "Kustomization" and obj["metadata"]["name"] == "api-proxy":
            value = (obj.get("status") or {}).get("lastHandledReconcileAt")
            if value and (not seen or seen[-1] != value):
                seen.append(value)
    unsub = store.subscribe(note)
    wait_handled(t, "api-proxy", second)
    unsub()
    assert seen == [first, second]
    assert len(t.record.reconciles_of("Kustomization", "api-proxy")) == 2


def test_source_reconcile_reads_the_new_git_head_and_kustomizations_follow(twin):
    t = twin()
    (t.git.tree / "NEW").write_text("x\n")
    head = t.git.commit_all("a change")
    kind = ("source.toolkit.fluxcd.io", "v1", "flux-system", "gitrepositories")
    stamp = request_reconcile(t, "flux-system", kind)
    obj = wait_handled(t, "flux-system", stamp, kind)
    assert obj["status"]["artifact"]["revision"] == f"main@sha1:{head}"
    store = t.stores["m720q"]
    assert t.world.wait_for(lambda: store.get("kustomize.toolkit.fluxcd.io/v1", "Kustomization", "flux-system", "sources")
                            ["status"]["lastAppliedRevision"] == f"main@sha1:{head}", 3)


def test_kube_flaky_fault_makes_the_api_answer_500s(twin):
    t = twin(faults=["kube-flaky=1"])
    out = subprocess.run(["kubectl", "get", "nodes", "--request-timeout=5s"], env=t.subprocess_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    t.clear("kube-flaky")
    assert t.kube["m720q"].flaky_share == 0.0


def test_homelab_api_is_unavailable_until_bootstrap_and_serves_nodes_when_synced(twin):
    t = twin(state="synced")
    assert t.kube["homelab"].available
    names = [n.metadata.name for n in client.CoreV1Api(api(t, "homelab")).list_node().items]
    assert names == ["homelab-cp-1", "homelab-worker-1"]
    m = client.CoreV1Api(api(t)).list_node().items[0]
    assert m.status.node_info.os_image == "Talos (v1.11.5)"


def test_helmreleases_of_each_kustomization_path_are_seeded_ready(twin):
    t = twin()
    hrs = client.CustomObjectsApi(api(t)).list_cluster_custom_object("helm.toolkit.fluxcd.io", "v2",
                                                                      "helmreleases")["items"]
    by_name = {(h["metadata"]["namespace"], h["metadata"]["name"]): h for h in hrs}
    # Base HelmReleases reached through an overlay's kustomization.yaml resources, and a plain directory.
    assert {("kube-system", "cilium"), ("rook-ceph", "rook-ceph"), ("rook-ceph", "rook-ceph-cluster"),
            ("prefect", "prefect-worker")} <= set(by_name)
    cilium = by_name[("kube-system", "cilium")]
    assert ready(cilium)["status"] == "True"
    assert cilium["status"]["history"][0]["chartVersion"] == cilium["spec"]["chart"]["spec"]["version"]
    assert cilium["metadata"]["labels"]["kustomize.toolkit.fluxcd.io/name"] == "infrastructure-core"


def test_helmreleases_take_the_overlay_namespace_and_its_patches(tmp_path):
    from twin.controllers import helmreleases_at

    base, overlay = tmp_path / "app" / "base", tmp_path / "app" / "overlay"
    base.mkdir(parents=True)
    overlay.mkdir()
    (base / "kustomization.yaml").write_text("resources:\n  - hr.yaml\n")
    (base / "hr.yaml").write_text("apiVersion: helm.toolkit.fluxcd.io/v2\nkind: HelmRelease\n"
                                  "metadata:\n  name: web\nspec:\n  chart:\n    spec:\n      version: 1.0.0\n"
                                  "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: not-a-release\n")
    (overlay / "kustomization.yaml").write_text("namespace: web\nresources:\n  - ../base\n"
                                                "patches:\n  - path: patch.yaml\n")
    (overlay / "patch.yaml").write_text("apiVersion: helm.toolkit.fluxcd.io/v2\nkind: HelmRelease\n"
                                        "metadata:\n  name: web\nspec:\n  chart:\n    spec:\n      version: 2.0.0\n")
    [hr] = helmreleases_at(tmp_path, "./app/overlay")
    assert hr["metadata"] == {"name": "web", "namespace": "web"}
    assert hr["spec"]["chart"]["spec"]["version"] == "2.0.0"
    assert helmreleases_at(tmp_path, "./app/missing") == []


def test_the_network_faults_take_no_argument_and_act_on_every_api_server(twin):
    from twin.state import parse_fault

    t = twin(faults=["kube-throttle", "watch-504", "kube-blackhole"], watch_504_seconds=0.5)
    for server in t.kube.values():
        assert server.throttle_share == 0.3 and server.watch_504_after_s == 0.5
        assert server.blackholed  # 20 s from the start, then normal again
    t.inject("kube-blackhole", "0.2")
    assert t.world.wait_for(lambda: not t.kube["m720q"].blackholed, 1)
    t.clear("kube-throttle")
    t.clear("watch-504")
    assert t.kube["homelab"].throttle_share == 0.0 and t.kube["homelab"].watch_504_after_s is None
    for bad, words in (("kube-blackhole=soon", "number of seconds"), ("kube-throttle=2", "share of requests"),
                       ("watch-504=1", "takes no argument")):
        with pytest.raises(ValueError, match=words):
            parse_fault(bad)
