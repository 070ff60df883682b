"""git-push: push → signed webhook → Prefect event → trigger → served run → exactly the affected reconciles."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SECRET = "push-secret-for-tests"
KS = "kustomize.toolkit.fluxcd.io/v1"
CORE = ("flux-system", "infrastructure-core")


def affected(t: Any) -> dict[str, set[str]]:
    """infrastructure-core (whose overlays include core/base) and everything depending on it, per cluster."""
    return {c: {k[1] for k in t.tree.clusters[c].flux.dependents({CORE})} for c in ("m720q", "homelab")}


def save_twin_block(t: Any, name: str = "twin") -> str:
    from twin.register import homelab_block

    homelab_block(t).save(name, overwrite=True)
    return name


def touch(t: Any, rel: str, text: str) -> tuple[str, str]:
    """Change a file of the twin's repository and commit it; (before, after)."""
    before = t.git.head()
    path = t.git.path / rel
    path.write_text(path.read_text() + text)
    return before, t.git.commit_all(f"touch {rel}")


def requested(t: Any, cluster: str) -> set[str]:
    """Kustomizations that got a reconcile request (the twin's own cascades do not annotate)."""
    return {o["metadata"]["name"] for o in t.stores[cluster].list(KS, "Kustomization")
            if "reconcile.fluxcd.io/requestedAt" in (o["metadata"].get("annotations") or {})}


def github_push(before: str, after: str, paths: list[str]) -> bytes:
    return json.dumps({
        "ref": "refs/heads/main", "before": before, "after": after, "forced": False, "created": False,
        "deleted": False, "repository": {"full_name": "example/homelab", "name": "homelab", "pushed_at": 1700000000},
        "pusher": {"name": "octo"}, "sender": {"login": "octo"},
        "commits": [{"id": after, "added": [], "removed": [], "modified": paths}],
        "head_commit": {"id": after, "added": [], "removed": [], "modified": paths},
    }).encode()


