"""Flow `kubernetes-upgrade`: `talosctl upgrade-k8s --to <v>`, one minor at a time, to a version the
cluster's Talos supports; `--dry-run` first; the same gates, approval, etcd snapshot and global lock as
the Talos upgrade; done when every kubelet reports the target."""

from __future__ import annotations

import time
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Failed
from pydantic import Field

from flows._guard import (
    RunStopped,
    StepFailed,
    checkpoint,
    describe_interruption,
    disruption_lock,
    interrupted_status,
)
from flows._names import run_name
from flows._upgrade import (
    Deadlines,
    MaintenanceWindow,
    Target,
    default_snapshot_dir,
    deferred_result,
    result,
    upgrade_target,
)
from flows._upgrade import table as _table
from flows.upgrade_steps import observe_versions, preflight_task, snapshot_task
from homelab.upgrade import K8sPlan, PlanRefused, plan_kubernetes_upgrade
from homelab.versions import parse_version
from tasks.connect import Clients
from tasks.kube import Kube, KubeError
from tasks.kube_watch import DisruptionWatch
from tasks.lock import DisruptionLock
from tasks.talos import TalosAborted, TalosError


def observe(cl: Clients, target: Target) -> tuple[str, dict[str, str]]:
    """(the lowest Talos version of the cluster, node -> kubelet version)."""
    talos = observe_versions(cl, target)
    if not talos:
        raise PlanRefused([f"no node of {target.name} answered `talosctl version`"])
    lowest = min(talos.values(), key=parse_version)
    kubelets = {n.name: n.kubelet_version for n in cl.kube.nodes(timeout_s=10)}
    return lowest, kubelets


def plan_for(cl: Clients, target: Target, to: str | None, talos_after: str | None = None) -> K8sPlan:
    """``talos_after``: plan for the Talos version the cluster will run by then (a combined upgrade that
    upgrades Talos first) instead of the lowest one it runs now."""
    talos, kubelets = observe(cl, target)
    talos = talos_after or talos
    config = target.config
    desired = config.kubernetes_version if hasattr(config, "kubernetes_version") else config.cluster.kubernetes_version  # type: ignore[union-attr]
    cp_ip = target.control_planes[0][1]
    return plan_kubernetes_upgrade(talos, kubelets, to or desired, node=cp_ip)


@task(name="upgrade-k8s-dry-run", task_run_name="upgrade-k8s --dry-run {to}", cache_policy=NO_CACHE,
      persist_result=False)
def dry_run_task(cl: Clients, to: str, node: str, timeout_s: float) -> str:
    try:
        return cl.talos.upgrade_k8s(to.lstrip("v"), dry_run=True, node=node, timeout_s=timeout_s)
    except TalosError as e:
        raise StepFailed("(cluster)", "upgrade-k8s --dry-run", str(e),
                         "fix what the dry run reports (removed APIs or flags) and run again; nothing was changed") from e


@task(name="upgrade-k8s", task_run_name="upgrade-k8s {to}", cache_policy=NO_CACHE, persist_result=False)
def upgrade_task(cl: Clients, to: str, node: str, timeout_s: float, lock: DisruptionLock) -> str:
    checkpoint(lock, "(cluster)", f"`talosctl upgrade-k8s --to {to}`")
    try:
        # Killed the moment the lock's ownership runs out: the call must not outlive the lease.
        return cl.talos.upgrade_k8s(to.lstrip("v"), dry_run=False, node=node, timeout_s=timeout_s, abort=lock.abort)
    except TalosAborted as e:
        raise StepFailed("(cluster)", "lock lost", f"{e}: {lock.lost_reason}",
                         "`talosctl upgrade-k8s` may have stopped half-way; make sure the worker reaches the "
                         "Prefect server, then run again with the same target: upgrade-k8s continues where it "
                         "stopped") from e
    except TalosError as e:
        raise StepFailed("(cluster)", "upgrade-k8s", str(e),
                         "`talosctl upgrade-k8s` can be run again with the same --to: it continues where it "
                         "stopped; check the control-plane pods first") from e


@task(name="kubelet-at-target", task_run_name="kubelet {node} at {to}", cache_policy=NO_CACHE, persist_result=False)
def kubelet_task(cl: Clients, node: str, to: str, deadline: float) -> None:
    want = parse_version(to)
    try:
        cl.kube.wait_node(node, lambda v: bool(v.kubelet_version) and parse_version(v.kubelet_version) == want
                          and v.ready, deadline, tolerate_unavailable=True, what=f"kubelet {to} and Ready")
    except KubeError as e:
        raise StepFailed(node, "kubelet version", str(e),
                         f"check the kubelet on {node} (`talosctl -n <ip> logs kubelet`) and run again") from e


@flow(name="kubernetes-upgrade", flow_run_name=run_name("kubernetes-upgrade"), log_prints=False, persist_result=False, validate_parameters=True)
def kubernetes_upgrade(
    homelab: Annotated[str, Field(description="Name of the Homelab block to act on.")] = "default",
    cluster: Annotated[str | None, Field(description="Cluster to upgrade (default: the block's cluster).")] = None,
    to: Annotated[str | None, Field(description="Target Kubernetes version (default: kubernetesVersion of the cluster's config); one minor at a time.")] = None,
    dry_run: Annotated[bool, Field(description="Only plan and run `upgrade-k8s --dry-run`; change nothing.")] = False,
    require_approval: Annotated[bool, Field(description="Pause with the plan until someone approves it (homelab approve RUN_ID).")] = True,
    window: Annotated[MaintenanceWindow | None, Field(description="Maintenance window; outside it the run is deferred.")] = None,
    run_now: Annotated[bool, Field(description="Run now even outside the maintenance window.")] = False,
    deadlines: Annotated[Deadlines, Field(description="Deadline of each step, in seconds (upgrade: the whole upgrade-k8s; node_ready: every kubelet at the target).")] = Deadlines(),
    snapshot_dir: Annotated[str | None, Field(description="Where the etcd snapshot goes (default ~/.local/state/homelab/etcd-snapshots).")] = None,
) -> Any:
    """Upgrade Kubernetes by one minor (or patch) with talosctl upgrade-k8s."""
    deferred = deferred_result(window, run_now, dry_run, to)
    if deferred:
        return deferred
    with upgrade_target(homelab, cluster) as (_, target, cl):
        return _upgrade(cl, target, to, dry_run, require_approval, deadlines, snapshot_dir or default_snapshot_dir())


