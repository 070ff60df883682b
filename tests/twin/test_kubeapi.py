"""The twin's fake kube-apiserver, driven by the official kubernetes client and kubectl."""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from twin.kubeapi import (
    ApiError,
    KubeApiServer,
    KubeStore,
    ResourceType,
    json_patch,
    parse_field_selector,
    parse_label_selector,
    strategic_merge_patch,
)

TOKEN = "twin-test-token"
KS = ("kustomize.toolkit.fluxcd.io", "v1", "kustomizations")
KS_AV = "kustomize.toolkit.fluxcd.io/v1"


def node(name: str, *, ready: bool = True, labels: dict[str, str] | None = None,
         kubelet: str = "v1.32.0", os_image: str = "Talos (v1.11.4)") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                              "node-role.kubernetes.io/control-plane": "", **(labels or {})}},
        "spec": {},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                 "message": "kubelet has sufficient memory available",
                 "lastHeartbeatTime": "2025-01-01T00:00:00Z", "lastTransitionTime": "2025-01-01T00:00:00Z"},
                {"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady",
                 "message": "kubelet is posting ready status",
                 "lastHeartbeatTime": "2025-01-01T00:00:00Z", "lastTransitionTime": "2025-01-01T00:00:00Z"},
            ],
            "addresses": [{"type": "InternalIP", "address": "10.42.0.11"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "architecture": "amd64", "bootID": f"boot-{name}", "containerRuntimeVersion": "containerd://2.0.5",
                "kernelVersion": "6.12.18-talos", "kubeProxyVersion": "", "kubeletVersion": kubelet,
                "machineID": f"machine-{name}", "operatingSystem": "linux", "osImage": os_image,
                "systemUUID": f"uuid-{name}",
            },
        },
    }


def kustomization(name: str, *, labels: dict[str, str] | None = None, ready: str = "True") -> dict[str, Any]:
    return {
        "apiVersion": KS_AV, "kind": "Kustomization",
        "metadata": {"name": name, "namespace": "flux-system", "labels": labels or {}},
        "spec": {"interval": "10m", "path": f"./k8s/{name}", "prune": True,
                 "sourceRef": {"kind": "GitRepository", "name": "flux-system"}},
        "status": {"conditions": [{"type": "Ready", "status": ready, "reason": "ReconciliationSucceeded",
                                   "message": "Applied revision: main@sha1:abc",
                                   "lastTransitionTime": "2025-01-01T00:00:00Z"}]},
    }


@pytest.fixture
def store() -> KubeStore:
    return KubeStore()


@pytest.fixture
def server(store: KubeStore) -> Iterator[KubeApiServer]:
    srv = KubeApiServer(store, token=TOKEN)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(server: KubeApiServer) -> Iterator[client.ApiClient]:
    cfg = client.Configuration()
    cfg.host = server.url
    cfg.api_key = {"authorization": f"Bearer {TOKEN}"}
    with client.ApiClient(cfg) as api_client:
        yield api_client


