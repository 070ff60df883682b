"""Flux as its controllers really behave, on the twin against a real Prefect server: a failed apply is
reported at once, a slow dependency is waited for, another requester's request counts, every source
kind reconciles, and an exhausted HelmRelease can be forced or reset."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tasks import flux
from tasks.kube import Kube

pytestmark = pytest.mark.usefixtures("prefect_api_url")

KS_API = "kustomize.toolkit.fluxcd.io/v1"
HR_API = "helm.toolkit.fluxcd.io/v2"
REPO = Path(__file__).resolve().parents[2]


def save_block(t: Any) -> str:
    from twin.register import homelab_block

    name = f"twin-{uuid.uuid4().hex[:8]}"
    homelab_block(t).save(name, overwrite=True)
    return name


def reconcile_run(**params: Any) -> dict[str, Any]:
    from flows.flux_reconcile import flux_reconcile, result_of

    return result_of(flux_reconcile(return_state=True, **params))


def rows(result: dict[str, Any], key: str = "kustomizations") -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in result[key]}


# --- 1. a failed apply is a failure now, not a timeout -----------------------------------------------


def test_a_kustomization_that_fails_to_apply_fails_the_run_within_seconds_with_its_ready_message(twin: Any) -> None:
    t = twin(faults=["flux-fails=rook-ceph-cluster"], flux_delay_seconds=0.1)
    result = reconcile_run(homelab=save_block(t), cluster="m720q", timeout_seconds=120)
    assert result["status"] == "failed"
    assert result["seconds"] < 10, "the failure waited for the deadline instead of being reported"
    by = rows(result)
    failed = by["rook-ceph-cluster"]
    assert failed["message"].startswith("Kustomization flux-system/rook-ceph-cluster reconciliation failed: "
                                        "'Deployment/flux-system/rook-ceph-cluster dry-run failed")
    assert "deadline" not in failed["message"]
    assert by["smokeping"]["status"] == "not-started" and "rook-ceph-cluster failed" in by["smokeping"]["message"]
    assert not t.record.reconciles_of("Kustomization", "smokeping")


def test_the_upgrade_flux_gate_reports_a_failing_rook_ceph_kustomization_instead_of_waiting(twin: Any) -> None:
    from flows.talos_upgrade import flux_verdict

    t = twin(faults=["flux-fails=rook-ceph-cluster"], flux_delay_seconds=0.05)
    with Kube.from_kubeconfig(t.kubeconfig, "admin@m720q") as kube:
        with pytest.raises(flux.ReconcileFailed):
            flux.reconcile(kube, "Kustomization", "flux-system", "rook-ceph-cluster", time.monotonic() + 20)
        verdict = flux_verdict(SimpleNamespace(kube=kube))  # type: ignore[arg-type]
    assert not verdict.ok
    assert "flux-system/rook-ceph-cluster failed: 'Deployment/flux-system/rook-ceph-cluster dry-run failed" \
        in verdict.reason
    assert "wait for it to finish" not in verdict.reason and "fix the manifests in git" in verdict.reason


# --- 2. a slow dependency outside the selection ---------------------------------------------------


def test_a_push_whose_app_depends_on_a_slowly_applying_kustomization_completes(twin: Any) -> None:
    from flows.git_push import git_push

    # rook-ceph-cluster (outside the push's selection) applies 5x slower than smokeping, which depends on it;
    # the controller's own requeue stays at the real 30 s, so only waiting for the dependency can be quick.
    t = twin(flux_delay_seconds=0.1, flux_delays=(("rook-ceph-cluster", 0.5),), requeue_dependency_seconds=0.3)
    block = save_block(t)
    rel = "k8s/apps/overlays/m720q/smokeping/pvc-patch.yaml"
    before = t.git.head()
    (t.git.path / rel).write_text((t.git.path / rel).read_text() + "# bigger\n")
    after = t.git.commit_all("smokeping: bigger volume")
    state = git_push(repository="example/homelab", ref="refs/heads/main", before=before, after=after,
                     homelab=block, timeout_seconds=60, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    [smokeping] = [r for r in result["reconcile"]["m720q"] if r["name"] == "smokeping"]
    assert smokeping["ready"] and smokeping["revision"] == f"main@sha1:{after}"
    assert "flux-system/rook-ceph-cluster" in smokeping.get("waited_for", [])  # it did meet DependencyNotReady
    dep_end = max(r.end for r in t.record.reconciles_of("Kustomization", "rook-ceph-cluster") if r.ok)
    applied = [r for r in t.record.reconciles_of("Kustomization", "smokeping") if r.ok]
    assert applied and applied[-1].start >= dep_end


# --- 3. another requester -------------------------------------------------------------------------


def test_a_concurrent_request_from_another_requester_does_not_hang_the_reconcile(twin: Any) -> None:
    t = twin(flux_delay_seconds=0.1)
    controller = next(f for f in t.flux if f.cluster == "m720q")
    key = ("Kustomization", "flux-system", "api-proxy")
    theirs = "2031-01-01T00:00:00.000000001Z"
    original = controller._reconcile

    def someone_else_first(k: Any) -> bool:
        # Between our patch and the controller picking the object up, a person's `flux reconcile` (or the
        # Receiver) overwrites requestedAt: the controller handles theirs, never ours.
        if k == key and controller.store.get(KS_API, "Kustomization", "flux-system", "api-proxy")[
                "metadata"]["annotations"].get(flux.REQUESTED_AT) != theirs:
            controller.store.patch(KS_API, "Kustomization", "flux-system", "api-proxy",
                                   {"metadata": {"annotations": {flux.REQUESTED_AT: theirs}}})
        return bool(original(k))
    controller._reconcile = someone_else_first  # type: ignore[method-assign]
    started = time.monotonic()
    with Kube.from_kubeconfig(t.kubeconfig, "admin@m720q") as kube:
        res = flux.reconcile(kube, "Kustomization", "flux-system", "api-proxy", time.monotonic() + 20)
    assert res.ready and time.monotonic() - started < 5
    obj = t.stores["m720q"].get(KS_API, "Kustomization", "flux-system", "api-proxy")
    assert obj["status"]["lastHandledReconcileAt"] == theirs


# --- 4. every source kind; HelmReleases forced and reset -------------------------------------------


EXTRA = """\
apiVersion: kustomize.toolkit.fluxcd.io/v1
kind: Kustomization
metadata:
  name: oci-app
  namespace: flux-system
