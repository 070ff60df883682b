"""Flux, the external system: what `flux reconcile <kind> <name>` does on the wire, for every kind.

One routine serves every kind Flux reconciles (the sources, Kustomization, HelmRelease); a small table
says where each kind lives (group, version, plural) and how the `flux` CLI names it. The protocol, as
flux2's cmd/flux/reconcile.go (reconcileCommand.run, requestReconciliation, reconciliationHandled):

1. get the object; refuse when ``spec.suspend`` is true;
2. remember ``status.lastHandledReconcileAt``;
3. merge-patch ``metadata.annotations["reconcile.fluxcd.io/requestedAt"]`` = now (RFC3339Nano), and for a
   HelmRelease ``forceAt``/``resetAt`` with the same token when asked (flux reconcile hr --force/--reset);
4. watch until ``lastHandledReconcileAt`` differs from the value seen before: the controller read a
   request made at or after ours (another requester may have overwritten ours first);
5. judge the attempt (``attempt``): Ready=True at the observed generation is success. Ready=False is a
   failed attempt when the controller keeps Reconciling with reason ProgressingWithRetry, is Stalled, or
   holds no Reconciling at all (kustomize-controller finalizeStatus; helm-controller atomic_release.go):
   reported at once with the Ready message, where flux2 would wait for kstatus Current until its timeout.
   Ready=False with reason DependencyNotReady is not final (the controller requeues it after
   --requeue-dependency): wait for the dependencies, then ask again.

Every wait is a watch under one monotonic deadline (tasks.kube.Kube.wait_object). Importable without
Prefect's server; the @task wrapper is the only Prefect in here.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import kube as kubeapi
from tasks.kube import condition

REQUESTED_AT = "reconcile.fluxcd.io/requestedAt"
# helm-controller api/v2 annotations.go: a token equal to requestedAt forces a release / resets the
# failure counts of a HelmRelease whose retries are exhausted.
FORCE_AT = "reconcile.fluxcd.io/forceAt"
RESET_AT = "reconcile.fluxcd.io/resetAt"


@dataclass(frozen=True)
class FluxKind:
    """Where one Flux kind lives on the wire, and how the flux CLI names it in advice."""

    kind: str
    group: str
    version: str
    plural: str
    cli: str  # `flux reconcile <cli> NAME`

    @property
    def is_source(self) -> bool:
        return self.group == SOURCE_GROUP


SOURCE_GROUP = "source.toolkit.fluxcd.io"
KINDS: dict[str, FluxKind] = {
    k.kind: k for k in (
        FluxKind("GitRepository", SOURCE_GROUP, "v1", "gitrepositories", "source git"),
        FluxKind("OCIRepository", SOURCE_GROUP, "v1", "ocirepositories", "source oci"),
        FluxKind("Bucket", SOURCE_GROUP, "v1", "buckets", "source bucket"),
        FluxKind("HelmRepository", SOURCE_GROUP, "v1", "helmrepositories", "source helm"),
        FluxKind("HelmChart", SOURCE_GROUP, "v1", "helmcharts", "source chart"),
        FluxKind("Kustomization", "kustomize.toolkit.fluxcd.io", "v1", "kustomizations", "ks"),
        FluxKind("HelmRelease", "helm.toolkit.fluxcd.io", "v2", "helmreleases", "hr"),
    )
}
# The sources a Kustomization can be reconciled with (flux2 reconcile_kustomization.go getSource);
# an ExternalArtifact, or anything else, has no reconcile command.
KUSTOMIZATION_SOURCES = ("GitRepository", "OCIRepository", "Bucket")


def flux_kind(kind: str) -> FluxKind:
    try:
        return KINDS[kind]
    except KeyError:
        raise UnsupportedKind(f"flux reconcile: cannot reconcile a {kind!r}: Flux has no reconcile for it "
                              f"(reconcilable kinds: {', '.join(KINDS)})") from None


# --- errors -----------------------------------------------------------------------------------


class FluxError(Exception):
    """A reconcile did not end Ready; ``result`` holds what was seen (ready False)."""

    retryable = False

    def __init__(self, message: str, result: ReconcileResult | None = None):
        self.result = result
        super().__init__(message)


class UnsupportedKind(FluxError, ValueError):
    """A kind Flux cannot reconcile (a source kind with no reconcile command, or a typo)."""


class Suspended(FluxError):
    """The object has spec.suspend: true; reconciling it would be a no-op that never finishes."""


class ReconcileFailed(FluxError):
    """The controller handled the request and the attempt failed (Ready=False, retrying or Stalled)."""


class DependencyFailed(ReconcileFailed):
    """A dependency the object waits for failed its own attempt: it will not become ready by waiting."""


class ReconcileTimeout(FluxError):
    """The request was not handled, or the attempt not finished, before the deadline."""


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


def requested_at(obj: Mapping[str, Any]) -> str | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(REQUESTED_AT)
    return str(value) if value is not None else None


def stalled(obj: Mapping[str, Any]) -> bool:
    return _true(obj, "Stalled")


def generation_observed(obj: Mapping[str, Any]) -> bool:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    return bool(status.get("observedGeneration") == meta.get("generation", status.get("observedGeneration")))


class Attempt(enum.Enum):
    """What a handled reconcile request came to, as far as the object tells."""

    RUNNING = "running"              # not finished yet: Reconciling (Progressing), or Ready Unknown
    READY = "ready"                  # Ready=True at the observed generation
    FAILED = "failed"                # Ready=False, and the controller will only retry on its interval
    WAITING_FOR_DEPENDENCY = "dependency"  # Ready=False DependencyNotReady: requeued, not final


def attempt(obj: Mapping[str, Any]) -> Attempt:
    """Judge an object whose controller has handled a request.

    kustomize-controller finalizeStatus keeps Reconciling after a failure with reason
    ProgressingWithRetry and moves observedGeneration only on success; helm-controller marks
    ProgressingWithRetry while it retries and Stalled once retries are exhausted; a failure before any
    work (a missing source) leaves Ready=False and no Reconciling. DependencyNotReady is requeued after
    --requeue-dependency, and helm-controller has already set Reconciling (Progressing) by then.
    """
    ready = condition(obj, "Ready") or {}
    reconciling = condition(obj, "Reconciling") or {}
    if stalled(obj):
        return Attempt.FAILED
    if ready.get("status") == "False" and ready.get("reason") == "DependencyNotReady":
        return Attempt.WAITING_FOR_DEPENDENCY
    if reconciling.get("status") == "True":
        if reconciling.get("reason") == "ProgressingWithRetry" and ready.get("status") == "False":
            return Attempt.FAILED
        return Attempt.RUNNING
    if ready.get("status") == "False":
        return Attempt.FAILED
    if ready.get("status") == "True" and generation_observed(obj):
        return Attempt.READY
    return Attempt.RUNNING


def failure_message(obj: Mapping[str, Any]) -> str:
    """The error to show for a failed attempt: Ready's message, else Stalled's."""
    message = str((condition(obj, "Ready") or {}).get("message") or "")
    if not message and stalled(obj):
        message = str((condition(obj, "Stalled") or {}).get("message") or "")
    return message


def current(obj: Mapping[str, Any]) -> bool:
    """kstatus Current: the controller has seen this generation and Ready has settled."""
    if not generation_observed(obj):
        return False
    if _true(obj, "Reconciling") or stalled(obj):
        return False
    ready = condition(obj, "Ready")
    return ready is not None and ready.get("status") in ("True", "False")


def handled(obj: Mapping[str, Any], stale: set[str | None] | str) -> bool:
    """The controller answered a request made at or after ours: lastHandledReconcileAt is none of the
    ``stale`` values (what it said, and what was requested, before our patch), and the attempt is over.
    A string is taken as our own token (equality), for callers that know no stale values."""
    seen = last_handled(obj)
    if isinstance(stale, str):
        if seen != stale:
            return False
    elif seen in stale:
        return False
    return attempt(obj) is not Attempt.RUNNING


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
    """The state a timeout or failure names: handled request, generation, Ready, Reconciling, Stalled."""
    if obj is None:
        return "the object is gone"
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    ready = condition(obj, "Ready")
    ready_text = ("no Ready condition" if ready is None else
                  f"Ready={ready.get('status')} ({ready.get('reason', '')}: {ready.get('message', '')})")
    parts = [f"lastHandledReconcileAt={last_handled(obj) or '(none)'}",
             f"observedGeneration={status.get('observedGeneration')}/generation={meta.get('generation')}",
             ready_text]
    reconciling = condition(obj, "Reconciling")
    if reconciling is not None and reconciling.get("status") == "True":
        parts.append(f"Reconciling=True ({reconciling.get('reason', '')})")
    if stalled(obj):
        parts.append(f"Stalled=True ({(condition(obj, 'Stalled') or {}).get('message', '')})")
    return ", ".join(parts)


def dependency_ready(dep: Mapping[str, Any], source_revision: str | None) -> bool:
    """kustomize-controller checkDependencies: the dependency has observed its generation, is Ready,
    and (when it reads the same source) has applied the source's current revision."""
    return (bool((dep.get("status") or {}).get("conditions")) and generation_observed(dep)
            and _true(dep, "Ready")
            and (source_revision is None or (dep.get("status") or {}).get("lastAppliedRevision") == source_revision))