def raw(server: KubeApiServer, method: str, path: str, body: Any = None,
        headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


# --- version, CRUD, conflicts -----------------------------------------------------------------


def test_version_answers_every_field_the_typed_client_requires(api: client.ApiClient, store: KubeStore) -> None:
    store.server_version = "v1.33.1"
    info = client.VersionApi(api).get_code()
    assert (info.major, info.minor, info.git_version) == ("1", "33", "v1.33.1")
    assert info.platform == "linux/amd64" and info.go_version


def test_node_round_trips_with_full_node_info(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    created = core.create_node(node("m720q-1"))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.generation == 1
    got = core.read_node("m720q-1")
    assert got.status.node_info.os_image == "Talos (v1.11.4)"
    listed = core.list_node()
    assert [n.metadata.name for n in listed.items] == ["m720q-1"]
    assert int(listed.metadata.resource_version) >= int(got.metadata.resource_version)


def test_create_of_an_existing_name_answers_409_already_exists(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    core.create_node(node("a"))
    with pytest.raises(ApiException) as exc:
        core.create_node(node("a"))
    assert exc.value.status == 409
    assert json.loads(exc.value.body)["reason"] == "AlreadyExists"


def test_replace_with_a_stale_resource_version_answers_409_conflict(api: client.ApiClient) -> None:
    objs = client.CustomObjectsApi(api)
    first = objs.create_namespaced_custom_object(*KS[:2], "flux-system", KS[2], kustomization("apps"))
    stale = json.loads(json.dumps(first))
    first["spec"]["suspend"] = True
    objs.replace_namespaced_custom_object(*KS[:2], "flux-system", KS[2], "apps", first)
    stale["spec"]["path"] = "./elsewhere"
    with pytest.raises(ApiException) as exc:
        objs.replace_namespaced_custom_object(*KS[:2], "flux-system", KS[2], "apps", stale)
    assert exc.value.status == 409
    assert json.loads(exc.value.body)["reason"] == "Conflict"


def test_get_of_a_missing_object_answers_404_status(api: client.ApiClient) -> None:
    with pytest.raises(ApiException) as exc:
        client.CoreV1Api(api).read_node("ghost")
    body = json.loads(exc.value.body)
    assert (exc.value.status, body["kind"], body["reason"]) == (404, "Status", "NotFound")


def test_delete_removes_the_object(api: client.ApiClient, store: KubeStore) -> None:
    core = client.CoreV1Api(api)
    core.create_node(node("a"))
    core.delete_node("a")
    assert store.get("v1", "Node", None, "a") is None
    objs = client.CustomObjectsApi(api)
    objs.create_namespaced_custom_object(*KS[:2], "flux-system", KS[2], kustomization("apps"))
    deleted = objs.delete_namespaced_custom_object(*KS[:2], "flux-system", KS[2], "apps")
    assert deleted["metadata"]["name"] == "apps"


def test_wrong_bearer_token_answers_401(server: KubeApiServer) -> None:
    status, body = raw(server, "GET", "/api/v1/nodes", headers={"Authorization": "Bearer nope"})
    assert (status, body["reason"]) == (401, "Unauthorized")


# --- patches, generation, status subresource ------------------------------------------------


def test_spec_patch_bumps_generation_and_annotation_patch_does_not(api: client.ApiClient) -> None:
    objs = client.CustomObjectsApi(api)
    objs.create_namespaced_custom_object(*KS[:2], "flux-system", KS[2], kustomization("apps"))
    a = objs.patch_namespaced_custom_object(*KS[:2], "flux-system", KS[2], "apps",
                                            {"metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": "now"}}})
    assert a["metadata"]["generation"] == 1
    b = objs.patch_namespaced_custom_object(*KS[:2], "flux-system", KS[2], "apps", {"spec": {"suspend": True}})
    assert b["metadata"]["generation"] == 2
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert b["metadata"]["annotations"]["reconcile.fluxcd.io/requestedAt"] == "now"


def test_json_patch_applies_operations_and_a_failed_test_answers_422(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    core.create_node(node("a"))
    patched = core.patch_node("a", [
        {"op": "add", "path": "/metadata/labels/role", "value": "storage"},
        {"op": "replace", "path": "/spec", "value": {"unschedulable": True}},
        {"op": "remove", "path": "/metadata/labels/kubernetes.io~1hostname"},
    ])
    assert patched.metadata.labels == {"role": "storage", "node-role.kubernetes.io/control-plane": ""}
    assert patched.spec.unschedulable is True
    with pytest.raises(ApiException) as exc:
        core.patch_node("a", [{"op": "test", "path": "/spec/unschedulable", "value": False}])
    assert exc.value.status == 422


def test_strategic_patch_merges_conditions_by_type(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    core.create_node(node("a"))
    patched = core.patch_node_status("a", {"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "rebooting",
         "lastHeartbeatTime": "2025-01-02T00:00:00Z", "lastTransitionTime": "2025-01-02T00:00:00Z"}]}})
    by_type = {c.type: c.status for c in patched.status.conditions}
    assert by_type == {"MemoryPressure": "False", "Ready": "False"}


def test_strategic_patch_of_a_custom_resource_answers_415(server: KubeApiServer, store: KubeStore) -> None:
    store.create(kustomization("apps"))
    status, body = raw(server, "PATCH", "/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/flux-system/kustomizations/apps",
                       {"spec": {"suspend": True}}, {"Content-Type": "application/strategic-merge-patch+json"})
    assert (status, body["reason"]) == (415, "UnsupportedMediaType")


def test_main_resource_writes_ignore_status_and_status_writes_ignore_spec(api: client.ApiClient) -> None:
    objs = client.CustomObjectsApi(api)
    created = objs.create_namespaced_custom_object(*KS[:2], "flux-system", KS[2], kustomization("apps"))
    assert "status" not in created  # the real server drops status on create when /status exists
    after_main = objs.patch_namespaced_custom_object(
        *KS[:2], "flux-system", KS[2], "apps", {"status": {"lastAppliedRevision": "x"}, "spec": {"suspend": True}})
    assert "status" not in after_main and after_main["spec"]["suspend"] is True
    after_status = objs.patch_namespaced_custom_object_status(
        *KS[:2], "flux-system", KS[2], "apps", {"status": {"lastAppliedRevision": "main@sha1:abc"},
                                                 "spec": {"suspend": False}})
    assert after_status["status"] == {"lastAppliedRevision": "main@sha1:abc"}
    assert after_status["spec"]["suspend"] is True
    assert after_status["metadata"]["generation"] == 2


