"""flux-reconcile on the twin against a real Prefect server: dependsOn order, concurrency, faults, refusals."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from tasks import flux

pytestmark = pytest.mark.integration

DEPS = {  # the m720q tree's dependsOn
    "infrastructure-core": ["sources"],
    "api-proxy": ["infrastructure-core"],
    "infrastructure": ["infrastructure-core"],
    "rook-ceph-operator": ["infrastructure-core"],
    "rook-ceph-cluster": ["rook-ceph-operator"],
    "smokeping": ["rook-ceph-cluster"],
}


def save_twin_block(t: Any, name: str = "twin") -> str:
    try:
        from twin.register import homelab_block
    except ImportError:  # the twin's own registration, when it is not there yet
        from blocks import GitSource, Homelab, Kubernetes, Talos

        block = Homelab(kubernetes=Kubernetes(kubeconfig_path=str(t.kubeconfig)), talos=Talos(),
                        git=GitSource(url=str(t.git_dir)))
    else:
        block = homelab_block(t)
    block.save(name, overwrite=True)
    return name


def run(**params: Any) -> dict[str, Any]:
    from flows.flux_reconcile import flux_reconcile, result_of

    return result_of(flux_reconcile(return_state=True, **params))


def by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in result["kustomizations"]}


# --- the routine, without Prefect ---------------------------------------------------------------


def test_rfc3339_nano_trims_like_go() -> None:
    assert flux.rfc3339_nano(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert flux.rfc3339_nano(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"
    assert flux.rfc3339_nano(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"


def test_reconcile_times_out_naming_the_object_and_its_last_state(twin: Any) -> None:
    from tasks.kube import Kube

    t = twin(flux_delay_seconds=5.0)
    import time

    with Kube.from_kubeconfig(t.kubeconfig, "admin@m720q") as kube:
        with pytest.raises(flux.ReconcileTimeout) as e:
            flux.reconcile(kube, "Kustomization", "flux-system", "sources", time.monotonic() + 0.5)
    text = str(e.value)
    assert "Kustomization flux-system/sources" in text and "Ready=Unknown" in text and "next step" in text


def test_reconcile_refuses_a_suspended_object_before_touching_it(twin: Any) -> None:
    from tasks.kube import Kube

    t = twin()
    t.stores["m720q"].mutate("kustomize.toolkit.fluxcd.io/v1", "Kustomization", "flux-system", "smokeping",
                             lambda o: o["spec"].update(suspend=True))
    import time

    with Kube.from_kubeconfig(t.kubeconfig, "admin@m720q") as kube:
        with pytest.raises(flux.Suspended, match=r"Kustomization flux-system/smokeping is suspended; "
                                                  r"resume it with `flux resume ks smokeping"):
            flux.reconcile(kube, "Kustomization", "flux-system", "smokeping", time.monotonic() + 5)
        obj = kube.get_object("kustomize.toolkit.fluxcd.io", "v1", "kustomizations", "flux-system", "smokeping")
    assert flux.REQUESTED_AT not in (obj["metadata"].get("annotations") or {})


# --- the flow ------------------------------------------------------------------------------------


def test_reconcile_all_runs_dependencies_first_and_independent_branches_together(
        twin: Any, prefect_api_url: str) -> None:
    t = twin(flux_delay_seconds=0.3)
    block = save_twin_block(t)
    result = run(homelab=block, cluster="m720q", timeout_seconds=60)
    assert result["status"] == "completed", result
    rows = by_name(result)
    assert all(r["ready"] and r["revision"].startswith("main@sha1:") for r in rows.values())
    rec = {r.name: r for r in t.record.reconciles_of("Kustomization")}
    source = t.record.reconciles_of("GitRepository")
    assert len(source) == 1 and all(r.start >= source[0].end for r in rec.values())
    for name, deps in DEPS.items():
        for dep in deps:
            assert rec[name].start >= rec[dep].end, f"{name} started before its dependency {dep} ended"
    branches = [rec["api-proxy"], rec["infrastructure"], rec["rook-ceph-operator"]]
    assert max(r.start for r in branches) < min(r.end for r in branches), "independent branches ran one by one"
    assert rec["sources"].start < rec["flux-system"].end and rec["flux-system"].start < rec["sources"].end


def test_flux_fails_fault_fails_that_one_and_does_not_start_its_dependents(
        twin: Any, prefect_api_url: str) -> None:
    t = twin(faults=["flux-fails=rook-ceph-operator"], flux_delay_seconds=0.1)
    block = save_twin_block(t)
    result = run(homelab=block, cluster="m720q", timeout_seconds=60)
    assert result["status"] == "failed"
    rows = by_name(result)
    failed = rows["rook-ceph-operator"]
    assert not failed["ready"]
    assert failed["message"].startswith("Kustomization flux-system/rook-ceph-operator reconciliation failed: '")
    assert "dry-run failed" in failed["message"]
    for dependent in ("rook-ceph-cluster", "smokeping"):
        assert rows[dependent]["status"] == "not-started"
        assert "rook-ceph-operator failed" in rows[dependent]["message"]
        assert not t.record.reconciles_of("Kustomization", dependent)
    assert rows["api-proxy"]["ready"] and rows["infrastructure"]["ready"]


def test_suspended_kustomization_is_refused_with_the_resume_command(twin: Any, prefect_api_url: str) -> None:
    t = twin()
    t.stores["m720q"].mutate("kustomize.toolkit.fluxcd.io/v1", "Kustomization", "flux-system", "api-proxy",
                             lambda o: o["spec"].update(suspend=True))
    block = save_twin_block(t)
    result = run(homelab=block, cluster="m720q", kustomizations=["api-proxy"], timeout_seconds=30)
    assert result["status"] == "failed"
    row = by_name(result)["api-proxy"]
    assert "is suspended; resume it with `flux resume ks api-proxy" in row["message"]
    assert not t.record.reconciles_of("Kustomization", "api-proxy")


def test_cli_without_names_or_all_is_a_usage_error() -> None:
    from flows.flux_reconcile import cli

    with pytest.raises(typer.Exit) as e:
        cli([], False, False, "default", "m720q", False, "pre-upgrade", [], True)
    assert e.value.exit_code == 2
