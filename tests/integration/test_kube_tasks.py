"""tasks.kube against the twin's fake API server: reads, patches, and watches with deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.kube import (
    Kube,
    KubeNotFound,
    KubeTimeout,
    KubeUnavailable,
    at_talos_version,
    ready_and_schedulable,
)
from twin.kubeapi import KubeApiServer, KubeStore

pytestmark = pytest.mark.integration


def node_obj(name: str, ready: bool = True, cordoned: bool = False, talos: str = "v1.11.4") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"unschedulable": cordoned} if cordoned else {},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                            "reason": "KubeletReady" if ready else "KubeletNotReady",
                            "lastHeartbeatTime": "2025-01-01T00:00:00Z", "lastTransitionTime": "2025-01-01T00:00:00Z",
                            "message": ""}],
            "nodeInfo": {"osImage": f"Talos ({talos})", "kubeletVersion": "v1.32.0", "architecture": "amd64",
                         "bootID": "b", "containerRuntimeVersion": "containerd://2.0.0", "kernelVersion": "6.12",
                         "kubeProxyVersion": "", "machineID": "m", "operatingSystem": "linux", "systemUUID": "u"},
        },
    }


def set_ready(store: KubeStore, name: str, ready: bool, talos: str | None = None) -> None:
    def fn(obj: dict[str, Any]) -> None:
        obj["status"]["conditions"][0]["status"] = "True" if ready else "False"
        obj["status"]["conditions"][0]["reason"] = "KubeletReady" if ready else "KubeletNotReady"
        if talos:
            obj["status"]["nodeInfo"]["osImage"] = f"Talos ({talos})"
    store.mutate("v1", "Node", None, name, fn, subresource="status")


def later(delay: float, fn: Callable[[], None]) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.daemon = True
    t.start()
    return t


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[KubeStore, KubeApiServer, Kube]]:
    store = KubeStore()
    for n in ("m720q-1", "m720q-2", "m720q-3"):
        store.create(node_obj(n))
    server = KubeApiServer(store)
    server.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "twin",
        "clusters": [{"name": "twin", "cluster": {"server": server.url}}],
        "users": [{"name": "twin", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "twin", "context": {"cluster": "twin", "user": "twin"}}]}))
    kube = Kube.from_kubeconfig(kubeconfig, "twin")
    try:
        yield store, server, kube
    finally:
        kube.close()
        server.stop()


def test_nodes_reads_readiness_cordon_and_talos_version(world):
    store, _, kube = world
    store.create(node_obj("w1", ready=False, cordoned=True, talos="v1.11.5"))
    views = {v.name: v for v in kube.nodes()}
    assert set(views) == {"m720q-1", "m720q-2", "m720q-3", "w1"}
    assert views["m720q-1"].ready and not views["m720q-1"].unschedulable
    assert views["m720q-1"].talos_version == "v1.11.4" and views["m720q-1"].kubelet_version == "v1.32.0"
    assert not views["w1"].ready and views["w1"].unschedulable and views["w1"].ready_reason == "KubeletNotReady"


def test_uncordon_patches_and_confirms(world):
    store, _, kube = world
    store.create(node_obj("w1", cordoned=True))
    view = kube.uncordon("w1")
    assert not view.unschedulable
    assert not (store.get("v1", "Node", None, "w1")["spec"].get("unschedulable"))


def test_get_missing_node_is_not_found(world):
    _, _, kube = world
    with pytest.raises(KubeNotFound, match="nodes/ghost"):
        kube.node("ghost")


def test_wait_node_returns_as_soon_as_the_node_is_back(world):
    store, _, kube = world
    set_ready(store, "m720q-2", False)
    flipped = {}

    def back() -> None:
        flipped["at"] = time.monotonic()
        set_ready(store, "m720q-2", True, talos="v1.11.5")

    later(0.3, back)
    view = kube.wait_node("m720q-2", lambda n: ready_and_schedulable(n) and at_talos_version("v1.11.5")(n),
                          deadline=time.monotonic() + 10)
    reaction = time.monotonic() - flipped["at"]
    assert view.ready and view.talos_version == "v1.11.5"
    assert reaction < 0.5


def test_wait_node_already_satisfied_returns_without_watching(world):
    _, server, kube = world
    before = server.count("watch")
    assert kube.wait_node("m720q-1", ready_and_schedulable, deadline=time.monotonic() + 5).ready
    assert server.count("watch") == before


def test_wait_node_timeout_names_node_wait_last_state_and_next_step(world):
    store, _, kube = world
    set_ready(store, "m720q-3", False)
    start = time.monotonic()
    with pytest.raises(KubeTimeout) as e:
        kube.wait_node("m720q-3", ready_and_schedulable, deadline=time.monotonic() + 1.0,
                       next_step="talosctl rollback --nodes 10.42.0.103")
    assert 0.9 < time.monotonic() - start < 3.5
    text = str(e.value)
    assert "nodes/m720q-3" in text and "Ready and not cordoned" in text
    assert "NotReady (KubeletNotReady)" in text and "talosctl rollback --nodes 10.42.0.103" in text


def test_wait_node_tolerates_api_server_away_while_single_control_plane_reboots(world):
    store, server, kube = world
    set_ready(store, "m720q-1", False)
    server.available = False

    def back() -> None:
        server.available = True
        set_ready(store, "m720q-1", True)

    later(0.5, back)
    view = kube.wait_node("m720q-1", ready_and_schedulable, deadline=time.monotonic() + 10,
                          tolerate_unavailable=True)
    assert view.ready


def test_wait_node_survives_the_api_server_going_away_mid_watch(world):
    store, server, kube = world
    set_ready(store, "m720q-1", False)
    later(0.2, lambda: setattr(server, "available", False))

    def back() -> None:
        set_ready(store, "m720q-1", True)
        server.available = True

    later(0.8, back)
    assert kube.wait_node("m720q-1", ready_and_schedulable, deadline=time.monotonic() + 10,
                          tolerate_unavailable=True).ready


def test_a_wait_waits_out_an_unavailable_api_and_names_it_at_the_deadline(world):
    store, server, kube = world
    set_ready(store, "m720q-1", False)
    server.available = False
    start = time.monotonic()
    with pytest.raises(KubeTimeout) as e:
        kube.wait_node("m720q-1", ready_and_schedulable, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - start < 1.5  # no retry outlives the deadline
    assert "the API server was unreachable at the end" in str(e.value) and "HTTP 503" in str(e.value)


def test_a_throttled_request_is_retried_after_its_retry_after(world):
    _, server, kube = world
    server.throttle_share = 1.0
    later(0.3, lambda: setattr(server, "throttle_share", 0.0))
    start = time.monotonic()
    assert len(kube.nodes(timeout_s=10)) == 3
    # Retry-After: 1 is honoured: the second attempt comes a second after the first, not sooner
    assert 1.0 <= time.monotonic() - start < 2.5
    assert server.count("fault", "throttle") == 1


def test_retries_stop_at_the_deadline_even_when_retry_after_is_longer(world):
    _, server, kube = world
    server.throttle_share = 1.0
    start = time.monotonic()
    with pytest.raises(KubeUnavailable) as e:
        kube.nodes(timeout_s=0.5)
    assert time.monotonic() - start < 0.8
    assert e.value.status == 429 and e.value.retry_after == 1.0
    assert "Too many requests, please try again later." in str(e.value)


def test_transient_errors_of_every_kind_are_retried_until_the_call_passes(world):
    _, server, kube = world
    server.flaky_share = 0.5
    server.rng.seed(3)
    for _ in range(20):
        assert len(kube.nodes(timeout_s=10)) == 3
    assert server.count("fault", "") > 5  # it did meet 500s


def test_a_watch_ending_with_504_lists_again_and_the_wait_goes_on(world):
    store, server, kube = world
    set_ready(store, "m720q-1", False)
    server.watch_504_after_s = 0.2
    later(0.7, lambda: set_ready(store, "m720q-1", True))
    lists = server.count("list", "Node")
    assert kube.wait_node("m720q-1", ready_and_schedulable, deadline=time.monotonic() + 10).ready
    assert server.count("list", "Node") - lists >= 2  # each 504 ended a watch and a fresh list followed


def test_connections_keep_tcp_keepalive_on(world):
    import socket

    _, _, kube = world
    options = kube.api.rest_client.pool_manager.connection_pool_kw["socket_options"]
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options


def test_wait_relists_after_410_gone(tmp_path):
    store = KubeStore(history_limit=3)
    store.create(node_obj("m720q-1", ready=False))
    with KubeApiServer(store) as server:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "twin",
            "clusters": [{"name": "twin", "cluster": {"server": server.url}}],
            "users": [{"name": "twin", "user": {}}],
            "contexts": [{"name": "twin", "context": {"cluster": "twin", "user": "twin"}}]}))

        class StaleFirstList(Kube):
            """The first list answers with a version that has left the server's history."""
            calls = 0

            def list_objects(self, *a: Any, **kw: Any) -> tuple[list[dict[str, Any]], str]:
                items, rv = super().list_objects(*a, **kw)
                StaleFirstList.calls += 1
                return items, ("1" if StaleFirstList.calls == 1 else rv)

        for i in range(6):
            store.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}", "namespace": "d"}})
        later(0.3, lambda: set_ready(store, "m720q-1", True))
        kube = StaleFirstList(Kube.from_kubeconfig(kubeconfig).api)
        assert kube.wait_node("m720q-1", ready_and_schedulable, deadline=time.monotonic() + 10).ready
        assert StaleFirstList.calls >= 2


KS = ("kustomize.toolkit.fluxcd.io", "v1", "kustomizations")


def test_custom_objects_get_list_patch_and_watch(world):
    store, _, kube = world
    store.create({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                  "metadata": {"name": "rook-ceph", "namespace": "flux-system"},
                  "spec": {"path": "./infrastructure/rook-ceph", "interval": "10m", "prune": True,
                           "sourceRef": {"kind": "GitRepository", "name": "flux-system"}}})
    items, rv = kube.list_objects(*KS, namespace="flux-system")
    assert [i["metadata"]["name"] for i in items] == ["rook-ceph"] and rv
    patched = kube.merge_patch(*KS, "flux-system", "rook-ceph",
                               {"metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": "2025-01-01T00:00:00Z"}}})
    assert patched["metadata"]["annotations"]["reconcile.fluxcd.io/requestedAt"] == "2025-01-01T00:00:00Z"
    got = kube.get_object(*KS, "flux-system", "rook-ceph")
    assert got["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]
    events = list(kube.watch_objects(*KS, namespace="flux-system", resource_version=rv, timeout_s=1))
    assert [(t, o["metadata"]["name"]) for t, o in events if t != "BOOKMARK"] == [("MODIFIED", "rook-ceph")]