def test_patch_carrying_a_stale_resource_version_answers_409(api: client.ApiClient, store: KubeStore) -> None:
    store.create(node("a"))
    with pytest.raises(ApiException) as exc:
        client.CoreV1Api(api).patch_node("a", {"metadata": {"resourceVersion": "0"}, "spec": {"unschedulable": True}})
    assert exc.value.status == 409


def test_json_patch_and_strategic_patch_functions() -> None:
    doc = {"a": [1, 2], "b": {"c": 1}}
    assert json_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}, {"op": "move", "from": "/b/c", "path": "/d"}]) == \
        {"a": [1, 2, 3], "b": {}, "d": 1}
    assert doc == {"a": [1, 2], "b": {"c": 1}}
    with pytest.raises(ApiError):
        json_patch(doc, [{"op": "remove", "path": "/nope"}])
    target = {"spec": {"containers": [{"name": "a", "image": "x:1"}, {"name": "b", "image": "y:1"}],
                       "args": ["1", "2"]}}
    out = strategic_merge_patch(target, {"spec": {"containers": [{"name": "b", "image": "y:2"},
                                                                 {"name": "a", "$patch": "delete"}],
                                                  "args": ["3"], "$setElementOrder/containers": [{"name": "b"}]}})
    assert out == {"spec": {"containers": [{"name": "b", "image": "y:2"}], "args": ["3"]}}


# --- selectors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "expected"), [
    ("tier=web", {"web1", "web2"}),
    ("tier==web,zone!=b", {"web1"}),
    ("tier in (web, db)", {"web1", "web2", "db1"}),
    ("tier notin (web)", {"db1", "bare"}),
    ("zone", {"web1", "web2", "db1"}),
    ("!zone", {"bare"}),
    ("tier in (web,db),zone=a", {"web1", "db1"}),
])
def test_label_selector_operators(selector: str, expected: set[str]) -> None:
    labels = {"web1": {"tier": "web", "zone": "a"}, "web2": {"tier": "web", "zone": "b"},
              "db1": {"tier": "db", "zone": "a"}, "bare": {}}
    match = parse_label_selector(selector)
    assert {name for name, ls in labels.items() if match(ls)} == expected


def test_malformed_label_selector_is_a_bad_request() -> None:
    with pytest.raises(ApiError) as exc:
        parse_label_selector("tier in web")
    assert exc.value.code == 400


def test_field_selector_treats_a_missing_unschedulable_as_false() -> None:
    assert parse_field_selector("spec.unschedulable=false")({"spec": {}})
    assert not parse_field_selector("spec.unschedulable=false")({"spec": {"unschedulable": True}})
    assert parse_field_selector("status.phase!=Running,metadata.name=x")({"metadata": {"name": "x"}})


def test_list_applies_label_and_field_selectors(api: client.ApiClient, store: KubeStore) -> None:
    store.create(node("a", labels={"zone": "1"}))
    store.create(node("b", labels={"zone": "2"}))
    store.patch("v1", "Node", None, "b", {"spec": {"unschedulable": True}})
    core = client.CoreV1Api(api)
    assert [n.metadata.name for n in core.list_node(label_selector="zone in (2,3)").items] == ["b"]
    assert [n.metadata.name for n in core.list_node(field_selector="spec.unschedulable=false").items] == ["a"]
    assert [n.metadata.name for n in core.list_node(field_selector="metadata.name!=a").items] == ["b"]
    objs = client.CustomObjectsApi(api)
    store.create(kustomization("infra", labels={"layer": "infra"}))
    store.create({**kustomization("apps"), "metadata": {"name": "apps", "namespace": "other"}})
    items = objs.list_cluster_custom_object(*KS, label_selector="layer=infra")["items"]
    assert [i["metadata"]["name"] for i in items] == ["infra"]
    items = objs.list_cluster_custom_object(*KS, field_selector="metadata.namespace=other")["items"]
    assert [i["metadata"]["name"] for i in items] == ["apps"]


def test_list_pages_with_limit_and_continue(server: KubeApiServer, store: KubeStore) -> None:
    for i in range(5):
        store.create(node(f"n{i}"))
    status, page = raw(server, "GET", "/api/v1/nodes?limit=2")
    names = [i["metadata"]["name"] for i in page["items"]]
    while page["metadata"].get("continue"):
        status, page = raw(server, "GET", f"/api/v1/nodes?limit=2&continue={page['metadata']['continue']}")
        names += [i["metadata"]["name"] for i in page["items"]]
    assert names == [f"n{i}" for i in range(5)]