def source_ref(obj: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of the source a Kustomization or HelmRelease reads."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    ns = str(meta.get("namespace") or "default")
    if obj.get("kind") == "HelmRelease":
        if spec.get("chartRef"):
            ref = spec["chartRef"]
            return str(ref.get("kind")), str(ref.get("namespace") or ns), str(ref.get("name"))
        chart = ((spec.get("chart") or {}).get("spec") or {})
        src = chart.get("sourceRef") or {}
        # helm-controller keeps the chart in a HelmChart <namespace>-<name> beside the source.
        return "HelmChart", str(src.get("namespace") or ns), f"{ns}-{meta.get('name')}"
    ref = spec.get("sourceRef") or {}
    if not ref.get("name"):
        return None
    return str(ref.get("kind") or "GitRepository"), str(ref.get("namespace") or ns), str(ref["name"])


@dataclass
class ReconcileResult:
    kind: str
    namespace: str
    name: str
    ready: bool
    revision: str | None
    seconds: float
    message: str
    waited_for: list[str] = field(default_factory=list)  # dependencies waited for on the way

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _label(fk: FluxKind, namespace: str, name: str) -> str:
    return f"{fk.kind} {namespace}/{name}"


# --- the protocol ------------------------------------------------------------------------------


def _request(kube: kubeapi.Kube, fk: FluxKind, namespace: str, name: str, deadline: float,
             clock_ns: Callable[[], int], force: bool, reset: bool, avoid: str | None) -> str:
    """Merge-patch a fresh requestedAt (and forceAt/resetAt) token; the token."""
    token = rfc3339_nano(clock_ns())
    if token == avoid:  # a coarse clock must not make the old answer look like ours
        token = rfc3339_nano(clock_ns() + 1)
    annotations = {REQUESTED_AT: token}
    if force:
        annotations[FORCE_AT] = token
    if reset:
        annotations[RESET_AT] = token
    kube.merge_patch(fk.group, fk.version, fk.plural, namespace, name, {"metadata": {"annotations": annotations}},
                     deadline=deadline)
    return token


def reconcile(kube: kubeapi.Kube, kind: str, namespace: str, name: str, deadline: float,
              clock_ns: Callable[[], int] = time.time_ns, force: bool = False, reset: bool = False,
              ) -> ReconcileResult:
    """Ask Flux to reconcile one object now and wait for the outcome (flux reconcile <kind> <name>).

    Returns the result when the object ends Ready=True. Raises Suspended (spec.suspend), ObjectMissing,
    ReconcileFailed (a failed attempt; the message is the controller's), DependencyFailed (a dependency
    it waits for failed), ReconcileTimeout (the monotonic ``deadline`` passed), UnsupportedKind, or
    tasks.kube.KubeError when the API server refuses (transient errors are retried until the deadline).
    ``force``/``reset`` (HelmRelease only) ask helm-controller for a one-off release / fresh retries.
    """
    fk = flux_kind(kind)
    if (force or reset) and kind != "HelmRelease":
        raise UnsupportedKind(f"flux reconcile: --force and --reset are for HelmReleases, not {kind} {namespace}/{name}")
    label = _label(fk, namespace, name)
    started = time.monotonic()
    waited: list[str] = []

    def result(obj: Mapping[str, Any] | None, ready: bool, message: str) -> ReconcileResult:
        return ReconcileResult(kind, namespace, name, ready, revision(obj or {}),
                               round(time.monotonic() - started, 3), message, list(waited))

    try:
        obj = kube.get_object(fk.group, fk.version, fk.plural, namespace, name, deadline=deadline)
    except kubeapi.KubeNotFound:
        raise ObjectMissing(f"{label} not found in the cluster; expected it from the GitOps tree: "
                            f"check `flux get {fk.cli} -n {namespace}` and that the flux-system "
                            f"Kustomization applied it") from None
    if (obj.get("spec") or {}).get("suspend"):
        raise Suspended(f"{label} is suspended; resume it with `flux resume {fk.cli} {name} -n {namespace}` first",
                        result(obj, False, "suspended"))
    next_step = (f"look at `flux get {fk.cli} {name} -n {namespace}` and the controller's logs, "
                 f"then run the reconcile again with a longer timeout")
    rounds = 0
    while True:
        # Answers to requests made before ours do not count: neither what was handled before, nor the
        # request that may still be in flight.
        stale = {last_handled(obj), requested_at(obj)}
        token = _request(kube, fk, namespace, name, deadline, clock_ns, force, reset, last_handled(obj))
        try:
            obj = kube.wait_object(
                fk.group, fk.version, fk.plural, namespace, name, functools.partial(handled, stale=stale), deadline,
                f"reconcile request {token} to be handled and the attempt to finish",
                describe=describe, next_step=next_step)
        except kubeapi.KubeTimeout as e:
            raise ReconcileTimeout(str(e).replace(f"{fk.plural}/{name} in {namespace}", label, 1),
                                   result(e.last, False, describe(e.last))) from None
        outcome = attempt(obj)
        if outcome is Attempt.READY:
            return result(obj, True, str((condition(obj, "Ready") or {}).get("message") or ""))
        if outcome is Attempt.FAILED:
            message = failure_message(obj)
            raise ReconcileFailed(f"{label} reconciliation failed: '{message}'", result(obj, False, message))
        # DependencyNotReady: the controller looks again after --requeue-dependency (30 s); waiting for
        # the dependencies and asking again is sooner, and a dependency that failed is reported now.
        looked = time.monotonic()
        waited += _wait_for_dependencies(kube, obj, deadline, label)
        force = reset = False  # a force or reset token is handled once, even when the attempt waited
        if time.monotonic() - looked < 0.05:
            # The dependencies already looked ready to us, not to the controller (a check it makes that
            # we do not): ask again, but not in a tight loop.
            pause = min(2.0, 0.2 * 2 ** min(rounds, 4))
            rounds += 1
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))


