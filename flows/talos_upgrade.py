"""Flow `talos-upgrade`: a rolling Talos upgrade, one node at a time, gated, approved, resumable.

Plan (pure, homelab.upgrade) -> preflight gates -> approval -> the global `homelab-disruption` lock ->
etcd snapshot -> per node: ok-to-stop, noout, pre-hook, upgrade, verify, Ready, etcd, OSDs, unset
noout, Ceph clean, post-hook, pause. A rerun re-reads the versions and goes on with the first node
that is not at the target. Every wait is a watch or a tight poll under a monotonic deadline.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from pydantic import BaseModel, Field

from flows import _monitoring
from flows._guard import (
    RunStopped,
    StepFailed,
    checkpoint,
    describe_interruption,
    disruption_lock,
    interrupted_status,
    last_result,
    remember,
)
from homelab import ceph_gate
from homelab.config import ProxmoxCluster, TalConfig, load_tree
from homelab.gates import NodeView, Verdict
from homelab.monitoring import MonitoringGates
from homelab.upgrade import (
    PlanRefused,
    TalosPlan,
    _members,
    etcd_gate,
    flux_gate,
    nodes_gate,
    plan_talos_upgrade,
    rollback_step,
    self_node_gate,
)
from homelab.window import Window, WindowError, current_opening, next_open
from tasks.ceph import CephError
from tasks.connect import Clients, connect
from tasks.kube import Kube, KubeError, ready_and_schedulable
from tasks.lock import DisruptionLock
from tasks.talos import TalosAborted, TalosError

POLL_S = 0.25
KS_GROUP = "kustomize.toolkit.fluxcd.io"

# (monotonic time, node, step) of every step start, newest last: the benchmark reads it.
TIMELINE: list[tuple[float, str, str]] = []


# --- parameters -------------------------------------------------------------------------------


class MaintenanceWindow(BaseModel):
    """When disruptive work may start: at each cron firing, for `hours`, in `timezone`."""

    cron: str = Field(description="Cron expression of each opening, e.g. '0 2 * * 6' (Saturdays 02:00).")
    hours: float = Field(default=4, gt=0, description="How long each opening lasts, in hours.")
    timezone: str = Field(default="UTC", description="IANA time zone of the cron expression, e.g. Europe/Berlin.")

    def window(self) -> Window:
        return Window(self.cron, self.hours, self.timezone)


class Deadlines(BaseModel):
    """How long each step may take, in seconds; a step that overruns stops the run with what it saw."""

    lock: float = Field(default=600, gt=0, description="Waiting for the homelab-disruption lock.")
    upgrade: float = Field(default=1800, gt=0, description="`talosctl upgrade --wait --timeout` of one node.")
    node_ready: float = Field(default=900, gt=0, description="The upgraded Node back Ready and schedulable.")
    etcd: float = Field(default=300, gt=0, description="Every etcd member healthy again.")
    osds_up: float = Field(default=600, gt=0, description="The node's Ceph OSDs up again.")
    ceph_clean: float = Field(default=1800, gt=0, description="Every PG active+clean and Ceph healthy again.")
    hook: float = Field(default=600, gt=0, description="One pre- or post-hook.")
    approval: float = Field(default=86400, gt=0, description="Waiting for someone to approve the plan.")


# --- failures ---------------------------------------------------------------------------------


def _mark(node: str, step: str) -> None:
    TIMELINE.append((time.monotonic(), node, step))


# --- observation of disruption ----------------------------------------------------------------


class DisruptionWatch:
    """Watches every Node on a thread of its own and keeps the most nodes seen not Ready at once;
    the node the flow is disrupting right now counts even while the API server is away."""

    def __init__(self, make_kube: Callable[[], Kube]):
        self._make_kube = make_kube
        self._lock = threading.Lock()
        self._not_ready: set[str] = set()
        self._current: str | None = None
        self.max_disrupted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="homelab-disruption-watch", daemon=True)

    def _note(self) -> None:
        with self._lock:
            now = self._not_ready | ({self._current} if self._current else set())
            self.max_disrupted = max(self.max_disrupted, len(now))

    def observe(self, nodes: list[NodeView]) -> None:
        with self._lock:
            self._not_ready = {n.name for n in nodes if not n.ready}
        self._note()

    @contextlib.contextmanager
    def disrupting(self, node: str) -> Iterator[None]:
        with self._lock:
            self._current = node
        self._note()
        try:
            yield
        finally:
            with self._lock:
                self._current = None

    def _run(self) -> None:
        from tasks.kube import node_view

        try:
            kube = self._make_kube()
        except Exception:
            return
        try:
            while not self._stop.is_set():
                try:
                    items, rv = kube.list_objects("", "v1", "nodes", timeout_s=5)
                    state = {o["metadata"]["name"]: node_view(o).ready for o in items}
                    self._set(state)
                    for etype, obj in kube.watch_objects("", "v1", "nodes", None, rv, timeout_s=2):
                        if self._stop.is_set():
                            return
                        if etype == "BOOKMARK":
                            continue
                        name = obj["metadata"]["name"]
                        if etype == "DELETED":
                            state.pop(name, None)
                        else:
                            state[name] = node_view(obj).ready
                        self._set(state)
                except Exception:
                    self._stop.wait(0.1)  # the API server is away (a single control plane rebooting)
        finally:
            with contextlib.suppress(Exception):
                kube.close()

    def _set(self, state: dict[str, bool]) -> None:
        with self._lock:
            self._not_ready = {n for n, ready in state.items() if not ready}
        self._note()

    def start(self) -> DisruptionWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


# --- the lock ---------------------------------------------------------------------------------


# --- small waits ------------------------------------------------------------------------------


def poll(check: Callable[[], Verdict], deadline: float, node: str, gate: str, next_step: str,
         interval_s: float = POLL_S) -> Verdict:
    """check() until it is ok or the monotonic deadline passes (StepFailed naming the last verdict)."""
    while True:
        verdict = check()
        if verdict.ok:
            return verdict
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepFailed(node, gate, verdict.reason, next_step)
        time.sleep(min(interval_s, left))


# --- reading the cluster ----------------------------------------------------------------------


@dataclass
class Target:
    """The cluster as configured: its desired state and members in upgrade order."""

    name: str
    config: TalConfig | ProxmoxCluster
    hosts: list[tuple[str, str, bool]] = field(default_factory=list)  # (hostname, ip, control plane)

    @property
    def control_planes(self) -> list[tuple[str, str]]:
        return [(h, ip) for h, ip, cp in self.hosts if cp]

    def ip(self, host: str) -> str:
        return next(ip for h, ip, _ in self.hosts if h == host)


def load_target(tree_path: Path, cluster: str) -> Target:
    tree = load_tree(tree_path)
    c = tree.cluster(cluster)
    config: TalConfig | ProxmoxCluster = c.talconfig if c.talconfig is not None else c.proxmox  # type: ignore[assignment]
    _, _, members = _members(config)
    return Target(cluster, config, [(m.hostname, m.ip, m.control_plane) for m in members])


def observe_versions(cl: Clients, target: Target) -> dict[str, str]:
    """hostname -> Talos tag, for every node that answers."""
    out: dict[str, str] = {}
    deadline = time.monotonic() + 30
    try:  # one talosctl call when every node answers; one per node otherwise
        replies = cl.talos.version([ip for _, ip, _ in target.hosts], deadline=deadline)
        if all(ip in replies for _, ip, _ in target.hosts):
            return {host: replies[ip] for host, ip, _ in target.hosts}
    except TalosError:
        pass
    for host, ip, _ in target.hosts:
        try:
            v = cl.talos.version([ip], deadline=deadline)
        except TalosError:
            continue
        if ip in v:
            out[host] = v[ip]
        elif len(v) == 1:
            out[host] = next(iter(v.values()))
    return out


def etcd_verdict(cl: Clients, target: Target) -> Verdict:
    cps = target.control_planes
    errors: list[str] = []

    def read_members() -> Any:
        for _, ip in cps:
            try:
                return cl.talos.etcd_members(ip, deadline=time.monotonic() + 15)
            except TalosError as e:
                errors.append(str(e))
        return None

    # Both reads at once: each is a talosctl process, and the gate is waited on between nodes.
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read_members)
        try:
            status = cl.talos.etcd_status([ip for _, ip in cps], deadline=time.monotonic() + 15)
        except TalosError as e:
            pending.result()
            return Verdict(False, f"etcd not healthy: {e}")
        members = pending.result()
    if members is None:
        return Verdict(False, f"etcd not healthy: no control plane answered `etcd members` ({'; '.join(errors)})")
    return etcd_gate(members, status, len(cps))


def nodes_verdict(cl: Clients, target: Target, watch: DisruptionWatch | None = None) -> Verdict:
    try:
        nodes = cl.kube.nodes(timeout_s=10)
    except KubeError as e:
        return Verdict(False, f"nodes not readable: {e}")
    if watch is not None:
        watch.observe(nodes)
    return nodes_gate(nodes, [h for h, _, _ in target.hosts])


def flux_verdict(cl: Clients) -> Verdict:
    try:
        items, _ = cl.kube.list_objects(KS_GROUP, "v1", "kustomizations", timeout_s=10)
    except KubeError as e:
        if e.status == 404:
            return Verdict(True, "no Flux Kustomizations in this cluster")
        return Verdict(False, f"Flux Kustomizations not readable: {e}")
    from homelab.upgrade import is_rook_ceph
    from tasks import flux

    # A Kustomization whose last attempt failed keeps Reconciling=True (ProgressingWithRetry) and will
    # never "finish" by waiting: say that it fails, and with what, instead of "wait for it".
    failing = [k for k in items if is_rook_ceph(k) and flux.attempt(k) is flux.Attempt.FAILED]
    if failing:
        names = "; ".join(f"{(k.get('metadata') or {}).get('namespace', 'flux-system')}/"
                          f"{(k.get('metadata') or {}).get('name')} failed: '{flux.failure_message(k)}'" for k in failing)
        return Verdict(False, f"Flux cannot apply rook-ceph: {names}; fix the manifests in git and reconcile it "
                              f"(flux get ks), then run again: the controller only retries the same failure")
    return flux_gate(items)


def ceph_clean_verdict(cl: Clients, tolerated: frozenset[str] = frozenset()) -> Verdict:
    if cl.ceph is None:
        return Verdict(True, "no Ceph in this cluster")
    try:
        # A noout that an interrupted talos-upgrade run left set on this cluster is this flow's own (its
        # owner record says so): tolerated, so that the rerun carries on. Anyone else's refuses, named.
        return cl.ceph.clean(tolerated, own_noout=("talos-upgrade", cl.cluster))
    except CephError as e:
        return Verdict(False, f"Ceph not readable: {e}")


def preflight(cl: Clients, target: Target, hosts: list[str], node_name: str | None,
              watch: DisruptionWatch | None = None) -> list[Verdict]:
    """Every gate at once; the failing ones tell the operator everything in one run."""
    with ThreadPoolExecutor(3) as pool:
        checks = [pool.submit(etcd_verdict, cl, target)]
        if cl.ceph is not None:
            checks.append(pool.submit(ceph_clean_verdict, cl))
        verdicts = [nodes_verdict(cl, target, watch), flux_verdict(cl)] + [c.result() for c in checks]
    verdicts += [self_node_gate(node_name, h) for h in hosts]
    return verdicts


# --- tasks: what the UI shows, one per step ---------------------------------------------------


def _t(name: str) -> Any:
    return task(name=name, task_run_name=name + " {node}", cache_policy=NO_CACHE, persist_result=False)


@_t("preflight")
def preflight_task(cl: Clients, target: Target, hosts: list[str], node: str) -> None:
    _mark(node, "preflight")
    failed = [v for v in preflight(cl, target, hosts, os.environ.get("NODE_NAME")) if not v.ok]
    if failed:
        raise StepFailed(node, "preflight", "; ".join(v.reason for v in failed),
                         "fix what the gates report and run again; nothing was changed")


@_t("etcd-snapshot")
def snapshot_task(cl: Clients, target: Target, directory: str, node: str) -> str:
    _mark(node, "etcd-snapshot")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(directory).expanduser() / f"{target.name}-etcd-{stamp}.db"
    ip = target.ip(node)
    try:
        return str(cl.talos.etcd_snapshot(path, ip, deadline=time.monotonic() + 300))
    except TalosError as e:
        raise StepFailed(node, "etcd snapshot", str(e), "check free space and etcd on the node, then run again") from e


@_t("ok-to-stop")
def ok_to_stop_task(cl: Clients, node: str, deadline_s: float = 180.0) -> list[int]:
    """Ceph's word before the node goes down: its mons (quorum, `mon ok-to-stop`), the mgrs, its OSDs
    (`osd ok-to-stop`), and the cluster otherwise clean. "Not yet" answers (EAGAIN while PG states are
    unknown after a mgr failover, no active mgr) are asked again within ``deadline_s``, longer than
    Ceph's 30 s mgr beacon grace; a "no" refuses at once."""
    from tasks.ceph import CephWaitTimeout

    _mark(node, "ok-to-stop")
    assert cl.ceph is not None
    ceph = cl.ceph
    log = get_run_logger()
    try:
        items, _ = cl.kube.list_objects("", "v1", "nodes", timeout_s=10)
    except KubeError as e:
        raise StepFailed(node, "ceph ok-to-stop", f"Nodes not readable: {e}", "check the Kubernetes API and "
                         "run again; nothing was changed on this node") from e
    # Rook names a node's CRUSH host after its kubernetes.io/hostname label (ceph_gate.crush_host_name).
    labels = {str(o["metadata"]["name"]): str((o["metadata"].get("labels") or {}).get("kubernetes.io/hostname", ""))
              for o in items}

    def waiting(v: Verdict) -> None:
        log.warning(f"{node}: Ceph cannot answer yet, asking again: {v.reason}")

    with ThreadPoolExecutor(1) as pool:
        clean_now = pool.submit(ceph_clean_verdict, cl)  # the otherwise-healthy check, meanwhile
        try:
            gate = ceph.node_gate(node, labels, time.monotonic() + deadline_s, on_wait=waiting)
        except CephWaitTimeout as e:
            raise StepFailed(node, "ceph ok-to-stop", str(e), "nothing was changed on this node; check "
                             "`ceph mgr stat` and `ceph pg stat`, then run again") from e
        except (CephError, ValueError) as e:
            raise StepFailed(node, "ceph ok-to-stop", str(e), "check `ceph -s` and run again") from e
        clean = clean_now.result()
    if not gate.ok:
        raise StepFailed(node, "ceph ok-to-stop", gate.reason, "nothing was changed on this node; "
                         "wait until Ceph is clean (`ceph -s`) and run again")
    if gate.waited:
        clean = ceph_clean_verdict(cl)  # the first reading is as old as the wait
    if not clean.ok:
        raise StepFailed(node, "ceph clean before the node", clean.reason,
                         "nothing was changed on this node; run again once Ceph is clean")
    log.info(f"{node}: {gate.reason}")
    return list(gate.osds)


