"""A disruptive deployment run that starts while its maintenance window is closed schedules the same work
into the next opening (flows.window), against a real Prefect server; the scheduled run, served by a
runner, upgrades the twin inside the window."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FAST = {"node_ready": 3, "etcd": 3, "osds_up": 3, "ceph_clean": 2, "lock": 60, "hook": 10, "upgrade": 30}
KNOBS = {"reboot_seconds": 0.4, "recovery_seconds": 0.2}
M720Q = ["m720q-1", "m720q-2", "m720q-3"]
DEPLOYMENT = "talos-upgrade/talos-upgrade"


def save_block(t: Any) -> str:
    from twin.register import homelab_block

    name = f"twin-{uuid.uuid4().hex[:8]}"
    homelab_block(t).save(name, overwrite=True)
    return name


def runs_of(deployment_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))


def forget(name: str = DEPLOYMENT) -> None:
    """Delete the deployment and every run of it: other tests of the session expect it not deployed."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return
        for run in runs_of(dep.id):
            client.delete_flow_run(run.id)
        client.delete_deployment(dep.id)


def register(homelab: str) -> Any:
    """The talos-upgrade deployment of prefect.yaml, registered with no runner to pick its runs up."""
    from prefect.client.orchestration import get_client

    from deployments.serve import load_definitions, to_deployments

    [deployment] = to_deployments(load_definitions(), only=["talos-upgrade"], homelab=homelab)
    deployment.apply()
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(DEPLOYMENT)


