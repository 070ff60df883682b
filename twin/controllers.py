"""The controllers the flows rely on, over the twin's KubeStores: node lifecycle (World -> Node objects),
Flux source + kustomize + helm controllers, and Rook's CephCluster status.

Everything is event driven: KubeStore.subscribe and World.subscribe hand news to one Loop thread
(a timer heap under a Condition); Flux's reconcile time is a timer on that loop, not a sleep.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from twin.gitrepo import GitRepo
from twin.state import Node, World

log = logging.getLogger(__name__)

KS_API = "kustomize.toolkit.fluxcd.io/v1"
SRC_API = "source.toolkit.fluxcd.io/v1"
HELM_API = "helm.toolkit.fluxcd.io/v2"
ROOK_API = "ceph.rook.io/v1"
REQUESTED_AT = "reconcile.fluxcd.io/requestedAt"
KINDS = {"Kustomization": KS_API, "GitRepository": SRC_API, "HelmRelease": HELM_API}
KERNEL = "6.12.57-talos"
CONTAINERD = "containerd://2.1.5"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Loop:
    """One thread running callbacks in order: call_soon / call_later, woken by a Condition."""

    def __init__(self, name: str = "twin-controllers") -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + delay, self._seq, fn))
            self._cond.notify()

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.call_later(0.0, fn)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, fn = heapq.heappop(self._heap)
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
            try:
                fn()
            except Exception:  # one failing reconcile must not stop every controller
                log.exception("twin controller callback %r failed", fn)

    def stop(self, timeout: float = 3.0) -> bool:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()


def condition(ctype: str, status: str, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now_rfc3339(), "observedGeneration": generation}


def get_condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), None)


# --- node lifecycle --------------------------------------------------------------------------


def node_object(n: Node, existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Kubernetes Node of a Talos node, with the complete status the typed client demands."""
    up = n.phase == "running"
    if not up:
        ready = condition("Ready", "Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status.", 0)
    elif n.ready:
        ready = condition("Ready", "True", "KubeletReady", "kubelet is posting ready status", 0)
    else:
        ready = condition("Ready", "False", "KubeletNotReady",
                          "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady "
                          "message:Network plugin returns error: cni plugin not initialized", 0)
    for c in (ready,):
        c.pop("observedGeneration")
        c["lastHeartbeatTime"] = c["lastTransitionTime"]
    old_ready = get_condition(existing, "Ready") if existing else None
    if old_ready and old_ready.get("status") == ready["status"]:
        ready["lastTransitionTime"] = old_ready.get("lastTransitionTime", ready["lastTransitionTime"])
        ready["lastHeartbeatTime"] = old_ready.get("lastHeartbeatTime", ready["lastHeartbeatTime"])
    pressure = [{"type": t, "status": "False", "reason": f"KubeletHasNo{t}" if t != "PIDPressure" else "KubeletHasSufficientPID",
                 "message": f"kubelet has no {t.lower()}", "lastHeartbeatTime": ready["lastHeartbeatTime"],
                 "lastTransitionTime": ready["lastTransitionTime"]}
                for t in ("MemoryPressure", "DiskPressure", "PIDPressure")]
    labels = {"kubernetes.io/hostname": n.hostname, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64"}
    if n.role == "controlplane":
        labels["node-role.kubernetes.io/control-plane"] = ""
    meta: dict[str, Any] = dict((existing or {}).get("metadata") or {})
    meta["name"] = n.hostname
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    meta.setdefault("annotations", {})["talos.dev/owned-labels"] = "[]"
    spec: dict[str, Any] = dict((existing or {}).get("spec") or {})
    spec.setdefault("podCIDR", f"10.244.{int(n.ip.rsplit('.', 1)[1]) % 256}.0/24")
    if n.unschedulable:
        spec["unschedulable"] = True
        spec["taints"] = [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule",
                           "timeAdded": now_rfc3339()}]
    else:
        spec.pop("unschedulable", None)
        spec.pop("taints", None)
    capacity = {"cpu": "6", "memory": "32596236Ki", "pods": "110", "ephemeral-storage": "488245288Ki",
                "hugepages-1Gi": "0", "hugepages-2Mi": "0"}
    return {
        "apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec,
        "status": {
            "capacity": capacity, "allocatable": {**capacity, "memory": "32493836Ki"},
            "conditions": [*pressure, ready],
            "addresses": [{"type": "InternalIP", "address": n.ip}, {"type": "Hostname", "address": n.hostname}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": n.boot_id.replace("-", "")[:32], "systemUUID": n.boot_id.upper(),
                         "bootID": n.boot_id, "kernelVersion": KERNEL, "osImage": f"Talos ({n.talos_version})",
                         "containerRuntimeVersion": CONTAINERD, "kubeletVersion": n.kubelet_version,
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            "images": [],
        },
    }


def _same_node(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal apart from heartbeat/timestamps (a no-op write would still bump resourceVersion)."""
    def strip(o: dict[str, Any]) -> Any:
        st = dict(o.get("status") or {})
        st["conditions"] = [(c.get("type"), c.get("status"), c.get("reason")) for c in st.get("conditions") or []]
        sp = dict(o.get("spec") or {})
        sp["taints"] = [(t.get("key"), t.get("effect")) for t in sp.get("taints") or []]
        return sp, st, (o.get("metadata") or {}).get("labels")
    return bool(strip(a) == strip(b))


class NodeLifecycle:
    """World nodes -> Node objects; kube API availability; cordons made through Kubernetes -> World."""

    def __init__(self, world: World, stores: dict[str, Any], servers: dict[str, Any], loop: Loop) -> None:
        self.world, self.stores, self.servers, self.loop = world, stores, servers, loop
        self._pending = False
        self._lock = threading.Lock()
        self._written: dict[tuple[str, str], bool] = {}
        self._unsubs: list[Callable[[], None]] = []

    def start(self) -> None:
        self._unsubs.append(self.world.subscribe(self._poke))
        for cluster, store in self.stores.items():
            self._unsubs.append(store.subscribe(
                lambda ev, obj, cluster=cluster: self._on_node_event(cluster, ev, obj)))
        self.sync()

    def stop(self) -> None:
        for u in self._unsubs:
            u()

    def _poke(self) -> None:
        with self._lock:
            if self._pending:
                return
            self._pending = True
        self.loop.call_soon(self.sync)

    def sync(self) -> None:
        with self._lock:
            self._pending = False
        with self.world.lock:
            snapshot = {name: (c.bootstrapped, [Node(**vars(n)) for n in c.nodes.values()])
                        for name, c in self.world.clusters.items()}
        for cluster, (bootstrapped, nodes) in snapshot.items():
            store = self.stores.get(cluster)
            if store is None:
                continue
            cp_up = any(n.role == "controlplane" and n.talos_up and n.etcd_running for n in nodes)
            server = self.servers.get(cluster)
            if server is not None and server.available != (bootstrapped and cp_up):
                server.available = bootstrapped and cp_up
                # Not a World change, but World.wait_for callers watch it: wake them to look again.
                with self.world.cond:
                    self.world.cond.notify_all()
            if not bootstrapped:
                continue
            for n in nodes:
                if not n.installed:
                    continue
                existing = store.get("v1", "Node", None, n.hostname)
                if existing is None and n.phase != "running":
                    continue  # a node registers with the API server when its kubelet first starts
                want = node_object(n, existing)
                self._written[(cluster, n.hostname)] = n.unschedulable
                if existing is None:
                    store.create(want)
                elif not _same_node(existing, want):
                    def fn(obj: dict[str, Any], want: dict[str, Any] = want) -> None:
                        obj["metadata"] = want["metadata"]
                        obj["spec"] = want["spec"]
                        obj["status"] = want["status"]
                    store.mutate("v1", "Node", None, n.hostname, fn)

    def _on_node_event(self, cluster: str, ev: str, obj: dict[str, Any]) -> None:
        if obj.get("kind") != "Node" or ev != "MODIFIED":
            return
        host = (obj.get("metadata") or {}).get("name", "")
        value = bool((obj.get("spec") or {}).get("unschedulable"))
        # Our own writes echo back with the value we wrote; anything else is `kubectl cordon`/`uncordon`.
        if self._written.get((cluster, host)) == value:
            return
        self._written[(cluster, host)] = value
        n = self.world.node(host)
        if n is not None and n.unschedulable != value:
            self.world.update(n, unschedulable=value)


# --- Flux ------------------------------------------------------------------------------------


class Flux:
    """source-controller (GitRepository), kustomize-controller (Kustomization), helm-controller."""

    def __init__(self, cluster: str, store: Any, world: World, git: GitRepo, loop: Loop) -> None:
        self.cluster, self.store, self.world, self.git, self.loop = cluster, store, world, git, loop
        self._in_progress: set[tuple[str, str, str]] = set()
        self._again: set[tuple[str, str, str]] = set()
        self._unsub: Callable[[], None] | None = None

    def start(self) -> None:
        self._unsub = self.store.subscribe(self._on_event)

    def stop(self) -> None:
        if self._unsub:
            self._unsub()

    def _on_event(self, ev: str, obj: dict[str, Any]) -> None:
        kind = obj.get("kind", "")
        if kind not in KINDS or ev == "DELETED":
            return
        meta = obj.get("metadata") or {}
        key = (kind, meta.get("namespace", ""), meta.get("name", ""))
        if self._wants_reconcile(obj):
            self.loop.call_soon(lambda: self.begin(key))

    @staticmethod
    def _wants_reconcile(obj: dict[str, Any]) -> bool:
        if (obj.get("spec") or {}).get("suspend"):
            return False
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        requested = (meta.get("annotations") or {}).get(REQUESTED_AT)
        if requested and requested != status.get("lastHandledReconcileAt"):
            return True
        return bool(meta.get("generation", 1) != status.get("observedGeneration"))

    def begin(self, key: tuple[str, str, str], force: bool = False) -> None:
        """A reconcile starts: Reconciling now, the result after flux_delay_seconds."""
        kind, ns, name = key
        obj = self.store.get(KINDS[kind], kind, ns, name)
        if obj is None or (obj.get("spec") or {}).get("suspend"):
            return
        if not force and not self._wants_reconcile(obj):
            return
        if key in self._in_progress:
            self._again.add(key)
            return
        self._in_progress.add(key)
        rec = self.world.record.reconcile_started(kind, ns, name, time.monotonic())
        gen = int(obj["metadata"].get("generation", 1))

        def progressing(o: dict[str, Any]) -> None:
            st = o.setdefault("status", {})
            conds = [c for c in st.get("conditions") or [] if c.get("type") not in ("Ready", "Reconciling")]
            conds.insert(0, condition("Reconciling", "True", "Progressing", "Reconciliation in progress", gen))
            conds.insert(1, condition("Ready", "Unknown", "Progressing", "Reconciliation in progress", gen))
            st["conditions"] = conds
        self.store.mutate(KINDS[kind], kind, ns, name, progressing, subresource="status")
        self.loop.call_later(self.world.knobs.flux_delay_seconds, lambda: self.finish(key, rec))

    def finish(self, key: tuple[str, str, str], rec: Any) -> None:
        kind, ns, name = key
        self._in_progress.discard(key)
        obj = self.store.get(KINDS[kind], kind, ns, name)
        if obj is None:
            self.world.record.reconcile_ended(rec, False, time.monotonic())
            return
        requested = ((obj["metadata"].get("annotations") or {}).get(REQUESTED_AT))
        gen = int(obj["metadata"].get("generation", 1))
        if kind == "GitRepository":
            ok, reason, message, extra = self._source_result(obj)
        elif kind == "Kustomization":
            ok, reason, message, extra = self._kustomization_result(obj)
        else:
            ok, reason, message, extra = True, "UpgradeSucceeded", f"Helm upgrade succeeded for release {ns}/{name}", {}
        old_revision = ((obj.get("status") or {}).get("artifact") or {}).get("revision")

        def settle(o: dict[str, Any]) -> None:
            st = o.setdefault("status", {})
            conds = [c for c in st.get("conditions") or [] if c.get("type") not in ("Ready", "Reconciling")]
            conds.insert(0, condition("Ready", "True" if ok else "False", reason, message, gen))
            st["conditions"] = conds
            st["observedGeneration"] = gen
            if requested:
                st["lastHandledReconcileAt"] = requested
            st.update(extra)
        self.store.mutate(KINDS[kind], kind, ns, name, settle, subresource="status")
        self.world.record.reconcile_ended(rec, ok, time.monotonic())
        if key in self._again:
            self._again.discard(key)
            self.loop.call_soon(lambda: self.begin(key))
        if kind == "GitRepository" and extra.get("artifact", {}).get("revision") != old_revision:
            for ks in self._kustomizations():
                ref = ks["spec"].get("sourceRef") or {}
                if ref.get("name") == name and (ref.get("namespace") or ks["metadata"]["namespace"]) == ns:
                    k = ("Kustomization", ks["metadata"]["namespace"], ks["metadata"]["name"])
                    self.loop.call_soon(partial(self.begin, k, force=True))
        if kind == "Kustomization" and ok:
            for ks in self._kustomizations():
                ready = get_condition(ks, "Ready") or {}
                deps = [(d.get("namespace") or ks["metadata"]["namespace"], d.get("name"))
                        for d in ks["spec"].get("dependsOn") or []]
                if (ns, name) in deps and ready.get("reason") == "DependencyNotReady":
                    k = ("Kustomization", ks["metadata"]["namespace"], ks["metadata"]["name"])
                    self.loop.call_soon(partial(self.begin, k, force=True))

    def _kustomizations(self) -> list[dict[str, Any]]:
        return list(self.store.list(KS_API, "Kustomization"))

    def _source_revision(self, obj: dict[str, Any]) -> str | None:
        ref = (obj.get("spec") or {}).get("sourceRef") or {}
        src = self.store.get(SRC_API, ref.get("kind") or "GitRepository",
                             ref.get("namespace") or obj["metadata"]["namespace"], ref.get("name", ""))
        if src is None:
            return None
        return ((src.get("status") or {}).get("artifact") or {}).get("revision")

    def _source_result(self, obj: dict[str, Any]) -> tuple[bool, str, str, dict[str, Any]]:
        revision = self.git.revision()
        return True, "Succeeded", f"stored artifact for revision '{revision}'", {
            "artifact": artifact(obj["metadata"]["namespace"], obj["metadata"]["name"], revision)}

    def _kustomization_result(self, obj: dict[str, Any]) -> tuple[bool, str, str, dict[str, Any]]:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        revision = self._source_revision(obj)
        if revision is None:
            ref = obj["spec"].get("sourceRef") or {}
            return False, "ArtifactFailed", (f"{ref.get('kind', 'GitRepository')} "
                                             f"'{ref.get('namespace') or ns}/{ref.get('name')}' not found"), {}
        for d in obj["spec"].get("dependsOn") or []:
            dns = d.get("namespace") or ns
            dep = self.store.get(KS_API, "Kustomization", dns, d.get("name", ""))
            if dep is None or not dependency_ready(dep, self._source_revision(dep)):
                return False, "DependencyNotReady", f"dependency '{dns}/{d.get('name')}' is not ready", {}
        if self.world.faults.has("flux-fails", name):
            return False, "ReconciliationFailed", (
                f"Deployment/{ns}/{name} dry-run failed: failed to create typed patch object "
                f"({ns}/{name}; apps/v1, Kind=Deployment): .spec.template.spec.containers[0].image: "
                "expected string, got &value.valueUnstructured{Value:interface {}(nil)}"), {
                "lastAttemptedRevision": revision}
        return True, "ReconciliationSucceeded", f"Applied revision: {revision}", {
            "lastAppliedRevision": revision, "lastAttemptedRevision": revision}


def dependency_ready(dep: dict[str, Any], source_revision: str | None) -> bool:
    """kustomize-controller's test: current generation, Ready=True, applied the source's revision."""
    st = dep.get("status") or {}
    ready = get_condition(dep, "Ready") or {}
    return (st.get("observedGeneration") == dep["metadata"].get("generation")
            and ready.get("status") == "True"
            and (source_revision is None or st.get("lastAppliedRevision") == source_revision))


def artifact(namespace: str, name: str, revision: str) -> dict[str, Any]:
    sha = revision.rsplit(":", 1)[-1]
    return {"digest": f"sha256:{sha[:32]}{sha[:32]}", "lastUpdateTime": now_rfc3339(),
            "path": f"gitrepository/{namespace}/{name}/{sha}.tar.gz", "revision": revision, "size": 81234,
            "url": f"http://source-controller.flux-system.svc.cluster.local./gitrepository/{namespace}/{name}/{sha}.tar.gz"}


# --- HelmReleases of the tree ----------------------------------------------------------------

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def helmreleases_at(repo_root: Path, path: str) -> list[dict[str, Any]]:
    """The HelmReleases a Flux Kustomization with spec.path ``path`` applies, as kustomize builds them.

    A directory with a kustomization.yaml contributes its resources (files and directories, followed
    recursively), its patches merged into the HelmReleases they name, and its ``namespace`` set on
    each; a directory without one contributes every YAML file under it, as kustomize-controller
    generates it. Remote resources and anything that is not a HelmRelease are left out.
    """
    root = (repo_root / path.removeprefix("./")).resolve()
    if not root.is_dir():
        return []
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for obj in _kustomize(root, frozenset()):
        if obj.get("kind") == "HelmRelease" and str(obj.get("apiVersion", "")).startswith("helm.toolkit.fluxcd.io/"):
            meta = obj.get("metadata") or {}
            found.setdefault((str(meta.get("namespace") or "default"), str(meta.get("name"))), obj)
    return [found[k] for k in sorted(found)]


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError):
        return []  # an unreadable file is the tree checks' business, not the twin's


def _kustomize(directory: Path, visiting: frozenset[Path]) -> list[dict[str, Any]]:
    if directory in visiting:
        return []
    visiting = visiting | {directory}
    kfile = next((directory / n for n in KUSTOMIZATION_FILES if (directory / n).is_file()), None)
    if kfile is None:
        objs: list[dict[str, Any]] = []
        for f in sorted(directory.rglob("*")):
            if f.suffix in (".yaml", ".yml") and f.is_file():
                objs += _yaml_docs(f)
        return objs
    spec = next(iter(_yaml_docs(kfile)), {})
    objs = []
    for res in [*(spec.get("resources") or []), *(spec.get("bases") or [])]:
        if not isinstance(res, str) or "://" in res:
            continue
        target = (directory / res).resolve()
        if target.is_dir():
            objs += _kustomize(target, visiting)
        elif target.is_file():
            objs += _yaml_docs(target)
    for patch in [*(spec.get("patches") or []), *(spec.get("patchesStrategicMerge") or [])]:
        file = patch.get("path") if isinstance(patch, dict) else patch
        if not isinstance(file, str) or not (directory / file).is_file():
            continue
        for doc in _yaml_docs(directory / file):
            for obj in objs:
                if obj.get("kind") == doc.get("kind") and _name(obj) == _name(doc):
                    _merge(obj, doc)
    namespace = spec.get("namespace")
    if namespace:
        for obj in objs:
            obj.setdefault("metadata", {})["namespace"] = namespace
    return objs


def _name(obj: dict[str, Any]) -> Any:
    return (obj.get("metadata") or {}).get("name")


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def helmrelease_object(hr: dict[str, Any], kustomization: tuple[str, str]) -> dict[str, Any]:
    """A HelmRelease of the tree as helm-controller leaves it after a successful install, owned by
    the Flux Kustomization (namespace, name) that applied it."""
    import hashlib

    meta = hr.get("metadata") or {}
    ns, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
    spec = hr.get("spec") or {}
    chart_spec = ((spec.get("chart") or {}).get("spec") or {})
    chart = str(chart_spec.get("chart") or (spec.get("chartRef") or {}).get("name") or name)
    # A range (">=2025.10.0") resolves to a release of the chart; its lower bound is one.
    version = str(chart_spec.get("version") or "0.1.0").lstrip("<>=~^ ").split(",")[0].strip() or "0.1.0"
    release = str(spec.get("releaseName") or (f"{spec['targetNamespace']}-{name}" if spec.get("targetNamespace")
                                               else name))
    release_ns = str(spec.get("targetNamespace") or spec.get("storageNamespace") or ns)
    digest = "sha256:" + hashlib.sha256(repr(sorted((spec.get("values") or {}).items())).encode()).hexdigest()
    stamp = now_rfc3339()
    message = f"Helm install succeeded for release {release_ns}/{release}.v1 with chart {chart}@{version}"
    labels = {**(meta.get("labels") or {}), "kustomize.toolkit.fluxcd.io/name": kustomization[1],
              "kustomize.toolkit.fluxcd.io/namespace": kustomization[0]}
    return {
        "apiVersion": HELM_API, "kind": "HelmRelease",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
                     **({"annotations": meta["annotations"]} if meta.get("annotations") else {})},
        "spec": spec,
        "status": {
            "observedGeneration": 1, "lastAttemptedGeneration": 1, "lastAttemptedRevision": version,
            "lastAttemptedConfigDigest": digest, "lastAttemptedReleaseAction": "install",
            "helmChart": f"{chart_spec.get('sourceRef', {}).get('namespace') or ns}/{ns}-{name}",
            "storageNamespace": release_ns,
            "history": [{"name": release, "namespace": release_ns, "version": 1, "status": "deployed",
                         "chartName": chart, "chartVersion": version, "configDigest": digest,
                         "firstDeployed": stamp, "lastDeployed": stamp}],
            "conditions": [condition("Ready", "True", "InstallSucceeded", message, 1),
                           condition("Released", "True", "InstallSucceeded", message, 1)],
        },
    }


# --- Rook ------------------------------------------------------------------------------------


class Rook:
    """CephCluster rook-ceph/rook-ceph .status.ceph.health follows the Ceph backend; its own thread,
    since asking real Ceph takes a subprocess. Woken by the backend (when it tells) or Rook's interval."""

    def __init__(self, store: Any, ceph: Any, world: World, interval: float = 1.0) -> None:
        self.store, self.ceph, self.world, self.interval = store, ceph, world, interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twin-rook", daemon=True)
        self._unsub: Callable[[], None] | None = None

    def start(self) -> None:
        if hasattr(self.ceph, "subscribe"):
            self.ceph.subscribe(self._wake.set)
        self._unsub = self.world.subscribe(self._wake.set)
        self.check()
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        if self._unsub:
            self._unsub()
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.check()
            except Exception:
                log.exception("twin Rook health check failed")

    def check(self) -> None:
        health = self.ceph.health()
        cur = self.store.get(ROOK_API, "CephCluster", "rook-ceph", "rook-ceph")
        if cur is None or ((cur.get("status") or {}).get("ceph") or {}).get("health") == health:
            return

        def fn(o: dict[str, Any]) -> None:
            st = o.setdefault("status", {})
            st.update({"phase": "Ready", "state": "Created", "message": "Cluster created successfully"})
            ceph = st.setdefault("ceph", {})
            if ceph.get("health") and ceph.get("health") != health:
                ceph["previousHealth"] = ceph["health"]
            ceph.update({"health": health, "lastChecked": now_rfc3339(), "fsid": getattr(self.ceph, "fsid", "")})
            if health != "HEALTH_OK" and hasattr(self.ceph, "checks"):
                ceph["details"] = {k: {"message": v["summary"]["message"], "severity": v["severity"]}
                                   for k, v in self.ceph.checks().items()}
            else:
                ceph.pop("details", None)
        self.store.mutate(ROOK_API, "CephCluster", "rook-ceph", "rook-ceph", fn, subresource="status")


def ceph_cluster_object(health: str) -> dict[str, Any]:
    return {"apiVersion": ROOK_API, "kind": "CephCluster",
            "metadata": {"name": "rook-ceph", "namespace": "rook-ceph"},
            "spec": {"cephVersion": {"image": "quay.io/ceph/ceph:v19.2.3"}, "dataDirHostPath": "/var/lib/rook",
                     "mon": {"count": 3}, "storage": {"useAllNodes": True, "useAllDevices": False}},
            "status": {"phase": "Ready", "state": "Created", "message": "Cluster created successfully",
                       "ceph": {"health": health, "lastChecked": now_rfc3339()}}}
