"""Drift: the desired state in git against what runs, as findings. Pure: every function takes data the
caller observed (Node views, Flux objects as dicts, Proxmox VM listings, Ceph status) and returns findings.

A finding names the area, the object, what git wants, what runs, a severity and the next step. Severity
``error`` means broken or unknown (not Ready, unreachable, an invalid tree); ``warning`` means running
but different from git (a version behind, a suspended object, a stale revision, a flag left set).
Notes (what was not checked, and why) are kept apart from findings: they are not drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from homelab.ceph_gate import CephStatus, flags_in_check
from homelab.config import FluxTree, ProxmoxCluster
from homelab.gates import NodeView
from homelab.monitoring import Alert, Matcher, Silence, matches_any
from homelab.problems import Problem
from homelab.provision import GIB, ObservedVM

AREAS = ("talos", "kubernetes", "flux", "proxmox", "ceph", "monitoring", "repository")
AREA_TITLES = {"talos": "Talos", "kubernetes": "Kubernetes", "flux": "Flux", "proxmox": "Proxmox",
               "ceph": "Ceph", "monitoring": "Monitoring", "repository": "Repository"}
ERROR, WARNING = "error", "warning"
SEVERITIES = (ERROR, WARNING)

# Flags an operator sets for maintenance and must unset afterwards; the always-on ones
# (sortbitwise, recovery_deletes, purged_snapdirs, pglog_hardlimit) are not drift.
OPERATOR_FLAGS = frozenset({
    "noout", "noin", "nodown", "noup", "norebalance", "norecover", "nobackfill", "noscrub",
    "nodeep-scrub", "pause", "pauserd", "pausewr", "notieragent", "nosnaptrim",
})

KS = ("kustomize.toolkit.fluxcd.io", "v1", "kustomizations", "Kustomization")
HR = ("helm.toolkit.fluxcd.io", "v2", "helmreleases", "HelmRelease")
GR = ("source.toolkit.fluxcd.io", "v1", "gitrepositories", "GitRepository")
FLUX_KINDS = (KS, HR, GR)


@dataclass(frozen=True)
class Finding:
    area: str
    object: str
    desired: str
    live: str
    severity: str
    hint: str = ""
    cluster: str = ""  # empty for the repository

    def as_result(self) -> dict[str, str]:
        return {"area": self.area, "object": self.object, "desired": self.desired, "live": self.live,
                "severity": self.severity}


def unreachable(area: str, cluster: str, what: str, error: str, hint: str) -> Finding:
    """A part that could not be read is a finding of its own: the rest of the check goes on."""
    return Finding(area, f"{cluster}: {what}", "reachable", f"unreachable: {error}", ERROR, hint, cluster)


def _v(version: str | None) -> str:
    if not version:
        return ""
    return version if version.startswith("v") else f"v{version}"


# --- Talos and Kubernetes ----------------------------------------------------------------------


def compare_nodes(cluster: str, talos_version: str, kubernetes_version: str, hosts: Sequence[str],
                  nodes: Iterable[NodeView]) -> list[Finding]:
    """Per node of the tree: the Talos version (from the Node's osImage) and the kubelet version."""
    want_talos, want_kube = _v(talos_version), _v(kubernetes_version)
    seen = {n.name: n for n in nodes}
    out: list[Finding] = []
    for host in hosts:
        n = seen.get(host)
        obj = f"{cluster}: node {host}"
        if n is None:
            out.append(Finding("talos", obj, f"Talos {want_talos}, registered as a Node", "no Node object", ERROR,
                               "check the machine (talosctl --nodes <ip> health) and its kubelet", cluster))
            continue
        live_talos = n.talos_version or (n.os_image or "osImage not reported")
        if n.talos_version != want_talos:
            out.append(Finding("talos", obj, want_talos, live_talos, WARNING,
                               f"homelab upgrade talos --cluster {cluster} --node {host}", cluster))
        if _v(n.kubelet_version) != want_kube:
            out.append(Finding("kubernetes", obj, want_kube, n.kubelet_version or "kubelet version not reported",
                               WARNING, f"homelab upgrade kubernetes --cluster {cluster} --to {want_kube}", cluster))
    for name in sorted(set(seen) - set(hosts)):
        out.append(Finding("kubernetes", f"{cluster}: node {name}", "absent (not in the tree)", "registered",
                           WARNING, f"add {name} to the cluster's config, or remove it: kubectl delete node {name}",
                           cluster))
    return out


def compare_machine_config(cluster: str, host: str, config_file: str, changed: bool, output: str) -> Finding | None:
    """`talosctl apply-config --dry-run`: a diff means the node runs another config than the generated one."""
    if not changed:
        return None
    diff = [ln for ln in output.splitlines() if ln.startswith(("+", "-")) and not ln.startswith(("+++", "---"))]
    return Finding("talos", f"{cluster}: machine config of {host}", f"as generated ({config_file})",
                   f"differs ({len(diff)} changed lines)", WARNING,
                   f"review `talosctl apply-config --nodes <ip> --file {config_file} --dry-run`, then apply it",
                   cluster)


# --- Flux ------------------------------------------------------------------------------------------


def revision_sha(revision: str | None) -> str:
    """`main@sha1:<sha>` (Flux v2.x), `main/<sha>` (older), or a bare sha -> the sha."""
    if not revision:
        return ""
    if "sha1:" in revision:
        return revision.rsplit("sha1:", 1)[1]
    return revision.rsplit("/", 1)[-1].rsplit(":", 1)[-1]


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or "flux-system"), str(meta.get("name") or "")


