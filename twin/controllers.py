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


UNREACHABLE_TAINTS = ("NoSchedule", "NoExecute")
TALOS_CORDONED = "talos.dev/cordoned"
SILENT = "Kubelet stopped posting node status."


def node_object(n: Node, existing: dict[str, Any] | None = None, unreachable: bool = False) -> dict[str, Any]:
    """The Kubernetes Node of a Talos node, with the complete status the typed client demands.

    While the node is up its kubelet posts the status. While it is down nobody does: the Node keeps the
    status last posted until the node lifecycle controller, ``node-monitor-grace-period`` after the last
    post (``unreachable``), sets every condition Unknown and taints it unreachable
    (kubernetes pkg/controller/nodelifecycle/node_lifecycle_controller.go tryUpdateNodeHealth,
    "Kubelet stopped posting node status."). A reboot shorter than the grace period never shows NotReady.
    """
    # A node up but for its kubelet (an upgrade sequence stopped it and then failed) posts nothing either.
    up = n.phase == "running" and n.kubelet_up
    silent = not up and (existing is None or unreachable)  # the controller has given up on the kubelet
    if not up and not silent:
        last = dict((existing or {}).get("status") or {})
    else:
        if not up:
            ready = condition("Ready", "Unknown", "NodeStatusUnknown", SILENT, 0)
        elif n.ready:
            ready = condition("Ready", "True", "KubeletReady", "kubelet is posting ready status", 0)
        else:
            ready = condition("Ready", "False", "KubeletNotReady",
                              "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady "
                              "message:Network plugin returns error: cni plugin not initialized", 0)
        ready.pop("observedGeneration")
        ready["lastHeartbeatTime"] = ready["lastTransitionTime"]
        old_ready = get_condition(existing, "Ready") if existing else None
        if old_ready and old_ready.get("status") == ready["status"]:
            ready["lastTransitionTime"] = old_ready.get("lastTransitionTime", ready["lastTransitionTime"])
            ready["lastHeartbeatTime"] = old_ready.get("lastHeartbeatTime", ready["lastHeartbeatTime"])
        pressure = [{"type": t, "status": "False",
                     "reason": f"KubeletHasNo{t}" if t != "PIDPressure" else "KubeletHasSufficientPID",
                     "message": f"kubelet has no {t.lower()}", "lastHeartbeatTime": ready["lastHeartbeatTime"],
                     "lastTransitionTime": ready["lastTransitionTime"]}
                    for t in ("MemoryPressure", "DiskPressure", "PIDPressure")]
        if not up:
            for c in pressure:
                c.update(status="Unknown", reason="NodeStatusUnknown", message=SILENT)
        capacity = {"cpu": "6", "memory": "32596236Ki", "pods": "110", "ephemeral-storage": "488245288Ki",
                    "hugepages-1Gi": "0", "hugepages-2Mi": "0"}
        node_info = {"machineID": n.boot_id.replace("-", "")[:32], "systemUUID": n.boot_id.upper(),
                     "bootID": n.boot_id, "kernelVersion": KERNEL, "osImage": f"Talos ({n.talos_version})",
                     "containerRuntimeVersion": CONTAINERD, "kubeletVersion": n.kubelet_version,
                     "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}
        if not up and existing is not None:
            node_info = dict((existing.get("status") or {}).get("nodeInfo") or node_info)  # what it last posted
        last = {
            "capacity": capacity, "allocatable": {**capacity, "memory": "32493836Ki"},
            "conditions": [*pressure, ready],
            "addresses": [{"type": "InternalIP", "address": n.ip}, {"type": "Hostname", "address": n.hostname}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": node_info,
            "images": [],
        }
    labels = {"kubernetes.io/hostname": n.hostname, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64"}
    if n.role == "controlplane":
        labels["node-role.kubernetes.io/control-plane"] = ""
    meta: dict[str, Any] = dict((existing or {}).get("metadata") or {})
    meta["name"] = n.hostname
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    annotations = meta.setdefault("annotations", {})
    annotations["talos.dev/owned-labels"] = "[]"
    # Talos marks the cordon it makes for an upgrade and lifts only a cordon so marked (talos v1.11.5
    # internal/app/machined/pkg/controllers/k8s/node_apply.go ApplyCordoned).
    if n.talos_cordoned:
        annotations[TALOS_CORDONED] = "true"
    else:
        annotations.pop(TALOS_CORDONED, None)
    spec: dict[str, Any] = dict((existing or {}).get("spec") or {})
    spec.setdefault("podCIDR", f"10.244.{int(n.ip.rsplit('.', 1)[1]) % 256}.0/24")
    taints = []
    if n.unschedulable:
        spec["unschedulable"] = True
        taints.append({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule", "timeAdded": now_rfc3339()})
    else:
        spec.pop("unschedulable", None)
    if silent:
        taints += [{"key": "node.kubernetes.io/unreachable", "effect": e, "timeAdded": now_rfc3339()}
                   for e in UNREACHABLE_TAINTS]
    if taints:
        spec["taints"] = taints
    else:
        spec.pop("taints", None)
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec, "status": last}


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
        self._written: dict[tuple[str, str], tuple[bool, bool]] = {}
        self._unsubs: list[Callable[[], None]] = []
        # (cluster, host) -> when its kubelet stopped posting (the node went down).
        self._silent_since: dict[tuple[str, str], float] = {}

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
            snapshot_endpoints = {name: c.api_endpoint for name, c in self.world.clusters.items()}
        for cluster, (bootstrapped, nodes) in snapshot.items():
            store = self.stores.get(cluster)
            if store is None:
                continue
            # The API answers from outside through the endpoint's address: with no VIP that is one node, whose
            # kube-apiserver talks to its own etcd (Talos points it at localhost:2379), so the API is gone
            # while that node reboots or its etcd is stopped. With a VIP (or a load balancer) any control
            # plane serves it. (talos v1.11.5 docs, "Production Clusters": the endpoint must stay reachable.)
            endpoint = snapshot_endpoints.get(cluster)
            cp_up = any(n.role == "controlplane" and n.talos_up and n.etcd_running and n.kubelet_up
                        and (endpoint is None or n.hostname == endpoint) for n in nodes)
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
                key = (cluster, n.hostname)
                if n.phase == "running":
                    self._silent_since.pop(key, None)
                elif key not in self._silent_since:
                    self._silent_since[key] = time.monotonic()
                    # Look again when the grace period is over: the node lifecycle controller's verdict.
                    self.loop.call_later(self.world.knobs.node_monitor_grace_seconds + 0.01, self._poke)
                unreachable = (key in self._silent_since and time.monotonic() - self._silent_since[key]
                               >= self.world.knobs.node_monitor_grace_seconds)
                want = node_object(n, existing, unreachable=unreachable)
                self._written[(cluster, n.hostname)] = (n.unschedulable, n.talos_cordoned)
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
        meta = obj.get("metadata") or {}
        host = meta.get("name", "")
        value = (bool((obj.get("spec") or {}).get("unschedulable")),
                 TALOS_CORDONED in (meta.get("annotations") or {}))
        # Our own writes echo back with the values we wrote; anything else is `kubectl cordon`/`uncordon` (or an
        # annotation someone removed).
        if self._written.get((cluster, host)) == value:
            return
        self._written[(cluster, host)] = value
        n = self.world.node(host)
        if n is not None and (n.unschedulable, n.talos_cordoned) != value:
            self.world.update(n, unschedulable=value[0], talos_cordoned=value[1])


# --- Flux ------------------------------------------------------------------------------------

SOURCE_KINDS = ("GitRepository", "OCIRepository", "Bucket", "HelmRepository", "HelmChart")
KINDS.update({k: SRC_API for k in SOURCE_KINDS})
Key = tuple[str, str, str]  # (kind, namespace, name)
FORCE_AT = "reconcile.fluxcd.io/forceAt"
RESET_AT = "reconcile.fluxcd.io/resetAt"


def go_duration_seconds(text: Any, default: float) -> float:
    """A Go duration string ("10m", "1m0s", "1h30m", "250ms") in seconds; ``default`` when absent or bad."""
    import re
    if not isinstance(text, str) or not text:
        return default
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return default
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def go_duration(seconds: float) -> str:
    """Seconds as Go's time.Duration.String() prints whole seconds: 30s, 5m0s, 1h0m0s."""
    total = int(round(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def _set_condition(conds: list[dict[str, Any]], new: dict[str, Any]) -> list[dict[str, Any]]:
    """conditions.Set: replace the condition of that type (keeping lastTransitionTime when the status
    did not change), or add it."""
    out = []
    placed = False
    for c in conds:
        if c.get("type") == new["type"]:
            if c.get("status") == new["status"]:
                new = {**new, "lastTransitionTime": c.get("lastTransitionTime", new["lastTransitionTime"])}
            out.append(new)
            placed = True
        else:
            out.append(c)
    if not placed:
        out.append(new)
    return out


def _delete_condition(conds: list[dict[str, Any]], ctype: str) -> list[dict[str, Any]]:
    return [c for c in conds if c.get("type") != ctype]


def _order(conds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Flux's patch helper keeps Ready first, then Reconciling/Stalled, then the rest.
    rank = {"Ready": 0, "Reconciling": 1, "Stalled": 2}
    return sorted(conds, key=lambda c: rank.get(str(c.get("type")), 3))


class Flux:
    """source-controller, kustomize-controller and helm-controller of one cluster, as a work queue.

    Like controller-runtime: a key is queued by a watch event that passes the controller's predicates
    (generation changed, or the reconcile.fluxcd.io/requestedAt annotation changed: fluxcd/pkg runtime
    predicates ReconcileRequestedPredicate), by a source whose artifact revision changed (kustomize-controller
    requestsForRevisionChangeOf), or by a requeue after an interval. One key never runs twice at once; an
    event for a running key runs it again afterwards. Each reconcile reads the object, and so its
    requestedAt, when it starts, and writes lastHandledReconcileAt from that value when it ends
    (kustomize-controller finalizeStatus, helm-controller Reconcile's deferred patch).
    """

    def __init__(self, cluster: str, store: Any, world: World, git: GitRepo, loop: Loop) -> None:
        self.cluster, self.store, self.world, self.git, self.loop = cluster, store, world, git, loop
        self._lock = threading.Lock()
        self._seen: dict[Key, tuple[Any, Any, Any]] = {}  # the informer cache: generation, requestedAt, revision
        self._due: dict[Key, float] = {}
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._unsub: Callable[[], None] | None = None

    def start(self) -> None:
        for kind, api in KINDS.items():
            for obj in self.store.list(api, kind):
                self._seen[self._key(obj)] = self._watched(obj)
        self._unsub = self.store.subscribe(self._on_event)

    def stop(self) -> None:
        if self._unsub:
            self._unsub()

    # -- the work queue ------------------------------------------------------------------------

    @staticmethod
    def _key(obj: dict[str, Any]) -> Key:
        meta = obj.get("metadata") or {}
        return (str(obj.get("kind", "")), str(meta.get("namespace", "")), str(meta.get("name", "")))

    @staticmethod
    def _watched(obj: dict[str, Any]) -> tuple[Any, Any, Any]:
        meta = obj.get("metadata") or {}
        return (meta.get("generation"), (meta.get("annotations") or {}).get(REQUESTED_AT),
                ((obj.get("status") or {}).get("artifact") or {}).get("revision"))

    def _on_event(self, ev: str, obj: dict[str, Any]) -> None:
        kind = obj.get("kind", "")
        if kind not in KINDS:
            return
        key = self._key(obj)
        if ev == "DELETED":
            self._seen.pop(key, None)
            return
        now = self._watched(obj)
        old = self._seen.get(key)
        self._seen[key] = now
        if ev == "ADDED":
            # Objects created with a status that says they are reconciled are seeded state: the twin
            # stands for controllers that already ran. Anything else is reconciled, as a create event is.
            if self._wants_reconcile(obj):
                self.enqueue(key)
            return
        if old is None or now[0] != old[0] or (now[1] is not None and now[1] != old[1]):
            self.enqueue(key)
        if kind in SOURCE_KINDS and now[2] is not None and old is not None and now[2] != old[2]:
            self._source_changed(kind, key[1], key[2], str(now[2]))

    @staticmethod
    def _wants_reconcile(obj: dict[str, Any]) -> bool:
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        requested = (meta.get("annotations") or {}).get(REQUESTED_AT)
        if requested and requested != status.get("lastHandledReconcileAt"):
            return True
        return bool(meta.get("generation", 1) != status.get("observedGeneration"))

    def enqueue(self, key: Key, after: float = 0.0) -> None:
        """Queue a reconcile ``after`` seconds from now; an earlier one already queued wins (workqueue AddAfter)."""
        due = time.monotonic() + after
        with self._lock:
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
        self.loop.call_later(after, partial(self._fire, key, due))

    def _fire(self, key: Key, due: float) -> None:
        with self._lock:
            if self._due.get(key) != due:
                return  # superseded by an earlier request
            del self._due[key]
            if key in self._running:
                self._dirty.add(key)
                return
            self._running.add(key)
        try:
            started = self._reconcile(key)
        except Exception:
            started = False
            log.exception("twin Flux reconcile of %s failed", key)
        if not started:
            self._done(key)

    def _done(self, key: Key, requeue_after: float | None = None) -> None:
        with self._lock:
            self._running.discard(key)
            again = key in self._dirty
            self._dirty.discard(key)
        if again:
            self.enqueue(key)
        elif requeue_after is not None:
            self.enqueue(key, requeue_after)

    def _reconcile(self, key: Key) -> bool:
        """Run one reconcile of ``key``; True when it goes on asynchronously (and calls _done itself)."""
        kind, ns, name = key
        obj = self.store.get(KINDS[kind], kind, ns, name)
        if obj is None:
            return False
        requested = (obj["metadata"].get("annotations") or {}).get(REQUESTED_AT)
        if (obj.get("spec") or {}).get("suspend"):
            # finalizeStatus runs on every return, the suspended one too: the request counts as handled.
            self._write(key, lambda st, c: ([], {"lastHandledReconcileAt": requested} if requested else {}))
            return False
        if kind == "Kustomization":
            return self._reconcile_kustomization(key, obj, requested)
        if kind == "HelmRelease":
            return self._reconcile_helmrelease(key, obj, requested)
        return self._reconcile_source(key, obj, requested)

    def _write(self, key: Key, fn: Callable[[dict[str, Any], list[dict[str, Any]]],
                                            tuple[list[dict[str, Any]], dict[str, Any]]]) -> None:
        """Patch the status: fn(status, conditions) -> (new conditions, fields to set; None deletes)."""
        kind, ns, name = key

        def mutate(o: dict[str, Any]) -> None:
            st = o.setdefault("status", {})
            conds, fields = fn(st, list(st.get("conditions") or []))
            st["conditions"] = _order(conds)
            for k, v in fields.items():
                if v is None:
                    st.pop(k, None)
                else:
                    st[k] = v
        self.store.mutate(KINDS[kind], kind, ns, name, mutate, subresource="status")

    def _delay(self, name: str) -> float:
        return dict(self.world.knobs.flux_delays).get(name, self.world.knobs.flux_delay_seconds)

    # -- kustomize-controller ------------------------------------------------------------------

    def _reconcile_kustomization(self, key: Key, obj: dict[str, Any], requested: str | None) -> bool:
        kind, ns, name = key
        spec = obj.get("spec") or {}
        gen = int(obj["metadata"].get("generation", 1))
        knobs = self.world.knobs
        interval = go_duration_seconds(spec.get("interval"), 600.0)
        retry = go_duration_seconds(spec.get("retryInterval"), interval)
        timeout = go_duration(go_duration_seconds(spec.get("timeout"), interval))
        handled = {"lastHandledReconcileAt": requested} if requested else {}

        def not_ready(reason: str, message: str) -> Callable[..., Any]:
            def fn(st: dict[str, Any], conds: list[dict[str, Any]]) -> Any:
                conds = _set_condition(conds, condition("Ready", "False", reason, message, gen))
                # finalizeStatus: a Reconciling left by an earlier failed attempt turns ProgressingWithRetry.
                rec = get_condition({"status": {"conditions": conds}}, "Reconciling")
                if rec is not None:
                    conds = _set_condition(conds, {**rec, "reason": "ProgressingWithRetry"})
                return conds, dict(handled)
            return fn

        # getSource: a missing source fails the attempt and retries after retryInterval.
        ref = spec.get("sourceRef") or {}
        ref_kind, ref_ns = ref.get("kind") or "GitRepository", ref.get("namespace") or ns
        src = self.store.get(SRC_API, ref_kind, ref_ns, ref.get("name", "")) if ref_kind in SOURCE_KINDS else None
        if src is None:
            plural = {"GitRepository": "gitrepositories", "OCIRepository": "ocirepositories",
                      "Bucket": "buckets", "ExternalArtifact": "externalartifacts"}.get(ref_kind, ref_kind.lower())
            self._write(key, not_ready("ArtifactFailed", f'{plural}.source.toolkit.fluxcd.io "{ref.get("name")}" '
                                                         "not found"))
            self._done(key, retry)
            return True
        revision = ((src.get("status") or {}).get("artifact") or {}).get("revision")
        if not revision:
            self._write(key, not_ready("ArtifactFailed", f"Source artifact not found, retrying in "
                                                         f"{go_duration(knobs.requeue_dependency_seconds)}"))
            self._done(key, knobs.requeue_dependency_seconds)
            return True
        # checkDependencies, before anything is applied: Ready=False DependencyNotReady, no Reconciling of
        # its own, requeue after --requeue-dependency (kustomization_controller.go Reconcile).
        problem = self._dependency_problem(obj, src, ref_kind, ref_ns, str(revision))
        if problem:
            self._write(key, not_ready("DependencyNotReady", problem))
            self._done(key, knobs.requeue_dependency_seconds)
            return True

        # reconcile(): Ready=Unknown and Reconciling=True while it fetches, builds and applies.
        fetching = f"Fetching manifests for revision {revision} with a timeout of {timeout}"
        self._write(key, lambda st, conds: (
            _set_condition(_set_condition(conds, condition("Ready", "Unknown", "Progressing",
                                                           "Reconciliation in progress", gen)),
                           condition("Reconciling", "True", "Progressing", fetching, gen)), {}))
        rec = self.world.record.reconcile_started(kind, ns, name, time.monotonic())

        def finish() -> None:
            fails = self.world.faults.has("flux-fails", name)
            if fails:
                message = (f"Deployment/{ns}/{name} dry-run failed: failed to create typed patch object "
                           f"({ns}/{name}; apps/v1, Kind=Deployment): .spec.template.spec.containers[0].image: "
                           "expected string, got &value.valueUnstructured{Value:interface {}(nil)}")
                drift = f"Detecting drift for revision {revision} with a timeout of {timeout}"

                def failed(st: dict[str, Any], conds: list[dict[str, Any]]) -> Any:
                    conds = _set_condition(conds, condition("Ready", "False", "ReconciliationFailed", message, gen))
                    # finalizeStatus: Ready=False keeps Reconciling, reason ProgressingWithRetry, and
                    # observedGeneration is not moved.
                    conds = _set_condition(conds, condition("Reconciling", "True", "ProgressingWithRetry", drift, gen))
                    return conds, {**handled, "lastAttemptedRevision": revision}
                self._write(key, failed)
                self.world.record.reconcile_ended(rec, False, time.monotonic())
                self._done(key, retry)
                return

            def succeeded(st: dict[str, Any], conds: list[dict[str, Any]]) -> Any:
                conds = _set_condition(conds, condition("Ready", "True", "ReconciliationSucceeded",
                                                        f"Applied revision: {revision}", gen))
                return _delete_condition(conds, "Reconciling"), {
                    **handled, "observedGeneration": gen, "lastAppliedRevision": revision,
                    "lastAttemptedRevision": revision}
            self._write(key, succeeded)
            self.world.record.reconcile_ended(rec, True, time.monotonic())
            self._done(key)
        self.loop.call_later(self._delay(name), finish)
        return True

    def _dependency_problem(self, obj: dict[str, Any], src: dict[str, Any], ref_kind: str, ref_ns: str,
                            revision: str) -> str | None:
        """kustomize-controller checkDependencies: the first unmet dependency, in its words."""
        ns = obj["metadata"]["namespace"]
        ref = (obj.get("spec") or {}).get("sourceRef") or {}
        for d in (obj.get("spec") or {}).get("dependsOn") or []:
            dns, dname = d.get("namespace") or ns, d.get("name", "")
            dep = self.store.get(KS_API, "Kustomization", dns, dname)
            if dep is None:
                return (f"dependency '{dns}/{dname}' not found: kustomizations.kustomize.toolkit.fluxcd.io "
                        f'"{dname}" not found')
            st = dep.get("status") or {}
            if not st.get("conditions") or dep["metadata"].get("generation") != st.get("observedGeneration"):
                return f"dependency '{dns}/{dname}' is not ready"
            if (get_condition(dep, "Ready") or {}).get("status") != "True":
                return f"dependency '{dns}/{dname}' is not ready"
            dref = (dep.get("spec") or {}).get("sourceRef") or {}
            if (dref.get("name") == ref.get("name") and (dref.get("namespace") or dns) == ref_ns
                    and (dref.get("kind") or "GitRepository") == ref_kind
                    and st.get("lastAppliedRevision") != revision):
                return f"dependency '{dns}/{dname}' revision is not up to date"
        return None

    def _source_changed(self, kind: str, ns: str, name: str, revision: str) -> None:
        """requestsForRevisionChangeOf: every Kustomization of this source, except those Ready or
        Reconciling whose lastAttemptedRevision is already the new one."""
        if kind not in ("GitRepository", "OCIRepository", "Bucket"):
            return
        for ks in self.store.list(KS_API, "Kustomization"):
            ref = (ks.get("spec") or {}).get("sourceRef") or {}
            kns = ks["metadata"]["namespace"]
            if (ref.get("kind") or "GitRepository") != kind or ref.get("name") != name \
                    or (ref.get("namespace") or kns) != ns:
                continue
            busy = any((get_condition(ks, t) or {}).get("status") == "True" for t in ("Ready", "Reconciling"))
            if busy and (ks.get("status") or {}).get("lastAttemptedRevision") == revision:
                continue
            self.enqueue(("Kustomization", kns, ks["metadata"]["name"]))

    # -- source-controller ---------------------------------------------------------------------

    def _reconcile_source(self, key: Key, obj: dict[str, Any], requested: str | None) -> bool:
        kind, ns, name = key
        gen = int(obj["metadata"].get("generation", 1))
        handled = {"lastHandledReconcileAt": requested} if requested else {}
        # ProgressiveStatus(false, obj, ProgressingReason, "reconciliation in progress")
        self._write(key, lambda st, conds: (
            _set_condition(_set_condition(conds, condition("Reconciling", "True", "Progressing",
                                                           "reconciliation in progress", gen)),
                           condition("Ready", "Unknown", "Progressing", "reconciliation in progress", gen)), {}))
        rec = self.world.record.reconcile_started(kind, ns, name, time.monotonic())

        def finish() -> None:
            current = self.store.get(SRC_API, kind, ns, name) or obj
            revision = source_revision(kind, current, self.git)
            art = artifact(kind, ns, name, revision)

            def stored(st: dict[str, Any], conds: list[dict[str, Any]]) -> Any:
                conds = _set_condition(conds, condition("Ready", "True", "Succeeded",
                                                        f"stored artifact for revision '{revision}'", gen))
                conds = _set_condition(conds, condition("ArtifactInStorage", "True", "Succeeded",
                                                        f"stored artifact for revision '{revision}'", gen))
                return _delete_condition(conds, "Reconciling"), {**handled, "observedGeneration": gen,
                                                                 "artifact": art}
            self._write(key, stored)
            self.world.record.reconcile_ended(rec, True, time.monotonic())
            self._done(key)
        self.loop.call_later(self._delay(name), finish)
        return True

    # -- helm-controller -----------------------------------------------------------------------

    def _reconcile_helmrelease(self, key: Key, obj: dict[str, Any], requested: str | None) -> bool:
        kind, ns, name = key
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        gen = int(meta.get("generation", 1))
        annotations = meta.get("annotations") or {}
        handled: dict[str, Any] = {"lastHandledReconcileAt": requested} if requested else {}
        # meta.HandleAnnotationRequest: a force/reset token counts only when it equals requestedAt, and
        # is marked handled either way.
        force = reset = False
        for annotation, field_name in ((FORCE_AT, "lastHandledForceAt"), (RESET_AT, "lastHandledResetAt")):
            token = annotations.get(annotation)
            if token is not None and token != status.get(field_name):
                handled[field_name] = token
                if token == requested:
                    force, reset = (True, reset) if annotation == FORCE_AT else (force, True)
        # reconcileRelease marks Reconciling before its dependency check.
        prerequisites = condition("Reconciling", "True", "Progressing", "Fulfilling prerequisites", gen)
        self._write(key, lambda st, conds: (_set_condition(conds, prerequisites), {}))
        for d in spec.get("dependsOn") or []:
            dns, dname = d.get("namespace") or ns, d.get("name", "")
            dep = self.store.get(HELM_API, "HelmRelease", dns, dname)
            dst = (dep or {}).get("status") or {}
            if dep is None or dep["metadata"].get("generation") != dst.get("observedGeneration") \
                    or (get_condition(dep, "Ready") or {}).get("status") != "True":
                # helm-controller checkDependencies, in its words
                text = (f"unable to get '{dns}/{dname}' dependency: helmreleases.helm.toolkit.fluxcd.io "
                        f'"{dname}" not found') if dep is None else f"dependency '{dns}/{dname}' is not ready"
                waiting = condition("Ready", "False", "DependencyNotReady", text, gen)

                def not_ready(st: dict[str, Any], conds: list[dict[str, Any]],
                              waiting: dict[str, Any] = waiting) -> Any:
                    return _set_condition(conds, waiting), dict(handled)
                self._write(key, not_ready)
                self._done(key, self.world.knobs.requeue_dependency_seconds)
                return True
        upgrade = (spec.get("upgrade") or {}).get("remediation") or {}
        retries = int(upgrade.get("retries") or 0)
        failures = 0 if reset else int(status.get("upgradeFailures") or 0)
        failed = (get_condition(obj, "Released") or {}).get("status") == "False" or \
            (get_condition(obj, "Stalled") or {}).get("status") == "True"
        if failed and failures > retries and not force:
            # actionForState: ErrExceededMaxRetries, a terminal error: Stalled stays, observedGeneration moves.
            action = status.get("lastAttemptedReleaseAction") or "upgrade"
            stalled = condition("Stalled", "True", "RetriesExceeded", f"Failed to {action} after {failures} attempt(s)", gen)
            self._write(key, lambda st, conds: (_delete_condition(_set_condition(conds, stalled), "Reconciling"),
                                                {**handled, "observedGeneration": gen}))
            return False
        if not failed and not force and status.get("lastAttemptedGeneration", gen) == gen:
            # ReleaseStatusInSync: nothing to run; summarize keeps Ready as it is.
            self._write(key, lambda st, conds: (_delete_condition(conds, "Reconciling"),
                                                {**handled, "observedGeneration": gen}))
            return False
        history = list(status.get("history") or [])
        prev = history[0] if history else {}
        chart = str(prev.get("chartName") or name)
        version = str(prev.get("chartVersion") or status.get("lastAttemptedRevision") or "0.1.0")
        release_ns = str(prev.get("namespace") or spec.get("targetNamespace") or ns)
        release = str(prev.get("name") or spec.get("releaseName") or name)
        number = int(prev.get("version") or 0) + 1
        timeout = go_duration(go_duration_seconds(spec.get("timeout"), 300.0))
        running = f"Running 'upgrade' action with timeout of {timeout}"
        self._write(key, lambda st, conds: (
            _set_condition(_set_condition(conds, condition("Reconciling", "True", "Progressing", running, gen)),
                           condition("Ready", "Unknown", "Progressing", running, gen)),
            {"upgradeFailures": None} if reset else {}))
        rec = self.world.record.reconcile_started(kind, ns, name, time.monotonic())

        def finish() -> None:
            message = f"Helm upgrade succeeded for release {release_ns}/{release}.v{number} with chart {chart}@{version}"
            stamp = now_rfc3339()
            entry = {**prev, "name": release, "namespace": release_ns, "version": number, "status": "deployed",
                     "chartName": chart, "chartVersion": version, "firstDeployed": prev.get("firstDeployed", stamp),
                     "lastDeployed": stamp}

            def released(st: dict[str, Any], conds: list[dict[str, Any]]) -> Any:
                conds = _set_condition(conds, condition("Ready", "True", "UpgradeSucceeded", message, gen))
                conds = _set_condition(conds, condition("Released", "True", "UpgradeSucceeded", message, gen))
                conds = _delete_condition(_delete_condition(conds, "Stalled"), "Reconciling")
                return conds, {**handled, "observedGeneration": gen, "lastAttemptedGeneration": gen,
                               "lastAttemptedRevision": version, "lastAttemptedReleaseAction": "upgrade",
                               "history": [entry, *history][:5]}
            self._write(key, released)
            self.world.record.reconcile_ended(rec, True, time.monotonic())
            self._done(key)
        self.loop.call_later(self._delay(name), finish)
        return True


def source_revision(kind: str, obj: dict[str, Any], git: GitRepo) -> str:
    """The revision source-controller would store for this source now. Everything the twin serves comes
    from its one git repository: a GitRepository's revision is the branch head (`main@sha1:<sha>`); an
    OCIRepository stands for that tree pushed with `flux push artifact` (`<tag>@sha256:<digest>`), a Bucket
    for it synced to object storage (`sha256:<digest of the index>`); a HelmRepository's index and a
    HelmChart's version do not move with git."""
    import hashlib
    spec = obj.get("spec") or {}
    if kind == "GitRepository":
        return git.revision()
    if kind == "HelmChart":
        artifact_now = ((obj.get("status") or {}).get("artifact") or {}).get("revision")
        if artifact_now:
            return str(artifact_now)  # the index the chart came from has not moved
        return str(spec.get("version") or "0.1.0").lstrip("<>=~^ *").split(",")[0].strip() or "0.1.0"
    if kind == "HelmRepository":
        return "sha256:" + hashlib.sha256(str(spec.get("url", "")).encode()).hexdigest()
    digest = hashlib.sha256(f"{kind}:{git.head()}".encode()).hexdigest()
    if kind == "OCIRepository":
        tag = ((spec.get("ref") or {}).get("tag")) or "latest"
        return f"{tag}@sha256:{digest}"
    return f"sha256:{digest}"


def artifact(kind: str, namespace: str, name: str, revision: str) -> dict[str, Any]:
    """status.artifact as source-controller writes it (path <kind>/<ns>/<name>/<digest>.tar.gz)."""
    sha = revision.rsplit(":", 1)[-1]
    sub = kind.lower()
    return {"digest": f"sha256:{sha[:32]}{sha[:32]}", "lastUpdateTime": now_rfc3339(),
            "path": f"{sub}/{namespace}/{name}/{sha}.tar.gz", "revision": revision, "size": 81234,
            "url": f"http://source-controller.flux-system.svc.cluster.local./{sub}/{namespace}/{name}/{sha}.tar.gz"}


# --- HelmReleases of the tree ----------------------------------------------------------------

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def flux_objects_at(repo_root: Path, path: str, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """The Flux objects of ``kinds`` a Flux Kustomization with spec.path ``path`` applies, as kustomize
    builds them.

    A directory with a kustomization.yaml contributes its resources (files and directories, followed
    recursively), its patches merged into the objects they name, and its ``namespace`` set on each; a
    directory without one contributes every YAML file under it, as kustomize-controller generates it.
    Remote resources and kinds not asked for are left out.
    """
    root = (repo_root / path.removeprefix("./")).resolve()
    if not root.is_dir():
        return []
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for obj in _kustomize(root, frozenset()):
        kind = str(obj.get("kind", ""))
        if kind in kinds and str(obj.get("apiVersion", "")).split("/")[0] in (
                "helm.toolkit.fluxcd.io", "source.toolkit.fluxcd.io"):
            meta = obj.get("metadata") or {}
            found.setdefault((kind, str(meta.get("namespace") or "default"), str(meta.get("name"))), obj)
    return [found[k] for k in sorted(found)]


def helmreleases_at(repo_root: Path, path: str) -> list[dict[str, Any]]:
    """The HelmReleases a Flux Kustomization with spec.path ``path`` applies (see flux_objects_at)."""
    return flux_objects_at(repo_root, path, ("HelmRelease",))


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


def helmchart_object(hr: dict[str, Any]) -> dict[str, Any] | None:
    """The HelmChart helm-controller keeps for a HelmRelease with a chart template: <namespace>-<name>
    beside the chart's source, its artifact the chart version (helm-controller reconcileChartTemplate)."""
    meta, spec = hr.get("metadata") or {}, hr.get("spec") or {}
    chart_spec = (spec.get("chart") or {}).get("spec") or {}
    src = chart_spec.get("sourceRef") or {}
    if not src.get("name"):
        return None
    ns = str(src.get("namespace") or meta.get("namespace") or "default")
    name = f"{meta.get('namespace') or 'default'}-{meta.get('name')}"
    history = (hr.get("status") or {}).get("history") or [{}]
    version = str(history[0].get("chartVersion") or chart_spec.get("version") or "0.1.0")
    chart = str(chart_spec.get("chart") or meta.get("name"))
    return {"apiVersion": SRC_API, "kind": "HelmChart", "metadata": {"name": name, "namespace": ns},
            "spec": {"chart": chart, "version": str(chart_spec.get("version") or "*"),
                     "sourceRef": {"kind": str(src.get("kind") or "HelmRepository"), "name": str(src["name"])},
                     "interval": str(chart_spec.get("interval") or spec.get("interval") or "10m0s"),
                     "reconcileStrategy": str(chart_spec.get("reconcileStrategy") or "ChartVersion")},
            "status": {"observedGeneration": 1, "observedChartName": chart,
                       "artifact": artifact("HelmChart", ns, name, version),
                       "conditions": [condition("Ready", "True", "ChartPullSucceeded",
                                                f"pulled '{chart}' chart with version '{version}'", 1)]}}


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
