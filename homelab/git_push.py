"""What a git push means for the homelab, as pure functions of data.

Changed paths → the Flux Kustomizations that apply them (a Kustomization applies the files its
spec.path's kustomization.yaml reaches through resources, components, patches and generators; a
spec.path without one applies every file below it) plus their dependents; talconfig.yaml version
changes → the upgrade deployment, always with approval (both versions at once → cluster-upgrade, which
upgrades Talos first, then Kubernetes); a cluster.yaml change → provision in plan mode.
"""

from __future__ import annotations

import ast
import json
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from homelab import safeyaml

if TYPE_CHECKING:  # the webhook receiver imports this module and needs none of the models
    from homelab.config import FluxTree

ZERO_SHA_CHARS = "0"
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
TALOS_UPGRADE = "talos-upgrade/talos-upgrade"
KUBERNETES_UPGRADE = "kubernetes-upgrade/kubernetes-upgrade"
CLUSTER_UPGRADE = "cluster-upgrade/cluster-upgrade"
PROVISION = "provision/provision"

Key = tuple[str, str]


def is_zero(sha: str | None) -> bool:
    """An all-zero commit id: the ref did not exist before (created) or does not after (deleted)."""
    return not sha or set(sha) == {ZERO_SHA_CHARS}


def ignore_reason(ref: str, branch: str, after: str) -> str | None:
    """Why a push needs nothing from us, or None when it does."""
    want = f"refs/heads/{branch}"
    if ref != want:
        return f"{ref} is not the branch Flux follows ({want})"
    if is_zero(after):
        return f"{ref} was deleted (after is all zeros): there is no new revision to reconcile"
    return None


# --- which repositories a homelab follows ------------------------------------------------------------

_FULL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}")
# https://host[:port]/[prefix/]owner/name[.git][/], ssh://[user@]host[:port]/[prefix/]owner/name[.git],
# or scp-like [user@]host:[prefix/]owner/name[.git]: the owner/name a forge's push payload calls it.
_URL_TAIL = re.compile(r"(?:[a-z][a-z0-9+.-]*://[^/]+/|[^/@:\s]+@[^/:\s]+:)(?:[^\s]*/)?"
                       r"(?P<owner>[A-Za-z0-9_.-]+)/(?P<name>[A-Za-z0-9_.-]+?)(?:\.git)?/?")


class RepositoryRefused(ValueError):
    """An entry of a repository list that is neither owner/name nor a clone URL."""


def repository_full_name(entry: str) -> str:
    """`owner/name` (lowercase: GitHub and Gitea names are case-insensitive) of a full name or clone URL."""
    text = entry.strip()
    if _FULL_NAME.fullmatch(text):
        return text.lower()
    m = _URL_TAIL.fullmatch(text)
    if m is None:
        raise RepositoryRefused(f"{entry!r} is neither owner/name nor a clone URL such as "
                                "https://github.com/owner/name.git or git@github.com:owner/name.git")
    return f"{m.group('owner')}/{m.group('name')}".lower()


def allowed_repositories(entries: Iterable[str]) -> frozenset[str]:
    """The full names a list of full names and clone URLs allows. A clone URL stands for the owner/name
    it ends with: the push payload names the repository that way, and the webhook secret, not the host,
    is what ties a delivery to one forge."""
    return frozenset(repository_full_name(e) for e in entries if e.strip())


def repository_refusal(repository: str, allowed: frozenset[str]) -> str | None:
    """Why a push of `repository` is not for this homelab, or None when it is."""
    if repository.strip().lower() in allowed:
        return None
    if not allowed:
        return (f"{repository} is not a repository this homelab follows: the Homelab block's git part names "
                "none (set its repositories, or a clone URL as its url)")
    return (f"{repository} is not a repository this homelab follows ({', '.join(sorted(allowed))}); "
            "a push of another repository never starts work")


def parse_changed_paths(value: Any) -> list[str] | None:
    """The sender's changed paths as a list: a list, or the string a template rendered it to
    (JSON or a Python literal); None when not given."""
    if value is None or value == "" or value == "None":
        return None
    if isinstance(value, str):
        text = value.strip()
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, list | tuple):
                value = parsed
                break
        else:
            return [p for p in (x.strip() for x in text.split(",")) if p]
    if not isinstance(value, list | tuple):
        raise ValueError(f"changed_paths: expected a list of paths, got {type(value).__name__}")
    return sorted({str(p) for p in value if isinstance(p, str) and p})