def _ready(obj: Mapping[str, Any]) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return dict(c)
    return {}


def _status_finding(cluster: str, kind: str, obj: Mapping[str, Any], declared_suspend: bool,
                    cli: str) -> Finding | None:
    """Suspended (when git does not say so), else not Ready; None when neither."""
    ns, name = _meta(obj)
    label = f"{cluster}: {kind} {ns}/{name}"
    if (obj.get("spec") or {}).get("suspend"):
        if declared_suspend:
            return None
        return Finding("flux", label, "not suspended", "suspended", WARNING,
                       f"flux resume {cli} {name} -n {ns} --context <{cluster}>", cluster)
    ready = _ready(obj)
    if ready.get("status") == "True":
        return None
    if not ready:
        live = "no Ready condition"
    else:
        live = f"Ready={ready.get('status')}"
        if ready.get("reason"):
            live += f" ({ready['reason']})"
        if ready.get("message"):
            live += f": {str(ready['message'])[:200]}"
    severity = WARNING if ready.get("status") == "Unknown" else ERROR
    return Finding("flux", label, "Ready", live, severity,
                   f"flux get {cli} {name} -n {ns}; fix the cause, then flux reconcile {cli} {name} -n {ns}", cluster)


def compare_flux(cluster: str, tree: FluxTree, head_revision: str, kustomizations: Sequence[Mapping[str, Any]],
                 helmreleases: Sequence[Mapping[str, Any]],
                 gitrepositories: Sequence[Mapping[str, Any]]) -> list[Finding]:
    """Every Flux object Ready and not suspended; each Kustomization at its source's artifact revision and
    each GitRepository that syncs the tree at the git head; Kustomizations in git and not in the cluster,
    and the other way round.

    Each step of the chain (git head -> artifact -> lastAppliedRevision) is compared once, so one stale
    link is one finding."""
    out: list[Finding] = []
    head_sha = revision_sha(head_revision)
    sources = {_meta(g): g for g in gitrepositories}
    tree_sources = {(k.source_namespace, k.source_name) for k in tree.kustomizations.values()
                    if k.source_kind == "GitRepository"}
    tree_sources |= {key for key, s in tree.sources.items() if s.kind == "GitRepository"}

    for key, g in sorted(sources.items()):
        f = _status_finding(cluster, "GitRepository", g, False, "source git")
        if f is not None:
            out.append(f)
            continue
        if key not in tree_sources or not head_sha:
            continue
        live_rev = str(((g.get("status") or {}).get("artifact") or {}).get("revision") or "")
        if revision_sha(live_rev) != head_sha:
            out.append(Finding("flux", f"{cluster}: GitRepository {key[0]}/{key[1]}", head_revision,
                               live_rev or "no artifact", WARNING,
                               f"flux reconcile source git {key[1]} -n {key[0]} (or homelab reconcile --with-source)",
                               cluster))
    for key in sorted(tree_sources - set(sources)):
        out.append(Finding("flux", f"{cluster}: GitRepository {key[0]}/{key[1]}", "present", "absent", ERROR,
                               "bootstrap Flux on the cluster, or apply clusters/<cluster>/flux-system", cluster))

    live_ks = {_meta(k): k for k in kustomizations}
    for key, k in sorted(live_ks.items()):
        declared = tree.kustomizations.get(key)
        if declared is None:
            out.append(Finding("flux", f"{cluster}: Kustomization {key[0]}/{key[1]}", "absent (not in git)",
                               "present", WARNING,
                               f"add it under clusters/{cluster}/, or remove it: flux delete ks {key[1]} -n {key[0]}",
                               cluster))
        f = _status_finding(cluster, "Kustomization", k, bool(declared and declared.suspend), "ks")
        if f is not None:
            out.append(f)
            continue
        if (k.get("spec") or {}).get("suspend"):
            continue  # suspended on purpose, as git says: its revision may lag
        ref = (k.get("spec") or {}).get("sourceRef") or {}
        if (ref.get("kind") or "GitRepository") != "GitRepository":
            continue
        src = sources.get((str(ref.get("namespace") or key[0]), str(ref.get("name") or "")))
        src_rev = str((((src or {}).get("status") or {}).get("artifact") or {}).get("revision") or "")
        applied = str((k.get("status") or {}).get("lastAppliedRevision") or "")
        if src_rev and revision_sha(applied) != revision_sha(src_rev):
            out.append(Finding("flux", f"{cluster}: Kustomization {key[0]}/{key[1]}", src_rev,
                               applied or "nothing applied yet", WARNING,
                               f"flux reconcile ks {key[1]} -n {key[0]}", cluster))
    for key, declared in sorted(tree.kustomizations.items()):
        if key not in live_ks:
            out.append(Finding("flux", f"{cluster}: Kustomization {key[0]}/{key[1]}", f"present ({declared.path})",
                               "absent", WARNING,
                               "flux reconcile ks flux-system (the Kustomization that applies "
                               f"clusters/{cluster}/), then look at its events", cluster))

    for h in sorted(helmreleases, key=_meta):
        f = _status_finding(cluster, "HelmRelease", h, False, "hr")
        if f is not None:
            out.append(f)
    return out


