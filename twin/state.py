"""The twin's world: clusters of Talos nodes, the knobs of simulated time, faults and the record.

One RLock guards everything; one Condition on it wakes every waiter (talosctl --wait, health,
controllers) when anything changes. Times are time.monotonic().
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Phase = Literal["running", "rebooting", "maintenance", "installing", "off"]

STATES = ("pre-upgrade", "synced")
PRE_UPGRADE_TALOS = "v1.11.4"
PRE_UPGRADE_KUBELET = "v1.32.0"

# Faults that name a host, a Kustomization, an optional share, an optional duration, or nothing.
FAULTS: dict[str, str] = {
    "node-never-ready": "host",
    "upgrade-fails": "host",
    "upgrade-falls-back": "host",
    "upgrade-slow": "host",
    "static-pod-missing": "host",
    "ceph-stuck": "none",
    "not-ok-to-stop": "host",
    "etcd-unhealthy": "host",
    "flux-fails": "kustomization",
    "kube-flaky": "share",
    "kube-throttle": "share",
    "kube-blackhole": "seconds",
    "watch-504": "none",
    "proxmox-task-fails": "none",
    # Any alert name: a rule of that name fires through the real Prometheus and Alertmanager (--monitoring real).
    "alert-firing": "alertname",
}
KUBE_FLAKY_DEFAULT_SHARE = 0.3
KUBE_THROTTLE_DEFAULT_SHARE = 0.3
KUBE_BLACKHOLE_DEFAULT_SECONDS = 20.0


@dataclass(frozen=True)
class Knobs:
    reboot_seconds: float = 1.0
    recovery_seconds: float = 0.5
    flux_delay_seconds: float = 0.2
    # kustomize-/helm-controller --requeue-dependency (main.go default 30s): how long a dependent that
    # found its dependency not ready waits before it looks again.
    requeue_dependency_seconds: float = 30.0
    # kube-controller-manager --node-monitor-grace-period (50s from Kubernetes 1.32, the homelab's version):
    # how long a Node whose kubelet stopped posting keeps its last Ready before it turns Unknown.
    node_monitor_grace_seconds: float = 50.0
    # kube-apiserver sends a watch bookmark about once a minute (the watch cache's bookmark frequency).
    bookmark_seconds: float = 60.0
    # watch-504: how long a watch streams before it ends with the 504 Timeout error event.
    watch_504_seconds: float = 3.0
    # Reconcile times of single Flux objects by name, overriding flux_delay_seconds (a slow dependency).
    flux_delays: tuple[tuple[str, float], ...] = ()
    # How long after an upgraded node is Ready again Talos itself uncordons it (machined's NodeApply
    # controller, once the node's stage is running and it reaches the API: talos v1.11.5
    # internal/app/machined/pkg/controllers/k8s/node_apply.go ApplyCordoned).
    talos_uncordon_seconds: float = 0.0


def parse_fault(text: str, arg: str | None = None) -> tuple[str, str | None]:
    """``NAME=ARG`` or ``NAME`` (or name and arg apart) -> (name, arg); ValueError naming the known faults."""
    name, sep, given = text.partition("=")
    name = name.strip()
    if arg is None and sep:
        arg = given.strip()
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; known faults: {', '.join(sorted(FAULTS))} "
                         f"(give them as NAME=ARG, e.g. upgrade-fails=m720q-2)")
    kind = FAULTS[name]
    if kind == "alertname":
        from homelab.monitoring import is_alert_name

        if not arg or not is_alert_name(arg):
            raise ValueError(f"fault {name} needs the alert's name, letters, digits, _ and : "
                             f"(e.g. {name}=TargetDown), got {arg!r}")
    if kind in ("host", "kustomization") and not arg:
        raise ValueError(f"fault {name} needs the {kind} it applies to: {name}=<{kind}>")
    if kind == "none" and arg:
        raise ValueError(f"fault {name} takes no argument, got {arg!r}")
    if kind == "share" and arg:
        try:
            share = float(arg)
        except ValueError:
            share = -1.0
        if not 0 <= share <= 1:
            raise ValueError(f"fault {name} takes a share of requests between 0 and 1 (or nothing for "
                             f"{FAULT_DEFAULTS[name]:g}), got {arg!r}")
    if kind == "seconds" and arg:
        try:
            seconds = float(arg)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 3600:
            raise ValueError(f"fault {name} takes a number of seconds up to 3600 (or nothing for "
                             f"{FAULT_DEFAULTS[name]:g} s), got {arg!r}")
    return name, (arg or None)


# The value an optional argument takes when the fault is given without one.
FAULT_DEFAULTS: dict[str, float] = {
    "kube-flaky": KUBE_FLAKY_DEFAULT_SHARE,
    "kube-throttle": KUBE_THROTTLE_DEFAULT_SHARE,
    "kube-blackhole": KUBE_BLACKHOLE_DEFAULT_SECONDS,
}


def fault_value(name: str, arg: str | None) -> float:
    """The number a share or duration fault acts with: its argument, or its default."""
    return float(arg) if arg else FAULT_DEFAULTS[name]


class Faults:
    """The active faults: name -> set of arguments (None for an argument-less fault)."""

    def __init__(self) -> None:
        self._active: dict[str, set[str | None]] = {}

    def add(self, name: str, arg: str | None) -> None:
        self._active.setdefault(name, set()).add(arg)

    def clear(self, name: str, arg: str | None = None) -> None:
        if arg is None:
            self._active.pop(name, None)
        else:
            self._active.get(name, set()).discard(arg)
            if not self._active.get(name):
                self._active.pop(name, None)

    def has(self, name: str, arg: str | None = None) -> bool:
        args = self._active.get(name)
        if not args:
            return False
        return arg is None or arg in args

    def args(self, name: str) -> set[str | None]:
        return set(self._active.get(name, set()))

    def active(self) -> list[str]:
        return sorted(f"{n}={a}" if a else n for n, args in self._active.items() for a in args)


@dataclass
class Node:
    cluster: str
    hostname: str
    ip: str
    role: Literal["controlplane", "worker"]
    talos_version: str
    kubelet_version: str
    installer_image: str
    phase: Phase = "running"
    ready: bool = True
    unschedulable: bool = False
    boot_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    etcd_member_id: str = ""  # 16 hex digits; empty for workers and before bootstrap/join
    etcd_running: bool = False
    installed: bool = True
    machine_config: str = ""  # the applied machine config's YAML text
    previous_version: str | None = None  # what `talosctl rollback` boots
    staged_image: str | None = None  # `upgrade --stage`: installed at the next reboot
    platform: str = "metal"
    dhcp_ip: str = ""  # the DHCP lease of a VM booted into maintenance mode (its static ip comes with the config)
    disk: str = "/dev/sda"  # the VM's boot disk as Talos sees it (virtio-blk: /dev/vda)
    booted_at: float = 0.0  # monotonic time of the last boot into the installed Talos
    kubelet_up: bool = True  # the kubelet runs and posts the Node's status (stopped by an upgrade sequence)
    # The machine stage `get machinestatus` reports when it is not the one the phase implies: "rebooting"
    # after a failed upgrade sequence that left the node up (talos v1.11.5
    # internal/app/machined/pkg/controllers/runtime/machine_status.go: a FATAL sequence error -> rebooting).
    stage: str = ""
    talos_cordoned: bool = False  # the Node carries talos.dev/cordoned: Talos cordoned it for an upgrade
    schematic_id: str = ""  # the "schematic" extension's version; empty for an image not from an Image Factory
    extensions: tuple[str, ...] = ()  # names of the system extensions the running image carries
    control_plane_version: str = ""  # the Kubernetes version of its kube-apiserver/-controller-manager/-scheduler pods
    static_pods_missing: tuple[str, ...] = ()  # control-plane static pods that did not start on this boot

    @property
    def disrupted(self) -> bool:
        return self.phase != "running" or not self.ready

    @property
    def talos_up(self) -> bool:
        """The Talos API answers with certificates (installed and booted)."""
        return self.phase == "running" and self.installed


@dataclass
class ClusterState:
    name: str
    nodes: dict[str, Node]
    bootstrapped: bool
    ceph: bool = False  # runs Rook Ceph on its nodes
    kubernetes_version: str = PRE_UPGRADE_KUBELET
    cni_ready: bool = True  # a CNI runs (no CNI: every Node NotReady, CoreDNS Pending)
    coredns_problem: str | None = None  # why CoreDNS cannot get ready although a CNI runs
    # The node whose address is the cluster's API endpoint (talconfig `endpoint`, cluster.yaml
    # `cluster.endpoint`): without a VIP or load balancer in front, the API answers from outside only while
    # that node's kube-apiserver runs. None: the endpoint is a VIP (or a name), served by any control plane.
    api_endpoint: str | None = None

    def control_planes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == "controlplane"]

    def etcd_members(self) -> list[Node]:
        return [n for n in self.control_planes() if n.etcd_member_id]


@dataclass
class Disruption:
    cluster: str
    node: str
    start: float
    end: float | None = None


@dataclass
class Reconcile:
    kind: str
    namespace: str
    name: str
    start: float
    end: float | None = None
    ok: bool | None = None


class Record:
    """Every disruption interval per node and every Flux reconcile, for invariants in tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.disruptions: list[Disruption] = []
        self.reconciles: list[Reconcile] = []

    def node_down(self, cluster: str, node: str, at: float) -> None:
        with self._lock:
            if not any(d.cluster == cluster and d.node == node and d.end is None for d in self.disruptions):
                self.disruptions.append(Disruption(cluster, node, at))

    def node_up(self, cluster: str, node: str, at: float) -> None:
        with self._lock:
            for d in self.disruptions:
                if d.cluster == cluster and d.node == node and d.end is None:
                    d.end = at

    def intervals(self, cluster: str | None = None) -> list[Disruption]:
        with self._lock:
            return [Disruption(d.cluster, d.node, d.start, d.end) for d in self.disruptions
                    if cluster is None or d.cluster == cluster]

    def max_concurrent(self, cluster: str | None = None) -> int:
        """The largest number of this cluster's nodes disrupted at one instant; with no cluster, of all
        nodes of every cluster (the homelab-wide invariant: one node at a time across all clusters)."""
        events: list[tuple[float, int]] = []
        for d in self.intervals(cluster):
            events.append((d.start, 1))
            events.append((d.end if d.end is not None else float("inf"), -1))
        # An interval that ends exactly when another starts does not overlap it: ends first.
        events.sort(key=lambda e: (e[0], e[1]))
        best = current = 0
        for _, delta in events:
            current += delta
            best = max(best, current)
        return best

    def reconcile_started(self, kind: str, namespace: str, name: str, at: float) -> Reconcile:
        r = Reconcile(kind, namespace, name, at)
        with self._lock:
            self.reconciles.append(r)
        return r

    def reconcile_ended(self, r: Reconcile, ok: bool, at: float) -> None:
        with self._lock:
            r.end, r.ok = at, ok

    def reconciles_of(self, kind: str | None = None, name: str | None = None) -> list[Reconcile]:
        with self._lock:
            return [Reconcile(r.kind, r.namespace, r.name, r.start, r.end, r.ok) for r in self.reconciles
                    if (kind is None or r.kind == kind) and (name is None or r.name == name)]