@_t("set-noout")
def set_noout_task(cl: Clients, node: str) -> None:
    from prefect.runtime import flow_run

    _mark(node, "set-noout")
    assert cl.ceph is not None
    # Recorded in the cluster (config-key homelab/noout-owner), where an operator sees who holds noout
    # and a rerun after an interruption knows the flag for its own.
    owner = ceph_gate.NooutOwner(flow="talos-upgrade", flow_run_id=str(flow_run.id or "unknown"),
                                 cluster=cl.cluster, node=node)
    try:
        cl.ceph.set_noout(owner)
    except CephError as e:
        raise StepFailed(node, "set noout", str(e), "check `ceph osd dump | grep flags` and `ceph config-key "
                         f"get {ceph_gate.NOOUT_OWNER_KEY}`; run again") from e
    get_run_logger().info(f"noout set for {node}, recorded as {owner.describe()} under config-key "
                          f"{ceph_gate.NOOUT_OWNER_KEY}")


@_t("unset-noout")
def unset_noout_task(cl: Clients, node: str) -> None:
    _mark(node, "unset-noout")
    assert cl.ceph is not None
    cl.ceph.unset_noout()  # the flag, verified, then its owner record


def _run_hook(command: str, node: str, ip: str, timeout_s: float, kind: str) -> None:
    from prefect.runtime import flow_run

    from blocks import load_homelab
    from tasks import hooks

    # The hook's extra variables live in the Homelab block this run acts on (its `homelab` parameter);
    # the hook sees them, PATH, HOME and the node, never the worker's environment (tasks/hooks.py).
    block_name = flow_run.parameters.get("homelab")
    extra = load_homelab(block_name).hook_env_values() if block_name else {}
    try:
        hooks.run_hook(command, kind=kind, node=node, ip=ip, deadline_s=timeout_s, extra_env=extra,
                       log=get_run_logger())
    except hooks.HookConfigError as e:
        raise StepFailed(node, f"{kind}-hook", str(e), "fix hook_env or PATH in the Homelab block and run again") from None
    except hooks.HookError as e:
        raise StepFailed(node, f"{kind}-hook", e.reason, e.next_step) from None


