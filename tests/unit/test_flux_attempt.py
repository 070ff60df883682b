"""How tasks.flux judges a handled reconcile: real controllers' failure shapes, read from recorded
`kubectl describe` output, must be reported as failures at once; DependencyNotReady must not be."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from tasks import flux

REALWORLD = Path("/work/shared/realworld/flux")
if not REALWORLD.is_dir():  # the captures also live beside the repository in some checkouts
    REALWORLD = Path(__file__).resolve().parents[3] / "shared" / "realworld" / "flux"


def described(name: str, kind: str) -> dict[str, Any]:
    """The object a recorded `kubectl describe` shows: its conditions and top-level observedGeneration."""
    path = REALWORLD / name
    if not path.exists() and os.environ.get("CI") != "true":  # CI has ../shared: there it must be read
        pytest.skip(f"real-world capture {path} not present")
    conditions: list[dict[str, Any]] = []
    status: dict[str, Any] = {"conditions": conditions}
    current: dict[str, Any] | None = None
    last_key = ""
    in_conditions = False
    for line in path.read_text().splitlines():
        if re.match(r"^  Conditions:", line):
            in_conditions = True
            continue
        m = re.match(r"^(\s+)([A-Z][A-Za-z ]+):\s*(.*)$", line)
        if in_conditions and m and len(m.group(1)) == 4:
            key, value = m.group(2), m.group(3)
            if key == "Last Transition Time":
                current = {}
                conditions.append(current)
            assert current is not None
            current[key] = value
            last_key = key
            continue
        if in_conditions and current is not None and line.startswith(" " * 10) and not m:
            current[last_key] += " " + line.strip()  # a wrapped message
            continue
        if m and len(m.group(1)) == 2:
            in_conditions = False
            if m.group(2) == "Observed Generation":
                status["observedGeneration"] = int(m.group(3))
    for c in conditions:
        c.update({"type": c.pop("Type"), "status": c.pop("Status"), "reason": c.pop("Reason"),
                  "message": c.pop("Message", ""), "observedGeneration": int(c.pop("Observed Generation"))})
    generation = max(c["observedGeneration"] for c in conditions)
    return {"kind": kind, "metadata": {"name": "x", "namespace": "flux-system", "generation": generation},
            "status": status}


def test_the_recorded_failed_kustomization_is_a_failed_attempt_with_its_ready_message() -> None:
    obj = described("fluxcd__kustomize-controller__docs-v1-kustomization-describe-failed.txt", "Kustomization")
    assert flux.condition(obj, "Reconciling")["reason"] == "ProgressingWithRetry"
    assert obj["status"]["observedGeneration"] == 2 and obj["metadata"]["generation"] == 3
    assert not flux.current(obj)  # kstatus never calls it Current: flux2 would wait for its whole timeout
    assert flux.attempt(obj) is flux.Attempt.FAILED
    assert flux.failure_message(obj).startswith("kustomization path not found: stat /tmp/kustomization-")


def test_the_recorded_stalled_helmrelease_is_a_failed_attempt() -> None:
    obj = described("fluxcd__helm-controller__docs-v2-helmrelease-describe-stalled.txt", "HelmRelease")
    assert flux.attempt(obj) is flux.Attempt.FAILED
    assert flux.failure_message(obj).startswith("Helm test failed for release podinfo/podinfo.v1")


def obj_with(*conds: tuple[str, str, str], gen: int = 1, observed: int = 1, handled: str | None = "t1") -> dict[str, Any]:
    return {"kind": "Kustomization", "metadata": {"name": "x", "namespace": "flux-system", "generation": gen},
            "status": {"observedGeneration": observed, "lastHandledReconcileAt": handled,
                       "conditions": [{"type": t, "status": s, "reason": r, "message": f"{t} {r}"}
                                      for t, s, r in conds]}}


@pytest.mark.parametrize("conds, gen, observed, expected", [
    ([("Ready", "Unknown", "Progressing"), ("Reconciling", "True", "Progressing")], 2, 1, flux.Attempt.RUNNING),
    ([("Ready", "True", "ReconciliationSucceeded")], 2, 2, flux.Attempt.READY),
    ([("Ready", "True", "ReconciliationSucceeded")], 3, 2, flux.Attempt.RUNNING),  # a newer spec not seen yet
    # kustomize-controller: the dependency check comes before Reconciling is set
    ([("Ready", "False", "DependencyNotReady")], 1, 1, flux.Attempt.WAITING_FOR_DEPENDENCY),
    # helm-controller: Reconciling (Progressing) is set before its dependency check
    ([("Ready", "False", "DependencyNotReady"), ("Reconciling", "True", "Progressing")], 2, 1,
     flux.Attempt.WAITING_FOR_DEPENDENCY),
    # helm-controller retrying with a retry strategy: ProgressingWithRetry, "retrying after 5m0s"
    ([("Ready", "False", "UpgradeFailed"), ("Reconciling", "True", "ProgressingWithRetry")], 2, 1,
     flux.Attempt.FAILED),
    # a missing source: Ready=False ArtifactFailed, no Reconciling, observedGeneration not moved
    ([("Ready", "False", "ArtifactFailed")], 2, 1, flux.Attempt.FAILED),
    ([("Ready", "False", "RetriesExceeded"), ("Stalled", "True", "RetriesExceeded")], 1, 1, flux.Attempt.FAILED),
])
def test_attempt_judges_each_shape_controllers_leave(conds: list[tuple[str, str, str]], gen: int, observed: int,
                                                      expected: flux.Attempt) -> None:
    assert flux.attempt(obj_with(*conds, gen=gen, observed=observed)) is expected


def test_handled_means_changed_from_what_was_there_before_our_request_not_equal_to_our_token() -> None:
    before = {"t0", None}  # lastHandledReconcileAt and requestedAt read before our patch
    obj = obj_with(("Ready", "True", "ReconciliationSucceeded"), handled="t0")
    assert not flux.handled(obj, before)
    obj["status"]["lastHandledReconcileAt"] = "t-other"  # another requester overwrote our requestedAt first
    assert flux.handled(obj, before)
    obj["status"]["conditions"] = [{"type": "Ready", "status": "Unknown", "reason": "Progressing"},
                                   {"type": "Reconciling", "status": "True", "reason": "Progressing"}]
    assert not flux.handled(obj, before)  # handled, but the attempt is still running
    # a request in flight before ours does not count either: its reconcile may have started before ours
    obj = obj_with(("Ready", "True", "ReconciliationSucceeded"), handled="t-inflight")
    assert not flux.handled(obj, {"t0", "t-inflight"})


def test_a_helmrelease_reads_its_chart_from_the_helmchart_beside_its_source() -> None:
    hr = {"kind": "HelmRelease", "metadata": {"name": "cilium", "namespace": "kube-system"},
          "spec": {"chart": {"spec": {"chart": "cilium", "sourceRef": {"kind": "HelmRepository", "name": "cilium",
                                                                        "namespace": "flux-system"}}}}}
    assert flux.source_ref(hr) == ("HelmChart", "flux-system", "kube-system-cilium")
    hr["spec"] = {"chartRef": {"kind": "OCIRepository", "name": "cilium"}}
    assert flux.source_ref(hr) == ("OCIRepository", "kube-system", "cilium")


def test_an_unknown_kind_is_named() -> None:
    with pytest.raises(flux.UnsupportedKind, match="cannot reconcile a 'ExternalArtifact'"):
        flux.flux_kind("ExternalArtifact")
