"""The GitOps tree's manifests: where the Prefect server lives, and the prefect app's permissions pinned rule
by rule: a later widening, a wildcard or a new binding fails here and has to be argued for.

Where the server lives: the upgrades reboot m720q's nodes one by one, so the server that holds their lock
(and its database and lease store) must not run on m720q. The check walks everything Flux applies on a
cluster, as kustomize-controller reads it, and names every object that is such a part."""

from __future__ import annotations

import functools
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from homelab.validate import validate

K8S = Path(__file__).resolve().parents[2] / "k8s"
PREFECT_YAML = K8S.parent / "prefect.yaml"
SERVER_DIRS = (K8S / "apps/base/prefect", K8S / "apps/overlays/homelab/prefect")
WORKER_DIRS = (K8S / "apps/base/prefect-worker", K8S / "apps/overlays/m720q/prefect")
APP_DIRS = SERVER_DIRS + WORKER_DIRS
TALOS = K8S / "clusters/m720q/talos"
SA = ("prefect", "homelab-flows")
DISRUPTIVE = {"talos-upgrade", "kubernetes-upgrade", "provision"}

Rule = tuple[str, str, str, str, str, str]  # (role kind, namespace, apiGroup, resource, verb, resourceName or "")

# Each line is a call the flows make (see the header of k8s/apps/base/prefect-worker/rbac.yaml).
EXPECTED_RULES: set[Rule] = {
    *{("ClusterRole", "", "", "nodes", v, "") for v in ("get", "list", "watch", "patch")},
    *{("ClusterRole", "", g, r, v, "")
      for g, r in (("kustomize.toolkit.fluxcd.io", "kustomizations"), ("helm.toolkit.fluxcd.io", "helmreleases"),
                   ("source.toolkit.fluxcd.io", "gitrepositories"))
      for v in ("get", "list", "watch")},
    ("Role", "flux-system", "kustomize.toolkit.fluxcd.io", "kustomizations", "patch", ""),
    ("Role", "flux-system", "source.toolkit.fluxcd.io", "gitrepositories", "patch", ""),
    ("Role", "rook-ceph", "", "pods", "get", "homelab-ceph-tools-0"),
    ("Role", "rook-ceph", "", "pods/exec", "create", "homelab-ceph-tools-0"),
}
# The one pod a flow may exec into (k8s/apps/base/prefect-worker/ceph-tools.yaml), and what its Ceph
# identity may do: read, the noout flag, and the ok-to-stop questions.
CEPH_TOOLS = ("rook-ceph", "homelab-ceph-tools")
CEPH_CAPS = {"mon": 'allow r, allow command "osd set" with key=noout, allow command "osd unset" with key=noout, '
                    'allow command "mon ok-to-stop"',
             "mgr": 'allow command "osd ok-to-stop"'}
# Subresources that run code in, or open a channel into, a pod.
POD_ENTRY = {"pods/exec", "pods/attach", "pods/portforward", "pods/proxy", "nodes/proxy"}


