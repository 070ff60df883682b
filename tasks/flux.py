"""Flux, the external system: what `flux reconcile <kind> <name>` does on the wire, for every kind.

One routine serves GitRepository, Kustomization and HelmRelease; a small table says where each kind
lives (group, version, plural) and how the `flux` CLI names it. The protocol, as flux2's reconcile.go:

1. get the object; refuse when ``spec.suspend`` is true;
2. remember ``status.lastHandledReconcileAt``;
3. merge-patch ``metadata.annotations["reconcile.fluxcd.io/requestedAt"]`` = now (RFC3339Nano);
4. watch until ``status.lastHandledReconcileAt`` equals that value and the object is Current
   (observedGeneration == generation, Ready settled, not Reconciling), or Stalled;
5. fail unless Ready=True, with the condition's message.

Every wait is a watch under one monotonic deadline (tasks.kube.Kube.wait_object: a dropped stream
resumes from the last resourceVersion, a 410 lists again). Importable without Prefect's server; the
@task wrapper is the only Prefect in here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import kube as kubeapi
from tasks.kube import condition

REQUESTED_AT = "reconcile.fluxcd.io/requestedAt"


@dataclass(frozen=True)
class FluxKind:
    """Where one Flux kind lives on the wire, and how the flux CLI names it in advice."""

    kind: str
    group: str
    version: str
    plural: str
    cli: str  # `flux reconcile <cli> NAME`


KINDS: dict[str, FluxKind] = {
    k.kind: k for k in (
        FluxKind("GitRepository", "source.toolkit.fluxcd.io", "v1", "gitrepositories", "source git"),
        FluxKind("Kustomization", "kustomize.toolkit.fluxcd.io", "v1", "kustomizations", "ks"),
        FluxKind("HelmRelease", "helm.toolkit.fluxcd.io", "v2", "helmreleases", "hr"),
    )
}


def flux_kind(kind: str) -> FluxKind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"flux reconcile: unsupported kind {kind!r}; supported: {', '.join(KINDS)}") from None


# --- errors -----------------------------------------------------------------------------------


class FluxError(Exception):
    """A reconcile did not end Ready; ``result`` holds what was seen (ready False)."""

    retryable = False

    def __init__(self, message: str, result: ReconcileResult | None = None):
        self.result = result
        super().__init__(message)


class Suspended(FluxError):
    """The object has spec.suspend: true; reconciling it would be a no-op that never finishes."""


class ReconcileFailed(FluxError):
    """The controller handled the request and reported Ready=False (or Stalled)."""


class ReconcileTimeout(FluxError):
    """The request was not handled, or the object not Current, before the deadline."""


class ObjectMissing(FluxError):
    """No such object in the cluster."""


# --- pure views ---------------------------------------------------------------------------------


def rfc3339_nano(ns_since_epoch: int) -> str:
    """Go's time.RFC3339Nano in UTC: trailing zeros of the fraction dropped, no fraction when zero."""
    secs, nanos = divmod(ns_since_epoch, 1_000_000_000)
    base = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def _true(obj: Mapping[str, Any], ctype: str) -> bool:
    return (condition(obj, ctype) or {}).get("status") == "True"


def last_handled(obj: Mapping[str, Any]) -> str | None:
    value = (obj.get("status") or {}).get("lastHandledReconcileAt")
    return str(value) if value is not None else None


def stalled(obj: Mapping[str, Any]) -> bool:
    return _true(obj, "Stalled")


def current(obj: Mapping[str, Any]) -> bool:
    """kstatus Current: the controller has seen this generation and Ready has settled."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation", status.get("observedGeneration")):
        return False
    if _true(obj, "Reconciling") or stalled(obj):
        return False
    ready = condition(obj, "Ready")
    return ready is not None and ready.get("status") in ("True", "False")


def handled(obj: Mapping[str, Any], requested: str) -> bool:
    """The controller took our request and is done with it: Current, or Stalled (it will not retry)."""
    return last_handled(obj) == requested and (current(obj) or stalled(obj))


def revision(obj: Mapping[str, Any]) -> str | None:
    """What the object applied: a Kustomization's lastAppliedRevision, a source's artifact revision,
    a HelmRelease's last release revision."""
    status = obj.get("status") or {}
    if status.get("lastAppliedRevision"):
        return str(status["lastAppliedRevision"])
    artifact = status.get("artifact") or {}
    if artifact.get("revision"):
        return str(artifact["revision"])
    history = status.get("history") or []
    if history and isinstance(history[0], Mapping):
        chart = history[0]
        if chart.get("chartVersion"):
            return f"{chart.get('chartName', '')}@{chart['chartVersion']}".lstrip("@")
    return str(status["lastAttemptedRevision"]) if status.get("lastAttemptedRevision") else None


def describe(obj: Mapping[str, Any] | None) -> str:
    """The state a timeout or failure names: handled request, generation, Ready."""
    if obj is None:
        return "the object is gone"
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    ready = condition(obj, "Ready")
    ready_text = ("no Ready condition" if ready is None else
                  f"Ready={ready.get('status')} ({ready.get('reason', '')}: {ready.get('message', '')})")
    parts = [f"lastHandledReconcileAt={last_handled(obj) or '(none)'}",
             f"observedGeneration={status.get('observedGeneration')}/generation={meta.get('generation')}",
             ready_text]
    if _true(obj, "Reconciling"):
        parts.append("Reconciling=True")
    if stalled(obj):
        parts.append(f"Stalled=True ({(condition(obj, 'Stalled') or {}).get('message', '')})")
    return ", ".join(parts)