def test_list_of_2000_objects_answers_within_100ms(server: KubeApiServer, store: KubeStore) -> None:
    for i in range(2000):
        store.create(kustomization(f"ks-{i:04d}"))
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            conn.request("GET", "/apis/kustomize.toolkit.fluxcd.io/v1/kustomizations",
                         headers={"Authorization": f"Bearer {TOKEN}"})
            body = conn.getresponse().read()
            timings.append(time.perf_counter() - start)
        assert len(json.loads(body)["items"]) == 2000
        assert min(timings) < 0.1, timings
    finally:
        conn.close()


# --- watch ------------------------------------------------------------------------------------


def test_watch_without_version_sends_current_objects_then_live_events(api: client.ApiClient, store: KubeStore) -> None:
    store.create(node("a"))
    core = client.CoreV1Api(api)
    seen: list[tuple[str, str]] = []

    def writer() -> None:
        time.sleep(0.1)
        store.create(node("b"))
        store.patch("v1", "Node", None, "a", {"spec": {"unschedulable": True}})
        store.delete("v1", "Node", None, "b")

    threading.Thread(target=writer).start()
    w = watch.Watch()
    for event in w.stream(core.list_node, timeout_seconds=3):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 4:
            w.stop()
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]


def test_watch_event_reaches_the_client_within_50ms_p50(api: client.ApiClient, store: KubeStore) -> None:
    store.create(node("a"))
    core = client.CoreV1Api(api)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    received = threading.Event()
    done = threading.Event()

    def writer() -> None:
        for i in range(15):
            received.wait(2)
            received.clear()
            sent[str(i)] = time.monotonic()
            store.patch("v1", "Node", None, "a", {"metadata": {"labels": {"i": str(i)}}})
        done.set()

    w = watch.Watch()
    threading.Thread(target=writer).start()
    for event in w.stream(core.list_node, timeout_seconds=10):
        i = (event["raw_object"]["metadata"].get("labels") or {}).get("i")
        if i is not None:
            latencies.append(time.monotonic() - sent[i])
        received.set()
        if len(latencies) == 15:
            w.stop()
    assert done.wait(2)
    assert statistics.median(latencies) < 0.05, latencies


def test_watch_resumes_from_a_resource_version_after_a_disconnect(api: client.ApiClient, store: KubeStore) -> None:
    core = client.CoreV1Api(api)
    store.create(node("a"))
    listed = core.list_node()
    w = watch.Watch()
    first = [e["type"] for e in w.stream(core.list_node, resource_version=listed.metadata.resource_version,
                                         timeout_seconds=1)]
    assert first == []  # nothing happened after the list
    store.patch("v1", "Node", None, "a", {"metadata": {"labels": {"step": "1"}}})
    store.create(node("b"))
    resumed = []
    w2 = watch.Watch()
    for e in w2.stream(core.list_node, resource_version=listed.metadata.resource_version, timeout_seconds=2):
        resumed.append((e["type"], e["object"].metadata.name))
        if len(resumed) == 2:
            w2.stop()
    assert resumed == [("MODIFIED", "a"), ("ADDED", "b")]
    assert w2.resource_version == str(store.resource_version)


def test_watch_from_a_version_older_than_the_history_answers_410() -> None:
    store = KubeStore(history_limit=3)
    with KubeApiServer(store) as server:
        cfg = client.Configuration()
        cfg.host = server.url
        with client.ApiClient(cfg) as api_client:
            core = client.CoreV1Api(api_client)
            for i in range(6):
                store.create(node(f"n{i}"))
            with pytest.raises(ApiException) as exc:
                list(watch.Watch().stream(core.list_node, resource_version="1", timeout_seconds=2))
            assert exc.value.status == 410
            # without timeout_seconds the client retries once from the same version, then gives up
            with pytest.raises(ApiException) as exc:
                list(watch.Watch().stream(core.list_node, resource_version="1"))
            assert exc.value.status == 410


def test_watch_ends_after_timeout_seconds(api: client.ApiClient) -> None:
    start = time.monotonic()
    events = list(watch.Watch().stream(client.CoreV1Api(api).list_node, timeout_seconds=1))
    assert events == []
    assert 0.9 < time.monotonic() - start < 2.0


