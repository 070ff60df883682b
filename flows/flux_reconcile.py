"""Flow `flux-reconcile`: `flux reconcile ks --with-source` for a selection of Kustomizations, in
dependsOn order, independent branches at the same time; and `flux reconcile hr [--force|--reset]` for
named HelmReleases.

The sources (the GitRepository, OCIRepository or Bucket the selection's sourceRefs name) go first; a
source kind Flux cannot reconcile is an error that names it. Then each Kustomization starts as soon as
every one of ITS dependencies inside the selection has finished Ready, not wave by wave: a slow branch
never holds back an unrelated one. A dependency outside the selection that is not yet ready is waited
for (tasks.flux). A failed Kustomization fails the run at once and its dependents are not started; a
suspended one is refused.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from blocks import load_homelab
from flows import _runtime
from flows._names import run_name
from homelab.config import FluxKustomization, FluxTree, load_tree
from homelab.problems import ConfigError, Problem
from tasks import flux
from tasks.kube import KubeError

COMPLETED, FAILED = "completed", "failed"
NOT_STARTED = "not-started"
MAX_PARALLEL = 16

Key = tuple[str, str]


class ReconcileRunFailed(_runtime.FlowFailed):
    """The run ends Failed; ``result`` is the flow's result dict (per-Kustomization outcomes)."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message, result or {"status": FAILED, "kustomizations": []})


# --- pure decisions -------------------------------------------------------------------------------


def select(tree: FluxTree, names: Iterable[str] | None) -> set[Key]:
    """The Kustomizations to reconcile: the named ones (by name, or namespace/name), or all of the tree."""
    wanted = [n for n in (names or []) if n]
    if not wanted:
        return set(tree.kustomizations)
    keys: set[Key] = set()
    unknown = []
    for n in wanted:
        ns, _, name = n.rpartition("/")
        hits = [k for k in tree.kustomizations if k[1] == name and (not ns or k[0] == ns)]
        if hits:
            keys.update(hits)
        else:
            unknown.append(n)
    if unknown:
        known = ", ".join(sorted(k.name for k in tree.kustomizations.values())) or "none"
        raise ConfigError([Problem(f"clusters/{tree.cluster}", "kustomizations",
                                   f"no Kustomization named {', '.join(map(repr, unknown))} in cluster "
                                   f"{tree.cluster} (known: {known})")])
    tree.order(keys)  # a cycle is a configuration error, before anything is touched
    return keys


def dependencies(tree: FluxTree, keys: set[Key]) -> dict[Key, set[Key]]:
    """Each selected Kustomization's dependencies inside the selection."""
    return {k: {d for d in tree.kustomizations[k].depends_on if d in keys} for k in keys}


def startable(deps: dict[Key, set[Key]], done: set[Key], started: set[Key]) -> list[Key]:
    """Not yet started, and every dependency finished Ready."""
    return sorted(k for k, ds in deps.items() if k not in started and ds <= done)


def blocked_by(deps: dict[Key, set[Key]], failed: set[Key]) -> dict[Key, Key]:
    """Kustomizations that cannot start because a dependency (transitively) failed: key -> the failed one."""
    out: dict[Key, Key] = {}
    changed = True
    while changed:
        changed = False
        for k, ds in deps.items():
            if k in failed or k in out:
                continue
            for d in sorted(ds):
                root = d if d in failed else out.get(d)
                if root is not None:
                    out[k] = root
                    changed = True
                    break
    return out


def sources_of(tree: FluxTree, keys: set[Key]) -> list[tuple[str, str, str]]:
    """(kind, namespace, name) of every source the selection reads from, whatever its kind: one that
    cannot be reconciled is reported by name, never left out."""
    found = {(tree.kustomizations[k].source_kind, tree.kustomizations[k].source_namespace,
              tree.kustomizations[k].source_name) for k in keys}
    return sorted(s for s in found if s[2])


def helmrelease_keys(names: Iterable[str] | None) -> list[Key]:
    """HelmReleases named namespace/name (a bare name is looked for in flux-system)."""
    keys = []
    for n in names or []:
        ns, _, name = n.strip().rpartition("/")
        if not name or "/" in ns:
            raise ConfigError([Problem("helmreleases", n, "name a HelmRelease as <namespace>/<name>")])
        keys.append((ns or "flux-system", name))
    return sorted(set(keys))


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"kind": r.get("kind", "Kustomization"), "name": r["name"], "ready": r["ready"],
             "revision": r.get("revision") or "", "seconds": r.get("seconds"), "message": r.get("message", "")}
            for r in rows]


