"""The steps of the upgrades and the per-node sequence: what both upgrade flows run.

`upgrade_node` takes one node from its gates to its post-hook, one step after the other; each step is a
Prefect task (what the UI shows) or a gate function, so a new gate is one more call in that sequence.
Every wait is a watch or a tight poll under a monotonic deadline; every failure is a StepFailed naming the
node, the gate, what was seen last and the next step, right for real Talos.

What the node really did decides, never talosctl's exit code alone: a failed or timed-out `talosctl upgrade`
is followed by a look at the node (version, machine stage, boot ID, etcd, Ready, cordon), judged by
homelab.upgrade.judge_upgrade into refused / stuck mid-sequence / fell back / finished late.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import _monitoring
from flows._guard import StepFailed, checkpoint
from flows._upgrade import Deadlines, Target, mark, poll
from homelab import ceph_gate
from homelab.config import TalConfig
from homelab.gates import NodeView, Verdict
from homelab.upgrade import (
    NodeSeen,
    NodeStep,
    RunningImage,
    TalosPlan,
    UpgradeEnd,
    etcd_gate,
    flux_gate,
    judge_upgrade,
    nodes_gate,
    rollback_step,
    self_node_gate,
    upgrade_next_step,
)
from homelab.versions import ImageFactory
from tasks import image_factory
from tasks.ceph import CephError
from tasks.connect import Clients
from tasks.kube import KubeError, ready_and_schedulable
from tasks.kube_watch import DisruptionWatch
from tasks.lock import DisruptionLock
from tasks.talos import TalosAborted, TalosError

KS_GROUP = "kustomize.toolkit.fluxcd.io"
# How long a node back from its upgrade may stay cordoned by Talos before the flow lifts the cordon itself:
# Talos lifts its own as soon as machined reaches the API (node_apply.go ApplyCordoned). A module knob.
TALOS_UNCORDON_GRACE_S = 30.0
_mark = mark
T = TypeVar("T")


def _both(first: Callable[[], T], second: Callable[[], Any]) -> tuple[T, Any]:
    """Two reads at once (each is a talosctl process or an API call; the gates are waited on between nodes)."""
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(second)
        return first(), later.result()


# --- reading the cluster ----------------------------------------------------------------------


def observe_versions(cl: Clients, target: Target, unanswered: dict[str, str] | None = None) -> dict[str, str]:
    """hostname -> Talos tag, for every node that answers. One talosctl call: the nodes missing from its reply
    did not answer (their errors into `unanswered`). Only when the call fails as a whole (the endpoint itself
    down) is each node asked on its own."""
    hosts = {ip: host for host, ip, _ in target.hosts}
    deadline = time.monotonic() + 30
    try:
        stdout, errors = cl.talos.run_nodes(["version", "--nodes", ",".join(hosts), "--json"], deadline=deadline)
        from tasks.talos import parse_version_output

        replies = parse_version_output(stdout, list(hosts))
        if unanswered is not None:
            unanswered.update({hosts.get(ip, ip): err for ip, err in errors.items()})
        return {host: replies[ip] for ip, host in hosts.items() if ip in replies}
    except TalosError:
        pass
    out: dict[str, str] = {}
    for ip, host in hosts.items():
        try:
            v = cl.talos.version([ip], deadline=deadline)
        except TalosError as e:
            if unanswered is not None:
                unanswered[host] = str(e)
            continue
        if ip in v:
            out[host] = v[ip]
        elif len(v) == 1:
            out[host] = next(iter(v.values()))
    return out


def observe_running(cl: Clients, target: Target) -> dict[str, RunningImage]:
    """hostname -> the schematic and extensions it runs, for every node that answered `get extensions`."""
    ips = {ip: host for host, ip, _ in target.hosts}
    try:
        running = cl.talos.running_images(list(ips), deadline=time.monotonic() + 30)
    except TalosError:
        return {}
    return {ips.get(node, node): img for node, img in running.items() if ips.get(node, node) in ips.values()}


def observe_kubelets(cl: Clients) -> dict[str, str]:
    """node -> kubelet version (a KubeError when the API does not answer within its deadline)."""
    return {n.name: n.kubelet_version for n in cl.kube.nodes(timeout_s=15) if n.kubelet_version}


def observe_node(cl: Clients, node: str, ip: str, control_plane: bool, deadline: float) -> NodeSeen:
    """The node through its Talos API (version, machine stage, boot ID, etcd) and its Node, all at once."""

    def talos_side() -> NodeSeen:
        try:
            with ThreadPoolExecutor(4) as pool:
                version = pool.submit(cl.talos.version, [ip], deadline)
                status = pool.submit(cl.talos.machinestatus, ip, deadline)
                boot = pool.submit(cl.talos.boot_id, ip, deadline)
                etcd = pool.submit(cl.talos.etcd_state, ip, deadline) if control_plane else None
                v = version.result()
                return NodeSeen(True, v.get(ip) or next(iter(v.values()), None), status.result().stage,
                                boot.result(), etcd=etcd.result() if etcd is not None else None)
        except TalosError as e:
            return NodeSeen(False, error=str(e))

    def kube_side() -> NodeView | None:
        try:
            return cl.kube.node(node, timeout_s=max(1.0, min(5.0, deadline - time.monotonic())))
        except KubeError:
            return None

    seen, view = _both(talos_side, kube_side)
    if view is None:
        return seen
    return NodeSeen(seen.reachable, seen.version, seen.stage, seen.boot_id, view.ready, view.unschedulable,
                    seen.etcd, seen.error)


# --- gate verdicts ----------------------------------------------------------------------------


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
    return _nodes_seen(cl, target, watch)[1]


def _nodes_seen(cl: Clients, target: Target, watch: DisruptionWatch | None = None) -> tuple[list[NodeView], Verdict]:
    try:
        nodes = cl.kube.nodes(timeout_s=10)
    except KubeError as e:
        return [], Verdict(False, f"nodes not readable: {e}")
    if watch is not None:
        watch.observe(nodes)
    return nodes, nodes_gate(nodes, [h for h, _, _ in target.hosts])


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


def snapshot_dir_problem(directory: Path) -> str | None:
    """In a pod the snapshots must go to a volume: the container's own filesystem goes with the pod. A
    directory whose mount point is the root of a pod's filesystem is that container layer."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    p = directory.resolve()
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    if p == Path("/"):
        return (f"{directory} is on the pod's own filesystem, which goes with the pod; mount a volume there "
                f"(or set HOMELAB_SNAPSHOT_DIR to one) and run again")
    return None


