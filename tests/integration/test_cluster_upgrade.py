"""The cluster-upgrade flow on the simulated homelab, against a real Prefect server: one plan, one
approval, Talos first, then Kubernetes; Kubernetes never starts when the Talos part fails."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("prefect_api_url")

FAST = {"node_ready": 5, "etcd": 3, "osds_up": 3, "ceph_clean": 2, "lock": 60, "hook": 10, "upgrade": 30}
KNOBS = {"reboot_seconds": 0.3, "recovery_seconds": 0.2}
M720Q = ["m720q-1", "m720q-2", "m720q-3"]
UPGRADE_FLOWS = ["cluster-upgrade", "talos-upgrade", "kubernetes-upgrade"]


def save_block(t: Any) -> str:
    from twin.register import homelab_block

    name = f"twin-{uuid.uuid4().hex[:8]}"
    homelab_block(t).save(name, overwrite=True)
    return name


def run(block: str, tmp_path: Path, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from flows.cluster_upgrade import cluster_upgrade
    from flows.talos_upgrade import Deadlines, state_result

    kw.setdefault("kubernetes_to", "v1.33.0")
    state = cluster_upgrade(homelab=block, deadlines=Deadlines(**FAST), snapshot_dir=str(tmp_path / "snapshots"),
                            return_state=True, **kw)
    return state, state_result(state)


def talos_versions(t: Any) -> dict[str, str]:
    with t.world.lock:
        return {h: n.talos_version for h, n in t.world.clusters["m720q"].nodes.items()}


def kubelets(t: Any) -> dict[str, str]:
    with t.world.lock:
        return {h: n.kubelet_version for h, n in t.world.clusters["m720q"].nodes.items()}


def subflows(state: Any) -> list[str]:
    """The flow names of the subflow runs of a finished run, in start order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC, flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        return [client.read_flow(r.flow_id).name for r in runs]


class Approver:
    """Approves every upgrade run that pauses for approval from now on, and notes which ones did."""

    def __init__(self) -> None:
        self.since = datetime.now(UTC)
        self.approved: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="approver", daemon=True)

    def __enter__(self) -> Approver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterStartTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        from flows.approval import approve

        with get_client(sync_client=True) as client:
            while not self._stop.is_set():
                for r in client.read_flow_runs(
                        flow_filter=FlowFilter(name=FlowFilterName(any_=UPGRADE_FLOWS)),
                        flow_run_filter=FlowRunFilter(
                            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
                            start_time=FlowRunFilterStartTime(after_=self.since))):  # type: ignore[arg-type]
                    approve(str(r.id))
                    self.approved.append((client.read_flow(r.flow_id).name, str(r.id)))
                self._stop.wait(0.2)  # the server offers no wait for a state


def test_cluster_upgrade_upgrades_talos_then_kubernetes_after_one_approval(twin, tmp_path):
    t = twin(**KNOBS)
    block = save_block(t)
    # The Talos versions at the instant the first kubelet reports the new Kubernetes.
    at_first_kubelet: dict[str, str] = {}

    def watch() -> None:
        if t.world.wait_for(lambda: "v1.33.0" in kubelets(t).values(), 120):
            at_first_kubelet.update(talos_versions(t))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with Approver() as approver:
        state, res = run(block, tmp_path)
    watcher.join(5)
    assert state.is_completed(), res["error"]
    assert approver.approved == [("cluster-upgrade", str(state.state_details.flow_run_id))]
    assert res["status"] == "completed" and res["error"] is None
    assert res["talos"]["status"] == "completed" and res["talos"]["target_version"] == "v1.11.5"
    assert [(n["name"], n["action"]) for n in res["talos"]["nodes"]] == [(h, "upgraded") for h in M720Q]
    assert res["kubernetes"]["status"] == "completed" and res["kubernetes"]["target_version"] == "v1.33.0"
    assert subflows(state) == ["talos-upgrade", "kubernetes-upgrade"]
    assert at_first_kubelet == dict.fromkeys(M720Q, "v1.11.5"), "Kubernetes moved before Talos was done"
    assert talos_versions(t) == dict.fromkeys(M720Q, "v1.11.5") and kubelets(t) == dict.fromkeys(M720Q, "v1.33.0")
    assert t.record.max_concurrent("m720q") == 1


def test_kubernetes_does_not_start_when_the_talos_part_fails(twin, tmp_path):
    t = twin(faults=["upgrade-fails=m720q-2"], **KNOBS)
    state, res = run(save_block(t), tmp_path, require_approval=False)
    assert state.is_failed() and res["status"] == "failed"
    assert res["talos"]["status"] == "failed" and res["talos"]["error"].startswith("m720q-2: talosctl upgrade failed")
    assert res["kubernetes"] == {"status": "not-started", "target_version": "v1.33.0"}
    assert res["error"].startswith("the Talos part did not complete (m720q-2: talosctl upgrade failed")
    assert res["error"].endswith("Kubernetes v1.33.0 was not started") and res["error"] == state.message
    assert subflows(state) == ["talos-upgrade"]
    assert kubelets(t) == dict.fromkeys(M720Q, "v1.32.0")
    assert talos_versions(t)["m720q-3"] == "v1.11.4"


def test_dry_run_plans_kubernetes_for_the_talos_it_upgrades_to_and_touches_nothing(twin, tmp_path):
    t = twin(**KNOBS)
    state, res = run(save_block(t), tmp_path, dry_run=True)
    assert state.is_completed() and res["status"] == "planned"
    assert res["plan"]["talos"]["target"] == "v1.11.5"
    assert [s["action"] for s in res["plan"]["talos"]["steps"]] == ["upgrade"] * 3
    # The nodes run v1.11.4 now; the Kubernetes plan is checked against what Talos will be.
    assert res["plan"]["kubernetes"]["talos_version"] == "v1.11.5"
    assert res["plan"]["kubernetes"]["target"] == "v1.33.0" and res["plan"]["kubernetes"]["action"] == "upgrade"
    assert subflows(state) == [] and t.record.intervals("m720q") == []
    assert kubelets(t) == dict.fromkeys(M720Q, "v1.32.0")


def test_a_refused_kubernetes_plan_stops_the_run_before_talos_is_touched(twin, tmp_path):
    t = twin(**KNOBS)
    state, res = run(save_block(t), tmp_path, kubernetes_to="v1.35.0", require_approval=False)
    assert state.is_failed() and "skips a Kubernetes minor" in res["error"] and "nothing was changed" in res["error"]
    assert res["talos"] is None and subflows(state) == []
    assert t.record.intervals("m720q") == [] and talos_versions(t) == dict.fromkeys(M720Q, "v1.11.4")


def test_started_outside_its_window_without_a_deployment_it_says_when(twin, tmp_path, monkeypatch):
    from flows import window as maintenance
    from flows.talos_upgrade import MaintenanceWindow

    t = twin(**KNOBS)
    monkeypatch.setattr(maintenance, "now", lambda: datetime(2031, 1, 6, 12, 0, tzinfo=UTC))
    started = time.monotonic()
    state, res = run(save_block(t), tmp_path, window=MaintenanceWindow(cron="0 3 * * *", hours=2))
    assert state.is_completed() and res["status"] == "deferred" and time.monotonic() - started < 30
    assert res["deferred_until"] == "2031-01-07T03:00:00+00:00" and res["rescheduled_run"] is None
    assert "run it again then with the same parameters" in res["error"]
    assert subflows(state) == [] and t.record.intervals("m720q") == []