# --- Proxmox ---------------------------------------------------------------------------------------


def _is_ours(cfg: ProxmoxCluster, vm: ObservedVM) -> bool:
    return cfg.cluster.name in vm.tags or vm.name.startswith(f"{cfg.cluster.name}-")


def provisioned(cfg: ProxmoxCluster, observed: Iterable[ObservedVM]) -> bool:
    """Any VM of cluster.yaml exists on its Proxmox node."""
    ids = {v.vmid for v in observed if v.node == cfg.proxmox.node}
    return any(vm.vmid in ids for vm in cfg.vms)


def compare_vms(cfg: ProxmoxCluster, observed: Iterable[ObservedVM]) -> list[Finding]:
    """cluster.yaml's VMs against the VM list of its Proxmox node: missing, extra, cores/memory/disk, power."""
    c = cfg.cluster.name
    seen = {v.vmid: v for v in observed if v.node == cfg.proxmox.node}
    out: list[Finding] = []
    for want in cfg.ordered_vms():
        obj = f"{c}: VM {want.vmid} ({want.name})"
        have = seen.get(want.vmid)
        if have is None:
            out.append(Finding("proxmox", obj, f"{want.cores} cores, {want.memory} MiB, {want.disk} GiB", "absent",
                               WARNING, f"homelab provision --cluster {c}", c))
            continue
        fields: list[tuple[str, str, str]] = []
        if have.cores != want.cores:
            fields.append(("cores", str(want.cores), str(have.cores)))
        if have.memory_mib != want.memory:
            fields.append(("memory", f"{want.memory} MiB", f"{have.memory_mib} MiB"))
        if have.disk_bytes != want.disk * GIB:
            live = "no sized disk" if have.disk_bytes is None else f"{have.disk_bytes / GIB:g} GiB"
            fields.append(("disk", f"{want.disk} GiB", live))
        for name, desired, live in fields:
            out.append(Finding("proxmox", f"{obj} {name}", desired, live, WARNING,
                               f"homelab provision --cluster {c} --plan (a disk cannot shrink: "
                               "fix cluster.yaml instead)" if name == "disk" else
                               f"homelab provision --cluster {c} --plan, or set it back in Proxmox", c))
        if not have.running:
            out.append(Finding("proxmox", f"{obj} power", "running", have.status, WARNING,
                               f"start it in Proxmox (qm start {want.vmid}) or homelab provision --cluster {c}", c))
    wanted = {vm.vmid for vm in cfg.vms} | {cfg.proxmox.template.vmid}
    for v in sorted(seen.values(), key=lambda v: v.vmid):
        if v.vmid in wanted or v.template or not _is_ours(cfg, v):
            continue
        out.append(Finding("proxmox", f"{c}: VM {v.vmid} ({v.name})", "absent (not in cluster.yaml)", v.status,
                           WARNING, "add it to cluster.yaml, or remove it in Proxmox", c))
    return out


# --- Ceph ------------------------------------------------------------------------------------------