def keep_snapshot(path: Path, directory: Path, prefix: str, keep: int) -> list[Path]:
    """The snapshot readable by this user only, and only the newest `keep` of the cluster's kept: etcd
    snapshots hold every Secret of the cluster. The removed ones are returned."""
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    ours = sorted((p for p in directory.glob(f"{prefix}*.db") if p.is_file()),
                  key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    removed = []
    for old in ours[max(1, keep):]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
            removed.append(old)
    return removed


@_t("etcd-snapshot")
def snapshot_task(cl: Clients, target: Target, directory: str, node: str, keep: int = 10) -> str:
    _mark(node, "etcd-snapshot")
    folder = Path(directory).expanduser()
    problem = snapshot_dir_problem(folder)
    if problem:
        raise StepFailed(node, "etcd snapshot", problem, "nothing was changed; fix the directory and run again")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = f"{target.name}-etcd-"
    path = folder / f"{prefix}{stamp}.db"
    ip = target.ip(node)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(stat.S_IRWXU)
        cl.talos.etcd_snapshot(path, ip, deadline=time.monotonic() + 300)
        removed = keep_snapshot(path, folder, prefix, keep)
    except TalosError as e:
        raise StepFailed(node, "etcd snapshot", str(e), "check free space and etcd on the node, then run again") from e
    except OSError as e:
        raise StepFailed(node, "etcd snapshot", f"{folder}: {e}", "make the directory writable by this user "
                         "(or pass another snapshot_dir) and run again; nothing was changed") from e
    if removed:
        get_run_logger().info(f"kept the newest {keep} etcd snapshots of {target.name} in {folder}; removed "
                              f"{', '.join(p.name for p in removed)}")
    return str(path)


def factory_of(target: Target) -> ImageFactory:
    return target.config.factory()


@_t("register-schematics")
def register_schematics_task(target: Target, plan: TalosPlan, node: str, deadline_s: float = 60.0) -> None:
    """Before the first node: every schematic the plan's installer images name is known to the Image Factory
    they come from — the ones from talconfig registered (POST, as talhelper does), any other ID looked up — so
    an unregistered schematic stops the run before anything changed (the node would refuse the image)."""
    from homelab.versions import schematic_id

    _mark(node, "register-schematics")
    factory = factory_of(target)
    config = target.config
    deadline = time.monotonic() + deadline_s
    done: set[str] = set()
    for s in plan.to_upgrade:
        if s.schematic is None or s.schematic in done:
            continue
        if isinstance(config, TalConfig):
            tn = config.node(s.hostname)
            wanted = config.schematic_for(tn) if tn is not None else None
        else:
            wanted = config.cluster.schematic
        try:
            if wanted is not None and schematic_id(wanted) == s.schematic:
                got = image_factory.register(factory, wanted, deadline)
                if got != s.schematic:
                    raise StepFailed(s.hostname, "register schematic", f"{factory.schematics_url} gave the "
                                     f"schematic of {s.hostname} the ID {got}, not {s.schematic} as computed here",
                                     "the factory marshals schematics differently: set the node's image in the "
                                     "images parameter (or talosImageURL) to the ID it gives; nothing was changed")
            elif not image_factory.known(factory, s.schematic, deadline):
                raise StepFailed(s.hostname, "register schematic", f"{factory.schematics_url}/{s.schematic}: "
                                 f"schematic not found (the installer image {s.image} cannot be built)",
                                 "register the schematic with the factory (POST it to "
                                 f"{factory.schematics_url}) or fix the image, then run again; nothing was changed")
        except image_factory.FactoryError as e:
            raise StepFailed(s.hostname, "register schematic", str(e), "check imageFactory in talconfig.yaml "
                             "and that the factory answers from here, then run again; nothing was changed") from e
        done.add(s.schematic)
    if done:
        get_run_logger().info(f"schematics known to {factory.schematics_url}: {', '.join(sorted(done))}")


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

    def read_labels() -> dict[str, str]:
        # Rook names a node's CRUSH host after its kubernetes.io/hostname label (ceph_gate.crush_host_name).
        items, _ = cl.kube.list_objects("", "v1", "nodes", timeout_s=10)
        return {str(o["metadata"]["name"]): str((o["metadata"].get("labels") or {}).get("kubernetes.io/hostname", ""))
                for o in items}

    def waiting(v: Verdict) -> None:
        log.warning(f"{node}: Ceph cannot answer yet, asking again: {v.reason}")

    with ThreadPoolExecutor(2) as pool:
        read = pool.submit(read_labels)  # the Nodes and Ceph's first answers, all at once

        def labels() -> dict[str, str]:
            try:
                return read.result()
            except KubeError as e:
                raise StepFailed(node, "ceph ok-to-stop", f"Nodes not readable: {e}", "check the Kubernetes "
                                 "API and run again; nothing was changed on this node") from e

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


def _log_talosctl(stderr: list[str], node: str) -> None:
    """talosctl's own report (with --debug the node's console when it failed) into the run's logs."""
    text = "".join(stderr).strip()
    if text:
        get_run_logger().info(f"{node}: talosctl said:\n{text}")


def judge_after(cl: Clients, node: str, ip: str, control_plane: bool, before: NodeSeen, target: str,
                deadline: float) -> tuple[UpgradeEnd, NodeSeen]:
    """How the upgrade really ended. A node that does not answer yet, or still runs the upgrade sequence, is
    waited for until the deadline: a timed-out talosctl may leave it finishing (siderolabs/talos #11830)."""
    while True:
        seen = observe_node(cl, node, ip, control_plane, deadline)
        end = judge_upgrade(before, seen, target)
        in_progress = end is UpgradeEnd.NOT_BACK or (seen.stage == "upgrading" and end is UpgradeEnd.STUCK)
        if not in_progress or time.monotonic() >= deadline:
            return end, seen
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


@_t("upgrade")
def upgrade_task(cl: Clients, argv: list[str], node: str, ip: str, timeout_s: float, target: str,
                 before: NodeSeen, lock: DisruptionLock, control_plane: bool = True, debug: bool = False,
                 back_s: float = 900.0) -> str:
    """`talosctl upgrade --wait`; when it fails or times out, what the node did decides: finished late at the
    target goes on (returns "finished-late"), every other ending stops the run with its own next step."""
    _mark(node, "upgrade")
    checkpoint(lock, node, f"`talosctl upgrade` of {node}")
    stderr: list[str] = []
    try:
        # Killed the moment the lock's ownership runs out: the call must not outlive the lease.
        cl.talos.run(argv[1:], timeout_s=timeout_s + 30, abort=lock.abort, stderr_sink=stderr)
        if debug:
            _log_talosctl(stderr, node)
        return "done"
    except TalosAborted as e:
        raise StepFailed(node, "lock lost", f"{e}: {lock.lost_reason}",
                         f"the node may still be upgrading: watch `talosctl -n {ip} dmesg -f` until it is back, "
                         f"make sure the worker reaches the Prefect server, then run again") from e
    except TalosError as e:
        _log_talosctl(stderr, node)
        end, seen = judge_after(cl, node, ip, control_plane, before, target, time.monotonic() + back_s)
        if end is UpgradeEnd.FINISHED_LATE:
            get_run_logger().warning(f"{node}: `talosctl upgrade` ended with an error ({e}) but the node finished "
                                     f"the upgrade: {seen.describe()}; going on")
            return "finished-late"
        raise StepFailed(node, "talosctl upgrade",
                         f"{e}; then {node} was {end.value}: {seen.describe()}",
                         upgrade_next_step(end, node, ip, before.version or "?", target, seen)) from e


@_t("verify-version")
def verify_version_task(cl: Clients, node: str, ip: str, target: str, deadline_s: float,
                        before: NodeSeen | None = None, control_plane: bool = True,
                        step: NodeStep | None = None) -> None:
    """The node runs the target (talosctl version, then its Node's osImage) and, read at the same time, the
    schematic of its installer image (`get extensions`)."""
    _mark(node, "verify-version")
    with ThreadPoolExecutor(1) as pool:
        schematic = pool.submit(_running_schematic, cl, ip, deadline_s) if step and step.schematic else None
        _verify_version(cl, node, ip, target, deadline_s, before, control_plane)
        if schematic is not None and step is not None:
            _check_schematic(node, ip, step, schematic.result())


def _running_schematic(cl: Clients, ip: str, deadline_s: float) -> RunningImage | TalosError:
    """What the node runs, read once it answers its Talos API again (or the last error)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            running = cl.talos.running_images([ip], deadline=deadline)
            return running.get(ip) or next(iter(running.values()), RunningImage(None))
        except TalosError as e:
            if not e.retryable or time.monotonic() >= deadline:
                return e
            time.sleep(0.25)


def _check_schematic(node: str, ip: str, step: NodeStep, now: RunningImage | TalosError) -> None:
    if isinstance(now, TalosError):
        raise StepFailed(node, "verify schematic", str(now), f"check `talosctl -n {ip} get extensions`") from now
    if (now.schematic or "") != step.schematic:
        raise StepFailed(node, "verify schematic", f"{node} runs {now.describe()}, not schematic {step.schematic} of "
                         f"{step.image}", f"the new image did not take — a node that booted it and fell back "
                         f"runs its old schematic, and `talosctl rollback` would boot the failed image again: read "
                         f"`talosctl -n {ip} dmesg`, fix the image and run again")


def _verify_version(cl: Clients, node: str, ip: str, target: str, deadline_s: float, before: NodeSeen | None,
                    control_plane: bool) -> None:
    deadline = time.monotonic() + deadline_s
    seen = "no answer"
    while True:
        try:
            versions = cl.talos.version([ip], deadline=deadline)
            seen = versions.get(ip) or next(iter(versions.values()), "no version")
            if seen == target:
                break
            after = observe_node(cl, node, ip, control_plane, deadline)
            end = judge_upgrade(before, after, target) if before is not None else UpgradeEnd.STUCK
            if end is UpgradeEnd.FELL_BACK:
                raise StepFailed(node, "verify version", f"talosctl version reports {seen}, expected {target}: "
                                 f"{node} was {end.value} ({after.describe()})",
                                 upgrade_next_step(end, node, ip, (before.version if before else None) or seen, target,
                                                   after))
            raise StepFailed(node, "verify version", f"talosctl version reports {seen}, expected {target} "
                             f"({after.describe()})",
                             f"the upgrade did not take; read `talosctl -n {ip} dmesg` and run again")
        except TalosError as e:
            seen = str(e)
            if not e.retryable or time.monotonic() >= deadline:
                raise StepFailed(node, "verify version", seen, f"check `talosctl -n {ip} version`") from e
            time.sleep(0.25)
    try:
        cl.kube.wait_node(node, lambda v: v.talos_version == target, deadline, tolerate_unavailable=True,
                          what=f"osImage Talos ({target})")
    except KubeError as e:
        raise StepFailed(node, "verify version (Node osImage)", str(e),
                         f"{node} runs {target} but its kubelet did not report it: check `talosctl -n {ip} logs "
                         f"kubelet`; if {target} is at fault, `{rollback_step(ip)}` boots the previous image") from e


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
    if ready_and_schedulable(view):
        return
    if view.talos_cordoned:
        # Talos's own cordon: Talos lifts it (and its mark) once machined reaches the API; wait a little for that.
        grace = min(TALOS_UNCORDON_GRACE_S, max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(KubeError):
            view = cl.kube.wait_node(node, ready_and_schedulable, time.monotonic() + grace,
                                     tolerate_unavailable=True, what="Talos's own uncordon")
        if ready_and_schedulable(view):
            return
    try:
        # The mark goes with the cordon (tasks/kube.py uncordon): none is left for Talos to act on later.
        cl.kube.uncordon(node, timeout_s=max(1.0, deadline - time.monotonic()))
    except KubeError as e:
        raise StepFailed(node, "node schedulable", str(e), f"kubectl uncordon {node}, then run again") from e


@_t("etcd-healthy")
def etcd_healthy_task(cl: Clients, target: Target, node: str, deadline_s: float) -> None:
    _mark(node, "etcd-healthy")
    poll(lambda: etcd_verdict(cl, target), time.monotonic() + deadline_s, node, "etcd healthy",
         "check `talosctl etcd status` and `talosctl etcd members`; run again once every member is healthy")


def _health_last_seen(stderr: str, error: str) -> str:
    """talosctl health's last complaint of each check that did not pass, and its final error."""
    waiting: dict[str, str] = {}
    for line in stderr.splitlines():
        if line.startswith("waiting for ") and ": " in line:
            what, _, why = line[len("waiting for "):].partition(": ")
            if why not in ("...", "OK", "SKIP"):
                waiting[what] = why
            elif why in ("OK", "SKIP"):
                waiting.pop(what, None)
    parts = [f"{what}: {why}" for what, why in waiting.items()]
    return "; ".join(parts + [error]) if parts else error


@_t("talos-health")
def health_task(cl: Clients, target: Target, node: str, ip: str, deadline_s: float,
                lock: DisruptionLock | None = None) -> None:
    """`talosctl health` once the node is back: etcd, apid, kubelet, boot finished, the control-plane static
    pods and components, every node Ready and schedulable, CoreDNS (talos pkg/cluster/check/default.go)."""
    _mark(node, "talos-health")
    cps = [i for _, i in target.control_planes]
    workers = [i for _, i in target.workers]
    # Run on the node just upgraded when it is a control plane: its own view is the one that must be whole.
    on = [ip] + [i for i in cps if i != ip] if ip in cps else cps
    stderr: list[str] = []
    try:
        wait = max(1, int(deadline_s))
        args = ["health", "--nodes", on[0], "--control-plane-nodes", ",".join(cps)]
        if workers:
            args += ["--worker-nodes", ",".join(workers)]
        args += ["--wait-timeout", f"{wait}s"]
        # A long wait: it ends with the lock's ownership like every long talosctl call of the run.
        cl.talos.run(args, timeout_s=wait + 30, stderr_sink=stderr, abort=lock.abort if lock else None)
    except TalosAborted as e:
        raise StepFailed(node, "lock lost", f"{e}: {lock.lost_reason if lock else ''}",
                         "make sure the worker reaches the Prefect server, then run again: finished nodes are not "
                         "repeated") from e
    except TalosError as e:
        raise StepFailed(node, "talosctl health", _health_last_seen("".join(stderr), str(e)),
                         f"look at what it names (`{shlex.join(['talosctl', '-n', on[0], 'health'])}`, "
                         f"`talosctl -n {ip} logs kubelet`, `talosctl -n {ip} containers -k`); run again once it "
                         f"passes: finished nodes are not repeated") from e


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


# --- the per-node sequence --------------------------------------------------------------------


@dataclass
class NodeRun:
    """What the steps of one run share: its clients, plan and deadlines, the watcher, the lock, and what it did
    to noout (`flag["noout"]`: untouched, set, unset)."""

    cl: Clients
    block: Any
    target: Target
    plan: TalosPlan
    deadlines: Deadlines
    watch: DisruptionWatch
    flag: dict[str, str]
    lock: DisruptionLock
    debug: bool = False
    gates: dict[str, list[str]] = field(default_factory=dict)  # per node, the gates it passed, in order

    def passed(self, node: str, *gates: str) -> None:
        self.gates.setdefault(node, []).extend(gates)


def gates_before(run: NodeRun, node: str) -> list[NodeView]:
    """Right before the node (after any pause): every node Ready and schedulable, every etcd member healthy,
    and not the node this run executes on. Nothing has been changed on the node yet. The Nodes as read."""
    cl, target = run.cl, run.target
    (views, nodes), etcd = _both(lambda: _nodes_seen(cl, target, run.watch), lambda: etcd_verdict(cl, target))
    if not nodes.ok:
        raise StepFailed(node, "all nodes Ready", nodes.reason, "nothing was changed on this node; run again once "
                         "every node is Ready and schedulable")
    if not etcd.ok:
        raise StepFailed(node, "etcd healthy before the node", etcd.reason,
                         "nothing was changed on this node; check `talosctl etcd status` and `talosctl etcd members` "
                         "and run again once every member is healthy")
    v = self_node_gate(os.environ.get("NODE_NAME"), node)
    if not v.ok:
        raise StepFailed(node, "not the node this run executes on", v.reason, "run the flow from another node")
    return views


def seen_before(run: NodeRun, s: NodeStep, views: list[NodeView]) -> NodeSeen:
    """The node as the upgrade starts: its version from the plan, its boot ID from its Node as the gates read
    it (the kubelet posts the kernel's), so that what it does afterwards can be told apart."""
    boot = next((v.boot_id for v in views if v.name == s.hostname), "")
    if not boot:
        with contextlib.suppress(TalosError):
            boot = run.cl.talos.boot_id(s.ip, deadline=time.monotonic() + 15)
    return NodeSeen(True, s.current, "running", boot or None, True, False)


def upgrade_node(run: NodeRun, s: NodeStep) -> None:
    """One node from its gates to its post-hook."""
    cl, block, target, deadlines, lock = run.cl, run.block, run.target, run.deadlines, run.lock
    node, ip = s.hostname, s.ip
    checkpoint(lock, node, f"the gates of {node}")
    if _monitoring.before_node(block, cl.cluster, cl.ceph is not None, node, _mark):
        run.passed(node, "no alert firing")
    views = gates_before(run, node)
    run.passed(node, "all nodes Ready", "etcd healthy")
    _monitoring.silence_node(block, cl.cluster, cl.ceph is not None, node, ip, _monitoring.node_deadline_s(deadlines),
                             _mark)
    osds: list[int] = []
    if cl.ceph is not None:
        osds = ok_to_stop_task(cl, node=node)
        run.passed(node, "ceph ok-to-stop")
        checkpoint(lock, node, f"setting noout for {node}")
        set_noout_task(cl, node=node)
        run.flag["noout"] = "set"
    if block.pre_node_hook:
        checkpoint(lock, node, f"the pre-hook of {node}")
        pre_hook_task(block.pre_node_hook, node=node, ip=ip, timeout_s=deadlines.hook)
    before = seen_before(run, s, views)
    with run.watch.disrupting(node):
        upgrade_task(cl, list(s.argv), node=node, ip=ip, timeout_s=deadlines.upgrade, target=run.plan.target,
                     before=before, lock=lock, control_plane=s.control_plane, debug=run.debug,
                     back_s=deadlines.node_ready)
        verify_version_task(cl, node=node, ip=ip, target=run.plan.target, deadline_s=deadlines.node_ready,
                            before=before, control_plane=s.control_plane, step=s)
        wait_ready_task(cl, node=node, ip=ip, target=run.plan.target, deadline_s=deadlines.node_ready)
    run.watch.well_again(node)
    run.passed(node, f"Talos {run.plan.target}", "Ready and uncordoned")
    etcd_healthy_task(cl, target, node=node, deadline_s=deadlines.etcd)
    run.passed(node, "etcd healthy after")
    health_task(cl, target, node=node, ip=ip, deadline_s=deadlines.health, lock=lock)
    run.passed(node, "talosctl health")
    if cl.ceph is not None:
        osds_up_task(cl, node=node, osds=osds, deadline_s=deadlines.osds_up)
        run.passed(node, "OSDs up")
        try:
            unset_noout_task(cl, node=node)
        except CephError as e:
            raise StepFailed(node, "unset noout", str(e), "unset it by hand: ceph osd unset noout") from e
        run.flag["noout"] = "unset"
        ceph_clean_task(cl, node=node, deadline_s=deadlines.ceph_clean, tolerated=[])
        run.passed(node, "ceph clean")
    _monitoring.node_passed(node, _mark)
    if block.post_node_hook:
        checkpoint(lock, node, f"the post-hook of {node}")
        post_hook_task(block.post_node_hook, node=node, ip=ip, timeout_s=deadlines.hook)
    if _monitoring.after_node(node, _mark):
        run.passed(node, "health queries")
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