def test_custom_object_watch_applies_selectors_and_reports_leaving_them(
        api: client.ApiClient, store: KubeStore) -> None:
    objs = client.CustomObjectsApi(api)
    store.create(kustomization("infra", labels={"layer": "infra"}))
    store.create(kustomization("apps", labels={"layer": "apps"}))
    seen: list[tuple[str, str]] = []

    def writer() -> None:
        time.sleep(0.1)
        store.patch(KS_AV, "Kustomization", "flux-system", "apps", {"spec": {"suspend": True}})
        store.patch(KS_AV, "Kustomization", "flux-system", "infra", {"metadata": {"labels": {"layer": "old"}}})

    threading.Thread(target=writer).start()
    w = watch.Watch()
    for e in w.stream(objs.list_namespaced_custom_object, *KS[:2], "flux-system", KS[2],
                      label_selector="layer=infra", timeout_seconds=3):
        seen.append((e["type"], e["object"]["metadata"]["name"]))
        if len(seen) == 2:
            w.stop()
    assert seen == [("ADDED", "infra"), ("DELETED", "infra")]


def test_watch_resume_through_the_custom_objects_api(api: client.ApiClient, store: KubeStore) -> None:
    objs = client.CustomObjectsApi(api)
    store.create(kustomization("apps"))
    rv = objs.list_namespaced_custom_object(*KS[:2], "flux-system", KS[2])["metadata"]["resourceVersion"]
    store.patch(KS_AV, "Kustomization", "flux-system", "apps",
                {"status": {"lastHandledReconcileAt": "t1"}}, subresource="status")
    w = watch.Watch()
    for e in w.stream(objs.list_namespaced_custom_object, *KS[:2], "flux-system", KS[2],
                      resource_version=rv, timeout_seconds=2):
        assert (e["type"], e["object"]["status"]["lastHandledReconcileAt"]) == ("MODIFIED", "t1")
        w.stop()
    assert w.resource_version == str(store.resource_version)


def test_concurrent_writers_reach_a_watcher_in_resource_version_order(api: client.ApiClient, store: KubeStore) -> None:
    for i in range(4):
        store.create(node(f"n{i}"))
    start_rv = str(store.resource_version)
    go = threading.Event()

    def writer(i: int) -> None:
        go.wait(2)
        for j in range(25):
            store.patch("v1", "Node", None, f"n{i}", {"metadata": {"labels": {"j": str(j)}}})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    versions: list[int] = []
    w = watch.Watch()
    go.set()
    for e in w.stream(client.CoreV1Api(api).list_node, resource_version=start_rv, timeout_seconds=5):
        versions.append(int(e["raw_object"]["metadata"]["resourceVersion"]))
        if len(versions) == 100:
            w.stop()
    for t in threads:
        t.join()
    assert versions == list(range(int(start_rv) + 1, int(start_rv) + 101))


def test_subscriber_writing_back_during_an_http_write_does_not_deadlock(
        api: client.ApiClient, store: KubeStore) -> None:
    def controller(event: str, obj: dict[str, Any]) -> None:
        annotations = obj["metadata"].get("annotations") or {}
        if obj["kind"] == "Kustomization" and "reconcile.fluxcd.io/requestedAt" in annotations:
            store.mutate(KS_AV, "Kustomization", obj["metadata"]["namespace"], obj["metadata"]["name"],
                         lambda o: o.setdefault("status", {}).update(
                             lastHandledReconcileAt=annotations["reconcile.fluxcd.io/requestedAt"]),
                         subresource="status")

    store.subscribe(controller)
    store.create(kustomization("apps"))
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        *KS[:2], "flux-system", KS[2], "apps", {"metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": "t"}}})
    assert store.get(KS_AV, "Kustomization", "flux-system", "apps")["status"]["lastHandledReconcileAt"] == "t"


def test_stop_closes_open_watches_within_a_second(store: KubeStore) -> None:
    server = KubeApiServer(store)
    server.start()
    cfg = client.Configuration()
    cfg.host = server.url
    finished = threading.Event()

    def consume() -> None:
        with client.ApiClient(cfg) as api_client:
            try:
                list(watch.Watch().stream(client.CoreV1Api(api_client).list_node, timeout_seconds=30))
            except Exception:  # noqa: BLE001 - the dropped connection is the expected end
                pass
        finished.set()

    threading.Thread(target=consume, daemon=True).start()
    time.sleep(0.2)
    start = time.monotonic()
    server.stop()
    assert finished.wait(2)
    assert time.monotonic() - start < 1.0


# --- faults and counters ----------------------------------------------------------------------