def documents(paths: tuple[Path, ...] | list[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    for root in paths:
        for path in sorted(root.rglob("*.yaml")) if root.is_dir() else [root]:
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict):
                    yield path, doc


@functools.cache
def _docs(paths: tuple[Path, ...]) -> tuple[tuple[Path, dict[str, Any]], ...]:
    return tuple(documents(paths))


def _app() -> tuple[tuple[Path, dict[str, Any]], ...]:
    return _docs(APP_DIRS)


def app_docs(kind: str, paths: tuple[Path, ...] = APP_DIRS) -> list[dict[str, Any]]:
    return [d for _, d in _docs(paths) if d.get("kind") == kind]


def named(kind: str, name: str, paths: tuple[Path, ...]) -> dict[str, Any]:
    """The one base object of that kind and name (patches in overlays are left out)."""
    [doc] = [d for p, d in _docs(paths) if d.get("kind") == kind and d["metadata"]["name"] == name
             and "base" in p.parts]
    return doc


def wildcards(doc: dict[str, Any]) -> list[str]:
    """Every '*' in a Role's or ClusterRole's rules, as `name: rules[i].field`."""
    found = []
    for i, rule in enumerate(doc.get("rules") or []):
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            if any("*" in str(v) for v in rule.get(field) or []):
                found.append(f"{doc['metadata']['name']}: rules[{i}].{field}")
    return found


def flatten(doc: dict[str, Any]) -> set[Rule]:
    kind, ns = doc["kind"], doc["metadata"].get("namespace", "")
    return {(kind, ns, g, r, v, n)
            for rule in doc.get("rules") or []
            for g in rule.get("apiGroups") or [""]
            for r in rule.get("resources") or []
            for v in rule.get("verbs") or []
            for n in rule.get("resourceNames") or [""]}


def roles() -> list[dict[str, Any]]:
    return app_docs("Role") + app_docs("ClusterRole")


def merged(base: Any, patch: Any) -> Any:
    """A patch of a custom resource (a HelmRelease) as kustomize applies it: maps merge, lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in patch.items()}}
    return patch


# --- What Flux applies on a cluster -----------------------------------------------------------------

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
Found = tuple[str, dict[str, Any]]  # (where: "Kustomization <name>: <file>", object)


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def _patch_objects(patch: Any, directory: Path, where: Path, unread: list[str]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The objects a `patches`/`patchesStrategicMerge`/`patchesJson6902` entry brings in: its file or inline text.
    An RFC 6902 operation counts with its value (a string at an .../image path is a container image)."""
    text, source = None, where
    if isinstance(patch, str):
        target = directory / patch
        text, source = (target.read_text(), target) if "\n" not in patch and target.is_file() else (patch, where)
    elif isinstance(patch, dict):
        if patch.get("path"):
            target = directory / str(patch["path"])
            if not target.is_file():
                unread.append(f"{where}: patch {patch['path']} does not exist")
                return
            text, source = target.read_text(), target
        elif patch.get("patch"):
            text = str(patch["patch"])
    if text is None:
        return
    for doc in yaml.safe_load_all(text):
        ops = doc if isinstance(doc, list) else [doc]
        for op in ops:
            if not isinstance(op, dict):
                continue
            value = op.get("value") if "op" in op else op
            if isinstance(value, dict):
                yield source, value
            elif isinstance(value, str) and str(op.get("path", "")).endswith("/image"):
                yield source, {"kind": "Patch", "metadata": {"name": op["path"]}, "containers": [{"image": value}]}


def kustomize(directory: Path, unread: list[str], visiting: frozenset[Path] = frozenset()
              ) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every object of one spec.path as kustomize-controller builds it, patches included (a patch can bring
    an image of its own). Without a kustomization file the controller takes every manifest under the path."""
    directory = directory.resolve()
    if directory in visiting:
        return
    visiting = visiting | {directory}
    kfile = next((directory / n for n in KUSTOMIZATION_FILES if (directory / n).is_file()), None)
    if kfile is None:
        for f in sorted(directory.rglob("*")):
            if f.suffix in (".yaml", ".yml") and f.is_file():
                yield from ((f, d) for d in _load(f))
        return
    spec = next(iter(_load(kfile)), {})
    for key in ("helmCharts", "generators", "transformers"):
        if spec.get(key):
            unread.append(f"{kfile}: {key} cannot be checked without building them")
    for entry in [*(spec.get("resources") or []), *(spec.get("components") or []), *(spec.get("bases") or [])]:
        entry = str(entry)
        if "://" in entry or entry.startswith(("github.com/", "git@")):
            unread.append(f"{kfile}: remote resource {entry} cannot be checked here")
            continue
        target = directory / entry
        if target.is_dir():
            yield from kustomize(target, unread, visiting)
        elif target.is_file():
            yield from ((target, d) for d in _load(target))
        else:
            unread.append(f"{kfile}: resource {entry} does not exist")
    for key in ("patches", "patchesStrategicMerge", "patchesJson6902"):
        for patch in spec.get(key) or []:
            yield from _patch_objects(patch, directory, kfile, unread)


def flux_objects(k8s: Path, cluster: str) -> tuple[list[Found], list[str]]:
    """Every object Flux applies on `cluster`, and what could not be read. From clusters/<cluster>/ (the
    path of its flux-system Kustomization), through every Flux Kustomization met on the way: its spec.path."""
    repo = k8s.parent
    queue = [("flux-system", f"./{k8s.name}/clusters/{cluster}")]
    done: set[Path] = set()
    found: list[Found] = []
    unread: list[str] = []
    while queue:
        name, path = queue.pop(0)
        directory = (repo / path).resolve()
        if directory in done:
            continue
        done.add(directory)
        if not directory.is_dir():
            unread.append(f"Kustomization {name}: spec.path {path} does not exist")
            continue
        for file, obj in kustomize(directory, unread):
            found.append((f"Kustomization {name}: {file.relative_to(repo)}", obj))
            if obj.get("kind") == "Kustomization" and str(obj.get("apiVersion", "")).startswith(
                    "kustomize.toolkit.fluxcd.io/"):
                spec = obj.get("spec") or {}
                ref = spec.get("sourceRef") or {}
                if (ref.get("kind"), ref.get("name")) != ("GitRepository", "flux-system"):
                    unread.append(f"Kustomization {obj['metadata']['name']}: its source is not this repository")
                elif spec.get("path"):
                    queue.append((obj["metadata"]["name"], str(spec["path"])))
    return found, unread


# --- What is a Prefect server, its database or its lease store -------------------------------------

# Blunt on purpose: m720q runs no PostgreSQL or Redis at all, and telling the server's from another
# app's would be guesswork. An app on m720q that needs one must be argued for here, by name.
DATABASE_OR_LEASE_STORE = re.compile(r"postgres|redis|valkey|keydb|dragonfly|cnpg|cloudnative-pg", re.IGNORECASE)
SERVER_COMMAND = re.compile(r"\bprefect\s+server\s+start\b|\bhomelab\s+server\b")


def image_name(image: str) -> str:
    """`docker.io/library/postgres:17@sha256:…` -> `postgres`; `ghcr.io/org/app:1` -> `org/app`."""
    ref = image.split("@")[0]
    head, _, last = ref.rpartition("/")
    ref = f"{head}/{last.split(':')[0]}" if head else last.split(":")[0]
    parts = ref.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    if len(parts) > 1 and parts[0] == "library":
        parts = parts[1:]
    return "/".join(parts).lower()


def containers(obj: Any) -> Iterator[dict[str, Any]]:
    """Every container of any pod template in `obj`, wherever it sits (Deployment, CronJob, Pod, a patch)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers", "ephemeralContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from containers(value)


def server_parts(obj: dict[str, Any]) -> list[str]:
    """Why `obj` is a Prefect server, its database or its lease store, one line per reason; [] if none."""
    kind = str(obj.get("kind", ""))
    name = str((obj.get("metadata") or {}).get("name", ""))
    what = f"{kind} {name}"
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    found = []
    if kind == "HelmRelease":
        charts = [str(((spec.get("chart") or {}).get("spec") or {}).get("chart") or ""),
                  str((spec.get("chartRef") or {}).get("name") or "")]
        for chart in filter(None, charts):
            base = chart.rstrip("/").rsplit("/", 1)[-1]
            if base == "prefect-server":
                found.append(f"{what}: the prefect-server chart")
            elif DATABASE_OR_LEASE_STORE.search(base):
                found.append(f"{what}: chart {chart}")
        values = spec.get("values") if isinstance(spec.get("values"), dict) else {}
        for sub in ("postgresql", "redis"):
            if isinstance(values.get(sub), dict) and values[sub].get("enabled") is True:
                found.append(f"{what}: values.{sub}.enabled (the chart's own {sub})")
    group = str(obj.get("apiVersion", "")).split("/")[0]
    if "/" in str(obj.get("apiVersion", "")) and (DATABASE_OR_LEASE_STORE.search(group) or group == "acid.zalan.do"):
        found.append(f"{what}: a kind of a database or redis operator ({obj['apiVersion']})")
    if kind == "StatefulSet" and (DATABASE_OR_LEASE_STORE.search(name) or "prefect-server" in name):
        found.append(f"{what}: a StatefulSet of a database, lease store or server")
    for c in containers(obj):
        argv = [str(a) for a in [*(c.get("command") or []), *(c.get("args") or [])]]
        image = str(c.get("image") or "")
        where = f"{what} container {c.get('name', '?')}"
        if SERVER_COMMAND.search(" ".join(argv)):
            found.append(f"{where}: runs a Prefect server ({' '.join(argv)})")
        if image_name(image) == "prefecthq/prefect" and "worker" not in argv:
            found.append(f"{where}: image {image} without worker arguments")
        elif DATABASE_OR_LEASE_STORE.search(image_name(image).rsplit("/", 1)[-1]):
            found.append(f"{where}: image {image}")
    return found


def server_findings(k8s: Path, cluster: str) -> tuple[list[str], list[str], set[tuple[str, str]]]:
    """(findings as `where: reason`, what could not be read, (kind, name) of every object seen)."""
    objects, unread = flux_objects(k8s, cluster)
    findings = [f"{where}: {reason}" for where, obj in objects for reason in server_parts(obj)]
    seen = {(str(o.get("kind")), str((o.get("metadata") or {}).get("name"))) for _, o in objects}
    return findings, unread, seen


def flagged(findings: list[str]) -> set[str]:
    """`Kind name` of each finding."""
    return {f.split(": ")[2].split(" container ")[0] for f in findings}


def test_m720q_deploys_no_prefect_server_database_or_lease_store() -> None:
    findings, unread, seen = server_findings(K8S, "m720q")
    assert unread == [], "parts of what Flux applies on m720q could not be checked"
    # The walk reaches the app and the cluster's other workloads, so finding nothing means something.
    assert {("HelmRelease", "prefect-worker"), ("Deployment", "smokeping"), ("HelmRelease", "rook-ceph-cluster"),
            ("Kustomization", "prefect")} <= seen
    assert findings == []


def test_homelab_deploys_the_server_its_database_and_its_lease_store() -> None:
    findings, unread, _ = server_findings(K8S, "homelab")
    assert unread == []
    assert {"HelmRelease prefect-server", "StatefulSet prefect-server-postgresql",
            "StatefulSet prefect-redis"} <= flagged(findings)


def _repo_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo" / "k8s"
    shutil.copytree(K8S, root)
    return root


def test_the_check_fails_when_the_server_is_back_under_m720q(tmp_path: Path) -> None:
    # The old layout: m720q's prefect overlay applying the server app beside the worker.
    k8s = _repo_copy(tmp_path)
    overlay = k8s / "apps/overlays/m720q/prefect/kustomization.yaml"
    spec = yaml.safe_load(overlay.read_text())
    spec["resources"].insert(0, "../../../base/prefect")
    overlay.write_text(yaml.safe_dump(spec, sort_keys=False))
    findings, unread, _ = server_findings(k8s, "m720q")
    assert unread == []
    assert {"HelmRelease prefect-server", "StatefulSet prefect-server-postgresql",
            "StatefulSet prefect-redis"} <= flagged(findings)
    assert all(f.startswith("Kustomization prefect: k8s/apps/base/prefect/") for f in findings)


def test_the_check_fails_when_a_new_m720q_kustomization_brings_the_homelab_app(tmp_path: Path) -> None:
    k8s = _repo_copy(tmp_path)
    flux = k8s / "clusters/m720q/flux-kustomizations"
    (flux / "coordination.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": "coordination", "namespace": "flux-system"},
        "spec": {"interval": "10m", "path": "./k8s/apps/overlays/homelab/prefect", "prune": True,
                 "sourceRef": {"kind": "GitRepository", "name": "flux-system"}}}))
    index = yaml.safe_load((flux / "kustomization.yaml").read_text())
    index["resources"].append("coordination.yaml")
    (flux / "kustomization.yaml").write_text(yaml.safe_dump(index))
    findings, _, _ = server_findings(k8s, "m720q")
    assert "HelmRelease prefect-server" in flagged(findings)
    assert all(f.startswith("Kustomization coordination: ") for f in findings)


