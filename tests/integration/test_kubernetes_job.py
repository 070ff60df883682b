"""The kubernetes pool's base job template, run by the real worker: prefect-kubernetes' KubernetesWorker
takes a flow run of a deployment on `homelab-kubernetes` (the pool as `homelab setup` leaves it, the job
variables of prefect.yaml) and creates its Job on the simulated homelab's API server, where the test reads
it back. The worker is the one in the chart's image (prefect-kubernetes); the Job it writes is what m720q
would run."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_asyncio.config.kube_config
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentCreate, WorkPoolUpdate
from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings
from prefect_kubernetes.worker import KubernetesWorker

from deployments.setup import KUBERNETES_POOL, kubernetes_job_template, setup
from twin.kubeapi import KubeApiServer, KubeStore, ResourceType

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# The kind the worker creates; the twin's server learns it here (its default kinds are the ones the
# flows touch). batch/v1 Job as the real API serves it: namespaced, with a status subresource.
JOB_KIND = ResourceType("batch", "v1", "Job", "jobs", namespaced=True, builtin=True, categories=("all",))


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeStore]:
    store = KubeStore()
    store.register_kind(JOB_KIND)
    for ns in ("kube-system", "prefect"):
        store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    server = KubeApiServer(store)
    server.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "m720q",
        "clusters": [{"name": "m720q", "cluster": {"server": server.url}}],
        "contexts": [{"name": "m720q", "context": {"cluster": "m720q", "user": "worker"}}],
        "users": [{"name": "worker", "user": {"token": "worker-token"}}]}))
    # Outside a pod the worker falls back to the kubeconfig, as `prefect worker start` on a laptop would.
    # kubernetes_asyncio reads KUBECONFIG once, at import.
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(kubernetes_asyncio.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # The chart's settings for the worker (charts/prefect-worker/templates/deployment.yaml with
    # basicAuth.existingSecret): the auth string reaches the Job as a secretKeyRef.
    monkeypatch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME", "prefect-basic-auth")
    monkeypatch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY", "auth-string")
    # The observer follows pods for crash detection; there is no kubelet here to make any.
    monkeypatch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_ENABLED", "false")
    try:
        yield store
    finally:
        server.stop()


def _kubernetes_deployment_config() -> dict[str, Any]:
    """drift-check as prefect.yaml describes its move to the kubernetes pool (the anchors' contents)."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [drift] = [d for d in config["deployments"] if d["name"] == "drift-check"]
    defs = config["definitions"]
    return {"entrypoint": drift["entrypoint"], "pool": defs["work_pools"]["kubernetes"],
            "pull_steps": defs["pull_steps"]["clone"]}


async def _submit(pool: str, commit: str) -> tuple[str, list[dict[str, Any]]]:
    cfg = _kubernetes_deployment_config()
    pull = json.loads(json.dumps(cfg["pull_steps"]).replace("{{ flows-commit.stdout }}", commit))
    async with get_client() as client:
        flow_id = await client.create_flow_from_name("drift-check")
        deployment_id = await client.create_deployment(**DeploymentCreate(
            flow_id=flow_id, name=f"drift-check-{uuid.uuid4().hex[:6]}", entrypoint=cfg["entrypoint"],
            work_pool_name=pool, job_variables=cfg["pool"]["job_variables"], pull_steps=pull,
            parameters={"cluster": "m720q", "homelab": "in-cluster"}).model_dump(exclude_unset=True))
        run = await client.create_flow_run_from_deployment(deployment_id)
    async with KubernetesWorker(work_pool_name=pool) as worker:
        await worker.get_and_submit_flow_runs()
    return str(run.id), []


def _pool_change(changes: list[Any]) -> Any:
    [change] = [c for c in changes if (c.kind, c.name) == ("work pool", KUBERNETES_POOL)]
    return change


def _job_for(store: KubeStore, run_id: str) -> dict[str, Any]:
    jobs = [j for j in store.list("batch/v1", "Job", "prefect")
            if j["metadata"].get("labels", {}).get("prefect.io/flow-run-id") == run_id]
    assert len(jobs) == 1, f"the worker created {len(jobs)} Job(s) for run {run_id}"
    return jobs[0]


def test_the_worker_creates_the_job_of_the_template(prefect_api_url: str, kube: KubeStore) -> None:
    assert _pool_change(setup()).action in ("created", "updated", "unchanged")
    commit = "57335007defe1bb0aaea256991baee27a33564cf"
    # The worker's own auth string, which it passes on to the runs it starts (the server here has none).
    with temporary_settings(updates={PREFECT_API_AUTH_STRING: "admin:not-on-the-job"}):
        run_id, _ = asyncio.run(_submit(KUBERNETES_POOL, commit))
    job = _job_for(kube, run_id)
    template = kubernetes_job_template()["variables"]["properties"]
    assert job["metadata"]["namespace"] == "prefect"
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "homelab-flows"
    assert pod["restartPolicy"] == "Never"

    [main] = pod["containers"]
    assert main["image"] == "prefecthq/prefect:3.9.1-python3.11"
    env = {e["name"]: e for e in main["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == run_id
    assert env["PREFECT_API_URL"]["value"] == prefect_api_url
    # The auth string never in the Job: a reference to the chart's secret.
    assert env["PREFECT_API_AUTH_STRING"] == {"name": "PREFECT_API_AUTH_STRING", "valueFrom": {
        "secretKeyRef": {"name": "prefect-basic-auth", "key": "auth-string"}}}
    assert "not-on-the-job" not in json.dumps(job)
    assert env["TALOSCONFIG"]["value"] == "/var/run/secrets/talos.dev/config"
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["talosconfig"] == {"name": "talosconfig", "mountPath": "/var/run/secrets/talos.dev", "readOnly": True}
    assert mounts["talosctl"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["talosconfig"]["secret"] == {"secretName": "homelab-flows-talos", "defaultMode": 0o400}
    assert main["resources"] == {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert main["args"][:3] == ["prefect", "flow-run", "execute"]

    [init] = pod["initContainers"]
    assert init["image"] == main["image"], "no second image to pin"
    init_env = {e["name"]: e["value"] for e in init["env"]}
    assert init_env["TALOSCTL_URL"] == ("https://github.com/siderolabs/talos/releases/download/v1.11.5/"
                                        "talosctl-linux-amd64")
    assert init_env["TALOSCTL_SHA256"] == template["talosctl_sha256"]["default"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/opt/talos/bin"}
    assert init["resources"]["limits"]["memory"] == "512Mi"


def test_the_job_runs_the_deployed_commit_through_the_pull_steps(prefect_api_url: str, kube: KubeStore) -> None:
    setup()
    commit = "0123456789abcdef0123456789abcdef01234567"
    run_id, _ = asyncio.run(_submit(KUBERNETES_POOL, commit))
    _job_for(kube, run_id)

    async def pull_steps() -> list[dict[str, Any]]:
        async with get_client() as client:
            run = await client.read_flow_run(uuid.UUID(run_id))
            assert run.deployment_id is not None
            deployment = await client.read_deployment(run.deployment_id)
            return list(deployment.pull_steps or [])

    steps = {next(iter(s)): next(iter(s.values())) for s in asyncio.run(pull_steps())}
    assert steps["prefect.deployments.steps.git_clone"]["commit_sha"] == commit
    assert steps["prefect.deployments.steps.pip_install_requirements"]["requirements_file"] == \
        "deploy/requirements-flows.txt"


def test_setup_puts_the_template_back_when_the_pool_holds_another(prefect_api_url: str) -> None:
    setup()

    async def replace_with_default() -> None:
        async with get_client() as client:
            await client.update_work_pool(KUBERNETES_POOL, WorkPoolUpdate(
                base_job_template=KubernetesWorker.get_default_base_job_template()))

    asyncio.run(replace_with_default())
    assert _pool_change(setup()).action == "updated"

    async def template() -> dict[str, Any]:
        async with get_client() as client:
            return (await client.read_work_pool(KUBERNETES_POOL)).base_job_template

    assert asyncio.run(template()) == kubernetes_job_template()
    assert _pool_change(setup()).action == "unchanged"