# --- the scheduler ------------------------------------------------------------------------------


def _row(ks: FluxKustomization, outcome: dict[str, Any] | None, message: str) -> dict[str, Any]:
    o = outcome or {}
    row = {"name": ks.name, "namespace": ks.namespace, "ready": bool(o.get("ready", False)),
           "revision": o.get("revision"), "seconds": o.get("seconds"), "message": message or o.get("message", "")}
    if o.get("waited_for"):
        row["waited_for"] = list(o["waited_for"])  # dependencies outside the selection it waited for
    return row


def _outcome(future: Any) -> tuple[bool, dict[str, Any] | None, str]:
    """(ready, result dict, message) of a finished reconcile task."""
    value = future.result(raise_on_failure=False)
    if isinstance(value, dict):
        return bool(value.get("ready")), value, str(value.get("message") or "")
    if isinstance(value, flux.FluxError):
        return False, (value.result.as_dict() if value.result else None), str(value)
    if isinstance(value, BaseException):
        return False, None, f"{type(value).__name__}: {value}"
    return False, None, f"the reconcile task ended {future.state.type.value}: {future.state.message}"


def reconcile_graph(kube: Any, tree: FluxTree, keys: set[Key], deadline: float,
                    submit: Callable[[FluxKustomization], Any]) -> list[dict[str, Any]]:
    """Start each Kustomization as soon as its dependencies are done; rows in dependsOn order."""
    deps = dependencies(tree, keys)
    done: set[Key] = set()
    failed: set[Key] = set()
    started: set[Key] = set()
    finished: queue.Queue[tuple[Key, Any]] = queue.Queue()
    results: dict[Key, dict[str, Any]] = {}
    running = 0

    def launch() -> int:
        n = 0
        for k in startable(deps, done, started):
            if k in blocked_by(deps, failed):
                continue
            started.add(k)
            fut = submit(tree.kustomizations[k])
            fut.add_done_callback(lambda f, k=k: finished.put((k, f)))
            n += 1
        return n

    running += launch()
    while running:
        # Every task has its own deadline; this bound only guards against a lost callback.
        k, fut = finished.get(timeout=max(1.0, deadline - time.monotonic() + 30))
        running -= 1
        ready, outcome, message = _outcome(fut)
        (done if ready else failed).add(k)
        results[k] = _row(tree.kustomizations[k], outcome, "" if ready else message)
        running += launch()
    for k, root in blocked_by(deps, failed).items():
        results[k] = {**_row(tree.kustomizations[k], None, ""), "ready": False, "status": NOT_STARTED,
                      "message": f"not started: dependency {root[0]}/{root[1]} failed"}
    ordered = [ks.key for wave in tree.order(keys) for ks in wave]
    return [results[k] for k in ordered if k in results]


def _source_row(kube: Any, kind: str, ns: str, name: str, deadline: float) -> dict[str, Any]:
    """Reconcile one source as a task run; its row."""
    if kind not in flux.KUSTOMIZATION_SOURCES and kind not in ("HelmRepository", "HelmChart"):
        return {"kind": kind, "name": name, "namespace": ns, "ready": False, "revision": None, "seconds": None,
                "message": f"flux reconcile: cannot reconcile source of kind {kind} ({ns}/{name}): Flux has no "
                           f"reconcile for it; reconcile it where it is produced, or run without the source"}
    fut = flux.reconcile_task.with_options(task_run_name=f"reconcile {name}").submit(kube, kind, ns, name, deadline)
    ready, outcome, message = _outcome(fut)
    return {"kind": kind, "name": name, "namespace": ns, "ready": ready, "revision": (outcome or {}).get("revision"),
            "seconds": (outcome or {}).get("seconds"), "message": message}