def test_unavailable_server_answers_503_and_ends_watches(api: client.ApiClient, server: KubeApiServer) -> None:
    core = client.CoreV1Api(api)
    ended = threading.Event()

    def consume() -> None:
        try:
            list(watch.Watch().stream(core.list_node, timeout_seconds=30))
        except Exception:  # noqa: BLE001 - the dropped connection is the expected end
            pass
        ended.set()

    threading.Thread(target=consume, daemon=True).start()
    time.sleep(0.2)
    server.available = False
    assert ended.wait(1.5)
    with pytest.raises(ApiException) as exc:
        core.list_node()
    assert exc.value.status == 503
    server.available = True
    assert core.list_node().items == []


def test_flaky_share_answers_that_share_of_requests_with_500(server: KubeApiServer) -> None:
    server.flaky_share = 1.0
    assert raw(server, "GET", "/api/v1/nodes")[0] == 500
    server.flaky_share = 0.5
    server.rng.seed(7)
    codes = [raw(server, "GET", "/api/v1/nodes")[0] for _ in range(100)]
    assert 25 < codes.count(500) < 75 and codes.count(200) == 100 - codes.count(500)
    server.flaky_share = 0.0
    assert raw(server, "GET", "/api/v1/nodes")[0] == 200


def test_request_count_counts_verbs_per_kind(api: client.ApiClient, server: KubeApiServer) -> None:
    core = client.CoreV1Api(api)
    core.list_node()
    core.list_node()
    core.create_node(node("a"))
    core.patch_node("a", {"spec": {"unschedulable": True}})
    assert server.count("list", "Node") == 2
    assert server.count("create", "Node") == 1 and server.count("patch") == 1
    assert server.request_count["list:Node"] == 2


# --- the in-process store ---------------------------------------------------------------------


def test_subscriber_may_write_back_without_deadlock_and_sees_events_in_order(store: KubeStore) -> None:
    seen: list[tuple[str, str, str]] = []

    def controller(event: str, obj: dict[str, Any]) -> None:
        seen.append((event, obj["metadata"]["name"], obj["metadata"]["resourceVersion"]))
        if event == "ADDED" and obj["kind"] == "Kustomization":
            store.patch(KS_AV, "Kustomization", "flux-system", obj["metadata"]["name"],
                        {"status": {"observedGeneration": 1}}, subresource="status")

    unsubscribe = store.subscribe(controller)
    store.create(kustomization("apps"))
    assert [(e, n) for e, n, _ in seen] == [("ADDED", "apps"), ("MODIFIED", "apps")]
    assert store.get(KS_AV, "Kustomization", "flux-system", "apps")["status"] == {
        "conditions": kustomization("apps")["status"]["conditions"], "observedGeneration": 1}
    unsubscribe()
    store.create(kustomization("infra"))
    assert len(seen) == 2