@_t("pre-hook")
def pre_hook_task(command: str, node: str, ip: str, timeout_s: float) -> None:
    _mark(node, "pre-hook")
    _run_hook(command, node, ip, timeout_s, "pre")


@_t("post-hook")
def post_hook_task(command: str, node: str, ip: str, timeout_s: float) -> None:
    _mark(node, "post-hook")
    _run_hook(command, node, ip, timeout_s, "post")


@_t("upgrade")
def upgrade_task(cl: Clients, argv: list[str], node: str, ip: str, timeout_s: float, target: str,
                 before: str, lock: DisruptionLock) -> None:
    _mark(node, "upgrade")
    checkpoint(lock, node, f"`talosctl upgrade` of {node}")
    try:
        # Killed the moment the lock's ownership runs out: the call must not outlive the lease.
        cl.talos.run(argv[1:], timeout_s=timeout_s + 30, abort=lock.abort)
    except TalosAborted as e:
        raise StepFailed(node, "lock lost", f"{e}: {lock.lost_reason}",
                         f"the node may still be upgrading: watch `talosctl -n {ip} dmesg -f` until it is back, "
                         f"make sure the worker reaches the Prefect server, then run again") from e
    except TalosError as e:
        raise StepFailed(node, "talosctl upgrade", f"{e}",
                         f"the node is expected back at {before}; check `talosctl -n {ip} dmesg` and the "
                         f"installer image, then run again") from e