def _pod(kind: str, name: str, image: str, **container: Any) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name},
            "spec": {"template": {"spec": {"containers": [{"name": "main", "image": image, **container}]}}}}


@pytest.mark.parametrize("obj", [
    # the layout this replaced: the chart with its bundled PostgreSQL
    {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "metadata": {"name": "srv"},
     "spec": {"chart": {"spec": {"chart": "prefect-server"}}, "values": {"postgresql": {"enabled": True}}}},
    {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "metadata": {"name": "db"},
     "spec": {"chart": {"spec": {"chart": "oci://registry-1.docker.io/bitnamicharts/postgresql"}}}},
    {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "metadata": {"name": "app"},
     "spec": {"chart": {"spec": {"chart": "some-app"}}, "values": {"redis": {"enabled": True}}}},
    _pod("Deployment", "api", "ghcr.io/acme/prefect:3", command=["prefect", "server", "start", "--host", "0.0.0.0"]),
    _pod("Deployment", "api", "busybox", command=["sh", "-c", "pip install prefect && prefect server start"]),
    _pod("Deployment", "api", "ghcr.io/homelab-flows/homelab-flows:0.1.0", command=["homelab", "server"]),
    _pod("Deployment", "api", "prefecthq/prefect:3.9.1-python3.11"),
    _pod("Deployment", "api", "docker.io/prefecthq/prefect:3-latest", args=["prefect", "server", "start"]),
    _pod("Deployment", "db", "postgres:17-alpine"),
    _pod("Deployment", "db", "docker.io/bitnamilegacy/postgresql:14.13.0"),
    _pod("Deployment", "leases", "redis:7.4-alpine"),
    _pod("Deployment", "leases", "valkey/valkey:8"),
    _pod("StatefulSet", "prefect-redis", "ghcr.io/acme/kv:1"),
    {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
     "spec": {"jobTemplate": {"spec": {"template": {"spec": {
         "initContainers": [{"name": "wait", "image": "postgres:17"}], "containers": [{"name": "c", "image": "x"}]}}}}}},
    {"apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster", "metadata": {"name": "prefect-db"}},
], ids=["chart-with-bundled-postgresql", "postgresql-chart", "bundled-redis", "server-command", "server-in-shell",
        "homelab-server", "prefect-image-default-args", "prefect-image-server-args", "postgres-image",
        "bitnami-postgresql", "redis-image", "valkey", "statefulset-name", "cronjob-init-container", "cnpg-cluster"])