@pytest.fixture
def served(prefect_api_url: str, tmp_path: Path) -> Iterator[Any]:
    """A factory: deployments/serve.py serving talos-upgrade for a Homelab block, in a subprocess."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(homelab: str) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        log_path = tmp_path / "serve.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--only", "talos-upgrade",
                                     "--homelab", homelab], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log_path))
        deadline = time.monotonic() + 60
        with get_client(sync_client=True) as client:
            while True:
                try:
                    dep = client.read_deployment_by_name(DEPLOYMENT)
                    if dep.parameters.get("homelab") == homelab:
                        return dep
                except ObjectNotFound:
                    pass
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "serve.py registered no talos-upgrade deployment in 60 s"
                time.sleep(0.2)

    yield start
    for proc, _ in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    forget()


def run_from_deployment(deployment_id: Any, parameters: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A run of the deployment executed here, in this process, as a worker's subprocess would execute it;
    created Pending so that no runner picks it up meanwhile."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    from flows.talos_upgrade import state_result, talos_upgrade

    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters, state=Pending())
    state = run_flow(talos_upgrade, flow_run=flow_run, return_type="state")
    return flow_run, state_result(state)


def wait_final(run_id: Any, deadline_s: float, log: Path | None = None) -> Any:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, (f"run {run_id} not finished in {deadline_s} s: {run.state}\n"
                                                 + (log.read_text()[-3000:] if log else ""))
            time.sleep(0.25)


def versions(t: Any) -> dict[str, str]:
    with t.world.lock:
        return {h: n.talos_version for h, n in t.world.clusters["m720q"].nodes.items()}


def test_run_outside_its_window_is_rescheduled_at_the_opening_and_that_run_upgrades_inside_it(
        twin: Any, served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import window as maintenance

    t = twin(**KNOBS)
    block = save_block(t)
    dep = served(block)
    # A daily window that opened at the last minute boundary and is open for six minutes. The deferred
    # run reads a clock 90 s before that opening, so the work it schedules is due at once: the runner
    # starts it now, and with the real clock the window is open.
    opening = datetime.now(UTC).replace(second=0, microsecond=0)
    window = {"cron": f"{opening.minute} {opening.hour} * * *", "hours": 0.1, "timezone": "UTC"}
    monkeypatch.setattr(maintenance, "now", lambda: opening - timedelta(seconds=90))
    params = {"window": window, "require_approval": False, "deadlines": FAST,
              "snapshot_dir": str(tmp_path / "snapshots")}

    first, res = run_from_deployment(dep.id, params)
    assert res["status"] == "deferred" and res["deferred_until"] == opening.isoformat()
    assert res["error"].startswith("deferred: the maintenance window") and res["rescheduled_run"] in res["error"]
    assert versions(t) == dict.fromkeys(M720Q, "v1.11.4"), "the deferred run changed something"

    rescheduled = wait_final(res["rescheduled_run"], 90, tmp_path / "serve.log")
    assert rescheduled.deployment_id == dep.id and rescheduled.parameters == first.parameters
    assert rescheduled.expected_start_time == opening
    assert rescheduled.state.is_completed(), f"{rescheduled.state.type}: {rescheduled.state.message}"
    assert rescheduled.start_time >= opening
    # It ran inside the window rather than deferring again: the twin is upgraded, one node at a time,
    # and it scheduled nothing more.
    assert versions(t) == dict.fromkeys(M720Q, "v1.11.5")
    assert t.record.max_concurrent("m720q") == 1
    assert {r.id for r in runs_of(dep.id)} == {first.id, rescheduled.id}


def test_deferred_runs_of_the_same_work_share_one_scheduled_run(
        prefect_api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import window as maintenance

    forget()
    dep = register("not-read-before-the-window-opens")
    try:
        # Far from the real clock: nothing may start these runs while the test looks at them.
        clock = datetime(2031, 1, 6, 12, 0, tzinfo=UTC)
        opening = datetime(2031, 1, 7, 3, 0, tzinfo=UTC)
        monkeypatch.setattr(maintenance, "now", lambda: clock)
        window = {"cron": "0 3 * * *", "hours": 2, "timezone": "UTC"}
        params = {"window": window, "to": "v1.11.5"}

        _, first = run_from_deployment(dep.id, params)
        _, second = run_from_deployment(dep.id, params)
        _, other = run_from_deployment(dep.id, {**params, "to": "v1.11.6"})
        assert [r["status"] for r in (first, second, other)] == ["deferred"] * 3
        assert first["deferred_until"] == second["deferred_until"] == opening.isoformat()
        assert second["rescheduled_run"] == first["rescheduled_run"]
        assert "is already scheduled then with the same parameters" in second["error"]
        assert other["rescheduled_run"] not in (None, first["rescheduled_run"])

        scheduled = [r for r in runs_of(dep.id) if r.state.is_scheduled()]
        assert sorted(str(r.id) for r in scheduled) == sorted([first["rescheduled_run"], other["rescheduled_run"]])
        for r in scheduled:
            assert r.expected_start_time == opening and r.state.state_details.scheduled_time == opening
        by_id = {str(r.id): r for r in scheduled}
        assert by_id[first["rescheduled_run"]].parameters["to"] == "v1.11.5"
        assert by_id[other["rescheduled_run"]].parameters["to"] == "v1.11.6"

        # --now overrides the window: that run goes on to the block (which does not exist here).
        _, now_res = run_from_deployment(dep.id, {**params, "run_now": True})
        assert now_res["status"] == "failed" and "not-read-before-the-window-opens" in now_res["error"]
        assert len([r for r in runs_of(dep.id) if r.state.is_scheduled()]) == 2
    finally:
        forget()


def test_deferred_run_without_a_deployment_names_the_time_and_the_command(
        prefect_api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import window as maintenance
    from flows.kubernetes_upgrade import kubernetes_upgrade
    from flows.talos_upgrade import MaintenanceWindow, state_result

    monkeypatch.setattr(maintenance, "now", lambda: datetime(2031, 1, 6, 12, 0, tzinfo=UTC))
    window = MaintenanceWindow(cron="0 3 * * *", hours=2, timezone="Europe/Berlin")
    res = state_result(kubernetes_upgrade(homelab="not-read", cluster="m720q", to="v1.33.0", window=window,
                                          return_state=True))
    assert res["status"] == "deferred" and res["rescheduled_run"] is None
    assert res["deferred_until"] == "2031-01-07T03:00:00+01:00"
    assert res["run_then"] == ("homelab upgrade kubernetes --homelab not-read --cluster m720q --to v1.33.0 "
                               "--window '0 3 * * *' --window-hours 2 --tz Europe/Berlin")
    assert "no deployment" in res["error"] and res["run_then"] in res["error"]