@_t("verify-version")
def verify_version_task(cl: Clients, node: str, ip: str, target: str, deadline_s: float) -> None:
    _mark(node, "verify-version")
    deadline = time.monotonic() + deadline_s
    seen = "no answer"
    while True:
        try:
            versions = cl.talos.version([ip], deadline=deadline)
            seen = versions.get(ip) or next(iter(versions.values()), "no version")
            if seen == target:
                break
            raise StepFailed(node, "verify version", f"talosctl version reports {seen}, expected {target}",
                             f"the upgrade did not take; check `talosctl -n {ip} dmesg`; {rollback_step(ip)} "
                             f"boots the previous image if the node misbehaves")
        except TalosError as e:
            seen = str(e)
            if not e.retryable or time.monotonic() >= deadline:
                raise StepFailed(node, "verify version", seen, f"check `talosctl -n {ip} version`") from e
            time.sleep(POLL_S)
    try:
        view = cl.kube.wait_node(node, lambda v: v.talos_version == target, deadline, tolerate_unavailable=True,
                                 what=f"osImage Talos ({target})")
    except KubeError as e:
        raise StepFailed(node, "verify version (Node osImage)", str(e),
                         f"{rollback_step(ip)} if the node does not come back") from e
    del view


@_t("wait-ready")
def wait_ready_task(cl: Clients, node: str, ip: str, target: str, deadline_s: float) -> None:
    _mark(node, "wait-ready")
    deadline = time.monotonic() + deadline_s
    try:
        view = cl.kube.wait_node(node, lambda v: v.ready, deadline, tolerate_unavailable=True, what="Ready")
    except KubeError as e:
        raise StepFailed(node, "node Ready", str(getattr(e, "args", [e])[0]),
                         f"check the kubelet (`talosctl -n {ip} logs kubelet`); if {target} is at fault, "
                         f"`{rollback_step(ip)}` boots the previous image; then run again") from e
    if not ready_and_schedulable(view):
        try:
            cl.kube.uncordon(node, timeout_s=max(1.0, deadline - time.monotonic()))
        except KubeError as e:
            raise StepFailed(node, "node schedulable", str(e), f"kubectl uncordon {node}, then run again") from e


@_t("etcd-healthy")
def etcd_healthy_task(cl: Clients, target: Target, node: str, deadline_s: float) -> None:
    _mark(node, "etcd-healthy")
    poll(lambda: etcd_verdict(cl, target), time.monotonic() + deadline_s, node, "etcd healthy",
         "check `talosctl etcd status` and `talosctl etcd members`; run again once every member is healthy")


@_t("osds-up")
def osds_up_task(cl: Clients, node: str, osds: list[int], deadline_s: float) -> None:
    _mark(node, "osds-up")
    assert cl.ceph is not None
    ceph = cl.ceph

    def check() -> Verdict:
        try:
            st = ceph.status()
        except CephError as e:
            return Verdict(False, f"Ceph not readable: {e}")
        if st.num_up_osds >= st.num_osds:
            return Verdict(True, f"all {st.num_osds} OSDs up")
        return Verdict(False, f"OSDs up {st.num_up_osds}/{st.num_osds} (waiting for {node}'s OSDs {osds})")

    poll(check, time.monotonic() + deadline_s, node, "OSDs up",
         f"check the OSD pods on {node} (`kubectl -n rook-ceph get pods -o wide`); noout stays set meanwhile")


@_t("ceph-clean")
def ceph_clean_task(cl: Clients, node: str, deadline_s: float, tolerated: list[str]) -> None:
    _mark(node, "ceph-clean")
    poll(lambda: ceph_clean_verdict(cl, frozenset(tolerated)), time.monotonic() + deadline_s, node, "Ceph clean",
         "wait for recovery (`ceph -s`) and run again: finished nodes are not repeated")