def test_each_part_of_a_server_is_recognised(obj: dict[str, Any]) -> None:
    assert server_parts(obj) != []


@pytest.mark.parametrize("obj", [
    _pod("Deployment", "prefect-worker", "prefecthq/prefect:3.9.1-python3.11-kubernetes",
         args=["prefect", "worker", "start", "--type", "kubernetes", "--pool", "homelab-kubernetes"]),
    _pod("Deployment", "homelab-webhook", "ghcr.io/homelab-flows/homelab-flows:0.1.0",
         command=["homelab", "webhook", "serve", "--host", "0.0.0.0", "--port", "8780"]),
    _pod("Deployment", "smokeping", "lscr.io/linuxserver/smokeping:latest"),
    {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "metadata": {"name": "prefect-worker"},
     "spec": {"chart": {"spec": {"chart": "prefect-worker"}}}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "prefect-server"}, "spec": {"type": "ExternalName"}},
], ids=["worker", "webhook", "other-app", "worker-chart", "egress-service"])
def test_a_worker_and_other_apps_are_not_a_server(obj: dict[str, Any]) -> None:
    assert server_parts(obj) == []


def test_the_walk_follows_kustomizations_resources_patches_and_plain_directories(tmp_path: Path) -> None:
    k8s = tmp_path / "repo" / "k8s"

    def write(rel: str, *docs: dict[str, Any]) -> None:
        path = k8s / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump_all(docs))

    def flux_ks(name: str, path: str) -> dict[str, Any]:
        return {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                "metadata": {"name": name, "namespace": "flux-system"},
                "spec": {"path": path, "sourceRef": {"kind": "GitRepository", "name": "flux-system"}}}

    write("clusters/c/kustomization.yaml", {"resources": ["a.yaml"]})
    write("clusters/c/a.yaml", flux_ks("a", "./k8s/apps/a"))
    write("apps/a/kustomization.yaml", {
        "resources": ["../plain", "https://example.com/remote.yaml", "missing.yaml"],
        "components": ["../component"],
        "patches": [{"path": "image-patch.yaml"},
                    {"patch": '[{"op": "replace", "path": "/spec/template/spec/containers/0/image",'
                              ' "value": "redis:7"}]', "target": {"kind": "Deployment"}}]})
    write("apps/a/image-patch.yaml", _pod("Deployment", "web", "postgres:16"))
    write("apps/plain/deep/b.yaml", flux_ks("b", "./k8s/apps/b"))
    write("apps/component/kustomization.yaml", {"resources": ["cm.yaml"]})
    write("apps/component/cm.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "from-component"}})
    write("apps/b/server.yaml", _pod("Deployment", "srv", "x", command=["prefect", "server", "start"]))
    write("apps/b/kustomization.yaml", {"resources": ["server.yaml"]})
    findings, unread, seen = server_findings(k8s, "c")
    assert ("ConfigMap", "from-component") in seen
    assert [f.split(": ")[0] for f in findings] == ["Kustomization a", "Kustomization a", "Kustomization b"]
    assert "image postgres:16" in findings[0] and "image redis:7" in findings[1]
    assert "runs a Prefect server" in findings[2]
    assert len(unread) == 2
    assert "remote resource https://example.com/remote.yaml" in unread[0] and "missing.yaml does not exist" in unread[1]


def test_image_name_drops_registry_tag_digest_and_library() -> None:
    assert image_name("docker.io/library/postgres:17@sha256:00") == "postgres"
    assert image_name("localhost:5000/redis:7") == "redis"
    assert image_name("ghcr.io/cloudnative-pg/postgresql:17") == "cloudnative-pg/postgresql"
    assert image_name("prefecthq/prefect:3.9.1-python3.11") == "prefecthq/prefect"


# --- The layout's pieces fit together -------------------------------------------------------------


def test_disruptive_deployments_never_use_the_m720q_worker_pool() -> None:
    worker = named("HelmRelease", "prefect-worker", WORKER_DIRS)["spec"]["values"]["worker"]
    pool = worker["config"]["workPool"]
    config = yaml.safe_load(PREFECT_YAML.read_text())
    assert config["definitions"]["work_pools"]["kubernetes"]["name"] == pool, \
        "prefect.yaml's in-cluster pool is not the one m720q's worker serves"
    disruptive = {d["name"]: d for d in config["deployments"]
                  if "disruptive" in (d.get("tags") or []) or d["name"] in DISRUPTIVE}
    assert DISRUPTIVE <= set(disruptive)
    on_m720q = sorted(name for name, d in disruptive.items() if (d.get("work_pool") or {}).get("name") == pool)
    assert on_m720q == [], f"disruptive deployments on m720q's in-cluster pool {pool}: a flow would reboot its own node"


def test_m720q_worker_reaches_the_server_on_homelab_through_the_tailnet() -> None:
    worker = named("HelmRelease", "prefect-worker", WORKER_DIRS)["spec"]["values"]["worker"]
    assert worker["apiConfig"] == "selfHostedServer"
    url = worker["selfHostedServerApiConfig"]["apiUrl"]
    [egress] = [d for d in app_docs("Service", WORKER_DIRS) if d["metadata"]["name"] == "prefect-server"]
    assert egress["spec"]["type"] == "ExternalName"
    assert url == f"http://prefect-server.{egress['metadata']['namespace']}.svc.cluster.local:4200/api"
    assert [p["port"] for p in egress["spec"]["ports"]] == [4200]
    fqdn = egress["metadata"]["annotations"]["tailscale.com/tailnet-fqdn"]
    api = named("Service", "prefect-server-tailnet", SERVER_DIRS)
    [api_patch] = [d for p, d in _docs(SERVER_DIRS)
                   if d.get("kind") == "Service" and d["metadata"]["name"] == "prefect-server-tailnet"
                   and "overlays" in p.parts]
    assert fqdn.split(".")[0] == api_patch["metadata"]["annotations"]["tailscale.com/hostname"]
    assert api["spec"]["loadBalancerClass"] == "tailscale"
    assert [(p["port"], p["targetPort"]) for p in api["spec"]["ports"]] == [(4200, 4200)]
    assert api["spec"]["selector"] == {"app.kubernetes.io/name": "prefect-server",
                                       "app.kubernetes.io/component": "server"}
    # The worker logs in with the server's credentials: the same encrypted file on both sides.
    assert ((K8S / "apps/overlays/m720q/prefect/prefect-basic-auth.sops.yaml").read_text()
            == (K8S / "apps/overlays/homelab/prefect/prefect-basic-auth.sops.yaml").read_text())


def test_server_keeps_its_leases_in_an_append_only_redis_and_its_data_in_postgresql() -> None:
    base = named("HelmRelease", "prefect-server", SERVER_DIRS)
    [patch] = [d for p, d in _docs(SERVER_DIRS) if d.get("kind") == "HelmRelease" and "overlays" in p.parts]
    values = merged(base, patch)["spec"]["values"]
    env = {e["name"]: e.get("value") for e in values["server"]["env"]}
    base_env = {e["name"]: e.get("value") for e in base["spec"]["values"]["server"]["env"]}
    assert base_env.items() <= env.items(), "the overlay's env list replaces the base's: it dropped an entry"
    redis_svc = named("Service", "prefect-redis", SERVER_DIRS)
    assert env["EXTRA_PIP_PACKAGES"] == "prefect-redis==0.3.0"
    assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == "prefect_redis.lease_storage"
    assert env["PREFECT_REDIS_MESSAGING_HOST"] == "prefect-redis.prefect.svc.cluster.local"
    assert env["PREFECT_REDIS_MESSAGING_PORT"] == str(redis_svc["spec"]["ports"][0]["port"])
    assert env["PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS"] == "5"
    assert env["PREFECT_UI_URL"] == "https://homelab-prefect.ktz.ts.net"
    # uv pip install --system at start writes root's site-packages
    assert values["server"]["containerSecurityContext"]["readOnlyRootFilesystem"] is False
    assert values["global"]["prefect"]["image"]["prefectTag"] == "3.9.1-python3.11"

    redis = named("StatefulSet", "prefect-redis", SERVER_DIRS)
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "always"
    assert [m["mountPath"] for m in container["volumeMounts"]] == [args[args.index("--dir") + 1]]
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]

    assert values["postgresql"]["enabled"] is False
    assert values["externalDatabase"] == {"existingSecret": "prefect-postgresql",
                                          "connectionStringSecretKey": "connection-string"}
    assert values["secret"] == {"create": False}
    pg = named("StatefulSet", "prefect-server-postgresql", SERVER_DIRS)
    [pg_container] = pg["spec"]["template"]["spec"]["containers"]
    pg_env = {e["name"]: e for e in pg_container["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "prefect-postgresql", "key": "password"}
    assert (pg_env["POSTGRES_USER"]["value"], pg_env["POSTGRES_DB"]["value"]) == ("prefect", "server")
    assert [t["metadata"]["name"] for t in pg["spec"]["volumeClaimTemplates"]] == ["data"]
    # the host and port of the connection string in the prefect-postgresql secret
    assert [p["port"] for p in named("Service", "prefect-server-postgresql", SERVER_DIRS)["spec"]["ports"]] == [5432]


def test_only_the_server_may_reach_the_database_and_the_lease_store() -> None:
    policies = {d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]: d
                for d in app_docs("NetworkPolicy", SERVER_DIRS) if "Ingress" in d["spec"]["policyTypes"]}
    assert set(policies) == {"prefect-redis", "prefect-server-postgresql"}
    for target, policy in policies.items():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        [rule] = policy["spec"]["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prefect-server"}}}]
        labels = named("StatefulSet", target, SERVER_DIRS)["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == target


def test_homelab_volumes_come_from_local_path_on_a_directory_the_kubelet_sees() -> None:
    [hr] = [d for _, d in documents([K8S / "infrastructure/local-path/helmrelease.yaml"])]
    values = hr["spec"]["values"]
    assert values["storageClass"]["defaultClass"] is True and values["storageClass"]["reclaimPolicy"] == "Retain"
    [path] = values["nodePathMap"][0]["paths"]
    patch = yaml.safe_load((K8S / "clusters/homelab/talos/patches/local-path.yaml").read_text())
    [mount] = patch["machine"]["kubelet"]["extraMounts"]
    assert mount["source"] == mount["destination"] == path and path.startswith("/var/")
    ns = yaml.safe_load((K8S / "infrastructure/local-path/namespace.yaml").read_text())
    assert ns["metadata"]["name"] == hr["metadata"]["namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    # The StatefulSets name no class: they take the cluster's default, local-path.
    for name in ("prefect-redis", "prefect-server-postgresql"):
        for t in named("StatefulSet", name, SERVER_DIRS)["spec"]["volumeClaimTemplates"]:
            assert "storageClassName" not in t["spec"]


def test_flux_kustomizations_apply_each_side_on_its_cluster_with_sops() -> None:
    expected = {"m720q": ("./k8s/apps/overlays/m720q/prefect", {"infrastructure-core", "rook-ceph-operator"}),
                "homelab": ("./k8s/apps/overlays/homelab/prefect", {"infrastructure-core", "local-path-provisioner"})}
    for cluster, (path, deps) in expected.items():
        flux = K8S / "clusters" / cluster / "flux-kustomizations"
        [ks] = [d for _, d in documents([flux / "prefect.yaml"])]
        assert ks["metadata"]["name"] == "prefect"
        assert ks["spec"]["path"] == path
        assert {d["name"] for d in ks["spec"]["dependsOn"]} == deps
        assert ks["spec"]["decryption"]["provider"] == "sops"
        assert "prefect.yaml" in yaml.safe_load((flux / "kustomization.yaml").read_text())["resources"]
    assert "prefect.yaml" in yaml.safe_load((K8S / "infrastructure/sources/kustomization.yaml").read_text())["resources"]


# --- Permissions and secrets ------------------------------------------------------------------------


def test_every_manifest_under_k8s_parses() -> None:
    paths = sorted(K8S.rglob("*.yaml"))
    assert len(paths) > 50
    for path in paths:
        list(yaml.safe_load_all(path.read_text()))  # raises on the first broken file, naming it


def test_homelab_validate_passes_on_the_tree() -> None:
    assert [str(p) for p in validate(K8S, "k8s")] == []


def test_wildcard_check_finds_a_star_in_any_field() -> None:
    bad = {"kind": "ClusterRole", "metadata": {"name": "wide"},
           "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
                     {"apiGroups": ["*"], "resources": ["pods/*"], "verbs": ["*"]}]}
    assert wildcards(bad) == ["wide: rules[1].apiGroups", "wide: rules[1].resources", "wide: rules[1].verbs"]


def test_prefect_app_rbac_has_no_wildcard() -> None:
    assert roles(), "no Role or ClusterRole found in the prefect app"
    assert [w for doc in roles() for w in wildcards(doc)] == []


def test_prefect_app_rbac_is_exactly_the_calls_the_flows_make() -> None:
    granted = set().union(*(flatten(doc) for doc in roles()))
    assert sorted(granted - EXPECTED_RULES) == [], "granted beyond what the flows call"
    assert sorted(EXPECTED_RULES - granted) == [], "a call the flows make is not granted"


def test_the_server_side_grants_nothing() -> None:
    assert [d["metadata"]["name"] for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
            for d in app_docs(kind, SERVER_DIRS)] == []


def test_every_binding_binds_only_the_flows_serviceaccount_to_this_apps_roles() -> None:
    defined = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in roles()}
    bindings = app_docs("RoleBinding") + app_docs("ClusterRoleBinding")
    assert len(bindings) == len(defined)
    for b in bindings:
        ns = b["metadata"].get("namespace", "")
        ref = b["roleRef"]
        assert (ref["kind"], ns if ref["kind"] == "Role" else "", ref["name"]) in defined, b["metadata"]["name"]
        assert [(s["kind"], s["namespace"], s["name"]) for s in b["subjects"]] == [("ServiceAccount", *SA)]
    [sa] = [d for d in app_docs("ServiceAccount") if d["apiVersion"] == "v1"]
    assert (sa["metadata"]["namespace"], sa["metadata"]["name"]) == SA


