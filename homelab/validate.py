"""`homelab validate`: the tree's files and the conventions of the homelab repository.

Rules (each problem is a line ``file: field: message``):
- talconfig.yaml, cluster.yaml and the Flux graph load (see homelab.config);
- every Flux spec.path exists; every talconfig patch referenced as ``@./file`` exists;
- every Tailscale Ingress, ProxyGroup and operator defaultTags carries tag:k8s, and under
  clusters/<c>/ or overlays/<c>/ also tag:k8s-<c>; in base/ no cluster-specific tag; an overlay
  keeps the tags its base has (tag:k8s-operator, tag:k8s-funnel);
- every Secret lives in a *.sops.yaml file and is encrypted; every *.sops.yaml file is SOPS's form;
- no hardware-specific values (node names, node IPs, disk paths) in base/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from homelab.config import Tree, as_dict, iter_yaml_files, load_tree, read_yaml_documents
from homelab.problems import ConfigError, Problem

ENC_RE = re.compile(r"^ENC\[[A-Z0-9_]+,data:[^,\]]*,iv:[^,\]]+,tag:[^,\]]+,type:[a-z]+\]$")
TAILSCALE_TAGS_ANNOTATION = "tailscale.com/tags"
DISK_PATH_RE = re.compile(r"^/dev/(disk/|nvme|sd[a-z]|vd[a-z]|hd[a-z]|mmcblk)")


def validate(root: Path, shown_root: str | None = None) -> list[Problem]:
    shown_root = shown_root if shown_root is not None else str(root)
    tree = load_tree(root, shown_root)
    problems = list(tree.problems)
    docs = list(_all_documents(root, shown_root, problems))
    problems += _flux_paths(tree)
    problems += _talconfig_patches(tree)
    problems += _tailscale_tags(root, tree, docs)
    problems += _secrets(root, docs, shown_root)
    problems += _hardware_in_base(root, tree, docs)
    return sorted(set(problems))


Doc = tuple[Path, str, int, dict[str, Any]]  # (path, shown, index, document)


def _all_documents(root: Path, shown_root: str, problems: list[Problem]) -> Iterator[Doc]:
    for path in iter_yaml_files(root):
        shown = f"{shown_root}/{path.relative_to(root)}"
        if path.name in ("talconfig.yaml", "cluster.yaml", "talenv.yaml"):
            continue  # loaded (and reported) by their models
        try:
            docs = read_yaml_documents(path, shown)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        for i, d in enumerate(docs):
            if isinstance(d, dict):
                yield path, shown, i, d


def _loc(index: int, field: str) -> str:
    return f"[{index}].{field}" if index else field


def _flux_paths(tree: Tree) -> list[Problem]:
    out = []
    repo_root = tree.root.resolve().parent
    for cluster in tree.clusters.values():
        for k in cluster.flux.kustomizations.values():
            if not k.path:
                continue
            if not k.path.startswith("./"):
                out.append(Problem(k.file, _loc(k.index, "spec.path"),
                                   f"{k.path!r} should be relative to the repository root, like ./k8s/..."))
                continue
            if not (repo_root / k.path).resolve().is_dir():
                out.append(Problem(k.file, _loc(k.index, "spec.path"), f"{k.path} does not exist in the repository"))
    return out


def _talconfig_patches(tree: Tree) -> list[Problem]:
    out = []
    for cluster in tree.clusters.values():
        tal = cluster.talconfig
        if tal is None:
            continue
        base = tree.root / "clusters" / cluster.name / "talos"
        shown = f"{tree.shown_root}/clusters/{cluster.name}/talos/talconfig.yaml"
        refs: list[tuple[str, Any]] = [("patches", tal.patches)]
        for section in ("control_plane", "worker"):
            sec = getattr(tal, section)
            if sec is not None:
                refs.append((f"{'controlPlane' if section == 'control_plane' else 'worker'}.patches", sec.patches))
        refs += [(f"nodes[{i}].patches", n.patches) for i, n in enumerate(tal.nodes)]
        for field, patches in refs:
            if not isinstance(patches, list):
                continue
            for j, p in enumerate(patches):
                if isinstance(p, str) and p.startswith("@"):
                    out += _patch_file_problems(tree.root, base, p[1:], shown, f"{field}[{j}]")
    return out


def _patch_file_problems(root: Path, base: Path, rel: str, shown: str, field: str) -> list[Problem]:
    """A `@file` patch must be a file inside the tree: talhelper reads whatever path it is given (and
    follows symlinks), so `@../../../etc/passwd` would put a file of the machine that runs it into a
    machine config."""
    target = (base / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        return [Problem(shown, field, f"patch file {rel} is outside the tree ({target}); patches must be "
                                      "files under the GitOps tree, e.g. @./patches/<name>.yaml")]
    if not target.is_file():
        return [Problem(shown, field, f"patch file {rel} does not exist")]
    return []


def _cluster_of(rel: Path, clusters: set[str]) -> str | None:
    parts = rel.parts
    if parts and parts[0] == "clusters" and len(parts) > 1:
        return parts[1]
    for i, part in enumerate(parts[:-1]):
        if part == "overlays" and parts[i + 1] in clusters | {parts[i + 1]}:
            return parts[i + 1]
    return None


def _is_base(rel: Path) -> bool:
    return "base" in rel.parts[:-1]


def _tag_sets(doc: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """(field, tags) for every Tailscale tag list a document carries."""
    kind = doc.get("kind")
    meta = as_dict(doc.get("metadata"))
    spec = as_dict(doc.get("spec"))
    ann = as_dict(meta.get("annotations"))
    if kind == "Ingress":
        if TAILSCALE_TAGS_ANNOTATION in ann or spec.get("ingressClassName") == "tailscale":
            raw = ann.get(TAILSCALE_TAGS_ANNOTATION, "")
            tags = [t.strip() for t in str(raw or "").split(",") if t.strip()]
            yield f"metadata.annotations[{TAILSCALE_TAGS_ANNOTATION}]", tags
    elif kind == "ProxyGroup":
        raw_tags = spec.get("tags")
        yield "spec.tags", [str(t) for t in raw_tags] if isinstance(raw_tags, list) else []
    elif kind == "HelmRelease":
        values = as_dict(spec.get("values"))
        op = as_dict(values.get("operatorConfig"))
        if "defaultTags" in op:
            tags = op["defaultTags"]
            if isinstance(tags, str):
                tags = [t.strip() for t in tags.split(",")]
            yield "spec.values.operatorConfig.defaultTags", [str(t) for t in tags] if isinstance(tags, list) else []


def _tailscale_tags(root: Path, tree: Tree, docs: list[Doc]) -> list[Problem]:
    out = []
    clusters = set(tree.clusters)
    cluster_tags = {f"tag:k8s-{c}" for c in clusters}
    base_tags: dict[tuple[str, str], set[str]] = {}
    for path, _, _, doc in docs:
        rel = path.relative_to(root)
        if _is_base(rel):
            for _, tags in _tag_sets(doc):
                name = as_dict(doc.get("metadata")).get("name")
                base_tags[(str(doc.get("kind")), str(name))] = set(tags)
    for path, shown, i, doc in docs:
        rel = path.relative_to(root)
        cluster = _cluster_of(rel, clusters)
        kind = doc.get("kind")
        meta = as_dict(doc.get("metadata"))
        name = meta.get("name")
        for field, tags in _tag_sets(doc):
            what = f"{kind} {name}"
            if "tag:k8s" not in tags:
                out.append(Problem(shown, _loc(i, field), f"{what} lacks tag:k8s (every Tailscale resource carries it)"))
            if _is_base(rel):
                specific = sorted(set(tags) & cluster_tags | {t for t in tags if re.fullmatch(r"tag:k8s-(?!operator$|funnel$).+", t)})
                if specific:
                    out.append(Problem(shown, _loc(i, field),
                                       f"{what} in base/ carries cluster-specific {', '.join(specific)}; "
                                       f"put it in overlays/<cluster>/"))
            elif cluster is not None:
                if f"tag:k8s-{cluster}" not in tags:
                    out.append(Problem(shown, _loc(i, field), f"{what} lacks tag:k8s-{cluster}"))
                for kept in sorted(base_tags.get((str(kind), str(name)), set()) & {"tag:k8s-operator", "tag:k8s-funnel"}):
                    if kept not in tags:
                        out.append(Problem(shown, _loc(i, field),
                                           f"{what} drops {kept}, which its base carries; Tailscale needs it"))
    return out


def _values(d: Any) -> Iterator[Any]:
    if isinstance(d, dict):
        for v in d.values():
            yield from _values(v)
    elif isinstance(d, list):
        for v in d:
            yield from _values(v)
    else:
        yield d


def _secrets(root: Path, docs: list[Doc], shown_root: str) -> list[Problem]:
    out = []
    sops_files_seen: set[str] = set()
    for path, shown, i, doc in docs:
        # `.sops.yaml` itself is SOPS's rules file, not an encrypted one.
        is_sops_file = path.name.endswith((".sops.yaml", ".sops.yml")) and path.name not in (".sops.yaml", ".sops.yml")
        if is_sops_file:
            sops_files_seen.add(shown)
            meta = doc.get("sops")
            if not isinstance(meta, dict) or "mac" not in meta or not any(
                    meta.get(k) for k in ("age", "pgp", "kms", "gcp_kms", "azure_kv", "hc_vault")):
                out.append(Problem(shown, _loc(i, "sops"),
                                   "not SOPS-encrypted (no sops metadata with a key and mac); run `sops -e -i` on it"))
        if doc.get("kind") == "Secret":
            if not is_sops_file:
                out.append(Problem(shown, _loc(i, "kind"),
                                   f"Secret {as_dict(doc.get('metadata')).get('name', '')} "
                                   f"is outside a *.sops.yaml file; move it to <name>.sops.yaml and encrypt it with sops"))
                continue
            for section in ("data", "stringData"):
                values = doc.get(section)
                if isinstance(values, dict):
                    for key, value in values.items():
                        if not (isinstance(value, str) and ENC_RE.match(value)):
                            out.append(Problem(shown, _loc(i, f"{section}.{key}"),
                                               "plaintext value in a Secret; encrypt the file with sops"))
        elif is_sops_file and not any(isinstance(v, str) and v.startswith("ENC[") for v in _values(
                {k: v for k, v in doc.items() if k != "sops"})):
            out.append(Problem(shown, _loc(i, "(document)"), "no ENC[...] value: the file is not encrypted"))
    return out


def _hardware_in_base(root: Path, tree: Tree, docs: list[Doc]) -> list[Problem]:
    names: set[str] = set()
    ips: set[str] = set()
    for c in tree.clusters.values():
        if c.talconfig:
            for n in c.talconfig.nodes:
                names.add(n.hostname)
                ips.update(n.ips)
        if c.proxmox:
            for vm in c.proxmox.vms:
                names.add(vm.name)
                ips.add(vm.ip)
    out = []
    for path, shown, i, doc in docs:
        if not _is_base(path.relative_to(root)):
            continue
        for field, value in _leaves(doc):
            if not isinstance(value, str):
                continue
            if DISK_PATH_RE.match(value):
                out.append(Problem(shown, _loc(i, field), f"disk path {value} in base/; it belongs in overlays/<cluster>/"))
            elif value in names:
                out.append(Problem(shown, _loc(i, field), f"node name {value} in base/; it belongs in overlays/<cluster>/"))
            elif any(re.search(rf"(?<![\d.]){re.escape(ip)}(?![\d])", value) for ip in ips):
                out.append(Problem(shown, _loc(i, field), f"node IP in base/ ({value}); it belongs in overlays/<cluster>/"))
    return out


def _leaves(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list):
        for j, v in enumerate(d):
            yield from _leaves(v, f"{prefix}[{j}]")
    else:
        yield prefix, d