def reconcile_selection(kube: Any, tree: FluxTree, keys: set[Key], with_source: bool, deadline: float
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(source rows, Kustomization rows): the sources first (when asked), then the Kustomizations
    in dependsOn order; each reconcile is a task run named `reconcile <name>` of the current flow."""
    source_rows: list[dict[str, Any]] = []
    if with_source:
        for kind, ns, name in sources_of(tree, keys):
            source_rows.append(_source_row(kube, kind, ns, name, deadline))
        failed = [r for r in source_rows if not r["ready"]]
        if failed:
            # Only what reads a failed source is held back; the rest goes on.
            bad = {(r["kind"], r["namespace"], r["name"]) for r in failed}
            held = {k for k in keys if (tree.kustomizations[k].source_kind, tree.kustomizations[k].source_namespace,
                                        tree.kustomizations[k].source_name) in bad}
            held = tree.dependents(held) & keys
            rows = []
            for k in sorted(held):
                ks = tree.kustomizations[k]
                rows.append({**_row(ks, None, ""), "status": NOT_STARTED,
                             "message": f"not started: source {ks.source_kind} {ks.source_namespace}/{ks.source_name} "
                                        f"failed" if (ks.source_kind, ks.source_namespace, ks.source_name) in bad
                                        else "not started: a dependency reads a source that failed"})
            rest = keys - held
            if rest:
                rows += reconcile_graph(kube, tree, rest, deadline, lambda ks: flux.reconcile_task.with_options(
                    task_run_name=f"reconcile {ks.name}").submit(kube, "Kustomization", ks.namespace, ks.name,
                                                                  deadline))
            order = [ks.key for wave in tree.order(keys) for ks in wave]
            rows.sort(key=lambda r: order.index((r["namespace"], r["name"])))
            return source_rows, rows
    rows = reconcile_graph(kube, tree, keys, deadline, lambda ks: flux.reconcile_task.with_options(
        task_run_name=f"reconcile {ks.name}").submit(kube, "Kustomization", ks.namespace, ks.name, deadline))
    return source_rows, rows


def reconcile_helmreleases(kube: Any, keys: list[Key], with_source: bool, force: bool, reset: bool,
                           deadline: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(source rows, HelmRelease rows): `flux reconcile hr [--with-source] [--force] [--reset]` for each,
    one after the other (their HelmChart and its HelmRepository first when asked)."""
    source_rows: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for ns, name in keys:
        base = {"kind": "HelmRelease", "name": name, "namespace": ns, "revision": None, "seconds": None}
        if with_source:
            try:
                chain = flux.sources_to_reconcile(kube, "HelmRelease", ns, name, deadline)
            except (flux.FluxError, KubeError) as e:
                rows.append({**base, "ready": False, "message": str(e)})
                continue
            failed = None
            for kind, sns, sname in chain:
                row = _source_row(kube, kind, sns, sname, deadline)
                source_rows.append(row)
                if not row["ready"]:
                    failed = row
                    break
            if failed is not None:
                rows.append({**base, "ready": False, "status": NOT_STARTED,
                             "message": f"not started: source {failed['kind']} {failed['namespace']}/{failed['name']} "
                                        f"failed"})
                continue
        fut = flux.reconcile_task.with_options(task_run_name=f"reconcile {name}").submit(
            kube, "HelmRelease", ns, name, deadline, force=force, reset=reset)
        ready, outcome, message = _outcome(fut)
        rows.append({**base, "ready": ready, "revision": (outcome or {}).get("revision"),
                     "seconds": (outcome or {}).get("seconds"), "message": "" if ready else message})
    return source_rows, rows


# --- the flow ------------------------------------------------------------------------------------


@flow(name="flux-reconcile", flow_run_name=run_name("flux-reconcile"), task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL),  # type: ignore[arg-type]  # Prefect 3.9 types the runner generically
      validate_parameters=True)