def _wait_for_dependencies(kube: kubeapi.Kube, obj: Mapping[str, Any], deadline: float, label: str) -> list[str]:
    """Wait until every dependency of ``obj`` is ready as its controller checks it; the ones waited for.
    DependencyFailed when one of them failed its own attempt; ReconcileTimeout at the deadline."""
    kind = str(obj.get("kind"))
    fk = KINDS[kind]
    ns = str((obj.get("metadata") or {}).get("namespace") or "default")
    message = str((condition(obj, "Ready") or {}).get("message") or "")
    source_revision: str | None = None
    ref = source_ref(obj) if kind == "Kustomization" else None
    if ref is not None and ref[0] in KINDS:
        sk = KINDS[ref[0]]
        try:
            source = kube.get_object(sk.group, sk.version, sk.plural, ref[1], ref[2], deadline=deadline)
            source_revision = ((source.get("status") or {}).get("artifact") or {}).get("revision")
        except kubeapi.KubeNotFound:
            source_revision = None

    def same_source(dep: Mapping[str, Any]) -> str | None:
        return source_revision if source_ref(dep) == ref else None

    def ready_now(dep: dict[str, Any]) -> bool:
        return dependency_ready(dep, same_source(dep))

    def failed(dep: dict[str, Any] | None) -> bool:
        # A failure at an older revision is not final: a new source revision queues the dependency
        # again (kustomize-controller requestsForRevisionChangeOf), so only a failure at this one counts.
        if dep is None or attempt(dep) is not Attempt.FAILED:
            return False
        revision_now = same_source(dep)
        return revision_now is None or (dep.get("status") or {}).get("lastAttemptedRevision") == revision_now

    waited = []
    for d in (obj.get("spec") or {}).get("dependsOn") or []:
        dns, dname = str(d.get("namespace") or ns), str(d.get("name"))
        dep_label = _label(fk, dns, dname)
        waited.append(f"{dns}/{dname}")
        try:
            dep = kube.wait_object(
                fk.group, fk.version, fk.plural, dns, dname, ready_now,
                deadline, f"dependency of {label} to be ready ({message})", describe=describe,
                next_step=f"look at `flux get {fk.cli} {dname} -n {dns}`: {label} waits for it",
                stop=failed)
        except kubeapi.KubeTimeout as e:
            raise ReconcileTimeout(f"{label}: waited for its dependency {dep_label} until the deadline; "
                                   f"{str(e).split(': ', 1)[-1]}",
                                   ReconcileResult(kind, ns, str((obj.get("metadata") or {}).get("name")),
                                                   False, revision(obj), 0.0, describe(e.last), waited)) from None
        if not dependency_ready(dep, same_source(dep)):
            dep_message = failure_message(dep)
            raise DependencyFailed(
                f"{label} not started: its dependency {dep_label} failed: '{dep_message}'",
                ReconcileResult(kind, ns, str((obj.get("metadata") or {}).get("name")), False, revision(obj), 0.0,
                                f"dependency {dns}/{dname} failed: {dep_message}", waited))
    return waited


