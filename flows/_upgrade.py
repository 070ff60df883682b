"""What both upgrade flows take and give: their parameters, the cluster they act on, their result.

The per-node steps are in flows.upgrade_steps; the command line that runs the flows is homelab.cli_upgrade.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from pydantic import BaseModel, Field

from flows import _monitoring
from flows._guard import StepFailed, remember
from flows._names import name_after_target
from homelab.ceph_gate import Verdict
from homelab.config import ProxmoxCluster, TalConfig, load_tree
from homelab.upgrade import TalosPlan, _members
from homelab.window import Window
from tasks.connect import Clients, connect

POLL_S = 0.25

# (monotonic time, node, step) of every step start, newest last: the benchmark reads it.
TIMELINE: list[tuple[float, str, str]] = []


def mark(node: str, step: str) -> None:
    TIMELINE.append((time.monotonic(), node, step))


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
    health: float = Field(default=300, gt=0, description="`talosctl health` after each node (its --wait-timeout).")
    osds_up: float = Field(default=600, gt=0, description="The node's Ceph OSDs up again.")
    ceph_clean: float = Field(default=1800, gt=0, description="Every PG active+clean and Ceph healthy again.")
    hook: float = Field(default=600, gt=0, description="One pre- or post-hook.")
    approval: float = Field(default=86400, gt=0, description="Waiting for someone to approve the plan.")


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


# --- the cluster ------------------------------------------------------------------------------


@dataclass
class Target:
    """The cluster as configured: its desired state and members in upgrade order."""

    name: str
    config: TalConfig | ProxmoxCluster
    hosts: list[tuple[str, str, bool]] = field(default_factory=list)  # (hostname, ip, control plane)

    @property
    def control_planes(self) -> list[tuple[str, str]]:
        return [(h, ip) for h, ip, cp in self.hosts if cp]

    @property
    def workers(self) -> list[tuple[str, str]]:
        return [(h, ip) for h, ip, cp in self.hosts if not cp]

    def ip(self, host: str) -> str:
        return next(ip for h, ip, _ in self.hosts if h == host)


def load_target(tree_path: Path, cluster: str) -> Target:
    tree = load_tree(tree_path)
    c = tree.cluster(cluster)
    config: TalConfig | ProxmoxCluster = c.talconfig if c.talconfig is not None else c.proxmox  # type: ignore[assignment]
    _, _, members = _members(config)
    return Target(cluster, config, [(m.hostname, m.ip, m.control_plane) for m in members])


@contextlib.contextmanager
def upgrade_target(homelab: str, cluster: str | None) -> Iterator[tuple[Any, Target, Clients]]:
    """The Homelab block, the cluster's desired state and its clients."""
    from blocks import load_homelab

    block = load_homelab(homelab)
    cluster = cluster or block.cluster
    target = load_target(block.gitops_tree(), cluster)
    name_after_target(cluster)
    with connect(block, cluster) as cl:
        yield block, target, cl


def default_snapshot_dir() -> str:
    """Where etcd snapshots are kept unless a run names a directory: $HOMELAB_SNAPSHOT_DIR, else the
    user's state directory ($XDG_STATE_HOME, ~/.local/state)/homelab/etcd-snapshots — a place that outlives
    the run and, in a pod, must be a volume (flows.upgrade_steps checks it)."""
    if os.environ.get("HOMELAB_SNAPSHOT_DIR"):
        return os.environ["HOMELAB_SNAPSHOT_DIR"]
    return str(Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "homelab" / "etcd-snapshots")


# --- results ----------------------------------------------------------------------------------


def node_rows(plan: TalosPlan | None, outcome: dict[str, tuple[str, float]], planned: bool, *,
              gates: dict[str, list[str]] | None = None, windows: Callable[[str], str] | None = None,
              ) -> list[dict[str, Any]]:
    """A row per node of the plan. After a run: what happened to it, its disruption window as the Node
    watch saw it (cordoned or NotReady → Ready and schedulable again) and the gates it passed, in order."""
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
        if not planned and s.action != "skip":
            rows[-1]["disrupted"] = (windows(s.hostname) if windows is not None else "") or "-"
            rows[-1]["gates passed"] = ", ".join((gates or {}).get(s.hostname, [])) or "-"
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


def failed_result(error: str) -> dict[str, Any]:
    """The result of a run that ended without its own result dict."""
    return result("failed", None, [], 0, "untouched", None, error)


def state_result(state: Any) -> dict[str, Any]:
    """The result dict of a finished run (Talos or Kubernetes upgrade), whether it completed or failed. The
    cluster-upgrade flow reads its parts' results with it, the command line and the tests too."""
    from flows import _runtime

    return _runtime.result_of(state, failed_result)


def table(rows: list[dict[str, Any]], key: str, description: str) -> None:
    from prefect.artifacts import create_table_artifact

    with contextlib.suppress(Exception):
        create_table_artifact(table=rows or [{"note": "nothing"}], key=key, description=description)


def markdown_plan(plan: TalosPlan) -> str:
    lines = [f"### Talos upgrade of {plan.cluster} to {plan.target}", "", "| node | from | action | why | command |",
             "|---|---|---|---|---|"]
    for s in plan.steps:
        lines.append(f"| {s.hostname} | {s.current} | {s.action} | {s.reason or '-'} | "
                     f"`{' '.join(s.argv) if s.argv else '-'}` |")
    return "\n".join(lines)


def deferred_result(window: MaintenanceWindow | None, run_now: bool, dry_run: bool, to: str | None) -> Any:
    """The "deferred" result when the maintenance window is closed (a dry run is never deferred); the same
    work goes into the next opening (flows.window), and the result says when and where."""
    from flows import window as maintenance

    deferral = maintenance.defer(window.window() if window is not None else None, run_now, dry_run)
    if deferral is None:
        return None
    get_run_logger().warning(deferral.message)
    return {**result("deferred", to, [], 0, "untouched", None, deferral.message), **deferral.fields()}