def talos_role_findings(sa_roles: list[str], allowed_roles: list[str], disruptive_on_pool: list[str]) -> list[str]:
    """Talos roles beyond os:reader in the in-cluster access, unless a disruptive deployment runs there."""
    if disruptive_on_pool:
        return []
    return [f"{where} grants {role}, but no disruptive deployment runs on the in-cluster pool"
            for where, roles in (("the talos.dev ServiceAccount", sa_roles), ("kubernetesTalosAPIAccess", allowed_roles))
            for role in roles if role != "os:reader"]


def _disruptive_on_the_in_cluster_pool() -> list[str]:
    config = yaml.safe_load(PREFECT_YAML.read_text())
    pool = config["definitions"]["work_pools"]["kubernetes"]["name"]
    return sorted(d["name"] for d in config["deployments"]
                  if ("disruptive" in (d.get("tags") or []) or d["name"] in DISRUPTIVE)
                  and (d.get("work_pool") or {}).get("name") == pool)


def test_talos_serviceaccount_has_the_role_the_machine_feature_allows() -> None:
    [talos_sa] = [d for _, d in _app()
                  if d.get("apiVersion") == "talos.dev/v1alpha1" and d.get("kind") == "ServiceAccount"]
    feature = yaml.safe_load((TALOS / "patches/talos-api-access.yaml").read_text())
    access = feature["machine"]["features"]["kubernetesTalosAPIAccess"]
    assert access["enabled"] is True
    assert access["allowedRoles"] == talos_sa["spec"]["roles"]
    assert access["allowedKubernetesNamespaces"] == [talos_sa["metadata"]["namespace"]]
    # In-cluster flows only read Talos: os:admin (upgrade) or os:operator (reboot) there is refused.
    assert talos_role_findings(talos_sa["spec"]["roles"], access["allowedRoles"],
                               _disruptive_on_the_in_cluster_pool()) == []
    assert talos_sa["spec"]["roles"] == ["os:reader"]


