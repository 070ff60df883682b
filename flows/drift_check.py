"""`drift-check`: the GitOps tree at the head of the configured branch against the live homelab. Read-only.

Per cluster of the tree (or the one named): Talos and kubelet versions per node (one Node list), machine
configs (`talosctl apply-config --dry-run`, where a generated config exists), Flux (one list each of
Kustomizations, HelmReleases and GitRepositories), the Proxmox VMs (one VM list), Ceph health and flags;
and the tree itself (the `homelab validate` rules). The comparisons are the pure functions of
homelab.drift. A part that cannot be reached is a finding of severity error; the others still run. The
run fails only when it cannot run at all (no block, no tree).

Output: a markdown artifact (one section per area), the result {"status", "counts", "findings"}, the
final state Completed named "Drifted" when anything is found, and the event `homelab.drift.detected`
(resource `homelab.cluster.<name>`, payload the counts) per drifted cluster.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.states import Completed
from pydantic import Field

from blocks import Homelab, load_homelab
from flows import _runtime
from flows._names import run_name
from homelab import drift
from homelab.config import Cluster, load_tree
from homelab.drift import DriftReport, Finding
from homelab.problems import Problem
from homelab.validate import validate
from tasks import git as gitrepo

EVENT = "homelab.drift.detected"
PROXMOX_DEADLINE_S = 10.0
KUBE_LIST_TIMEOUT_S = 20.0


class DriftCheckFailed(RuntimeError):
    """The check could not run at all (the tree cannot be read); drift itself is never an error."""


# --- git: the desired state at the branch head -------------------------------------------------------


@contextlib.contextmanager
def desired_tree(block: Homelab) -> Iterator[tuple[Path, str]]:
    """(the tree at the branch head in a temp dir, the revision as Flux names it: <branch>@sha1:<sha>)."""
    url, branch, tree_path = block.git.url, block.git.branch, block.git.tree_path.strip("/")
    try:
        repo = gitrepo.Repo.from_url(url)
        sha = repo.branch_head(branch)
    except gitrepo.GitError as e:
        raise DriftCheckFailed(f"the desired state cannot be read: {e}; check the git block's url and branch "
                               "and that the repository is reachable") from None
    with tempfile.TemporaryDirectory(prefix="homelab-drift-") as tmp:
        try:
            root = repo.export(sha, tree_path, Path(tmp))
        except gitrepo.GitError as e:
            raise DriftCheckFailed(f"{e}; is {tree_path or 'the tree'}/ in {url} at {sha[:12]}?") from None
        if not (root / "clusters").is_dir():
            raise DriftCheckFailed(f"{tree_path or '.'}/clusters/ is not in {url} at {sha[:12]}; "
                                   "fix the git block's tree_path")
        yield root, f"{branch}@sha1:{sha}"


# --- observing (each part bounded: a list call per kind, never one request per object) -------------


@dataclass
class ClusterScan:
    findings: list[Finding]
    notes: list[str]


def _generated_config(roots: list[Path], cluster: Cluster, host: str) -> Path | None:
    """talhelper's output for the node (clusterconfig/<clusterName>-<host>.yaml); gitignored, so a local
    checkout is looked at as well as the branch head."""
    name = cluster.talconfig.cluster_name if cluster.talconfig else cluster.name
    for root in roots:
        p = root / "clusters" / cluster.name / "talos" / "clusterconfig" / f"{name}-{host}.yaml"
        if p.is_file():
            return p
    return None


@task(name="drift-proxmox", cache_policy=NO_CACHE)
def observe_proxmox(block: Homelab, cluster: Cluster) -> tuple[list[Finding], bool | None]:
    """(findings, provisioned?) — provisioned is None when Proxmox could not be read."""
    from tasks import proxmox as px

    cfg = cluster.proxmox
    assert cfg is not None
    if block.proxmox is None:
        return [drift.unreachable("proxmox", cluster.name, "Proxmox API", "the Homelab block has no Proxmox part",
                                  "add the Proxmox block to the Homelab block")], None
    api = px.ProxmoxApi.from_block(block.proxmox)
    node = cfg.proxmox.node
    try:
        # One call: the VM list carries cores (cpus), memory (maxmem) and the boot disk (maxdisk) from
        # each VM's config; a per-VM config read would be one request per object.
        observed = api.list_vm_summaries(node, deadline=time.monotonic() + PROXMOX_DEADLINE_S)
    except px.ProxmoxError as e:
        return [drift.unreachable("proxmox", cluster.name, f"Proxmox API ({block.proxmox.host})", str(e),
                                  "check that Proxmox is up and the block's token is valid")], None
    return drift.compare_vms(cfg, observed), drift.provisioned(cfg, observed)


@task(name="drift-kubernetes", cache_policy=NO_CACHE)
def observe_cluster(block: Homelab, cluster: Cluster, head_revision: str, config_roots: list[Path]) -> ClusterScan:
    """Nodes, machine configs and Flux of one cluster."""
    from tasks.connect import connect
    from tasks.kube import KubeError, node_view
    from tasks.talos import TalosError

    findings: list[Finding] = []
    notes: list[str] = []
    c = cluster.name
    hosts: dict[str, str] = ({n.hostname: n.ip for n in cluster.talconfig.nodes} if cluster.talconfig
                             else {vm.name: vm.ip for vm in cluster.proxmox.vms} if cluster.proxmox else {})
    with connect(block, c) as clients:
        kube = clients.kube
        try:
            nodes, _ = kube.list_objects("", "v1", "nodes", timeout_s=KUBE_LIST_TIMEOUT_S)
        except KubeError as e:
            findings.append(drift.unreachable("kubernetes", c, "Kubernetes API", str(e),
                                              f"check the API server and the kubeconfig context {block.kube_context(c)}"))
            notes.append(f"{c}: Talos versions, kubelets and Flux not compared: the Kubernetes API did not answer")
            return ClusterScan(findings, notes)
        findings += drift.compare_nodes(c, cluster.talos_version, cluster.kubernetes_version, list(hosts),
                                        [node_view(o) for o in nodes])
        live: dict[str, list[dict[str, Any]]] = {}
        for group, version, plural, kind in drift.FLUX_KINDS:
            try:
                live[kind], _ = kube.list_objects(group, version, plural, timeout_s=KUBE_LIST_TIMEOUT_S)
            except KubeError as e:
                live[kind] = []
                findings.append(drift.unreachable("flux", c, f"{kind} list", str(e),
                                                  f"check that Flux's {plural}.{group} CRD is installed"))
        findings += drift.compare_flux(c, cluster.flux, head_revision, live["Kustomization"], live["HelmRelease"],
                                       live["GitRepository"])
        missing = []
        for host, ip in hosts.items():
            cfg_file = _generated_config(config_roots, cluster, host)
            if cfg_file is None:
                missing.append(host)
                continue
            try:
                res = clients.talos.apply_config(ip, cfg_file, dry_run=True)
            except TalosError as e:
                findings.append(drift.unreachable("talos", c, f"Talos API of {host}", str(e),
                                                  f"talosctl --nodes {ip} version"))
                continue
            f = drift.compare_machine_config(c, host, cfg_file.name, bool(res.changed), res.output)
            if f is not None:
                findings.append(f)
        if missing:
            notes.append(f"{c}: machine configs not compared for {', '.join(missing)}: no generated config "
                         f"(clusters/{c}/talos/clusterconfig/ is written by talhelper genconfig and not kept in git)")
    return ClusterScan(findings, notes)


@task(name="drift-ceph", cache_policy=NO_CACHE)
def observe_ceph(block: Homelab, cluster: str) -> list[Finding]:
    from tasks.ceph import CephCli, CephError

    assert block.ceph is not None
    cli = CephCli(list(block.ceph.command), block.ceph.env, timeout_s=block.ceph.timeout_seconds)
    try:
        status, flags = cli.status(), cli.flags()
    except CephError as e:
        return [drift.unreachable("ceph", cluster, "Ceph", str(e), "check the mons and the Ceph command of the block")]
    return drift.compare_ceph(cluster, status, flags)


@task(name="drift-monitoring", cache_policy=NO_CACHE)
def observe_monitoring(block: Homelab, cluster: str) -> list[Finding]:
    """The alerts firing in the cluster's Prometheus, and this project's silences left in its Alertmanager."""
    from datetime import UTC, datetime

    from homelab.monitoring import parse_matcher_sets, stale_silences
    from tasks.monitoring import MonitoringClient, MonitoringError

    mon = block.monitoring_for(cluster)
    assert mon is not None
    with MonitoringClient.from_block(mon) as client:
        found: list[Finding] = []
        try:
            alerts = client.alerts()
        except MonitoringError as e:
            alerts = []
            found.append(drift.unreachable("monitoring", cluster, "Prometheus", str(e),
                                           "check the Monitoring block's prometheus_url and credentials"))
        try:
            now = datetime.now(UTC)
            stale = stale_silences(client.silences(), now, mon.stale_silence_seconds)
        except MonitoringError as e:
            stale = []
            found.append(drift.unreachable("monitoring", cluster, "Alertmanager", str(e),
                                           "check the Monitoring block's alertmanager_url and credentials"))
        return found + drift.compare_monitoring(cluster, alerts, parse_matcher_sets(mon.allowed_alerts), stale, now)


# --- the flow ------------------------------------------------------------------------------------


def scan(block: Homelab, tree_root: Path, revision: str, only: str | None) -> DriftReport:
    shown = block.git.tree_path.rstrip("/") or "."
    tree = load_tree(tree_root, shown)
    report = DriftReport(revision=revision)
    problems: list[Problem] = validate(tree_root, shown)
    report.findings += drift.repository_findings(problems)
    names = [tree.cluster(only).name] if only else sorted(tree.clusters)
    local = block.gitops_tree()
    roots = [tree_root] + ([local] if local.is_dir() else [])
    for name in names:
        cluster = tree.clusters[name]
        provisioned: bool | None = True
        if cluster.proxmox is not None:
            found, provisioned = observe_proxmox(block, cluster)
            report.findings += found
        if provisioned is False:
            report.notes.append(f"{name}: not provisioned (none of cluster.yaml's VMs exists in Proxmox); its "
                                "Talos, Kubernetes and Flux parts are not compared until `homelab provision`")
        else:
            part = observe_cluster(block, cluster, revision, roots)
            report.findings += part.findings
            report.notes += part.notes
        if block.runs_ceph(name):
            report.findings += observe_ceph(block, name)
        if block.monitoring_for(name) is not None:
            report.findings += observe_monitoring(block, name)
    return report


def _emit(report: DriftReport, homelab: str) -> None:
    for cluster, counts in sorted(report.counts_by_cluster().items()):
        rid = f"homelab.cluster.{cluster}" if cluster else "homelab.repository"
        emit_event(event=EVENT, resource={"prefect.resource.id": rid, "prefect.resource.name": cluster or "repository"},
                   related=[{"prefect.resource.id": f"prefect.block-document.{homelab}",
                             "prefect.resource.role": "homelab", "prefect.resource.name": homelab}],
                   payload={"counts": counts, "revision": report.revision,
                            "findings": sum(counts.values())})


@flow(name="drift-check", flow_run_name=run_name("drift-check", everywhere="all"), validate_parameters=True)
def drift_check(
    homelab: Annotated[str, Field(description="The Homelab block to compare.")] = "default",
    cluster: Annotated[str | None, Field(description="One cluster of the tree; default: every cluster.")] = None,
) -> Any:
    """Compare the GitOps tree at the branch head with the live homelab; read-only."""
    logger = get_run_logger()
    block = load_homelab(homelab)
    with desired_tree(block) as (root, revision):
        report = scan(block, root, revision, cluster)
    create_markdown_artifact(report.markdown(), key="drift-check",
                             description=f"Drift of {cluster or 'every cluster'} against {revision}")
    result = report.result()
    logger.info("drift-check: %s (%s)", result["status"],
                ", ".join(f"{n} {s}" for s, n in sorted(result["counts"].items())) or "no findings")
    if report.findings:
        _emit(report, homelab)
        return Completed(name="Drifted", data=result, message=f"{len(report.findings)} finding(s)")
    return result


# --- command line ----------------------------------------------------------------------------------


def failed_result(error: str) -> dict[str, Any]:
    """The result of a check that could not run."""
    return {"status": "failed", "counts": {}, "findings": [], "error": error}


def summary(result: dict[str, Any]) -> str:
    if result["status"] == "failed":
        return f"drift: the check could not run: {result.get('error')}"
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result["counts"].items())) or "no findings"
    lines = [f"drift: {result['status']} ({counts})"]
    lines += [f"  [{f['severity']}] {f['area']}: {f['object']}: want {f['desired']}, live {f['live']}"
              for f in result["findings"]]
    return "\n".join(lines)


def cli(homelab: str, cluster: str | None, twin: bool, twin_state: str, fault: list[str], as_json: bool) -> None:
    """`homelab drift`: exit 0 clean or drifted, 1 when the check could not run, 2 bad usage or configuration."""
    _runtime.quiet_prefect()
    outcome: dict[str, Any] = {}
    with _runtime.target(homelab, twin, twin_state, fault) as block_name:
        def run() -> None:
            state = drift_check(homelab=block_name, cluster=cluster or None, return_state=True)
            outcome.update(_runtime.result_of(state, failed_result))

        _runtime.config_errors_exit_2(run)
    _runtime.finish(outcome, as_json, summary, ok=("clean", "drifted"))