def sources_to_reconcile(kube: kubeapi.Kube, kind: str, namespace: str, name: str,
                         deadline: float) -> list[tuple[str, str, str]]:
    """What `--with-source` reconciles first for this object, in order (flux2 reconcile_with_source.go):
    a Kustomization's GitRepository, OCIRepository or Bucket; a HelmRelease's HelmChart after the
    HelmChart's own source. UnsupportedKind names a source kind Flux cannot reconcile."""
    fk = flux_kind(kind)
    obj = kube.get_object(fk.group, fk.version, fk.plural, namespace, name, deadline=deadline)
    ref = source_ref(obj)
    if ref is None:
        return []
    if kind == "Kustomization" and ref[0] not in KUSTOMIZATION_SOURCES:
        raise UnsupportedKind(f"flux reconcile: cannot reconcile source of kind {ref[0]} "
                              f"({ref[1]}/{ref[2]}, the source of {_label(fk, namespace, name)})")
    if ref[0] == "HelmChart":
        chain: list[tuple[str, str, str]] = []
        with contextlib.suppress(kubeapi.KubeNotFound):
            chart = kube.get_object(SOURCE_GROUP, "v1", "helmcharts", ref[1], ref[2], deadline=deadline)
            src = (chart.get("spec") or {}).get("sourceRef") or {}
            if src.get("kind") in ("HelmRepository", "GitRepository", "Bucket"):
                chain.append((str(src["kind"]), ref[1], str(src.get("name"))))
        return [*chain, ref]
    flux_kind(ref[0])  # an unknown kind is named, not skipped
    return [ref]


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
def reconcile_task(kube: kubeapi.Kube, kind: str, namespace: str, name: str, deadline: float,
                   force: bool = False, reset: bool = False) -> dict[str, Any]:
    """One `flux reconcile`; the result as a dict (FluxError and KubeError propagate and fail the task)."""
    return reconcile(kube, kind, namespace, name, deadline, force=force, reset=reset).as_dict()