spec:
  interval: 10m
  path: ./
  prune: true
  sourceRef:
    kind: OCIRepository
    name: app-manifests
---
apiVersion: kustomize.toolkit.fluxcd.io/v1
kind: Kustomization
metadata:
  name: bucket-app
  namespace: flux-system
spec:
  interval: 10m
  path: ./
  prune: true
  sourceRef:
    kind: Bucket
    name: app-bucket
---
apiVersion: kustomize.toolkit.fluxcd.io/v1
kind: Kustomization
metadata:
  name: external-app
  namespace: flux-system
spec:
  interval: 10m
  path: ./
  prune: true
  sourceRef:
    kind: ExternalArtifact
    name: generated
---
apiVersion: source.toolkit.fluxcd.io/v1
kind: OCIRepository
metadata:
  name: app-manifests
  namespace: flux-system
spec:
  interval: 5m
  url: oci://registry.homelab.lan/app-manifests
  ref:
    tag: stable
"""


def tree_with_other_sources(tmp_path: Path) -> Path:
    tree = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", tree)
    flux_dir = tree / "clusters" / "m720q" / "flux-kustomizations"
    (flux_dir / "other-sources.yaml").write_text(EXTRA)
    kustomization = flux_dir / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "  - other-sources.yaml\n")
    return tree


def test_oci_repository_and_bucket_sources_reconcile_and_an_external_artifact_is_named(
        tmp_path: Path) -> None:
    from tests.conftest import FAST
    from twin import Knobs, Twin

    with Twin(tree_with_other_sources(tmp_path), tmp_path / "twin", knobs=Knobs(**FAST)) as t:
        from twin.register import homelab_block

        block = homelab_block(t)
        block.tree_path = str(tmp_path / "k8s")
        name = f"twin-{uuid.uuid4().hex[:8]}"
        block.save(name, overwrite=True)
        result = reconcile_run(homelab=name, cluster="m720q", timeout_seconds=60,
                               kustomizations=["oci-app", "bucket-app", "external-app"])
        sources = {r["kind"]: r for r in result["sources"]}
        assert sources["OCIRepository"]["ready"] and sources["OCIRepository"]["revision"].startswith("stable@sha256:")
        assert sources["Bucket"]["ready"] and sources["Bucket"]["revision"].startswith("sha256:")
        assert not sources["ExternalArtifact"]["ready"]
        assert "cannot reconcile source of kind ExternalArtifact (flux-system/generated)" \
            in sources["ExternalArtifact"]["message"]
        by = rows(result)
        assert by["oci-app"]["ready"] and by["oci-app"]["revision"] == sources["OCIRepository"]["revision"]
        assert by["bucket-app"]["ready"] and by["bucket-app"]["revision"] == sources["Bucket"]["revision"]
        assert by["external-app"]["status"] == "not-started"
        assert {r.kind for r in t.record.reconciles_of()} >= {"OCIRepository", "Bucket", "Kustomization"}


def exhaust(t: Any, ns: str, name: str) -> None:
    """Leave the HelmRelease as helm-controller does after its one upgrade attempt failed with no retries
    left (helm-controller atomic_release.go: Stalled RetriesExceeded; the recorded describe sample)."""
    def fn(o: dict[str, Any]) -> None:
        chart = o["status"]["history"][0]
        failure = (f"Helm upgrade failed for release {chart['namespace']}/{chart['name']} with chart "
                   f"{chart['chartName']}@{chart['chartVersion']}: context deadline exceeded")
        # RetriesExhausted: more failures than spec.upgrade.remediation.retries
        attempts = int(((o["spec"].get("upgrade") or {}).get("remediation") or {}).get("retries") or 0) + 1
        o["status"].update(upgradeFailures=attempts, lastAttemptedReleaseAction="upgrade", conditions=[
            {"type": "Ready", "status": "False", "reason": "UpgradeFailed", "message": failure,
             "observedGeneration": 1, "lastTransitionTime": "2025-01-01T00:00:00Z"},
            {"type": "Stalled", "status": "True", "reason": "RetriesExceeded",
             "message": f"Failed to upgrade after {attempts} attempt(s)", "observedGeneration": 1,
             "lastTransitionTime": "2025-01-01T00:00:00Z"},
            {"type": "Released", "status": "False", "reason": "UpgradeFailed", "message": failure,
             "observedGeneration": 1, "lastTransitionTime": "2025-01-01T00:00:00Z"}])
    t.stores["m720q"].mutate(HR_API, "HelmRelease", ns, name, fn, subresource="status")


def test_force_and_reset_recover_a_helmrelease_whose_retries_are_exhausted(twin: Any) -> None:
    t = twin(flux_delay_seconds=0.05)
    block = save_block(t)
    exhaust(t, "rook-ceph", "rook-ceph-cluster")
    plain = reconcile_run(homelab=block, cluster="m720q", helmreleases=["rook-ceph/rook-ceph-cluster"],
                          timeout_seconds=30)
    assert plain["status"] == "failed" and plain["seconds"] < 10
    assert "upgrade failed" in rows(plain, "helmreleases")["rook-ceph-cluster"]["message"].lower()

    forced = reconcile_run(homelab=block, cluster="m720q", helmreleases=["rook-ceph/rook-ceph-cluster"],
                           force=True, timeout_seconds=30)
    assert forced["status"] == "completed", forced
    assert [r["kind"] for r in forced["sources"]] == ["HelmRepository", "HelmChart"]  # --with-source, in order
    hr = t.stores["m720q"].get(HR_API, "HelmRelease", "rook-ceph", "rook-ceph-cluster")
    assert hr["status"]["lastHandledForceAt"] == hr["metadata"]["annotations"][flux.REQUESTED_AT]
    assert hr["status"]["history"][0]["version"] == 2
    assert not any(c["type"] == "Stalled" for c in hr["status"]["conditions"])

    exhaust(t, "rook-ceph", "rook-ceph-cluster")
    reset = reconcile_run(homelab=block, cluster="m720q", helmreleases=["rook-ceph/rook-ceph-cluster"],
                          reset=True, with_source=False, timeout_seconds=30)
    assert reset["status"] == "completed", reset
    hr = t.stores["m720q"].get(HR_API, "HelmRelease", "rook-ceph", "rook-ceph-cluster")
    assert hr["status"]["lastHandledResetAt"] == hr["metadata"]["annotations"][flux.REQUESTED_AT]
    assert "upgradeFailures" not in hr["status"] and hr["status"]["history"][0]["version"] == 3


def test_force_without_a_helmrelease_is_a_usage_error() -> None:
    import typer

    from flows.flux_reconcile import cli

    with pytest.raises(typer.Exit) as e:
        cli(["smokeping"], False, False, "default", "m720q", False, "pre-upgrade", [], True, force=True)
    assert e.value.exit_code == 2


def test_homelab_reconcile_forces_a_helmrelease_and_takes_the_new_faults_without_an_argument(
        prefect_api_url: str) -> None:
    from tests.integration.test_cli import homelab, last_json

    out = homelab("reconcile", "--helmrelease", "kube-system/cilium", "--force", "--twin", "--fault", "kube-throttle",
                  "--fault", "watch-504", "--json", api_url=prefect_api_url)
    assert out.returncode == 0, out.stderr[-2000:]
    result = last_json(out.stdout)
    assert result["kustomizations"] == [] and [r["name"] for r in result["helmreleases"]] == ["cilium"]
    [release] = result["helmreleases"]
    assert release["ready"] and release["revision"].startswith("cilium@")
    assert [r["kind"] for r in result["sources"]] == ["HelmRepository", "HelmChart"]