def compare_ceph(cluster: str, status: CephStatus, flags: Iterable[str]) -> list[Finding]:
    """Operator flags left set, and every health check those flags do not explain."""
    out: list[Finding] = []
    left = sorted(set(flags) & OPERATOR_FLAGS)
    for flag in left:
        out.append(Finding("ceph", f"{cluster}: flag {flag}", "unset", "set", WARNING,
                           f"if no maintenance is running: ceph osd unset {flag}", cluster))
    for name, check in sorted(status.health.checks.items()):
        if check.muted:
            continue
        if name == "OSDMAP_FLAGS":
            named = flags_in_check(check)
            if named is not None and named <= set(left):
                continue
        severity = ERROR if check.severity == "HEALTH_ERR" else WARNING
        out.append(Finding("ceph", f"{cluster}: health {name}", "HEALTH_OK", f"{check.severity}: {check.message}",
                           severity, "ceph health detail", cluster))
    if status.health.status != "HEALTH_OK" and not status.health.checks:
        out.append(Finding("ceph", f"{cluster}: health", "HEALTH_OK", status.health.status, WARNING,
                           "ceph health detail", cluster))
    return out


# --- monitoring ------------------------------------------------------------------------------------


def compare_monitoring(cluster: str, alerts: Iterable[Alert], allowed: Sequence[Sequence[Matcher]],
                       stale: Iterable[Silence], now: datetime) -> list[Finding]:
    """The alerts firing now (but the allowed ones: Watchdog fires forever on purpose), and silences these
    flows made that are still in force long after (a run that crashed before it expired its own)."""
    out: list[Finding] = []
    for a in sorted((a for a in alerts if a.state == "firing" and not matches_any(a.labels, allowed)),
                    key=lambda a: a.describe()):
        severity = ERROR if a.labels.get("severity") == "critical" else WARNING
        since = f" since {a.active_at}" if a.active_at else ""
        out.append(Finding("monitoring", f"{cluster}: alert {a.describe()}", "not firing", f"firing{since}", severity,
                           "look at the alert in Alertmanager (amtool alert query) and fix its cause", cluster))
    for s in stale:
        age = (now - s.starts_at).total_seconds() / 3600 if s.starts_at else 0.0
        out.append(Finding("monitoring", f"{cluster}: silence {s.id} {s.describe()}", "expired by the run that made it",
                           f"{s.state} for {age:.1f} h, until {s.ends_at.isoformat() if s.ends_at else '?'} "
                           f"({s.comment[:120]})", WARNING,
                           f"if that run is over: amtool silence expire {s.id}", cluster))
    return out


# --- the repository --------------------------------------------------------------------------------


def repository_findings(problems: Iterable[Problem]) -> list[Finding]:
    """Each `homelab validate` problem of the tree at the branch head."""
    return [Finding("repository", f"{p.file}: {p.field}", "valid", p.message, ERROR,
                    "fix it in git (homelab validate k8s lists every problem)")
            for p in problems]


# --- the report ------------------------------------------------------------------------------------


@dataclass
class DriftReport:
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    revision: str = ""

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.severity] = out.get(f.severity, 0) + 1
        return out

    @property
    def status(self) -> str:
        return "drifted" if self.findings else "clean"

    def result(self) -> dict[str, Any]:
        return {"status": self.status, "counts": self.counts, "findings": [f.as_result() for f in self.findings]}

    def counts_by_cluster(self) -> dict[str, dict[str, int]]:
        """Counts per cluster ("" for the repository), for one event per drifted target."""
        out: dict[str, dict[str, int]] = {}
        for f in self.findings:
            c = out.setdefault(f.cluster, {})
            c[f.severity] = c.get(f.severity, 0) + 1
        return out

    def markdown(self) -> str:
        head = f"# Drift check: {self.status}"
        lines = [head, ""]
        if self.revision:
            lines += [f"Desired state: `{self.revision}`", ""]
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items())) or "no findings"
        lines += [f"Findings: {counts}", ""]
        for area in AREAS:
            found = [f for f in self.findings if f.area == area]
            lines += [f"## {AREA_TITLES[area]}", ""]
            if not found:
                lines += ["No drift.", ""]
                continue
            lines += ["| area | object | desired | live | severity | hint |", "|---|---|---|---|---|---|"]
            lines += [f"| {_cell(f.area)} | {_cell(f.object)} | {_cell(f.desired)} | {_cell(f.live)} | "
                      f"{_cell(f.severity)} | {_cell(f.hint)} |" for f in found]
            lines.append("")
        lines += ["## Notes", ""]
        lines += [f"- {n}" for n in self.notes] or ["None."]
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