# --- which files a Kustomization applies ----------------------------------------------------------


@dataclass
class Coverage:
    """The files a Kustomization's build reads, and directories applied whole (no kustomization.yaml)."""

    files: set[str] = field(default_factory=set)
    dirs: set[str] = field(default_factory=set)

    def covers(self, path: str) -> bool:
        return path in self.files or any(path == d or path.startswith(d + "/") for d in self.dirs)


def _norm(base: str, entry: str) -> str:
    out = posixpath.normpath(posixpath.join(base, entry))
    return "" if out == "." else out


def _entries(doc: Mapping[str, Any]) -> list[str]:
    """Every local path a kustomization.yaml names."""
    out: list[str] = []

    def add(v: Any, keyed: bool = False) -> None:
        if isinstance(v, str) and v:
            out.append(v.split("=", 1)[-1] if keyed else v)  # generator files may be `key=path`

    for key in ("resources", "components", "bases", "crds", "patchesStrategicMerge", "generators", "transformers",
                "validators", "configurations"):
        for v in doc.get(key) or []:
            add(v)
    for key in ("patches", "patchesJson6902", "replacements"):
        for v in doc.get(key) or []:
            if isinstance(v, Mapping):
                add(v.get("path"))
    for key in ("configMapGenerator", "secretGenerator"):
        for gen in doc.get(key) or []:
            if isinstance(gen, Mapping):
                for sub in ("files", "envs"):
                    for v in gen.get(sub) or []:
                        add(v, keyed=True)
                add(gen.get("env"))
    openapi = doc.get("openapi")
    if isinstance(openapi, Mapping):
        add(openapi.get("path"))
    return [e for e in out if "://" not in e and not e.startswith(("github.com/", "git@"))]


def coverage(spec_dir: str, kustomization_texts: Mapping[str, str], all_files: Iterable[str]) -> Coverage:
    """What `kustomize build <spec_dir>` reads. ``kustomization_texts`` maps a directory (repo-relative)
    to its kustomization.yaml text; ``all_files`` lists every file of the commit."""
    files = set(all_files)
    dirs_in_tree = {posixpath.dirname(f) for f in files}
    all_dirs: set[str] = set()
    for d in dirs_in_tree:
        while d:
            all_dirs.add(d)
            d = posixpath.dirname(d)
    cov = Coverage()
    seen: set[str] = set()
    stack = [spec_dir.strip("/")]
    while stack:
        d = stack.pop()
        if d in seen:
            continue
        seen.add(d)
        text = kustomization_texts.get(d)
        if text is None:
            cov.dirs.add(d)  # Flux generates a kustomization of every manifest below the directory
            continue
        cov.files.update(f for f in (posixpath.join(d, n) for n in KUSTOMIZATION_FILES) if f in files)
        try:
            docs = safeyaml.load_all(text)
        except safeyaml.YamlRefused:
            docs = [None, None]
        if len(docs) > 1:
            cov.dirs.add(d)  # unreadable (or refused): count everything below it rather than miss a change
            continue
        doc = docs[0] if docs else None
        for entry in _entries(doc if isinstance(doc, Mapping) else {}):
            target = _norm(d, entry)
            if target in all_dirs:
                stack.append(target)
            else:
                cov.files.add(target)
    return cov


def spec_dir(spec_path: str) -> str:
    """spec.path (./k8s/..., relative to the source's root) as a repo-relative directory."""
    out = posixpath.normpath(spec_path.strip() or ".").lstrip("/")
    return "" if out == "." else out


# --- the plan of one push ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentStart:
    deployment: str
    parameters: dict[str, Any]
    reason: str


@dataclass
class PushPlan:
    # cluster -> Kustomization key -> why (the paths it applies, or the dependency it follows)
    reconcile: dict[str, dict[Key, str]] = field(default_factory=dict)
    # path -> ["<cluster>/<name>", ...] (empty: no Kustomization applies it)
    paths: dict[str, list[str]] = field(default_factory=dict)
    deployments: list[DeploymentStart] = field(default_factory=list)