# --- results ----------------------------------------------------------------------------------


def node_rows(plan: TalosPlan | None, outcome: dict[str, tuple[str, float]], planned: bool) -> list[dict[str, Any]]:
    if plan is None:
        return []
    rows = []
    for s in plan.steps:
        if s.action == "skip":
            action, secs = "skipped", 0.0
        elif planned:
            action, secs = "would-upgrade", 0.0
        else:
            action, secs = outcome.get(s.hostname, ("not-started", 0.0))
        rows.append({"name": s.hostname, "from": s.current, "to": s.target, "action": action,
                     "seconds": round(secs, 3)})
        if not planned and _monitoring.current() is not None:
            rows[-1]["health"] = _monitoring.health_cell(s.hostname)  # the health queries after the node
    return rows


def result(status: str, target: str | None, nodes: list[dict[str, Any]], max_disrupted: int, noout: str,
           snapshot: str | None, error: str | None, plan: dict[str, Any] | None = None,
           lock: dict[str, Any] | None = None, silences: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The result of an upgrade run; `noout` is what the run left: untouched, unset or left-set; `silences`
    the Alertmanager silences it made ({id, node, state}: expired, or left to end by itself)."""
    return remember({"status": status, "target_version": target, "nodes": nodes, "max_disrupted": max_disrupted,
            "noout": noout, "etcd_snapshot": snapshot, "error": error, "plan": plan, "lock": lock,
            "silences": list(silences or [])})


def _table(rows: list[dict[str, Any]], key: str, description: str) -> None:
    from prefect.artifacts import create_table_artifact

    with contextlib.suppress(Exception):
        create_table_artifact(table=rows or [{"note": "nothing"}], key=key, description=description)


def _markdown_plan(plan: TalosPlan) -> str:
    lines = [f"### Talos upgrade of {plan.cluster} to {plan.target}", "", "| node | from | action | command |",
             "|---|---|---|---|"]
    for s in plan.steps:
        lines.append(f"| {s.hostname} | {s.current} | {s.action} | `{' '.join(s.argv) if s.argv else '-'}` |")
    return "\n".join(lines)


def window_deferral(window: MaintenanceWindow | None, run_now: bool, now: datetime | None = None) -> str | None:
    """Why the run must wait (the window is closed), or None to go ahead."""
    if window is None or run_now:
        return None
    w = window.window()
    now = now or datetime.now(UTC)
    if current_opening(w, now) is not None:
        return None
    opens = next_open(w, now)
    return (f"deferred: the maintenance window {w.describe()} is closed now; it next opens at "
            f"{opens.isoformat()}; pass run_now (--now) to run anyway")


def default_snapshot_dir() -> str:
    return str(Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "homelab" / "etcd-snapshots")


# --- the flow ---------------------------------------------------------------------------------


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"talos-upgrade {p.get('cluster') or 'default-cluster'}{' dry-run' if p.get('dry_run') else ''}"


@flow(name="talos-upgrade", flow_run_name=_run_name, log_prints=False, persist_result=False,
      validate_parameters=True)
def talos_upgrade(
    homelab: Annotated[str, Field(description="Name of the Homelab block to act on.")] = "default",
    cluster: Annotated[str | None, Field(description="Cluster to upgrade (default: the block's cluster, m720q).")] = None,
    to: Annotated[str | None, Field(description="Target Talos version (default: talosVersion of the cluster's config).")] = None,
    nodes: Annotated[list[str] | None, Field(description="Nodes to upgrade (default all: control planes first, in config order, then workers).")] = None,
    images: Annotated[dict[str, str] | None, Field(description="Installer image per node (default: talosImageURL, else the Image Factory URL of the node's schematic).")] = None,
    dry_run: Annotated[bool, Field(description="Only return the plan, with the talosctl commands; touch nothing.")] = False,
    require_approval: Annotated[bool, Field(description="Pause with the plan until someone approves it (homelab approve RUN_ID).")] = True,
    pause_seconds: Annotated[float, Field(description="Pause between nodes, in seconds.", ge=0)] = 0,
    allow_minor_skip: Annotated[bool, Field(description="Allow skipping a Talos minor version (not supported by Talos).")] = False,
    allow_downgrade: Annotated[bool, Field(description="Allow a downgrade.")] = False,
    window: Annotated[MaintenanceWindow | None, Field(description="Maintenance window; outside it the run is deferred.")] = None,
    run_now: Annotated[bool, Field(description="Run now even outside the maintenance window.")] = False,
    deadlines: Annotated[Deadlines, Field(description="Deadline of each step, in seconds.")] = Deadlines(),
    snapshot_dir: Annotated[str | None, Field(description="Where the etcd snapshot goes (default ~/.local/state/homelab/etcd-snapshots).")] = None,
    # Read where the gates run (flows._monitoring, from this run's parameters), like the hooks' block name.
    monitoring: Annotated[MonitoringGates | None, Field(description="This run's overrides of the Monitoring block's gates: allowed alerts, health queries, alert gate deadline, or off.")] = None,
) -> Any:
    """Upgrade Talos one node at a time, never losing etcd quorum or Ceph availability."""
    _mark("(flow)", "start")
    try:
        return _talos_upgrade(homelab, cluster, to, nodes, images, dry_run, require_approval, pause_seconds,
                              allow_minor_skip, allow_downgrade, window, run_now, deadlines, snapshot_dir)
    finally:
        _mark("(flow)", "end")


def _talos_upgrade(homelab: str, cluster: str | None, to: str | None, nodes: list[str] | None,
                   images: dict[str, str] | None, dry_run: bool, require_approval: bool, pause_seconds: float,
                   allow_minor_skip: bool, allow_downgrade: bool, window: MaintenanceWindow | None, run_now: bool,
                   deadlines: Deadlines, snapshot_dir: str | None) -> Any:
    deferred = deferred_result(window, run_now, dry_run, to)
    if deferred:
        return deferred
    with upgrade_target(homelab, cluster) as (block, target, cl):
        return _upgrade(cl, block, target, to, nodes, images, dry_run, require_approval, pause_seconds,
                        allow_minor_skip, allow_downgrade, deadlines, snapshot_dir or default_snapshot_dir())


def deferred_result(window: MaintenanceWindow | None, run_now: bool, dry_run: bool, to: str | None) -> Any:
    """The "deferred" result when the maintenance window is closed (a dry run is never deferred); the same
    work goes into the next opening (flows.window), and the result says when and where."""
    from flows import window as maintenance

    deferral = maintenance.defer(window.window() if window is not None else None, run_now, dry_run)
    if deferral is None:
        return None
    get_run_logger().warning(deferral.message)
    return {**result("deferred", to, [], 0, "untouched", None, deferral.message), **deferral.fields()}


@contextlib.contextmanager
def upgrade_target(homelab: str, cluster: str | None) -> Iterator[tuple[Any, Target, Clients]]:
    """The Homelab block, the cluster's desired state and its clients."""
    from blocks import load_homelab

    block = load_homelab(homelab)
    cluster = cluster or block.cluster
    target = load_target(block.gitops_tree(), cluster)
    with connect(block, cluster) as cl:
        yield block, target, cl


def _plan(cl: Clients, target: Target, to: str | None, nodes: list[str] | None, images: dict[str, str] | None,
          allow_minor_skip: bool, allow_downgrade: bool, deadlines: Deadlines) -> TalosPlan:
    return plan_talos_upgrade(target.config, observe_versions(cl, target), to, nodes, allow_minor_skip,
                              allow_downgrade, images, talosctl="talosctl", timeout_s=int(deadlines.upgrade))


def _refused(to: str | None, e: PlanRefused) -> Any:
    msg = f"plan refused: {e}"
    return Failed(message=msg, data=result("failed", to, [], 0, "untouched", None, msg))


def _upgrade(cl: Clients, block: Any, target: Target, to: str | None, nodes: list[str] | None,
             images: dict[str, str] | None, dry_run: bool, require_approval: bool, pause_seconds: float,
             allow_minor_skip: bool, allow_downgrade: bool, deadlines: Deadlines, snapshot_dir: str) -> Any:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    log = get_run_logger()
    plan: TalosPlan | None = None
    if dry_run or require_approval:
        try:
            plan = _plan(cl, target, to, nodes, images, allow_minor_skip, allow_downgrade, deadlines)
        except PlanRefused as e:
            return _refused(to, e)
        _table(plan.to_rows(), f"talos-upgrade-plan-{target.name}", f"Plan: Talos {plan.target} on {target.name}")
        if dry_run:
            return result("planned", plan.target, node_rows(plan, {}, True), 0, "untouched", None, None,
                          {**plan.to_dict(), "monitoring": _monitoring.plan_line(block, cl.cluster, cl.ceph is not None)})
        if not plan.to_upgrade:
            return result("completed", plan.target, node_rows(plan, {}, False), 0, "untouched", None, None)
        try:
            preflight_task(cl, target, [s.hostname for s in plan.to_upgrade], node="(all nodes)")
        except StepFailed as e:
            return Failed(message=str(e), data=result("failed", plan.target, node_rows(plan, {}, False), 0,
                                                      "untouched", None, str(e)))
        from flows.approval import request_approval

        log.warning("waiting for approval of the plan: homelab approve <this flow run's id> (or Resume in the UI)")
        answer = request_approval(_markdown_plan(plan) + "\n\n" + _monitoring.plan_line(block, cl.cluster,
                                                                                          cl.ceph is not None),
                                  timeout_s=int(deadlines.approval))
        if not answer.approved:
            msg = f"the plan was rejected{': ' + answer.comment if answer.comment else ''}; nothing was changed"
            return Failed(message=msg, data=result("failed", plan.target, node_rows(plan, {}, False), 0, "untouched",
                                                   None, msg))

    outcome: dict[str, tuple[str, float]] = {}
    flag = {"noout": "untouched"}
    snapshot: str | None = None
    lock: DisruptionLock | None = None
    watch = DisruptionWatch(cl.new_kube if not cl.in_cluster else Kube.in_cluster).start()
    progress = None
    with contextlib.suppress(Exception):
        progress = create_progress_artifact(0.0, key=f"talos-upgrade-progress-{target.name}",
                                            description=f"Nodes of {target.name} upgraded")
    current = "(all nodes)"
    try:
        with disruption_lock(deadlines.lock, log) as lock:
            # Read the versions under the lock: another run may have finished nodes meanwhile.
            try:
                plan = _plan(cl, target, to, nodes, images, allow_minor_skip, allow_downgrade, deadlines)
            except PlanRefused as e:
                watch.stop()
                return _refused(to, e)
            if not require_approval:
                _table(plan.to_rows(), f"talos-upgrade-plan-{target.name}",
                       f"Plan: Talos {plan.target} on {target.name}")
            todo = list(plan.to_upgrade)
            if todo:
                preflight_task(cl, target, [s.hostname for s in todo], node="(all nodes)")
            if any(s.control_plane for s in todo):
                first_cp = next(s for s in todo if s.control_plane)
                snap_from = next((h for h, _ in target.control_planes if h != first_cp.hostname), first_cp.hostname)
                snapshot = snapshot_task(cl, target, snapshot_dir, node=snap_from)
            done = 0
            for s in plan.steps:
                if s.action == "skip":
                    done += 1
                    continue
                current = s.hostname
                t0 = time.monotonic()
                outcome[s.hostname] = ("failed", 0.0)
                try:
                    _one_node(cl, block, target, plan, s, deadlines, watch, flag, lock)
                finally:
                    outcome[s.hostname] = (outcome[s.hostname][0], time.monotonic() - t0)
                outcome[s.hostname] = ("upgraded", time.monotonic() - t0)
                current = "(all nodes)"
                done += 1
                if progress is not None:
                    with contextlib.suppress(Exception):
                        update_progress_artifact(cast(UUID, progress), 100.0 * done / len(plan.steps))
                if pause_seconds and any(x.action == "upgrade" and x.hostname not in outcome for x in plan.steps):
                    time.sleep(pause_seconds)  # pacing chosen by the operator, not a wait for a condition
    except BaseException as e:  # a refused gate, a lost lock, a cancel, SIGTERM, a crash: one ending for all
        return _ended_early(cl, target, plan, outcome, flag["noout"], snapshot, watch, lock, e, current, log)
    watch.stop()
    assert plan is not None
    rows = node_rows(plan, outcome, False)
    _table(rows, f"talos-upgrade-outcome-{target.name}", "Outcome")
    return result("completed", plan.target, rows, watch.max_disrupted, flag["noout"], snapshot, None,
                  lock=lock.record() if lock else None, silences=_monitoring.end_of_run(log))


def _ended_early(cl: Clients, target: Target, plan: TalosPlan | None, outcome: dict[str, tuple[str, float]],
                 noout: str, snapshot: str | None, watch: DisruptionWatch, lock: DisruptionLock | None,
                 error: BaseException, node: str, log: Any) -> Any:
    """The ending of a run that did not finish: the noout rule, the outcome artifact, a final state the
    notifications cover (Failed or Cancelled) and the result dict, whatever stopped it."""
    from prefect.states import Cancelled

    watch.stop()
    status = interrupted_status(error)
    failure = error if isinstance(error, StepFailed) else None
    if failure is None:
        where = f"{target.name} at {node}"
        log.error(describe_interruption(error, where))
        failure = RunStopped(node, "interrupted", describe_interruption(error, where),
                             "check the node and `ceph -s`, then run again: finished nodes are not repeated")
    noout = _after_failure(cl, target, noout, failure, log)
    msg = str(failure) if noout != "left-set" else (
        f"{failure}. noout is left set on purpose because not every node is up; "
        f"`ceph osd unset noout` once they are")
    rows = node_rows(plan, outcome, False)
    _table(rows, f"talos-upgrade-outcome-{target.name}", f"Outcome ({status})")
    # Whatever stopped the run, the silences it made end now; one that cannot be expired ends by itself.
    silences = _monitoring.end_of_run(log)
    if any(x["state"] == "left" for x in silences):
        msg += "; a silence could not be expired and ends by itself (see the result's silences)"
    data = result(status, plan.target if plan else None, rows, watch.max_disrupted, noout, snapshot, msg,
                  lock=lock.record() if lock else None, silences=silences)
    return Cancelled(message=msg, data=data) if status == "cancelled" else Failed(message=msg, data=data)


def _one_node(cl: Clients, block: Any, target: Target, plan: TalosPlan, s: Any, deadlines: Deadlines,
              watch: DisruptionWatch, flag: dict[str, str], lock: DisruptionLock) -> None:
    """One node from ok-to-stop to its post-hook; ``flag["noout"]`` follows what this run did to noout."""
    node, ip = s.hostname, s.ip
    checkpoint(lock, node, f"the gates of {node}")
    _monitoring.before_node(block, cl.cluster, cl.ceph is not None, node, _mark)
    gate = nodes_verdict(cl, target, watch)
    if not gate.ok:
        raise StepFailed(node, "all nodes Ready", gate.reason, "nothing was changed on this node; run again once "
                         "every node is Ready and schedulable")
    v = self_node_gate(os.environ.get("NODE_NAME"), node)
    if not v.ok:
        raise StepFailed(node, "not the node this run executes on", v.reason, "run the flow from another node")
    _monitoring.silence_node(block, cl.cluster, cl.ceph is not None, node, ip, _monitoring.node_deadline_s(deadlines),
                             _mark)
    osds: list[int] = []
    if cl.ceph is not None:
        osds = ok_to_stop_task(cl, node=node)
        checkpoint(lock, node, f"setting noout for {node}")
        set_noout_task(cl, node=node)
        flag["noout"] = "set"
    if block.pre_node_hook:
        checkpoint(lock, node, f"the pre-hook of {node}")
        pre_hook_task(block.pre_node_hook, node=node, ip=ip, timeout_s=deadlines.hook)
    with watch.disrupting(node):
        upgrade_task(cl, list(s.argv), node=node, ip=ip, timeout_s=deadlines.upgrade, target=plan.target,
                     before=s.current, lock=lock)
        verify_version_task(cl, node=node, ip=ip, target=plan.target, deadline_s=deadlines.node_ready)
        wait_ready_task(cl, node=node, ip=ip, target=plan.target, deadline_s=deadlines.node_ready)
    etcd_healthy_task(cl, target, node=node, deadline_s=deadlines.etcd)
    if cl.ceph is not None:
        osds_up_task(cl, node=node, osds=osds, deadline_s=deadlines.osds_up)
        try:
            unset_noout_task(cl, node=node)
        except CephError as e:
            raise StepFailed(node, "unset noout", str(e), "unset it by hand: ceph osd unset noout") from e
        flag["noout"] = "unset"
        ceph_clean_task(cl, node=node, deadline_s=deadlines.ceph_clean, tolerated=[])
    _monitoring.node_passed(node, _mark)
    if block.post_node_hook:
        checkpoint(lock, node, f"the post-hook of {node}")
        post_hook_task(block.post_node_hook, node=node, ip=ip, timeout_s=deadlines.hook)
    _monitoring.after_node(node, _mark)
    _mark(node, "done")


def _after_failure(cl: Clients, target: Target, noout: str, error: StepFailed, log: Any) -> str:
    """Unset the noout this run set only when every node is up; otherwise leave it and say so."""
    if noout != "set" or cl.ceph is None:
        return noout
    gate = nodes_verdict(cl, target)
    try:
        st = cl.ceph.status()
        osds_ok = st.num_up_osds >= st.num_osds
    except CephError:
        osds_ok = False
    if gate.ok and osds_ok:
        try:
            cl.ceph.unset_noout()
            return "unset"
        except CephError as e:
            log.error(f"unsetting noout after the failure failed: {e}")
            return "left-set"
    # Its owner record stays with it: a rerun recognises the flag as its own and carries on.
    log.error(f"noout left set on purpose: {gate.reason if not gate.ok else 'not every OSD is up'}; it stays "
              f"recorded as this run's (`ceph config-key get {ceph_gate.NOOUT_OWNER_KEY}`), so a rerun carries "
              f"on; to end it by hand: `ceph osd unset noout && ceph config-key rm {ceph_gate.NOOUT_OWNER_KEY}`")
    return "left-set"


# --- command line -----------------------------------------------------------------------------


def summary(res: dict[str, Any]) -> str:
    lines = [f"Talos upgrade to {res.get('target_version')}: {res['status']}"]
    for n in res.get("nodes") or []:
        lines.append(f"  {n['name']:<20} {n['from']} -> {n['to']}  {n['action']}  {n['seconds']:.1f}s")
    if res.get("plan"):
        for s in res["plan"]["steps"]:
            if s["argv"]:
                lines.append("  $ " + shlex.join(s["argv"]))
    lines.append(f"  max disrupted at once: {res.get('max_disrupted')}; noout: {res.get('noout')}; "
                 f"etcd snapshot: {res.get('etcd_snapshot') or '-'}")
    if res.get("silences"):
        states = sorted({x["state"] for x in res["silences"]})
        lines.append(f"  Alertmanager silences: {len(res['silences'])} made, {', '.join(states)}")
    if res.get("error"):
        lines.append(f"  {res['error']}")
    return "\n".join(lines)


def failed_result(error: str) -> dict[str, Any]:
    """The result of a run that ended without its own result dict."""
    return result("failed", None, [], 0, "untouched", None, error)


def state_result(state: Any) -> dict[str, Any]:
    """The result dict of a finished run (Talos or Kubernetes upgrade), whether it completed or failed."""
    from flows import _runtime

    return _runtime.result_of(state, failed_result)


def build_window(window: str | None, window_hours: float, tz: str) -> MaintenanceWindow | None:
    if not window:
        return None
    try:
        Window(window, window_hours, tz)
    except WindowError as e:
        import typer

        raise typer.BadParameter(str(e), param_hint="--window") from None
    return MaintenanceWindow(cron=window, hours=window_hours, timezone=tz)


def upgrade_cli(run: Callable[..., Any], params: dict[str, Any], render: Callable[[dict[str, Any]], str], *,
                question: str, homelab: str, window: str | None, window_hours: float, tz: str, dry_run: bool,
                yes: bool, twin: bool, twin_state: str, fault: list[str] | None, json_output: bool) -> None:
    """`homelab upgrade talos|kubernetes`: `run` (the upgrade flow) with `params` on the target homelab,
    its result printed by `render` (or as JSON).
    Without --yes and without a Prefect server to hold the approval form, the plan (a dry run) is shown
    and the question asked on the terminal first. Exit 0 completed/planned/deferred, 1 failed or not
    approved, 2 bad usage or configuration."""
    from flows import _runtime

    _runtime.quiet_prefect()
    mw = build_window(window, window_hours, tz)

    def go() -> None:
        with _runtime.target(homelab, twin, twin_state, list(fault or [])) as block_name:
            common = dict(params, homelab=block_name, window=mw)
            approval = not yes
            if not dry_run and not yes and not _runtime.prefect_server_configured():
                import typer

                planned = state_result(run(**common, dry_run=True, return_state=True))
                if planned["status"] != "planned":
                    _runtime.finish(planned, json_output, render, ok=("completed", "deferred"))
                typer.echo(render(planned), err=True)
                if not typer.confirm(question, err=True):
                    typer.echo("not approved; nothing was changed", err=True)
                    raise typer.Exit(1)
                approval = False
            try:
                state = run(**common, dry_run=dry_run, require_approval=approval, return_state=True)
                res = state_result(state)
            except (Exception, TerminationSignal, KeyboardInterrupt) as e:
                if isinstance(e, ConfigError):
                    raise
                # The run could not report its end to the server (or was stopped outside its own body):
                # what the flow last concluded is still the truth about noout.
                res = _runtime.interrupted_result(e, last_result(), failed_result)
            _runtime.finish(res, json_output, render, ok=("completed", "planned", "deferred"))

    from prefect.exceptions import TerminationSignal

    from homelab.problems import ConfigError

    with _runtime.sigterm_raises():
        _runtime.config_errors_exit_2(go)