def _rows(plan: K8sPlan, outcome: dict[str, tuple[str, float]], planned: bool) -> list[dict[str, Any]]:
    rows = []
    for r in plan.to_rows():
        if r["action"] == "skip":
            action, secs = "skipped", 0.0
        elif planned:
            action, secs = "would-upgrade", 0.0
        else:
            action, secs = outcome.get(r["node"], ("not-started", 0.0))
        rows.append({"name": r["node"], "from": r["from"], "to": r["to"], "action": action, "seconds": round(secs, 3)})
    return rows


def _upgrade(cl: Clients, target: Target, to: str | None, dry_run: bool, require_approval: bool,
             deadlines: Deadlines, snapshot_dir: str) -> Any:
    try:
        plan = plan_for(cl, target, to)
    except (PlanRefused, KubeError) as e:
        msg = f"plan refused: {e}"
        return Failed(message=msg, data=result("failed", to, [], 0, "untouched", None, msg))
    _table(plan.to_rows(), f"kubernetes-upgrade-plan-{target.name}", f"Plan: Kubernetes {plan.target} on {target.name}")
    cp_ip = target.control_planes[0][1]
    failed_rows = _rows(plan, {}, False)
    try:
        dry_run_task(cl, to=plan.target, node=cp_ip, timeout_s=deadlines.upgrade)
    except StepFailed as e:
        return Failed(message=str(e), data=result("failed", plan.target, failed_rows, 0, "untouched", None, str(e)))
    if dry_run:
        return result("planned", plan.target, _rows(plan, {}, True), 0, "untouched", None, None, plan.to_dict())
    if plan.action == "skip":
        return result("completed", plan.target, _rows(plan, {}, False), 0, "untouched", None, None)
    if require_approval:
        from flows.approval import request_approval

        try:
            preflight_task(cl, target, [], node="(all nodes)")
        except StepFailed as e:
            return Failed(message=str(e), data=result("failed", plan.target, failed_rows, 0, "untouched", None, str(e)))
        text = (f"### Kubernetes upgrade of {target.name} to {plan.target}\n\n`{' '.join(plan.argv)}` "
                f"(after `{' '.join(plan.dry_run_argv)}` passed)\n\nNodes behind: {', '.join(plan.behind)}")
        answer = request_approval(text, timeout_s=int(deadlines.approval))
        if not answer.approved:
            msg = f"the plan was rejected{': ' + answer.comment if answer.comment else ''}; nothing was changed"
            return Failed(message=msg, data=result("failed", plan.target, failed_rows, 0, "untouched", None, msg))
    log = get_run_logger()
    watch = DisruptionWatch(cl.new_kube if not cl.in_cluster else Kube.in_cluster).start()
    outcome: dict[str, tuple[str, float]] = {}
    snapshot = None
    lock: DisruptionLock | None = None
    try:
        with disruption_lock(deadlines.lock, log) as lock:
            plan = plan_for(cl, target, to)
            if plan.action == "skip":
                watch.stop()
                return result("completed", plan.target, _rows(plan, {}, False), 0, "untouched", None, None,
                              lock=lock.record())
            preflight_task(cl, target, [], node="(all nodes)")
            snap_from = target.control_planes[0][0]
            snapshot = snapshot_task(cl, target, snapshot_dir, node=snap_from)
            t0 = time.monotonic()
            upgrade_task(cl, to=plan.target, node=cp_ip, timeout_s=deadlines.upgrade, lock=lock)
            deadline = time.monotonic() + deadlines.node_ready
            for name in plan.behind:
                outcome[name] = ("failed", 0.0)
                kubelet_task(cl, node=name, to=plan.target, deadline=deadline)
                outcome[name] = ("upgraded", time.monotonic() - t0)
    except BaseException as e:  # a refused gate, a lost lock, a cancel, SIGTERM, a crash: one ending for all
        watch.stop()
        status = interrupted_status(e)
        if isinstance(e, StepFailed | PlanRefused):
            msg = str(e)
        else:
            msg = str(RunStopped("(cluster)", "interrupted", describe_interruption(e, target.name),
                                 "check the control plane (`talosctl health`), then run again with the same target"))
            log.error(msg)
        rows = _rows(plan, outcome, False)
        _table(rows, f"kubernetes-upgrade-outcome-{target.name}", f"Outcome ({status})")
        data = result(status, plan.target, rows, watch.max_disrupted, "untouched", snapshot, msg,
                      lock=lock.record() if lock else None)
        return Cancelled(message=msg, data=data) if status == "cancelled" else Failed(message=msg, data=data)
    watch.stop()
    rows = _rows(plan, outcome, False)
    _table(rows, f"kubernetes-upgrade-outcome-{target.name}", "Outcome")
    return result("completed", plan.target, rows, watch.max_disrupted, "untouched", snapshot, None,
                  lock=lock.record() if lock else None)