def test_mutate_is_a_read_modify_write_and_a_no_op_keeps_the_version(store: KubeStore) -> None:
    store.create(node("a"))
    before = store.get("v1", "Node", None, "a")
    same = store.mutate("v1", "Node", None, "a", lambda o: None)
    assert same["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

    def cordon(o: dict[str, Any]) -> None:
        o["spec"]["unschedulable"] = True

    after = store.mutate("v1", "Node", None, "a", cordon)
    assert after["spec"]["unschedulable"] is True and after["metadata"]["generation"] == 2
    assert store.mutate("v1", "Node", None, "ghost", cordon) is None


def test_reads_are_copies(store: KubeStore) -> None:
    store.create(node("a"))
    got = store.get("v1", "Node", None, "a")
    got["spec"]["unschedulable"] = True
    store.list("v1", "Node")[0]["metadata"]["labels"].clear()
    again = store.get("v1", "Node", None, "a")
    assert "unschedulable" not in again["spec"] and again["metadata"]["labels"]


def test_delete_with_finalizers_waits_until_they_are_removed(store: KubeStore) -> None:
    obj = kustomization("apps")
    obj["metadata"]["finalizers"] = ["finalizers.fluxcd.io"]
    store.create(obj)
    marked = store.delete(KS_AV, "Kustomization", "flux-system", "apps")
    assert marked["metadata"]["deletionTimestamp"]
    store.patch(KS_AV, "Kustomization", "flux-system", "apps", {"metadata": {"finalizers": None}})
    assert store.get(KS_AV, "Kustomization", "flux-system", "apps") is None


def test_registered_kind_is_served_with_discovery(server: KubeApiServer, store: KubeStore) -> None:
    store.register_kind(ResourceType("example.dev", "v1", "Widget", "widgets", namespaced=False))
    status, resources = raw(server, "GET", "/apis/example.dev/v1")
    assert status == 200
    assert {r["name"] for r in resources["resources"]} == {"widgets", "widgets/status"}
    status, created = raw(server, "POST", "/apis/example.dev/v1/widgets",
                          {"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert (status, created["metadata"]["resourceVersion"]) == (201, str(store.resource_version))


# --- kubectl ----------------------------------------------------------------------------------


@pytest.fixture
def kubectl(server: KubeApiServer, tmp_path: Path):
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: twin\n  cluster:\n    server: {server.url}\n"
        f"users:\n- name: twin\n  user:\n    token: {TOKEN}\n"
        "contexts:\n- name: twin\n  context:\n    cluster: twin\n    user: twin\n"
        "current-context: twin\n")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "KUBECONFIG": str(kubeconfig)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=30, check=False)
    return run


def test_kubectl_gets_nodes_and_kustomizations(kubectl, store: KubeStore) -> None:
    store.create(node("m720q-1"))
    store.create(node("m720q-2", ready=False))
    store.create(kustomization("apps"))
    out = kubectl("get", "nodes")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert lines[1].split()[:3] == ["m720q-1", "Ready", "control-plane"]
    assert lines[2].split()[:2] == ["m720q-2", "NotReady"]
    out = kubectl("get", "kustomizations", "-A")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:2] == ["flux-system", "apps"]
    out = kubectl("get", "nodes", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert [i["status"]["nodeInfo"]["osImage"] for i in json.loads(out.stdout)["items"]] == ["Talos (v1.11.4)"] * 2


def test_kubectl_patches_a_kustomization_and_cordons_a_node(kubectl, store: KubeStore) -> None:
    store.create(node("m720q-1"))
    store.create(kustomization("apps"))
    out = kubectl("-n", "flux-system", "patch", "kustomization", "apps", "--type", "merge",
                  "-p", '{"metadata":{"annotations":{"reconcile.fluxcd.io/requestedAt":"2025-01-01T00:00:00Z"}}}')
    assert out.returncode == 0, out.stderr
    ks = store.get(KS_AV, "Kustomization", "flux-system", "apps")
    assert ks["metadata"]["annotations"] == {"reconcile.fluxcd.io/requestedAt": "2025-01-01T00:00:00Z"}
    assert ks["metadata"]["generation"] == 1
    out = kubectl("cordon", "m720q-1")
    assert out.returncode == 0, out.stderr
    assert store.get("v1", "Node", None, "m720q-1")["spec"]["unschedulable"] is True


# --- what a real kube-apiserver refuses, with its status and message ----------------------------


def raw_text(server: KubeApiServer, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


KS_PATH = "/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/flux-system/kustomizations"


@pytest.mark.parametrize("path", [f"{KS_PATH}?fieldSelector=spec.suspend%3Dtrue",
                                  f"{KS_PATH}?watch=true&fieldSelector=status.observedGeneration%3D1"])
def test_a_field_selector_on_a_custom_resource_field_answers_400_field_label_not_supported(
        server: KubeApiServer, store: KubeStore, path: str) -> None:
    # apiextensions-apiserver crConverter.ConvertFieldLabel: metadata.name and metadata.namespace only.
    store.create(kustomization("apps"))
    code, status = raw(server, "GET", path)
    label = path.split("fieldSelector=")[1].split("%3D")[0]
    assert code == 400
    assert status["reason"] == "BadRequest" and status["message"] == f"field label not supported: {label}"
    code, found = raw(server, "GET", f"{KS_PATH}?fieldSelector=metadata.name%3Dapps,metadata.namespace%3Dflux-system")
    assert code == 200 and [i["metadata"]["name"] for i in found["items"]] == ["apps"]


def test_a_node_field_selector_takes_name_and_unschedulable_only(server: KubeApiServer, store: KubeStore) -> None:
    store.create(node("m720q-1"))
    assert raw(server, "GET", "/api/v1/nodes?fieldSelector=spec.unschedulable%3Dfalse")[0] == 200
    code, status = raw(server, "GET", "/api/v1/nodes?fieldSelector=status.phase%3DRunning")
    assert code == 400 and status["message"] == "field label not supported: status.phase"


def test_an_update_of_a_custom_resource_without_resource_version_answers_422(
        server: KubeApiServer, store: KubeStore) -> None:
    # Custom resources do not allow unconditional updates (the registry store's Update).
    created = store.create(kustomization("apps"))
    body = {**kustomization("apps"), "spec": {**kustomization("apps")["spec"], "suspend": True}}
    code, status = raw(server, "PUT", f"{KS_PATH}/apps", body)
    assert code == 422 and status["reason"] == "Invalid"
    assert status["message"] == ('kustomizations.kustomize.toolkit.fluxcd.io "apps" is invalid: '
                                 "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
    assert status["details"]["causes"] == [{"reason": "FieldValueInvalid", "field": "metadata.resourceVersion",
                                            "message": "Invalid value: 0x0: must be specified for an update"}]
    assert store.get(KS_AV, "Kustomization", "flux-system", "apps")["metadata"]["resourceVersion"] == \
        created["metadata"]["resourceVersion"]
    body["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    assert raw(server, "PUT", f"{KS_PATH}/apps", body)[0] == 200
    # a built-in kind still takes an unconditional update
    store.create(node("m720q-1"))
    assert raw(server, "PUT", "/api/v1/nodes/m720q-1", node("m720q-1", labels={"x": "y"}))[0] == 200


def test_a_dry_run_patch_answers_the_patched_object_and_stores_nothing(server: KubeApiServer, store: KubeStore) -> None:
    created = store.create(kustomization("apps"))
    code, obj = raw(server, "PATCH", f"{KS_PATH}/apps?dryRun=All", {"spec": {"suspend": True}},
                    {"Content-Type": "application/merge-patch+json"})
    assert code == 200 and obj["spec"]["suspend"] is True and obj["metadata"]["generation"] == 2
    assert obj["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    stored = store.get(KS_AV, "Kustomization", "flux-system", "apps")
    assert "suspend" not in stored["spec"] and stored["metadata"]["generation"] == 1


def watch_lines(server: KubeApiServer, path: str, read_timeout: float = 5) -> list[dict[str, Any]]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=read_timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    finally:
        conn.close()


def test_bookmarks_come_about_once_a_bookmark_interval(server: KubeApiServer, store: KubeStore) -> None:
    rv = store.create(node("m720q-1"))["metadata"]["resourceVersion"]
    quiet = watch_lines(server, f"/api/v1/nodes?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"
                                "&timeoutSeconds=1")
    assert quiet == []  # the default interval is a minute, as kube-apiserver's watch cache
    server.bookmark_interval_s = 0.3
    events = watch_lines(server, f"/api/v1/nodes?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"
                                 "&timeoutSeconds=1")
    assert 1 <= len(events) <= 3 and {e["type"] for e in events} == {"BOOKMARK"}


def test_a_throttled_request_answers_429_in_plain_text_with_retry_after(server: KubeApiServer) -> None:
    # apiserver filters/maxinflight.go tooManyRequests: http.Error's text, not a Status object.
    server.throttle_share = 1.0
    code, headers, body = raw_text(server, "GET", "/api/v1/nodes")
    assert code == 429 and headers["retry-after"] == "1"
    assert headers["content-type"].startswith("text/plain") and body == b"Too many requests, please try again later.\n"
    assert raw_text(server, "GET", "/healthz")[0] == 200
    server.throttle_share = 0.0
    assert raw_text(server, "GET", "/api/v1/nodes")[0] == 200


def test_a_blackholed_server_accepts_never_answers_then_resets_and_serves_again(server: KubeApiServer) -> None:
    server.blackhole_for(1.0)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=0.4)
    started = time.monotonic()
    with pytest.raises(TimeoutError):  # connected, request sent, no answer
        conn.request("GET", "/api/v1/nodes", headers={"Authorization": f"Bearer {TOKEN}"})
        conn.getresponse()
    conn.close()
    patient = http.client.HTTPConnection(server.host, server.port, timeout=5)
    patient.request("GET", "/api/v1/nodes", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        patient.getresponse()  # the window ends: the connection is reset, never answered
    assert 0.9 <= time.monotonic() - started < 3
    patient.close()
    assert raw(server, "GET", "/api/v1/nodes")[0] == 200
    assert server.count("fault", "blackhole") >= 2


def test_under_watch_504_a_watch_ends_with_the_watch_cache_timeout_status(server: KubeApiServer,
                                                                         store: KubeStore) -> None:
    rv = store.create(node("m720q-1"))["metadata"]["resourceVersion"]
    server.watch_504_after_s = 0.5
    threading.Timer(0.1, lambda: store.patch("v1", "Node", None, "m720q-1", {"spec": {"unschedulable": True}})).start()
    started = time.monotonic()
    events = watch_lines(server, f"/api/v1/nodes?watch=true&resourceVersion={rv}&timeoutSeconds=30")
    assert 0.4 < time.monotonic() - started < 2
    assert [e["type"] for e in events] == ["MODIFIED", "ERROR"]
    status = events[-1]["object"]
    assert status["code"] == 504 and status["reason"] == "Timeout"
    assert status["message"].startswith("Timeout: Too large resource version: ")
    assert status["details"]["causes"] == [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]