def test_talos_role_check_fails_on_admin_or_operator_outside_a_disruptive_worker() -> None:
    assert talos_role_findings(["os:admin"], ["os:admin"], []) == [
        "the talos.dev ServiceAccount grants os:admin, but no disruptive deployment runs on the in-cluster pool",
        "kubernetesTalosAPIAccess grants os:admin, but no disruptive deployment runs on the in-cluster pool"]
    assert talos_role_findings(["os:reader", "os:operator"], ["os:reader"], [])
    assert talos_role_findings(["os:admin"], ["os:admin"], ["talos-upgrade"]) == []


def test_talconfig_applies_the_talos_api_access_patch_to_control_planes() -> None:
    talconfig = yaml.safe_load((TALOS / "talconfig.yaml").read_text())
    assert "@./patches/talos-api-access.yaml" in talconfig["controlPlane"]["patches"]


def test_helmreleases_use_the_prefect_helm_repository_and_the_self_hosted_api() -> None:
    [repo] = [d for _, d in documents([K8S / "infrastructure/sources/prefect.yaml"])]
    assert repo["spec"]["url"] == "https://prefecthq.github.io/prefect-helm"
    releases = {d["metadata"]["name"]: d for d in app_docs("HelmRelease") if "chart" in d["spec"]}
    assert set(releases) == {"prefect-server", "prefect-worker"}
    for r in releases.values():
        assert r["spec"]["chart"]["spec"]["sourceRef"] == {"kind": "HelmRepository", "name": "prefect",
                                                          "namespace": "flux-system"}
    assert "dependsOn" not in releases["prefect-worker"]["spec"], "no prefect-server HelmRelease on the worker's cluster"
    server = releases["prefect-server"]["spec"]["values"]
    assert server["server"]["basicAuth"] == {"enabled": True, "existingSecret": "prefect-basic-auth"}
    worker = releases["prefect-worker"]["spec"]["values"]["worker"]
    assert worker["config"]["type"] == "kubernetes"
    assert worker["selfHostedServerApiConfig"]["basicAuth"] == {"enabled": True, "existingSecret": "prefect-basic-auth"}