def map_paths(trees: Mapping[str, FluxTree], changed: Iterable[str], kustomization_texts: Mapping[str, str],
              all_files: Iterable[str]) -> PushPlan:
    """The Kustomizations (per cluster) whose build reads a changed path, plus their dependents."""
    files = set(all_files)
    changed = sorted(set(changed))
    plan = PushPlan(paths={p: [] for p in changed})
    for cluster, tree in sorted(trees.items()):
        direct: dict[Key, list[str]] = {}
        for key, ks in sorted(tree.kustomizations.items()):
            cov = coverage(spec_dir(ks.path), kustomization_texts, files)
            hits = [p for p in changed if cov.covers(p)]
            if hits:
                direct[key] = hits
                for p in hits:
                    plan.paths[p].append(f"{cluster}/{ks.name}")
        if not direct:
            continue
        why: dict[Key, str] = {k: "applies " + ", ".join(ps) for k, ps in direct.items()}
        for key in sorted(tree.dependents(set(direct)) - set(direct)):
            deps = [d[1] for d in tree.kustomizations[key].depends_on if d in tree.dependents(set(direct))]
            why[key] = "depends on " + ", ".join(deps)
        plan.reconcile[cluster] = why
    return plan


def version_starts(cluster: str, before: tuple[str, str] | None, after: tuple[str, str] | None,
                   shown: str) -> list[DeploymentStart]:
    """(talosVersion, kubernetesVersion) of a talconfig.yaml at before and after → upgrade deployments,
    always with require_approval: a push never upgrades a cluster unapproved. Both changed → one
    cluster-upgrade (Talos first, then Kubernetes, one approval): two separate runs would race for the
    global lock, and the new Kubernetes may need the new Talos."""
    if after is None:
        return []
    old_talos, old_k8s = before if before is not None else (None, None)
    params = {"cluster": cluster, "require_approval": True}
    talos = f"talosVersion {old_talos or '(new file)'} -> {after[0]}" if after[0] != old_talos else None
    k8s = f"kubernetesVersion {old_k8s or '(new file)'} -> {after[1]}" if after[1] != old_k8s else None
    if talos and k8s:
        return [DeploymentStart(CLUSTER_UPGRADE, params, f"{shown}: {talos}, then {k8s}")]
    if talos:
        return [DeploymentStart(TALOS_UPGRADE, params, f"{shown}: {talos}")]
    if k8s:
        return [DeploymentStart(KUBERNETES_UPGRADE, params, f"{shown}: {k8s}")]
    return []


def provision_start(cluster: str, shown: str) -> DeploymentStart:
    return DeploymentStart(PROVISION, {"cluster": cluster, "plan_only": True},
                           f"{shown} changed: plan only, nothing is applied")


def talconfig_paths(tree_path: str, cluster: str) -> tuple[str, str]:
    base = posixpath.join(tree_path, "clusters", cluster, "talos") if tree_path else f"clusters/{cluster}/talos"
    return posixpath.join(base, "talconfig.yaml"), posixpath.join(base, "talenv.yaml")


def cluster_yaml_path(tree_path: str, cluster: str) -> str:
    return posixpath.join(tree_path, "clusters", cluster, "cluster.yaml") if tree_path else f"clusters/{cluster}/cluster.yaml"


def markdown(repository: str, ref: str, before: str, after: str, plan: PushPlan, notes: list[str],
             started: list[dict[str, Any]], results: Mapping[str, list[dict[str, Any]]], status: str) -> str:
    """The run's report: each path and the Kustomizations it reaches, dependents and why, deployments."""
    lines = [f"## git push {repository} {ref}: {status}", "", f"`{before[:12]}` → `{after[:12]}`", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "### Changed paths", "", "| path | applied by |", "|---|---|"]
    for p, ks in sorted(plan.paths.items()):
        lines.append(f"| `{p}` | {', '.join(ks) if ks else 'no Kustomization'} |")
    lines += ["", "### Reconciled", ""]
    if not plan.reconcile:
        lines.append("Nothing: no changed path is applied by a Kustomization.")
    for cluster, why in sorted(plan.reconcile.items()):
        rows = {r["name"]: r for r in results.get(cluster, [])}
        for (_, name), reason in sorted(why.items()):
            r = rows.get(name)
            state = "—" if r is None else ("Ready" if r["ready"] else r.get("status", "failed"))
            msg = "" if r is None else (r.get("message") or "")
            lines.append(f"- **{cluster}/{name}** ({reason}): {state} {msg}".rstrip())
    lines += ["", "### Deployments", ""]
    if not started:
        lines.append("None.")
    for s in started:
        lines.append(f"- `{s['deployment']}` {json.dumps(s['parameters'])}: {s['outcome']} — {s['reason']}")
    return "\n".join(lines)
