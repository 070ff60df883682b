"""Flow `cluster-upgrade`: Talos, then Kubernetes, on one cluster, under one plan and one approval.

A push that changes both talosVersion and kubernetesVersion needs them in that order: the Kubernetes
version may need the new Talos (the support table), and two runs started side by side would take the
global lock in either order. Both plans are made first, from the live cluster — the Kubernetes one for
the Talos version the first part upgrades to — then the gates are checked and one approval asked for
both. talos-upgrade and kubernetes-upgrade then run as subflows with approval already given, each
behind its own gates and the global lock, pinned to the approved versions. A Talos part that does not
complete stops the run: Kubernetes is not started.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.states import Failed
from pydantic import Field

from flows import kubernetes_upgrade as k8s
from flows import talos_upgrade as talos
from flows import window as maintenance
from flows._names import run_name
from flows.talos_upgrade import Deadlines, MaintenanceWindow, StepFailed
from homelab.upgrade import K8sPlan, PlanRefused, TalosPlan
from tasks.kube import KubeError

NOT_STARTED = "not-started"


def result(status: str, cluster: str | None, talos_part: dict[str, Any] | None, kubernetes_part: dict[str, Any] | None,
           error: str | None, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's result: each part's own result dict (None: not reached), the combined plan on a dry run."""
    return {"status": status, "cluster": cluster, "talos": talos_part, "kubernetes": kubernetes_part,
            "error": error, "plan": plan}


def not_started(target_version: str | None) -> dict[str, Any]:
    return {"status": NOT_STARTED, "target_version": target_version}


def markdown_plan(cluster: str, talos_plan: TalosPlan, k8s_plan: K8sPlan) -> str:
    """Both plans in the order they run, for the one approval form."""
    k8s_steps = (f"`{' '.join(k8s_plan.argv)}` (after `{' '.join(k8s_plan.dry_run_argv)}` passes)\n\n"
                 f"Nodes behind: {', '.join(k8s_plan.behind)}" if k8s_plan.action == "upgrade"
                 else f"nothing to do: every kubelet is at {k8s_plan.target}")
    return (f"## Upgrade of {cluster}: Talos {talos_plan.target}, then Kubernetes {k8s_plan.target}\n\n"
            f"1. {talos._markdown_plan(talos_plan)}\n\n"
            f"2. ### Kubernetes upgrade of {cluster} to {k8s_plan.target} (once every node runs Talos "
            f"{talos_plan.target})\n\n{k8s_steps}\n\n"
            "Kubernetes is not started unless the Talos part completes.")


@flow(name="cluster-upgrade", flow_run_name=run_name("cluster-upgrade"), log_prints=False, persist_result=False,
      validate_parameters=True)
def cluster_upgrade(
    homelab: Annotated[str, Field(description="Name of the Homelab block to act on.")] = "default",
    cluster: Annotated[str | None, Field(description="Cluster to upgrade (default: the block's cluster).")] = None,
    talos_to: Annotated[str | None, Field(description="Target Talos version (default: talosVersion of the cluster's config).")] = None,
    kubernetes_to: Annotated[str | None, Field(description="Target Kubernetes version (default: kubernetesVersion of the cluster's config); one minor at a time.")] = None,
    dry_run: Annotated[bool, Field(description="Only return both plans; touch nothing.")] = False,
    require_approval: Annotated[bool, Field(description="Pause with both plans until someone approves them (homelab approve RUN_ID).")] = True,
    window: Annotated[MaintenanceWindow | None, Field(description="Maintenance window for the start of the run; outside it the run is scheduled into the next opening.")] = None,
    run_now: Annotated[bool, Field(description="Run now even outside the maintenance window.")] = False,
    deadlines: Annotated[Deadlines, Field(description="Deadline of each step of both parts, in seconds.")] = Deadlines(),
    snapshot_dir: Annotated[str | None, Field(description="Where the etcd snapshots go (default ~/.local/state/homelab/etcd-snapshots).")] = None,
) -> Any:
    """Upgrade Talos, then Kubernetes: one plan, one approval, each part behind its own gates."""
    log = get_run_logger()
    deferral = maintenance.defer(window.window() if window is not None else None, run_now, dry_run)
    if deferral is not None:
        log.warning(deferral.message)
        return {**result("deferred", cluster, None, None, deferral.message), **deferral.fields()}

    with talos.upgrade_target(homelab, cluster) as (_, target, cl):
        try:
            talos_plan = talos._plan(cl, target, talos_to, None, None, False, False, deadlines)
            # Planned for the Talos the first part leaves behind: the support table is checked against it.
            k8s_plan = k8s.plan_for(cl, target, kubernetes_to,
                                    talos_after=talos_plan.target if talos_plan.to_upgrade else None)
        except (PlanRefused, KubeError) as e:
            msg = f"plan refused: {e}; nothing was changed"
            return Failed(message=msg, data=result("failed", target.name, None, None, msg))
        talos._table(talos_plan.to_rows(), f"cluster-upgrade-talos-plan-{target.name}",
                     f"Plan, first: Talos {talos_plan.target} on {target.name}")
        talos._table(k8s_plan.to_rows(), f"cluster-upgrade-kubernetes-plan-{target.name}",
                     f"Plan, then: Kubernetes {k8s_plan.target} on {target.name}")
        plan = {"talos": talos_plan.to_dict(), "kubernetes": k8s_plan.to_dict()}
        if dry_run:
            return result("planned", target.name, None, None, None, plan)
        if not talos_plan.to_upgrade and k8s_plan.action == "skip":
            return result("completed", target.name, None, None, None)
        if require_approval:
            try:
                talos.preflight_task(cl, target, [s.hostname for s in talos_plan.to_upgrade], node="(all nodes)")
            except StepFailed as e:
                return Failed(message=str(e), data=result("failed", target.name, None, None, str(e)))
            from flows.approval import request_approval

            log.warning("waiting for approval of both plans: homelab approve <this flow run's id> (or Resume in the UI)")
            answer = request_approval(markdown_plan(target.name, talos_plan, k8s_plan),
                                      timeout_s=int(deadlines.approval))
            if not answer.approved:
                msg = f"the plan was rejected{': ' + answer.comment if answer.comment else ''}; nothing was changed"
                return Failed(message=msg, data=result("failed", target.name, None, None, msg))

    # Each part opens its own connections, takes the global lock and re-reads the cluster under it; the
    # approval above covers exactly these versions, so they are pinned.
    talos_res = talos.state_result(talos.talos_upgrade(
        homelab=homelab, cluster=target.name, to=talos_plan.target, require_approval=False, deadlines=deadlines,
        snapshot_dir=snapshot_dir, return_state=True))
    if talos_res.get("status") != "completed":
        msg = (f"the Talos part did not complete ({talos_res.get('error') or talos_res.get('status')}); "
               f"Kubernetes {k8s_plan.target} was not started")
        return Failed(message=msg, data=result("failed", target.name, talos_res, not_started(k8s_plan.target), msg))
    k8s_res = talos.state_result(k8s.kubernetes_upgrade(
        homelab=homelab, cluster=target.name, to=k8s_plan.target, require_approval=False, deadlines=deadlines,
        snapshot_dir=snapshot_dir, return_state=True))
    if k8s_res.get("status") != "completed":
        msg = (f"Talos {talos_plan.target} is done; the Kubernetes part did not complete "
               f"({k8s_res.get('error') or k8s_res.get('status')})")
        return Failed(message=msg, data=result("failed", target.name, talos_res, k8s_res, msg))
    return result("completed", target.name, talos_res, k8s_res, None)