@pytest.fixture
def served(prefect_api_url: str, tmp_path: Path):
    """deployments/serve.py in a subprocess, serving git-push for the block `twin`."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--only", "git-push", "--homelab", "twin"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            try:
                dep = client.read_deployment_by_name("git-push/git-push")
                if client.read_resource_related_automations(f"prefect.deployment.{dep.id}"):
                    break
            except Exception:  # not registered yet
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve.py registered no git-push deployment with its trigger in 60 s"
            time.sleep(0.2)
    yield dep
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def wait_run(deployment_id: Any, deadline_s: float = 120) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + deadline_s
    last = None
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            last = runs[0] if runs else None
            if last is not None and last.state is not None and last.state.is_final():
                return last
            time.sleep(0.25)
    raise AssertionError(f"no finished git-push run within {deadline_s}s; last: {last and last.state}")


def test_signed_push_reconciles_exactly_the_affected_kustomizations(
        twin: Any, prefect_api_url: str, served: Any, serve_asgi: Any) -> None:
    from deployments.webhook import create_app

    t = twin(state="synced", flux_delay_seconds=0.05)
    save_twin_block(t)
    rel = "k8s/infrastructure/core/base/cilium/helmrelease.yaml"
    before, after = touch(t, rel, "# retuned\n")
    base = serve_asgi(create_app(SECRET, prefect_api_url, repositories=["example/homelab"]))
    body = github_push(before, after, [rel])
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    resp = httpx.post(f"{base}/hooks/git", content=body, timeout=10, headers={
        "Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": sig})
    assert resp.status_code == 200, resp.text
    run = wait_run(served.id)
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"
    # The event names no paths: the flow takes them from its own clone at `after`.
    assert run.parameters["after"] == after and not run.parameters.get("changed_paths")
    want = affected(t)
    assert {"api-proxy", "smokeping"} <= want["m720q"] and "sources" not in want["m720q"]
    for cluster, names in want.items():
        assert requested(t, cluster) == names, cluster
        git = t.stores[cluster].get("source.toolkit.fluxcd.io/v1", "GitRepository", "flux-system", "flux-system")
        assert git["status"]["artifact"]["revision"] == f"main@sha1:{after}"
    ok = {r.name for r in t.record.reconciles_of("Kustomization") if r.ok}
    assert want["m720q"] <= ok


# --- the flow itself, run in-process --------------------------------------------------------------


def run_push(**params: Any) -> tuple[str, dict[str, Any]]:
    from flows.git_push import GitPushFailed, git_push

    state = git_push(return_state=True, **params)
    if state.is_completed():
        return "completed", state.result()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, GitPushFailed), exc
    return "failed", {**exc.result, "error": str(exc)}


def test_push_to_another_branch_is_ignored(twin: Any, prefect_api_url: str) -> None:
    t = twin(flux_delay_seconds=0.05)
    block = save_twin_block(t, "twin-ignore")
    _, result = run_push(repository="example/homelab", ref="refs/heads/feature", before="a" * 40, after="b" * 40,
                         homelab=block)
    assert result["status"] == "ignored" and "not the branch Flux follows" in result["reason"]
    assert not requested(t, "m720q")


def test_unknown_commit_is_named_when_the_sender_gave_no_paths(twin: Any, prefect_api_url: str) -> None:
    t = twin(flux_delay_seconds=0.05)
    block = save_twin_block(t, "twin-unknown")
    ghost = "c" * 40
    outcome, result = run_push(repository="example/homelab", ref="refs/heads/main", before=t.git.head(), after=ghost,
                               homelab=block)
    assert outcome == "failed" and f"commit {ghost} is not in the repository" in result["error"]


def test_talos_version_change_asks_for_an_approved_upgrade_and_reports_a_missing_deployment(
        twin: Any, prefect_api_url: str) -> None:
    t = twin(flux_delay_seconds=0.05)
    block = save_twin_block(t, "twin-talos")
    tal = t.git.path / "k8s/clusters/m720q/talos/talconfig.yaml"
    before = t.git.head()
    text = tal.read_text()
    from homelab.config import load_talconfig

    old = load_talconfig(tal).talos_version
    assert old in text, "talosVersion is not written literally in talconfig.yaml"
    tal.write_text(text.replace(old, "v1.11.6", 1))
    after = t.git.commit_all("talos v1.11.6")
    outcome, result = run_push(repository="example/homelab", ref="refs/heads/main", before=before, after=after,
                               changed_paths='["k8s/clusters/m720q/talos/talconfig.yaml"]', homelab=block)
    assert outcome == "completed", result
    [start] = result["deployments"]
    assert start["deployment"] == "talos-upgrade/talos-upgrade"
    assert start["parameters"] == {"cluster": "m720q", "require_approval": True}
    assert start["outcome"] == "not started: deployment missing"
    assert result["reconcile"] == {} and not requested(t, "m720q")


UPGRADES = ("talos-upgrade", "kubernetes-upgrade", "cluster-upgrade")


@pytest.fixture
def upgrade_deployments(prefect_api_url: str) -> Any:
    """The three upgrade deployments of prefect.yaml, registered with no runner (their runs stay Scheduled);
    deleted afterwards with their runs, since other tests expect them not deployed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.exceptions import ObjectNotFound

    from deployments.serve import load_definitions, to_deployments

    def forget() -> None:
        with get_client(sync_client=True) as client:
            for name in UPGRADES:
                try:
                    dep = client.read_deployment_by_name(f"{name}/{name}")
                except ObjectNotFound:
                    continue
                for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]))):
                    client.delete_flow_run(run.id)
                client.delete_deployment(dep.id)

    def runs(name: str) -> list[Any]:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"{name}/{name}")
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[dep.id])))

    forget()
    for deployment in to_deployments(load_definitions(), only=UPGRADES, homelab="twin-both"):
        deployment.apply()
    yield runs
    forget()


def test_push_changing_both_versions_starts_exactly_one_cluster_upgrade(twin: Any, upgrade_deployments: Any) -> None:
    from homelab.config import load_talconfig

    t = twin(flux_delay_seconds=0.05)
    block = save_twin_block(t, "twin-both")
    tal = t.git.path / "k8s/clusters/m720q/talos/talconfig.yaml"
    old = load_talconfig(tal)
    text = tal.read_text()
    assert f"talosVersion: {old.talos_version}" in text and f"kubernetesVersion: {old.kubernetes_version}" in text
    tal.write_text(text.replace(f"talosVersion: {old.talos_version}", "talosVersion: v1.11.6", 1)
                   .replace(f"kubernetesVersion: {old.kubernetes_version}", "kubernetesVersion: v1.33.0", 1))
    before = t.git.head()
    after = t.git.commit_all("talos v1.11.6 and kubernetes v1.33.0")
    outcome, result = run_push(repository="example/homelab", ref="refs/heads/main", before=before, after=after,
                               homelab=block)
    assert outcome == "completed", result
    [start] = result["deployments"]
    assert start["deployment"] == "cluster-upgrade/cluster-upgrade"
    assert start["parameters"] == {"cluster": "m720q", "require_approval": True}
    assert "then kubernetesVersion" in start["reason"]
    [run] = upgrade_deployments("cluster-upgrade")
    assert start["outcome"] == f"started flow run {run.id}"
    assert run.parameters == {"cluster": "m720q", "require_approval": True, "homelab": "twin-both"}
    assert upgrade_deployments("talos-upgrade") == [] and upgrade_deployments("kubernetes-upgrade") == []