def flux_reconcile(
    homelab: Annotated[str, Field(description="The Homelab block to act on.")] = "default",
    cluster: Annotated[str, Field(description="The cluster whose Flux objects to reconcile (clusters/<cluster>/).")] = "m720q",
    kustomizations: Annotated[list[str] | None, Field(
        description="Kustomization names (or namespace/name); empty: every Kustomization of the cluster's tree "
                    "(none when HelmReleases are named).")] = None,
    with_source: Annotated[bool, Field(
        description="Reconcile the source each object reads from first (flux reconcile --with-source).")] = True,
    timeout_seconds: Annotated[float, Field(
        gt=0, description="Deadline of the whole run; a reconcile still waiting then fails with what it saw last.")] = 600.0,
    helmreleases: Annotated[list[str] | None, Field(
        description="HelmReleases to reconcile, as namespace/name (flux reconcile hr).")] = None,
    force: Annotated[bool, Field(
        description="HelmReleases: a one-off install or upgrade, even with retries exhausted (--force).")] = False,
    reset: Annotated[bool, Field(
        description="HelmReleases: reset the failure counts so retries start again (--reset).")] = False,
) -> dict[str, Any]:
    """Reconcile Flux Kustomizations in dependsOn order, independent branches concurrently; and HelmReleases."""
    started_at = time.monotonic()
    deadline = started_at + timeout_seconds
    logger = get_run_logger()
    block = load_homelab(homelab)
    tree = load_tree(block.gitops_tree()).cluster(cluster).flux
    releases = helmrelease_keys(helmreleases)
    if (force or reset) and not releases:
        raise ConfigError([Problem("helmreleases", "force/reset",
                                   "--force and --reset act on HelmReleases: name at least one")])
    keys = select(tree, kustomizations) if kustomizations or not releases else set()
    with flux.kube_client(block, cluster) as kube:
        source_rows, rows = reconcile_selection(kube, tree, keys, with_source, deadline) if keys else ([], [])
        hr_sources, hr_rows = reconcile_helmreleases(kube, releases, with_source, force, reset, deadline)
    source_rows += hr_sources
    ok = all(r["ready"] for r in source_rows + rows + hr_rows)
    result = {"status": COMPLETED if ok else FAILED, "cluster": cluster,
              "sources": source_rows, "kustomizations": rows, "helmreleases": hr_rows,
              "seconds": round(time.monotonic() - started_at, 3)}
    create_table_artifact(table=table_rows(source_rows) + table_rows(rows) + table_rows(hr_rows),
                          key=f"flux-reconcile-{cluster}".lower(),
                          description=f"flux reconcile on {cluster}: {result['status']}")
    for r in rows + hr_rows:
        logger.info("%s: %s %s", r["name"], "Ready" if r["ready"] else r.get("status", "failed"), r["message"])
    if not ok:
        failures = [r for r in source_rows + rows + hr_rows if not r["ready"] and r.get("status") != NOT_STARTED]
        raise ReconcileRunFailed("; ".join(r["message"] for r in failures) or "flux reconcile failed", result)
    result["wall_seconds"] = round(time.monotonic() - started_at, 3)
    return result


# --- command line ---------------------------------------------------------------------------------


def failed_result(error: str) -> dict[str, Any]:
    """The result of a run that ended without its own result dict."""
    return {"status": FAILED, "kustomizations": [], "error": error}


def result_of(state: Any) -> dict[str, Any]:
    """The flow's result dict from its final state (a Failed state carries it in ReconcileRunFailed)."""
    return _runtime.result_of(state, failed_result)


def summary(result: dict[str, Any]) -> str:
    lines = [f"flux reconcile: {result['status']}"]
    for r in result.get("sources", []) + result.get("kustomizations", []) + result.get("helmreleases", []):
        state = "Ready" if r["ready"] else r.get("status", "failed")
        secs = f"{r['seconds']:.1f}s" if isinstance(r.get("seconds"), int | float) else ""
        lines.append(f"  {r['name']:<24} {state:<12} {secs:>7}  {r.get('revision') or ''}  {r.get('message') or ''}")
    if result.get("error"):
        lines.append(f"  error: {result['error']}")
    return "\n".join(lines)


def cli(names: list[str], all_: bool, no_source: bool, homelab: str, cluster: str, twin: bool, twin_state: str,
        fault: list[str], as_json: bool, helmreleases: list[str] | None = None, force: bool = False,
        reset: bool = False) -> None:
    """`homelab reconcile`: exit 0 all Ready, 1 a reconcile failed or was refused, 2 bad usage or configuration."""
    releases = list(helmreleases or [])
    if not names and not all_ and not releases:
        typer.echo("homelab reconcile: name the Kustomizations to reconcile (or --helmrelease NS/NAME), or pass --all",
                   err=True)
        raise typer.Exit(2)
    if names and all_:
        typer.echo("homelab reconcile: give Kustomization names or --all, not both", err=True)
        raise typer.Exit(2)
    if (force or reset) and not releases:
        typer.echo("homelab reconcile: --force and --reset act on HelmReleases: name them with --helmrelease NS/NAME",
                   err=True)
        raise typer.Exit(2)
    _runtime.quiet_prefect()
    outcome: dict[str, Any] = {}
    with _runtime.target(homelab, twin, twin_state, fault) as block_name:
        def run() -> None:
            wanted = list(names) or None
            if all_ and releases:  # every Kustomization too, not only the HelmReleases
                wanted = [f"{ns}/{n}" for ns, n in sorted(load_tree(load_homelab(block_name).gitops_tree())
                                                         .cluster(cluster).flux.kustomizations)]
            state = flux_reconcile(homelab=block_name, cluster=cluster, kustomizations=wanted,
                                   with_source=not no_source, helmreleases=releases or None, force=force,
                                   reset=reset, return_state=True)
            outcome.update(result_of(state))

        _runtime.config_errors_exit_2(run)
    _runtime.finish(outcome, as_json, summary, ok=(COMPLETED,))


__all__ = ["ReconcileRunFailed", "reconcile_selection", "cli", "flux_reconcile", "result_of", "select"]
