"""Flow `talos-upgrade`: a rolling Talos upgrade, one node at a time, gated, approved, resumable.

Plan (pure, homelab.upgrade: versions, schematics, Talos's compatibility table) -> preflight gates ->
approval -> the global `homelab-disruption` lock -> the schematics registered with the Image Factory -> etcd
snapshot -> per node (flows.upgrade_steps.upgrade_node): nodes and etcd again, ok-to-stop, noout, pre-hook,
upgrade, verify, Ready, schematic, etcd, `talosctl health`, OSDs, unset noout, Ceph clean, post-hook, pause.
A rerun re-reads the versions and schematics and goes on with the first node that is not where the tree
says. Every wait is a watch or a tight poll under a monotonic deadline.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.states import Failed
from pydantic import Field

from flows import _monitoring
from flows._guard import (
    RunStopped,
    StepFailed,
    describe_interruption,
    disruption_lock,
    interrupted_status,
)
from flows._names import run_name
from flows._upgrade import (
    TIMELINE,
    Deadlines,
    MaintenanceWindow,
    Target,
    default_snapshot_dir,
    deferred_result,
    failed_result,
    load_target,
    mark,
    node_rows,
    result,
    state_result,
    upgrade_target,
)
from flows._upgrade import markdown_plan as _markdown_plan
from flows._upgrade import table as _table
from flows.upgrade_steps import (
    NodeRun,
    _after_failure,
    flux_verdict,
    observe_kubelets,
    observe_running,
    observe_versions,
    preflight_task,
    register_schematics_task,
    snapshot_task,
    upgrade_node,
)
from homelab.monitoring import MonitoringGates
from homelab.upgrade import PlanRefused, TalosPlan, UpgradeOptions, plan_talos_upgrade
from tasks.connect import Clients
from tasks.kube import Kube, KubeError
from tasks.kube_watch import DisruptionWatch
from tasks.lock import DisruptionLock

# What other modules, the benchmark and the tests reach through this module.
__all__ = ["TIMELINE", "Deadlines", "DisruptionWatch", "MaintenanceWindow", "StepFailed", "Target", "failed_result",
           "flux_verdict", "load_target", "observe_versions", "preflight_task", "result", "snapshot_task",
           "state_result", "talos_upgrade", "upgrade_target"]

_mark = mark


# --- the flow ---------------------------------------------------------------------------------


@flow(name="talos-upgrade", flow_run_name=run_name("talos-upgrade"), log_prints=False, persist_result=False,
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
    allow_minor_skip: Annotated[bool, Field(description="Allow skipping a Talos minor version (e.g. v1.9 -> v1.11). Talos's installer accepts hosts down to its minimum upgradable version (checked either way); this flow upgrades one minor at a time unless this is set.")] = False,
    allow_downgrade: Annotated[bool, Field(description="Allow a downgrade.")] = False,
    allow_extension_removal: Annotated[bool, Field(description="Allow an installer image that lacks a system extension a node runs now (the upgrade removes it).")] = False,
    reboot_mode: Annotated[Literal["default", "powercycle"], Field(description="`talosctl upgrade --reboot-mode`: default (kexec) or powercycle (through the firmware).")] = "default",
    stage: Annotated[bool, Field(description="`talosctl upgrade --stage`: Talos records the image and reboots at once, without draining; the installer runs at the next boot, which reboots once more.")] = False,
    debug: Annotated[bool, Field(description="`talosctl upgrade --debug`: the node's console is followed and what talosctl prints goes into this run's logs.")] = False,
    window: Annotated[MaintenanceWindow | None, Field(description="Maintenance window; outside it the run is deferred.")] = None,
    run_now: Annotated[bool, Field(description="Run now even outside the maintenance window.")] = False,
    deadlines: Annotated[Deadlines, Field(description="Deadline of each step, in seconds.")] = Deadlines(),
    snapshot_dir: Annotated[str | None, Field(description="Where etcd snapshots are kept: 0700, each 0600 (default $HOMELAB_SNAPSHOT_DIR, else ~/.local/state/homelab/etcd-snapshots; in a pod, a volume).")] = None,
    snapshot_keep: Annotated[int, Field(description="How many etcd snapshots of the cluster to keep (the newest).", ge=1)] = 10,
    # Read where the gates run (flows._monitoring, from this run's parameters), like the hooks' block name.
    monitoring: Annotated[MonitoringGates | None, Field(description="This run's overrides of the Monitoring block's gates: allowed alerts, health queries, alert gate deadline, or off.")] = None,
) -> Any:
    """Upgrade Talos one node at a time, never losing etcd quorum or Ceph availability."""
    _mark("(flow)", "start")
    try:
        deferred = deferred_result(window, run_now, dry_run, to)
        if deferred:
            return deferred
        options = UpgradeOptions(reboot_mode=reboot_mode, stage=stage, debug=debug)
        with upgrade_target(homelab, cluster) as (block, target, cl):
            return _upgrade(cl, block, target, to, nodes, images, dry_run, require_approval, pause_seconds,
                            allow_minor_skip, allow_downgrade, deadlines, snapshot_dir or default_snapshot_dir(),
                            allow_extension_removal=allow_extension_removal, options=options,
                            snapshot_keep=snapshot_keep)
    finally:
        _mark("(flow)", "end")


def _plan(cl: Clients, target: Target, to: str | None, nodes: list[str] | None, images: dict[str, str] | None,
          allow_minor_skip: bool, allow_downgrade: bool, deadlines: Deadlines, *,
          allow_extension_removal: bool = False, options: UpgradeOptions = UpgradeOptions()) -> TalosPlan:
    """The plan from what the cluster runs now: versions (a node missing from the reply did not answer),
    schematics and extensions, and the kubelets' Kubernetes (Talos's support table)."""
    unanswered: dict[str, str] = {}
    # The three reads at once: two talosctl processes and an API call.
    with ThreadPoolExecutor(2) as pool:
        running_later = pool.submit(observe_running, cl, target)
        kubelets_later = pool.submit(observe_kubelets, cl)
        versions = observe_versions(cl, target, unanswered)
        running = running_later.result()
        try:
            kubelets = kubelets_later.result()
        except KubeError as e:
            raise PlanRefused([f"the Kubernetes API did not answer ({e}): the target's Kubernetes support cannot "
                               f"be checked; run again once it answers"]) from None
    try:
        return plan_talos_upgrade(target.config, versions, to, nodes, allow_minor_skip, allow_downgrade, images,
                                  talosctl="talosctl", timeout_s=int(deadlines.upgrade), kubernetes=kubelets,
                                  running=running, allow_extension_removal=allow_extension_removal,
                                  options=options)
    except PlanRefused as e:
        # Name why a node did not answer where the plan says it was not observed.
        raise PlanRefused([r + (f" (it did not answer: {unanswered[h]})" if (h := r.split(":", 1)[0]) in unanswered
                                and "no Talos version observed" in r else "") for r in e.reasons]) from None


def _refused(to: str | None, e: PlanRefused) -> Any:
    msg = f"plan refused: {e}"
    return Failed(message=msg, data=result("failed", to, [], 0, "untouched", None, msg))


def _upgrade(cl: Clients, block: Any, target: Target, to: str | None, nodes: list[str] | None,
             images: dict[str, str] | None, dry_run: bool, require_approval: bool, pause_seconds: float,
             allow_minor_skip: bool, allow_downgrade: bool, deadlines: Deadlines, snapshot_dir: str, *,
             allow_extension_removal: bool = False, options: UpgradeOptions = UpgradeOptions(),
             snapshot_keep: int = 10) -> Any:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    log = get_run_logger()
    plan: TalosPlan | None = None

    def make_plan() -> TalosPlan:
        return _plan(cl, target, to, nodes, images, allow_minor_skip, allow_downgrade, deadlines,
                     allow_extension_removal=allow_extension_removal, options=options)

    if dry_run or require_approval:
        try:
            plan = make_plan()
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
    gates: dict[str, list[str]] = {}
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
                plan = make_plan()
            except PlanRefused as e:
                watch.stop()
                return _refused(to, e)
            if not require_approval:
                _table(plan.to_rows(), f"talos-upgrade-plan-{target.name}",
                       f"Plan: Talos {plan.target} on {target.name}")
            todo = list(plan.to_upgrade)
            if todo:
                preflight_task(cl, target, [s.hostname for s in todo], node="(all nodes)")
                register_schematics_task(target, plan, node="(all nodes)")
            if any(s.control_plane for s in todo):
                first_cp = next(s for s in todo if s.control_plane)
                snap_from = next((h for h, _ in target.control_planes if h != first_cp.hostname), first_cp.hostname)
                snapshot = snapshot_task(cl, target, snapshot_dir, node=snap_from, keep=snapshot_keep)
            run = NodeRun(cl, block, target, plan, deadlines, watch, flag, lock, debug=options.debug, gates=gates)
            done = 0
            for s in plan.steps:
                if s.action == "skip":
                    done += 1
                    continue
                current = s.hostname
                t0 = time.monotonic()
                outcome[s.hostname] = ("failed", 0.0)
                try:
                    upgrade_node(run, s)
                finally:
                    outcome[s.hostname] = (outcome[s.hostname][0], time.monotonic() - t0)
                outcome[s.hostname] = ("upgraded", time.monotonic() - t0)
                current = "(all nodes)"
                done += 1
                if progress is not None:
                    with contextlib.suppress(Exception):
                        update_progress_artifact(cast(UUID, progress), 100.0 * done / len(plan.steps))
                if pause_seconds and any(x.action == "upgrade" and x.hostname not in outcome for x in plan.steps):
                    # Pacing chosen by the operator, not a wait for a condition; the next node's gates (etcd
                    # included) are read again after it.
                    time.sleep(pause_seconds)
    except BaseException as e:  # a refused gate, a lost lock, a cancel, SIGTERM, a crash: one ending for all
        return _ended_early(cl, target, plan, outcome, flag["noout"], snapshot, watch, lock, e, current, log,
                            gates)
    watch.stop()
    assert plan is not None
    rows = node_rows(plan, outcome, False, gates=gates, windows=watch.window)
    _table(rows, f"talos-upgrade-outcome-{target.name}", "Outcome")
    return result("completed", plan.target, rows, watch.max_disrupted, flag["noout"], snapshot, None,
                  lock=lock.record() if lock else None, silences=_monitoring.end_of_run(log, settle=True))


def _ended_early(cl: Clients, target: Target, plan: TalosPlan | None, outcome: dict[str, tuple[str, float]],
                 noout: str, snapshot: str | None, watch: DisruptionWatch, lock: DisruptionLock | None,
                 error: BaseException, node: str, log: Any, gates: dict[str, list[str]]) -> Any:
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
    if lock is not None and lock.lost_reason is not None and noout == "set":
        # Without the lock this run changes nothing more, noout included: by the time the node is back another
        # run may hold the lock and a noout of its own. The flag stays recorded as this run's: a rerun carries on.
        log.error("noout left set on purpose: this run no longer holds the disruption lock, so it changes nothing "
                  "more; a rerun takes the flag over")
        noout = "left-set"
        msg = (f"{failure}. noout is left set on purpose because this run no longer holds the disruption lock; a "
               f"rerun takes it over, or `ceph osd unset noout` once every node is up")
    else:
        noout = _after_failure(cl, target, noout, failure, log)
        msg = str(failure) if noout != "left-set" else (
            f"{failure}. noout is left set on purpose because not every node is up; "
            f"`ceph osd unset noout` once they are")
    rows = node_rows(plan, outcome, False, gates=gates, windows=watch.window)
    _table(rows, f"talos-upgrade-outcome-{target.name}", f"Outcome ({status})")
    # Whatever stopped the run, the silences it made end now; one that cannot be expired ends by itself.
    silences = _monitoring.end_of_run(log)
    if any(x["state"] == "left" for x in silences):
        msg += "; a silence could not be expired and ends by itself (see the result's silences)"
    data = result(status, plan.target if plan else None, rows, watch.max_disrupted, noout, snapshot, msg,
                  lock=lock.record() if lock else None, silences=silences)
    return Cancelled(message=msg, data=data) if status == "cancelled" else Failed(message=msg, data=data)