def exec_findings(roles: list[dict[str, Any]], allowed: tuple[str, str]) -> list[str]:
    """Every rule that lets someone into a pod other than `allowed` (namespace, pod name)."""
    found = []
    for doc in roles:
        ns = doc["metadata"].get("namespace", "")
        for i, rule in enumerate(doc.get("rules") or []):
            entry = POD_ENTRY & set(rule.get("resources") or [])
            names = rule.get("resourceNames") or []
            if entry and (doc["kind"] != "Role" or (ns, tuple(names)) != (allowed[0], (allowed[1],))):
                found.append(f"{doc['metadata']['name']}: rules[{i}]: {', '.join(sorted(entry))} in "
                             f"{ns or 'every namespace'} on {names or 'every pod'}")
    return found


def test_exec_reaches_only_the_ceph_tools_pod_the_app_ships() -> None:
    namespace, name = CEPH_TOOLS
    tools = [d for d in app_docs("StatefulSet", WORKER_DIRS) if d["metadata"]["name"] == name]
    assert [(d["metadata"]["namespace"], d["spec"]["replicas"]) for d in tools] == [(namespace, 1)]
    assert exec_findings(roles(), (namespace, f"{name}-0")) == []
    [container] = tools[0]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["CEPH_ARGS"]["value"] == "--id homelab-flows"
    assert env["ROOK_CEPH_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "rook-ceph-client-homelab-flows",
                                                                    "key": "homelab-flows"}
    assert tools[0]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    [client] = [d for d in app_docs("CephClient", WORKER_DIRS)]
    assert (client["metadata"]["namespace"], client["metadata"]["name"]) == (namespace, "homelab-flows")
    assert client["spec"]["caps"] == CEPH_CAPS
    assert not any("*" in cap or "allow rw" in cap or "allow w" in cap for cap in client["spec"]["caps"].values())