@dataclass
class ReconcileResult:
    kind: str
    namespace: str
    name: str
    ready: bool
    revision: str | None
    seconds: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _label(fk: FluxKind, namespace: str, name: str) -> str:
    return f"{fk.kind} {namespace}/{name}"


# --- the protocol ------------------------------------------------------------------------------


def reconcile(kube: kubeapi.Kube, kind: str, namespace: str, name: str, deadline: float,
              clock_ns: Callable[[], int] = time.time_ns) -> ReconcileResult:
    """Ask Flux to reconcile one object now and wait for the outcome (flux reconcile <kind> <name>).

    Returns the result when the object ends Ready=True. Raises Suspended (spec.suspend), ObjectMissing,
    ReconcileFailed (Ready=False or Stalled; the message is the condition's), ReconcileTimeout (the
    monotonic ``deadline`` passed), or tasks.kube.KubeError when the API server fails.
    """
    fk = flux_kind(kind)
    label = _label(fk, namespace, name)
    started = time.monotonic()
    try:
        obj = kube.get_object(fk.group, fk.version, fk.plural, namespace, name,
                              timeout_s=max(0.001, deadline - time.monotonic()))
    except kubeapi.KubeNotFound:
        raise ObjectMissing(f"{label} not found in the cluster; expected it from the GitOps tree: "
                            f"check `flux get {fk.cli} -n {namespace}` and that the flux-system "
                            f"Kustomization applied it") from None
    if (obj.get("spec") or {}).get("suspend"):
        raise Suspended(f"{label} is suspended; resume it with `flux resume {fk.cli} {name} -n {namespace}` first",
                        ReconcileResult(kind, namespace, name, False, revision(obj), 0.0, "suspended"))
    before = last_handled(obj)
    requested = rfc3339_nano(clock_ns())
    if requested == before:  # a coarse clock must not make the old answer look like ours
        requested = rfc3339_nano(clock_ns() + 1)
    kube.merge_patch(fk.group, fk.version, fk.plural, namespace, name,
                     {"metadata": {"annotations": {REQUESTED_AT: requested}}},
                     timeout_s=max(0.001, deadline - time.monotonic()))
    try:
        obj = kube.wait_object(
            fk.group, fk.version, fk.plural, namespace, name, lambda o: handled(o, requested), deadline,
            f"reconcile request {requested} to be handled and the object to be Current",
            describe=describe,
            next_step=f"look at `flux get {fk.cli} {name} -n {namespace}` and the controller's logs, "
                      f"then run the reconcile again with a longer timeout")
    except kubeapi.KubeTimeout as e:
        raise ReconcileTimeout(
            str(e).replace(f"{fk.plural}/{name} in {namespace}", label, 1),
            ReconcileResult(kind, namespace, name, False, revision(e.last or {}),
                            round(time.monotonic() - started, 3), describe(e.last))) from None
    seconds = round(time.monotonic() - started, 3)
    ready = condition(obj, "Ready") or {}
    message = str(ready.get("message") or "")
    if ready.get("status") != "True":
        if stalled(obj) and not message:
            message = str((condition(obj, "Stalled") or {}).get("message") or "")
        result = ReconcileResult(kind, namespace, name, False, revision(obj), seconds, message)
        raise ReconcileFailed(f"{label} reconciliation failed: '{message}'", result)
    return ReconcileResult(kind, namespace, name, True, revision(obj), seconds, message)


# --- clients from the Homelab block --------------------------------------------------------------


@contextlib.contextmanager
def kube_client(homelab: Any, cluster: str) -> Iterator[kubeapi.Kube]:
    """The Kubernetes API of ``cluster`` from a Homelab block (its kubeconfig and context)."""
    k8s = homelab.kubernetes
    if k8s.in_cluster:
        client = kubeapi.Kube.in_cluster()
    else:
        path = k8s.kubeconfig_file()
        if path is None:
            raise kubeapi.KubeError("the Homelab block's kubernetes has neither kubeconfig nor kubeconfig_path: "
                                    "set one of them (or in_cluster) on the block")
        try:
            client = kubeapi.Kube.from_kubeconfig(path, homelab.kube_context(cluster))
        finally:
            if k8s.kubeconfig is not None:  # a temp copy of the secret text: never leave it on disk
                path.unlink(missing_ok=True)
    try:
        yield client
    finally:
        client.close()


# --- Prefect task ---------------------------------------------------------------------------------


@task(name="reconcile", task_run_name="reconcile {name}", cache_policy=NO_CACHE, retries=0)
def reconcile_task(kube: kubeapi.Kube, kind: str, namespace: str, name: str, deadline: float) -> dict[str, Any]:
    """One `flux reconcile`; the result as a dict (FluxError and KubeError propagate and fail the task)."""
    return reconcile(kube, kind, namespace, name, deadline).as_dict()
