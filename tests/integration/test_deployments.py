"""prefect.yaml against a real Prefect server: `prefect deploy --all` registers every deployment with its
schedule, concurrency and trigger, and deployments/serve.py serves the same definitions without a work pool."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
NAMES = ("talos-upgrade", "kubernetes-upgrade", "cluster-upgrade", "flux-reconcile", "git-push", "provision",
         "drift-check")
DISRUPTIVE = ("talos-upgrade", "kubernetes-upgrade", "cluster-upgrade", "provision")


def read(name: str) -> Any:
    """The deployment `name` of the flow of the same name, or None."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"{name}/{name}")
        except ObjectNotFound:
            return None


def automations_of(deployment: Any) -> list[Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")


def forget_deployments() -> None:
    """Delete the deployments of prefect.yaml and the automations they own: other tests of the session
    count on a server where, say, talos-upgrade is not deployed."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in NAMES:
            dep = read(name)
            if dep is not None:
                client.delete_resource_owned_automations(f"prefect.deployment.{dep.id}")
                client.delete_deployment(dep.id)


def ensure_homelab_pool() -> None:
    from prefect.client.orchestration import get_client

    from deployments.setup import ensure_work_pool

    async def go() -> None:
        async with get_client() as client:
            await ensure_work_pool(client)

    asyncio.run(go())


@pytest.fixture(scope="module")
def deployed(prefect_api_url: str) -> Iterator[str]:
    """`prefect --no-prompt deploy --all` run from the repository root, as an operator would; its output."""
    ensure_homelab_pool()
    forget_deployments()
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"prefect deploy --all exited {proc.returncode}:\n{output[-4000:]}"
    yield output
    forget_deployments()


def test_prefect_yaml_declares_exactly_one_deployment_per_flow() -> None:
    entries = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert [e["name"] for e in entries] == list(NAMES)
    for e in entries:
        # The flow's own name is the deployment's: git-push starts `talos-upgrade/talos-upgrade` by name.
        assert Path(e["entrypoint"].split(":")[0]).stem.replace("_", "-") == e["name"]


def test_deploy_all_registers_every_deployment_on_the_homelab_pool(deployed: str) -> None:
    found = {name: read(name) for name in NAMES}
    assert [n for n, d in found.items() if d is None] == [], deployed[-3000:]
    for name, dep in found.items():
        assert dep.work_pool_name == "homelab", name
        assert dep.description, f"{name} has no description"
    assert found["provision"].parameters["cluster"] == "homelab"
    for name in ("talos-upgrade", "kubernetes-upgrade", "cluster-upgrade", "flux-reconcile", "drift-check"):
        assert found[name].parameters["cluster"] == "m720q", name


def test_deployed_upgrades_and_provision_require_approval_and_have_no_deployment_limit(deployed: str) -> None:
    for name in DISRUPTIVE:
        dep = read(name)
        assert dep.parameters["require_approval"] is True, name
        assert dep.schedules == [] and automations_of(dep) == [], f"{name} must only run when started"
        # Prefect releases a deployment slot when a run pauses and crashes the paused run when its lease
        # renewal then fails (prefect.yaml, definitions.concurrency): approvals need no such limit.
        assert dep.global_concurrency_limit is None, name
    assert read("provision").parameters["plan_only"] is False


def test_deployed_drift_check_runs_nightly_at_three_utc_and_drops_an_overlapping_run(deployed: str) -> None:
    dep = read("drift-check")
    [schedule] = dep.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * *", "UTC", True)
    assert dep.global_concurrency_limit.limit == 1
    assert dep.concurrency_options.collision_strategy == "CANCEL_NEW"


def test_deployed_flux_reconcile_is_manual(deployed: str) -> None:
    dep = read("flux-reconcile")
    assert dep.schedules == [] and automations_of(dep) == []


def test_deployed_git_push_runs_on_the_push_event_with_the_payload_as_parameters(deployed: str) -> None:
    dep = read("git-push")
    assert dep.schedules == []
    [automation] = automations_of(dep)
    trigger = automation.trigger
    assert automation.enabled and trigger.expect == {"homelab.git.push"}
    assert trigger.match.model_dump()["prefect.resource.id"] in ("git.repo.*", ["git.repo.*"])
    [action] = automation.actions
    assert action.type == "run-deployment" and action.deployment_id == dep.id
    assert action.parameters["changed_paths"] == "{{ event.payload.changed_paths }}"
    assert set(action.parameters) == {"repository", "ref", "before", "after", "changed_paths"}


def test_kubernetes_variant_sets_image_namespace_and_service_account() -> None:
    pools = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"]
    variables = pools["kubernetes"]["job_variables"]
    assert pools["kubernetes"]["name"] != pools["process"]["name"] == "homelab"
    assert variables["namespace"] == "prefect" and variables["service_account_name"] == "homelab-flows"
    manifests = (REPO / "k8s/apps/base/prefect/webhook.yaml").read_text()
    assert f"image: {variables['image']}" in manifests, "the flows' image differs from the receiver's"


def test_serve_reads_a_concurrency_mapping_and_names_the_entry_when_it_is_wrong() -> None:
    from deployments.serve import ServeConfigError, _concurrency

    config = _concurrency({"name": "x", "concurrency_limit": {"limit": 1, "collision_strategy": "CANCEL_NEW"}})
    assert (config.limit, config.collision_strategy) == (1, "CANCEL_NEW")
    assert _concurrency({"name": "x", "concurrency_limit": 2}) == 2
    with pytest.raises(ServeConfigError, match="deployment drift-check: concurrency_limit"):
        _concurrency({"name": "drift-check", "concurrency_limit": {"limit": 1, "collision_strategy": "QUEUE"}})


# --- serve.py: the same definitions, one process, no work pool ------------------------------------------


@pytest.fixture
def served_all(prefect_api_url: str, twin: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """deployments/serve.py serving every deployment for the twin's block, until all are registered."""
    from twin.register import homelab_block

    forget_deployments()
    t = twin(state="synced")
    homelab_block(t).save("twin-served", overwrite=True)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--homelab", "twin-served"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            found = {name: read(name) for name in NAMES}
            if all(found.values()) and automations_of(found["git-push"]):
                break
            assert proc.poll() is None, f"serve.py exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            missing = [n for n, d in found.items() if d is None]
            assert time.monotonic() < deadline, f"serve.py did not register {missing or 'the git-push trigger'} in 90 s"
            time.sleep(0.2)
        yield found
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        forget_deployments()


def post_push_event(api_url: str, ref: str) -> None:
    """A `homelab.git.push` event as the webhook receiver posts it (`POST /events`)."""
    event = {
        "id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat(), "event": "homelab.git.push",
        "resource": {"prefect.resource.id": "git.repo.example/homelab"},
        "payload": {"repository": "example/homelab", "ref": ref, "before": "a" * 40, "after": "b" * 40,
                    "changed_paths": ["k8s/apps/base/smokeping/helmrelease.yaml"]},
    }
    response = httpx.post(f"{api_url.rstrip('/')}/events", json=[event], timeout=10)
    assert response.status_code in (200, 204), response.text


def test_serve_registers_every_deployment_with_schedule_and_concurrency_without_a_pool(
        served_all: dict[str, Any]) -> None:
    assert {n: d.work_pool_name for n, d in served_all.items()} == dict.fromkeys(NAMES)
    [schedule] = served_all["drift-check"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "UTC")
    assert served_all["drift-check"].concurrency_options.collision_strategy == "CANCEL_NEW"
    for name in DISRUPTIVE:
        dep = served_all[name]
        assert dep.global_concurrency_limit is None, name
        assert dep.parameters["require_approval"] is True and dep.parameters["homelab"] == "twin-served"


def test_served_git_push_runs_when_a_push_event_arrives(prefect_api_url: str, served_all: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep = served_all["git-push"]
    post_push_event(prefect_api_url, "refs/heads/feature")
    deadline = time.monotonic() + 90
    run = None
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            run = runs[0] if runs else None
            if run is not None and run.state is not None and run.state.is_final():
                break
            time.sleep(0.25)
    assert run is not None, "the push event created no git-push run in 90 s"
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"
    assert run.parameters["ref"] == "refs/heads/feature" and run.parameters["homelab"] == "twin-served"
    assert run.parameters["changed_paths"] == ["k8s/apps/base/smokeping/helmrelease.yaml"]