def test_exec_check_fails_on_any_other_pod_or_a_wider_grant() -> None:
    def role(rule: dict[str, Any], kind: str = "Role", ns: str = "rook-ceph") -> dict[str, Any]:
        return {"kind": kind, "metadata": {"name": "r", "namespace": ns}, "rules": [rule]}

    allowed = ("rook-ceph", "homelab-ceph-tools-0")
    ok = {"apiGroups": [""], "resources": ["pods/exec"], "resourceNames": ["homelab-ceph-tools-0"], "verbs": ["create"]}
    assert exec_findings([role(ok)], allowed) == []
    assert exec_findings([role({**ok, "resourceNames": []})], allowed)  # every pod of rook-ceph
    assert exec_findings([role({**ok, "resourceNames": ["rook-ceph-osd-0-abc"]})], allowed)
    assert exec_findings([role(ok, ns="kube-system")], allowed)
    assert exec_findings([role(ok, kind="ClusterRole", ns="")], allowed)
    assert exec_findings([role({**ok, "resources": ["pods/attach"], "resourceNames": []})], allowed)


def test_webhook_receiver_lives_with_the_server_and_takes_its_secrets_from_secret_refs_only() -> None:
    [deploy] = [d for d in app_docs("Deployment") if d["metadata"]["name"] == "homelab-webhook"]
    assert deploy in app_docs("Deployment", SERVER_DIRS)
    containers = {c["name"]: c for c in deploy["spec"]["template"]["spec"]["containers"]}
    container = containers["webhook"]
    assert container["command"] == ["python", "-m", "homelab", "webhook", "serve", "--host", "0.0.0.0", "--port", "8780"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HOMELAB_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "homelab-webhook", "key": "secret"}
    secret_names = {d["metadata"]["name"] for d in app_docs("Secret", SERVER_DIRS)}
    for c in containers.values():
        for e in c["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in secret_names, f"{e['name']} reads a Secret the app does not ship"


def test_internet_facing_receiver_holds_no_prefect_credential() -> None:
    [deploy] = [d for d in app_docs("Deployment") if d["metadata"]["name"] == "homelab-webhook"]
    spec = deploy["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    receiver, relay = containers["webhook"], containers["relay"]
    env = {e["name"]: e for e in receiver["env"]}
    # No Prefect credential, by name or by Secret, and nothing imported wholesale.
    assert not {"PREFECT_API_AUTH_STRING", "PREFECT_API_KEY"} & set(env)
    assert "envFrom" not in receiver
    assert all(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") != "prefect-basic-auth" for e in env.values())
    assert spec["automountServiceAccountToken"] is False
    # It posts to the relay beside it, which listens on the pod's loopback only and holds the credential.
    assert env["PREFECT_API_URL"]["value"] == "http://127.0.0.1:8781/api"
    assert relay["command"][-4:] == ["--host", "127.0.0.1", "--port", "8781"]
    relay_env = {e["name"]: e for e in relay["env"]}
    assert relay_env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "prefect-basic-auth"
    assert relay_env["HOMELAB_WEBHOOK_REPOS"]["value"] == env["HOMELAB_WEBHOOK_REPOS"]["value"]
    assert not spec.get("shareProcessNamespace"), "a shared process namespace would show the relay's environment"
    # Replays stay refused across restarts: the delivery store is on a claimed volume.
    volumes = {v["name"]: v for v in spec["volumes"]}
    [mount] = [m for m in receiver["volumeMounts"] if m["mountPath"] == "/var/lib/homelab-webhook"]
    assert env["HOMELAB_WEBHOOK_STATE"]["value"].startswith(mount["mountPath"] + "/")
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in {d["metadata"]["name"] for d in app_docs("PersistentVolumeClaim", SERVER_DIRS)}
    # And the pod reaches only the server's API and DNS.
    [egress] = [d for d in app_docs("NetworkPolicy", SERVER_DIRS) if d["spec"]["policyTypes"] == ["Egress"]]
    assert egress["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "homelab-webhook"}
    assert [(r["to"][0].get("podSelector"), [p["port"] for p in r["ports"]]) for r in egress["spec"]["egress"]] == [
        ({"matchLabels": {"app.kubernetes.io/name": "prefect-server"}}, [4200]),
        ({"matchLabels": {"k8s-app": "kube-dns"}}, [53, 53])]


@pytest.mark.parametrize("name", ["homelab-webhook", "prefect-server"])
def test_tailscale_ingress_tags_base_and_homelab_overlay(name: str) -> None:
    tags = {"homelab" if "overlays" in path.parts else path.parent.name:
            d["metadata"]["annotations"]["tailscale.com/tags"]
            for path, d in _app() if d.get("kind") == "Ingress" and d["metadata"]["name"] == name}
    assert tags == {"prefect": "tag:k8s", "homelab": "tag:k8s,tag:k8s-homelab"}


def test_tailscale_services_carry_tag_k8s_and_their_clusters_tag() -> None:
    services = [(path, d) for path, d in _app() if d.get("kind") == "Service"
                and any(k.startswith("tailscale.com/") for k in (d["metadata"].get("annotations") or {}))]
    assert len(services) == 3  # the API device (base and homelab patch) and m720q's egress to it
    for path, d in services:
        tags = d["metadata"]["annotations"]["tailscale.com/tags"].split(",")
        rel = path.relative_to(K8S).parts
        cluster = rel[rel.index("overlays") + 1] if "overlays" in rel else None
        assert tags == (["tag:k8s", f"tag:k8s-{cluster}"] if cluster else ["tag:k8s"]), path