class World:
    """Clusters and nodes, guarded by one lock; change() wakes every waiter and listener."""

    def __init__(self, knobs: Knobs | None = None) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.knobs = knobs or Knobs()
        self.faults = Faults()
        self.record = Record()
        self.clusters: dict[str, ClusterState] = {}
        self.version = 0
        self.stopping = False
        self._listeners: list[Callable[[], None]] = []
        # (cluster, hostname, down) when a node powers off / is back: the Ceph seam hangs here.
        self.power_hooks: list[Callable[[str, str, bool], None]] = []
        self._threads: list[threading.Thread] = []
        self._seen_up: set[tuple[str, str]] = set()
        # The schematics the Image Factory knows (twin.image_factory serves them): ID -> schematic.
        self.schematics: dict[str, dict[str, Any]] = {}

    # --- lookups ---------------------------------------------------------------------------

    def node_by_ip(self, ip: str) -> Node | None:
        with self.lock:
            for c in self.clusters.values():
                for n in c.nodes.values():
                    if n.ip == ip or n.hostname == ip or (n.dhcp_ip == ip and n.phase == "maintenance"):
                        return n
        return None

    def node(self, hostname: str) -> Node | None:
        with self.lock:
            for c in self.clusters.values():
                if hostname in c.nodes:
                    return c.nodes[hostname]
        return None

    def hosts(self) -> list[str]:
        with self.lock:
            return [h for c in self.clusters.values() for h in c.nodes]

    # --- change ----------------------------------------------------------------------------

    def subscribe(self, fn: Callable[[], None]) -> Callable[[], None]:
        """fn() runs (under the lock: it must only hand the news on) after every change."""
        with self.lock:
            self._listeners.append(fn)

        def unsubscribe() -> None:
            with self.lock:
                if fn in self._listeners:
                    self._listeners.remove(fn)
        return unsubscribe

    def changed(self) -> None:
        with self.lock:
            self.version += 1
            now = time.monotonic()
            for c in self.clusters.values():
                for n in c.nodes.values():
                    # A disruption starts when a node that was up goes down; first boots are not one.
                    if not n.disrupted:
                        self._seen_up.add((c.name, n.hostname))
                        self.record.node_up(c.name, n.hostname, now)
                    elif (c.name, n.hostname) in self._seen_up:
                        self.record.node_down(c.name, n.hostname, now)
            self.cond.notify_all()
            for fn in list(self._listeners):
                fn()

    def update(self, node: Node, **fields: Any) -> None:
        with self.lock:
            for k, v in fields.items():
                if not hasattr(node, k):
                    raise AttributeError(f"twin node has no field {k!r}")
                setattr(node, k, v)
            self.changed()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """True once predicate() holds (checked under the lock), False at the deadline or on stop."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if predicate():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stopping:
                    return False
                self.cond.wait(remaining)

    def sleep(self, seconds: float) -> bool:
        """Simulated time passing; False when the twin stops meanwhile."""
        deadline = time.monotonic() + seconds
        with self.cond:
            while not self.stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                self.cond.wait(remaining)
        return False

    def spawn(self, fn: Callable[[], None], name: str) -> threading.Thread:
        """A background activity (a reboot without --wait) that stop() joins."""
        t = threading.Thread(target=fn, name=f"twin-{name}", daemon=True)
        with self.lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        return t

    def power(self, node: Node, down: bool) -> None:
        """Tell the hooks (Ceph) that a node's disks went away or came back; outside the lock."""
        for hook in list(self.power_hooks):
            hook(node.cluster, node.hostname, down)

    def stop(self, timeout: float = 5.0) -> list[str]:
        """Wake every waiter and join the background activities; the names of those still alive."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in threads if t.is_alive()]


def new_member_id() -> str:
    return uuid.uuid4().hex[:16]


def seed_world(world: World, tree: Any, state: str) -> None:
    """Clusters and nodes from the loaded k8s/ tree (homelab.config.Tree) in the given state."""
    if state not in STATES:
        raise ValueError(f"unknown twin state {state!r}; expected one of {', '.join(STATES)}")
    synced = state == "synced"
    with world.lock:
        for name, c in sorted(tree.clusters.items()):
            nodes: dict[str, Node] = {}
            if c.talconfig is not None:
                tal = c.talconfig
                version = tal.talos_version if synced else PRE_UPGRADE_TALOS
                kubelet = tal.kubernetes_version if synced else PRE_UPGRADE_KUBELET
                for tn in tal.nodes:
                    role: Literal["controlplane", "worker"] = "controlplane" if tn.control_plane else "worker"
                    schematic_id, extensions = _image_contents(world, tal.schematic_for(tn), tn.talos_image_url or (
                        (tal.control_plane if tn.control_plane else tal.worker) or _NoSection).talos_image_url)
                    nodes[tn.hostname] = Node(
                        cluster=name, hostname=tn.hostname, ip=tn.ip, role=role,
                        talos_version=version, kubelet_version=_v(kubelet),
                        installer_image=tal.installer_for(tn, version),
                        etcd_member_id=new_member_id() if role == "controlplane" else "",
                        etcd_running=role == "controlplane",
                        schematic_id=schematic_id, extensions=extensions,
                        control_plane_version=_v(kubelet) if role == "controlplane" else "",
                    )
                world.clusters[name] = ClusterState(name, nodes, bootstrapped=True, ceph=True,
                                                    kubernetes_version=_v(kubelet),
                                                    api_endpoint=_endpoint_node(tal.endpoint, tal.nodes))
            elif c.proxmox is not None:
                px = c.proxmox
                schematic_id, extensions = _image_contents(world, px.cluster.schematic, px.cluster.talos_image_url)
                for vm in px.vms:
                    nodes[vm.name] = Node(
                        cluster=name, hostname=vm.name, ip=vm.ip, role=vm.role,
                        talos_version=px.cluster.talos_version, kubelet_version=_v(px.cluster.kubernetes_version),
                        installer_image=px.installer(px.cluster.talos_version), platform="nocloud",
                        phase="running" if synced else "off", ready=synced, installed=synced,
                        etcd_member_id=new_member_id() if synced and vm.role == "controlplane" else "",
                        etcd_running=synced and vm.role == "controlplane",
                        schematic_id=schematic_id, extensions=extensions,
                        control_plane_version=_v(px.cluster.kubernetes_version) if vm.role == "controlplane" else "",
                    )
                world.clusters[name] = ClusterState(name, nodes, bootstrapped=synced, ceph=False,
                                                    kubernetes_version=_v(px.cluster.kubernetes_version),
                                                    cni_ready=synced,
                                                    api_endpoint=_endpoint_node(px.cluster.endpoint, px.vms))
        world.changed()


def _v(version: str) -> str:
    return version if version.startswith("v") else f"v{version}"


class _NoSection:
    talos_image_url = None


def extension_names(schematic: dict[str, Any] | None) -> tuple[str, ...]:
    """The names the running extensions report for a schematic's official extensions: the manifest name of
    `siderolabs/i915` is `i915` (siderolabs/extensions, each extension's manifest.yaml)."""
    customization = (schematic or {}).get("customization") or {}
    official = ((customization.get("systemExtensions") or {}).get("officialExtensions")) or []
    return tuple(sorted(str(e).rsplit("/", 1)[-1] for e in official))


def _image_contents(world: World, schematic: dict[str, Any] | None, image_url: str | None) -> tuple[str, tuple[str, ...]]:
    """(schematic ID, extension names) of the image a node was installed from. An Image Factory image carries
    the virtual extension `schematic` whose version is the schematic ID (siderolabs/image-factory
    internal/artifacts/schematic.go schematicExtension); the stock installer and a talosImageURL build carry
    none the twin could know. The factory knows every schematic a node runs: it was registered to build it."""
    from homelab.versions import schematic_id

    if image_url or schematic is None:
        return "", ()
    sid = schematic_id(schematic)
    world.schematics.setdefault(sid, schematic)
    return sid, (*extension_names(schematic), "schematic")


def _endpoint_node(endpoint: str, nodes: Iterable[Any]) -> str | None:
    """The hostname of the node whose address the API endpoint names; None when no node has it (a VIP, a
    load balancer or a DNS name: any control plane serves it)."""
    from urllib.parse import urlsplit

    host = (urlsplit(endpoint).hostname or "").strip("[]")
    for n in nodes:
        ips = getattr(n, "ips", None) or [getattr(n, "ip", "")]
        if host in ips:
            return str(getattr(n, "hostname", None) or n.name)
    return None


def all_nodes(world: World, cluster: str | None = None) -> Iterable[Node]:
    with world.lock:
        return [n for c in world.clusters.values() if cluster in (None, c.name) for n in c.nodes.values()]
