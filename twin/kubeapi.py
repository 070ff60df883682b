"""A stateful fake Kubernetes API server.

`KubeStore` holds the objects of one cluster (resourceVersion, generation, status subresource
semantics, in-process subscribers); `KubeApiServer` serves it over HTTP to the official
`kubernetes` client and to `kubectl` (discovery, CRUD, patch, /status, selectors, watch). It refuses
what kube-apiserver refuses (field selectors a kind does not index, unconditional updates of custom
resources) and misbehaves as networks and loaded servers do when asked (kube-flaky, kube-throttle,
kube-blackhole, watch-504); docs/twin.md lists each behaviour with its source.
"""

from __future__ import annotations

import base64
import builtins
import copy
import http.server
import json
import random
import re
import select
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "ApiError",
    "KubeApiServer",
    "KubeStore",
    "ResourceType",
    "DEFAULT_KINDS",
    "parse_label_selector",
    "parse_field_selector",
    "merge_patch",
    "json_patch",
    "strategic_merge_patch",
]

HISTORY_LIMIT = 10_000
DEFAULT_SERVER_VERSION = "v1.32.0"

# ---------------------------------------------------------------------------------------------
# Kinds


@dataclass(frozen=True)
class ResourceType:
    """One kind the server knows: where it lives on the wire and how writes behave."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    status_subresource: bool = True
    # Strategic merge patch is defined only for built-in types; CRDs answer 415.
    builtin: bool = False
    # The real registry returns the deleted object for some kinds and a Status for others.
    delete_returns_object: bool = True
    # Nodes may carry status on create (the kubelet registers that way); other kinds drop it.
    status_on_create: bool = False
    # The status a create starts from when it drops the one it was given.
    initial_status: tuple[tuple[str, str], ...] = ()
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    # kubectl's table columns: (header, dotted path or one of the computed names below).
    columns: tuple[tuple[str, str], ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


_FLUX_COLUMNS = (("Age", "@age"), ("Ready", "@ready"), ("Status", "@message"))

DEFAULT_KINDS: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "Node", "nodes", namespaced=False, builtin=True,
                 delete_returns_object=False, status_on_create=True, short_names=("no",),
                 columns=(("Status", "@node-status"), ("Roles", "@node-roles"), ("Age", "@age"),
                          ("Version", "status.nodeInfo.kubeletVersion"))),
    ResourceType("", "v1", "Namespace", "namespaces", namespaced=False, builtin=True,
                 initial_status=(("phase", "Active"),), short_names=("ns",), columns=(("Status", "status.phase"), ("Age", "@age"))),
    ResourceType("", "v1", "Pod", "pods", namespaced=True, builtin=True, short_names=("po",),
                 initial_status=(("phase", "Pending"),),
                 categories=("all",),
                 columns=(("Status", "status.phase"), ("Node", "spec.nodeName"), ("Age", "@age"))),
    ResourceType("", "v1", "Secret", "secrets", namespaced=True, status_subresource=False,
                 builtin=True, columns=(("Type", "type"), ("Age", "@age"))),
    ResourceType("", "v1", "ConfigMap", "configmaps", namespaced=True, status_subresource=False,
                 builtin=True, short_names=("cm",), columns=(("Age", "@age"),)),
    ResourceType("apps", "v1", "Deployment", "deployments", namespaced=True, builtin=True,
                 delete_returns_object=False, short_names=("deploy",), categories=("all",),
                 columns=(("Ready", "@deploy-ready"), ("Available", "status.availableReplicas"),
                          ("Age", "@age"))),
    ResourceType("source.toolkit.fluxcd.io", "v1", "GitRepository", "gitrepositories",
                 namespaced=True, short_names=("gitrepo",), categories=("fluxcd",),
                 columns=(("Url", "spec.url"),) + _FLUX_COLUMNS),
    ResourceType("source.toolkit.fluxcd.io", "v1", "HelmRepository", "helmrepositories",
                 namespaced=True, short_names=("helmrepo",), categories=("fluxcd",),
                 columns=(("Url", "spec.url"),) + _FLUX_COLUMNS),
    ResourceType("source.toolkit.fluxcd.io", "v1", "HelmChart", "helmcharts",
                 namespaced=True, short_names=("hc",), categories=("fluxcd",),
                 columns=(("Chart", "spec.chart"), ("Version", "spec.version")) + _FLUX_COLUMNS),
    ResourceType("source.toolkit.fluxcd.io", "v1", "OCIRepository", "ocirepositories",
                 namespaced=True, short_names=("ocirepo",), categories=("fluxcd",),
                 columns=(("Url", "spec.url"),) + _FLUX_COLUMNS),
    ResourceType("source.toolkit.fluxcd.io", "v1", "Bucket", "buckets",
                 namespaced=True, categories=("fluxcd",),
                 columns=(("Endpoint", "spec.endpoint"),) + _FLUX_COLUMNS),
    ResourceType("kustomize.toolkit.fluxcd.io", "v1", "Kustomization", "kustomizations",
                 namespaced=True, short_names=("ks",), categories=("fluxcd",), columns=_FLUX_COLUMNS),
    ResourceType("helm.toolkit.fluxcd.io", "v2", "HelmRelease", "helmreleases", namespaced=True,
                 short_names=("hr",), categories=("fluxcd",), columns=_FLUX_COLUMNS),
    ResourceType("ceph.rook.io", "v1", "CephCluster", "cephclusters", namespaced=True,
                 columns=(("Phase", "status.phase"), ("Health", "status.ceph.health"), ("Age", "@age"))),
    ResourceType("talos.dev", "v1alpha1", "ServiceAccount", "serviceaccounts", namespaced=True,
                 columns=(("Age", "@age"),)),
)


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """A request the API server refuses; carries the Kubernetes Status object it answers with."""

    def __init__(self, code: int, reason: str, message: str, *, kind: str | None = None,
                 name: str | None = None, group: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details: dict[str, Any] = {}
        if name is not None:
            self.details["name"] = name
        if group is not None:
            self.details["group"] = group
        if kind is not None:
            self.details["kind"] = kind

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }
        if self.details:
            out["details"] = dict(self.details)
        return out


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.plural}{"." + rt.group if rt.group else ""} "{name}" not found',
                    kind=rt.plural, name=name, group=rt.group)


def _conflict(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {rt.plural}{"." + rt.group if rt.group else ""} '
                    f'"{name}": {why}', kind=rt.plural, name=name, group=rt.group)


# ---------------------------------------------------------------------------------------------
# Selectors


_LABEL_TERM = re.compile(
    r"^\s*(?:(?P<not>!)\s*(?P<nkey>[^\s=!,()]+)"
    r"|(?P<key>[^\s=!,()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[^\s,()]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\))?)\s*$"
)


def _split_terms(selector: str) -> list[str]:
    terms: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    return [t for t in terms if t.strip()]


LabelPredicate = Callable[[dict[str, str]], bool]


def parse_label_selector(selector: str | None) -> LabelPredicate:
    """Kubernetes label selector syntax: `=`, `==`, `!=`, `in`, `notin`, `key`, `!key`."""
    reqs: list[tuple[str, str, frozenset[str]]] = []
    for term in _split_terms(selector or ""):
        m = _LABEL_TERM.match(term)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term.strip()!r} in label selector")
        if m.group("nkey"):
            reqs.append(("!", m.group("nkey"), frozenset()))
        elif m.group("op"):
            reqs.append(("!=" if m.group("op") == "!=" else "=", m.group("key"), frozenset([m.group("val")])))
        elif m.group("setop"):
            values = frozenset(x.strip() for x in m.group("set").split(",") if x.strip())
            reqs.append((m.group("setop"), m.group("key"), values))
        else:
            reqs.append(("exists", m.group("key"), frozenset()))

    def matches(labels: dict[str, str]) -> bool:
        for op, key, values in reqs:
            value = labels.get(key)
            ok = {"!": key not in labels, "exists": key in labels, "=": value in values, "in": value in values,
                  "!=": value not in values, "notin": value not in values}[op]
            if not ok:
                return False
        return True
    return matches


ObjPredicate = Callable[[dict[str, Any]], bool]

# Field labels a list or watch may select on. A custom resource knows metadata.name and (namespaced)
# metadata.namespace only (apiextensions-apiserver, pkg/apiserver/conversion/converter.go,
# crConverter.ConvertFieldLabel); a Node metadata.name and spec.unschedulable (pkg/apis/core/v1/conversion.go,
# AddFieldLabelConversionFunc for "Node"). Anything else is refused with 400 BadRequest (the list
# handler wraps the conversion error in errors.NewBadRequest, apiserver endpoints/handlers/get.go).
_NODE_FIELD_LABELS = frozenset({"metadata.name", "spec.unschedulable"})


def check_field_selector(rt: ResourceType, selector: str | None) -> None:
    """ApiError 400 for a field label the real API server cannot select this kind on."""
    if not selector:
        return
    if rt.builtin and rt.kind != "Node":
        return  # built-in kinds other than Node: every path the twin stores is accepted
    allowed = _NODE_FIELD_LABELS if rt.kind == "Node" else (
        frozenset({"metadata.name", "metadata.namespace"}) if rt.namespaced else frozenset({"metadata.name"}))
    for term in selector.split(","):
        m = re.match(r"^\s*([A-Za-z0-9_.\-/]+)\s*(?:==|=|!=)", term)
        if m and m.group(1) not in allowed:
            raise ApiError(400, "BadRequest", f"field label not supported: {m.group(1)}")


def _field_value(obj: dict[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            cur = None
            break
        cur = cur.get(part)
    if cur is None:
        # The real server indexes a missing spec.unschedulable as "false".
        return "false" if path == "spec.unschedulable" else ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def parse_field_selector(selector: str | None) -> ObjPredicate:
    """Field selectors: `path=value`, `path==value`, `path!=value`, comma separated."""
    reqs: list[tuple[str, bool, str]] = []
    for term in (selector or "").split(","):
        term = term.strip()
        if not term:
            continue
        m = re.match(r"^([A-Za-z0-9_.\-/]+)\s*(==|=|!=)\s*(.*)$", term)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector term {term!r}: expected path=value or path!=value")
        reqs.append((m.group(1), m.group(2) != "!=", m.group(3).strip()))

    def matches(obj: dict[str, Any]) -> bool:
        return all((_field_value(obj, path) == value) == equal for path, equal, value in reqs)
    return matches


# ---------------------------------------------------------------------------------------------
# Patches

_DELETE = object()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"json patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str], path: str) -> Any:
    cur = doc
    for p in parts:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            raise ApiError(422, "Invalid", f"json patch: path {path!r} does not exist in the object")
    return cur


def _json_patch_set(doc: Any, parts: list[str], value: Any, path: str, op: str) -> Any:
    if not parts:
        return value
    parent = _resolve(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        if op == "replace" and last not in parent:
            raise ApiError(422, "Invalid", f"json patch replace: path {path!r} does not exist in the object")
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-" and op == "add":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent) - (0 if op == "add" else 1):
            if op == "add":
                parent.insert(int(last), value)
            else:
                parent[int(last)] = value
        else:
            raise ApiError(422, "Invalid", f"json patch {op}: index in {path!r} is out of range")
    else:
        raise ApiError(422, "Invalid", f"json patch {op}: parent of {path!r} is not an object or array")
    return doc


def _json_patch_remove(doc: Any, parts: list[str], path: str) -> Any:
    if not parts:
        raise ApiError(422, "Invalid", "json patch remove: cannot remove the whole object")
    parent = _resolve(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise ApiError(422, "Invalid", f"json patch remove: path {path!r} does not exist in the object")


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test); returns a new value."""
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "json patch must be a JSON array of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, "BadRequest", f"json patch operation {op!r} lacks 'op' or 'path'")
        name, path = op["op"], op["path"]
        parts = _pointer(path)
        if name in ("add", "replace"):
            if "value" not in op:
                raise ApiError(400, "BadRequest", f"json patch {name} at {path!r} lacks 'value'")
            doc = _json_patch_set(doc, parts, copy.deepcopy(op["value"]), path, name)
        elif name == "remove":
            _json_patch_remove(doc, parts, path)
        elif name in ("move", "copy"):
            src = op.get("from")
            if src is None:
                raise ApiError(400, "BadRequest", f"json patch {name} to {path!r} lacks 'from'")
            if name == "move":
                value = _json_patch_remove(doc, _pointer(src), src)
            else:
                value = copy.deepcopy(_resolve(doc, _pointer(src), src))
            doc = _json_patch_set(doc, parts, value, path, "add")
        elif name == "test":
            if _resolve(doc, parts, path) != op.get("value"):
                raise ApiError(422, "Invalid", f"json patch test failed at {path!r}: expected {op.get('value')!r}")
        else:
            raise ApiError(400, "BadRequest", f"json patch operation {name!r} is not one of add/remove/replace/move/copy/test")
    return doc


# Merge keys of the built-in types' lists (patchMergeKey in the Kubernetes API types).
_MERGE_KEYS = {
    "conditions": "type", "addresses": "type", "containers": "name", "initContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort",
    "imagePullSecrets": "name", "ownerReferences": "uid",
}


def _list_merge_key(field_name: str, items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    key = _MERGE_KEYS.get(field_name)
    if key and all(key in i for i in items):
        return key
    for candidate in ("type", "name"):
        if all(candidate in i for i in items):
            return candidate
    return None


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch: a merge patch whose lists of objects merge by their key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "delete":
        return _DELETE
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$"):
            continue  # $setElementOrder, $retainKeys, $deleteFromPrimitiveList: ordering hints
        if v is None:
            out.pop(k, None)
            continue
        cur = out.get(k)
        if isinstance(v, list) and isinstance(cur, list):
            key = _list_merge_key(k, [i for i in v if not (isinstance(i, dict) and i.get("$patch"))] or v)
            key = key or _list_merge_key(k, cur)
            if key is not None and all(isinstance(i, dict) for i in v):
                merged = list(cur)
                for item in v:
                    idx = next((n for n, c in enumerate(merged) if isinstance(c, dict) and c.get(key) == item.get(key)), None)
                    if item.get("$patch") == "delete":
                        if idx is not None:
                            merged.pop(idx)
                    elif idx is None:
                        merged.append({ik: iv for ik, iv in item.items() if ik != "$patch"})
                    else:
                        merged[idx] = strategic_merge_patch(merged[idx], item)
                out[k] = merged
                continue
            out[k] = copy.deepcopy(v)
            continue
        result = strategic_merge_patch(cur, v)
        if result is _DELETE:
            out.pop(k, None)
        else:
            out[k] = result
    return out


# ---------------------------------------------------------------------------------------------
# The store


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class _Entry:
    obj: dict[str, Any]  # never mutated once stored
    raw: bytes


@dataclass
class _Event:
    rv: int
    type: str
    rt: ResourceType
    obj: dict[str, Any]
    raw: bytes
    old: dict[str, Any] | None


Key = tuple[str, str]  # (namespace or "", name)


@dataclass
class _Subscribers:
    fns: list[Callable[[str, dict[str, Any]], None]] = field(default_factory=list)
    pending: deque[tuple[str, bytes]] = field(default_factory=deque)
    dispatching: bool = False


class KubeStore:
    """The objects of one cluster; thread-safe; every read returns a copy."""

    def __init__(self, kinds: Iterable[ResourceType] = DEFAULT_KINDS,
                 server_version: str = DEFAULT_SERVER_VERSION, history_limit: int = HISTORY_LIMIT) -> None:
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)
        self._kinds: dict[tuple[str, str], ResourceType] = {}
        self._objects: dict[tuple[str, str], dict[Key, _Entry]] = {}
        self._rv = 0
        self._history: deque[_Event] = deque(maxlen=history_limit)
        self._subs = _Subscribers()
        self._sub_lock = threading.Lock()
        self.server_version = server_version
        for rt in kinds:
            self.register_kind(rt)

    # -- kinds ------------------------------------------------------------------------------

    def register_kind(self, rt: ResourceType) -> None:
        with self._lock:
            self._kinds[(rt.api_version, rt.kind)] = rt
            self._objects.setdefault((rt.api_version, rt.kind), {})

    def kinds(self) -> list[ResourceType]:
        with self._lock:
            return list(self._kinds.values())

    def kind(self, api_version: str, kind: str) -> ResourceType:
        rt = self._kinds.get((api_version, kind))
        if rt is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource: "
                           f"kind {kind!r} of apiVersion {api_version!r} is not registered")
        return rt

    def resource(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self._lock:
            for rt in self._kinds.values():
                if rt.group == group and rt.version == version and rt.plural == plural:
                    return rt
        return None

    @property
    def resource_version(self) -> int:
        return self._rv

    # -- reads ------------------------------------------------------------------------------

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        with self._lock:
            _, _, entry = self._find(api_version, kind, namespace, name)
            raw = entry.raw if entry else None
        return json.loads(raw) if raw is not None else None

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str | None = None, field_selector: str | None = None) -> list[dict[str, Any]]:
        rt, raws, _ = self.list_raw(api_version, kind, namespace, label_selector, field_selector)
        return [json.loads(r) for r in raws]

    def list_raw(self, api_version: str, kind: str, namespace: str | None = None,
                 label_selector: str | None = None, field_selector: str | None = None,
                 ) -> tuple[ResourceType, builtins.list[bytes], int]:
        """Serialized matching objects sorted by namespace/name, and the resourceVersion read at."""
        match = self._matcher(label_selector, field_selector)
        with self._lock:
            rt = self.kind(api_version, kind)
            objs = self._objects[(api_version, kind)]
            keys = sorted(objs)
            if namespace and rt.namespaced:
                keys = [k for k in keys if k[0] == namespace]
            raws = [objs[k].raw for k in keys if match(objs[k].obj)]
            return rt, raws, self._rv

    @staticmethod
    def _matcher(label_selector: str | None, field_selector: str | None) -> ObjPredicate:
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector)
        return lambda obj: labels(obj.get("metadata", {}).get("labels") or {}) and fields(obj)

    # -- writes -----------------------------------------------------------------------------

    def create(self, obj: dict[str, Any], *, keep_status: bool = True) -> dict[str, Any]:
        """Create an object; the in-process world keeps the status it is given."""
        obj = copy.deepcopy(obj)
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        meta = obj.setdefault("metadata", {})
        with self._lock:
            rt = self.kind(api_version, kind)
            if not meta.get("name"):
                if meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                else:
                    raise ApiError(422, "Invalid", f"{kind} has no metadata.name: set metadata.name or metadata.generateName",
                                   kind=kind)
            if rt.namespaced:
                meta["namespace"] = meta.get("namespace") or "default"
            else:
                meta.pop("namespace", None)
            key = self._key(rt, meta.get("namespace"), meta["name"])
            objs = self._objects[(api_version, kind)]
            if key in objs:
                raise ApiError(409, "AlreadyExists",
                               f'{rt.plural}{"." + rt.group if rt.group else ""} "{meta["name"]}" already exists',
                               kind=rt.plural, name=meta["name"], group=rt.group)
            if not keep_status and rt.status_subresource and not rt.status_on_create:
                obj.pop("status", None)
            if rt.initial_status and not obj.get("status"):
                obj["status"] = dict(rt.initial_status)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
            meta.pop("deletionTimestamp", None)
            out = self._commit(rt, key, obj, None, "ADDED")
        self._dispatch()
        return out

    def replace(self, obj: dict[str, Any], check_version: bool = False,
                subresource: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Replace an object. `subresource=None` writes all of it (the in-process world),
        "main" ignores status for kinds with a status subresource (HTTP PUT), "status" only status."""
        obj = copy.deepcopy(obj)
        meta = obj.get("metadata") or {}
        with self._lock:
            rt = self.kind(obj.get("apiVersion", ""), obj.get("kind", ""))
            key = self._key(rt, meta.get("namespace"), meta.get("name", ""))
            cur = self._objects[(rt.api_version, rt.kind)].get(key)
            if cur is None:
                raise _not_found(rt, meta.get("name", ""))
            want_rv = meta.get("resourceVersion")
            if check_version and want_rv and want_rv != cur.obj["metadata"]["resourceVersion"]:
                raise _conflict(rt, key[1], "the object has been modified; please apply your changes "
                                "to the latest version and try again")
            out = self._update(rt, key, cur, obj, subresource, dry_run)
        self._dispatch()
        return out

    def patch(self, api_version: str, kind: str, namespace: str | None, name: str,
              patch: dict[str, Any] | builtins.list[Any], patch_type: str = "merge",
              subresource: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Patch with `merge`, `json` or `strategic`; a resourceVersion in the patch must match."""
        with self._lock:
            rt, key, cur = self._find(api_version, kind, namespace, name)
            if cur is None:
                raise _not_found(rt, name)
            base = json.loads(cur.raw)
            if patch_type == "merge":
                if not isinstance(patch, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                new = merge_patch(base, patch)
            elif patch_type == "json":
                new = json_patch(base, patch)  # type: ignore[arg-type]
            elif patch_type == "strategic":
                if not rt.builtin:
                    raise ApiError(415, "UnsupportedMediaType",
                                   f"the body of the request was in an unknown format - accepted media types include: "
                                   f"application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml "
                                   f"({rt.kind} is a custom resource: use a merge or JSON patch)")
                if not isinstance(patch, dict):
                    raise ApiError(400, "BadRequest", "a strategic merge patch must be a JSON object")
                new = strategic_merge_patch(base, patch)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"patch type {patch_type!r} is not merge, json or strategic")
            if not isinstance(new, dict):
                raise ApiError(422, "Invalid", f"{kind} {name!r}: the patch did not leave an object")
            new_rv = (new.get("metadata") or {}).get("resourceVersion")
            if new_rv and new_rv != cur.obj["metadata"]["resourceVersion"]:
                raise _conflict(rt, name, "the object has been modified; please apply your changes "
                                "to the latest version and try again")
            out = self._update(rt, key, cur, new, subresource, dry_run)
        self._dispatch()
        return out

    def mutate(self, api_version: str, kind: str, namespace: str | None, name: str,
               fn: Callable[[dict[str, Any]], None], subresource: str | None = None) -> dict[str, Any] | None:
        """Read-modify-write under the store lock; None when the object does not exist."""
        with self._lock:
            rt, key, cur = self._find(api_version, kind, namespace, name)
            if cur is None:
                return None
            new = json.loads(cur.raw)
            fn(new)
            out = self._update(rt, key, cur, new, subresource)
        self._dispatch()
        return out

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """Delete; an object with finalizers only gets a deletionTimestamp until they are removed."""
        with self._lock:
            rt, key, cur = self._find(api_version, kind, namespace, name)
            if cur is None:
                return None
            if cur.obj["metadata"].get("finalizers"):
                if cur.obj["metadata"].get("deletionTimestamp"):
                    return json.loads(cur.raw)
                new = json.loads(cur.raw)
                new["metadata"]["deletionTimestamp"] = _now()
                out = self._commit(rt, key, new, cur, "MODIFIED")
            else:
                out = self._remove(rt, key, cur)
        self._dispatch()
        return out

    def subscribe(self, fn: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        """Call `fn(event_type, object)` after every write, outside the store lock and in write
        order; a subscriber may write to the store (its events are delivered after it returns)."""
        with self._sub_lock:
            self._subs.fns.append(fn)

        def unsubscribe() -> None:
            with self._sub_lock:
                if fn in self._subs.fns:
                    self._subs.fns.remove(fn)
        return unsubscribe

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _key(rt: ResourceType, namespace: str | None, name: str) -> Key:
        return ((namespace or "default") if rt.namespaced else "", name)

    def _find(self, api_version: str, kind: str, namespace: str | None,
              name: str) -> tuple[ResourceType, Key, _Entry | None]:
        """The object's type, its key in the store and its entry (None when absent); under the store lock."""
        rt = self.kind(api_version, kind)
        key = self._key(rt, namespace, name)
        return rt, key, self._objects[(api_version, kind)].get(key)

    def _update(self, rt: ResourceType, key: Key, cur: _Entry, new: dict[str, Any],
                subresource: str | None, dry_run: bool = False) -> dict[str, Any]:
        old = cur.obj
        if subresource == "status":
            merged = json.loads(cur.raw)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        elif subresource == "main" and rt.status_subresource:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        elif subresource not in (None, "main", "status"):
            raise ApiError(404, "NotFound", f"{rt.kind} has no subresource {subresource!r}")
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        meta = new.setdefault("metadata", {})
        ometa = old["metadata"]
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion", "generation",
                      "deletionTimestamp"):
            if fixed in ometa:
                meta[fixed] = ometa[fixed]
            else:
                meta.pop(fixed, None)
        if new == old:
            return json.loads(cur.raw)  # a no-op write neither bumps resourceVersion nor notifies
        if _spec_of(rt, new) != _spec_of(rt, old):
            meta["generation"] = int(ometa.get("generation", 1)) + 1
        if dry_run:
            return json.loads(_dumps(new))  # what the write would store, at the current resourceVersion
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(rt, key, cur)
        return self._commit(rt, key, new, cur, "MODIFIED")

    def _commit(self, rt: ResourceType, key: Key, obj: dict[str, Any], old: _Entry | None,
                event: str) -> dict[str, Any]:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        raw = _dumps(obj)
        self._objects[(rt.api_version, rt.kind)][key] = _Entry(obj, raw)
        self._record(rt, event, obj, raw, old.obj if old else None)
        return json.loads(raw)

    def _remove(self, rt: ResourceType, key: Key, cur: _Entry) -> dict[str, Any]:
        del self._objects[(rt.api_version, rt.kind)][key]
        self._rv += 1
        obj = json.loads(cur.raw)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        raw = _dumps(obj)
        self._record(rt, "DELETED", obj, raw, cur.obj)
        return json.loads(raw)

    def _record(self, rt: ResourceType, event: str, obj: dict[str, Any], raw: bytes,
                old: dict[str, Any] | None) -> None:
        self._history.append(_Event(self._rv, event, rt, obj, raw, old))
        with self._sub_lock:
            if self._subs.fns:
                self._subs.pending.append((event, raw))
        self.changed.notify_all()

    def _dispatch(self) -> None:
        # The first writer to get here delivers every pending event in order; writes made by
        # subscribers (or other threads meanwhile) queue up and are drained by the same loop.
        with self._sub_lock:
            if self._subs.dispatching:
                return
            self._subs.dispatching = True
        try:
            while True:
                with self._sub_lock:
                    if not self._subs.pending:
                        self._subs.dispatching = False
                        return
                    event, raw = self._subs.pending.popleft()
                    fns = list(self._subs.fns)
                for fn in fns:
                    try:
                        fn(event, json.loads(raw))
                    except Exception:  # noqa: BLE001 - one broken controller must not stop the others
                        import logging
                        logging.getLogger(__name__).exception("kube store subscriber %r failed on %s", fn, event)
        except BaseException:
            with self._sub_lock:
                self._subs.dispatching = False
            raise

    def events_since(self, rv: int) -> builtins.list[_Event]:
        """Events after `rv`; raises Gone (410) when they have left the bounded history.
        Call with the lock held (`with store.changed:`)."""
        if rv >= self._rv:
            return []
        first = self._history[0].rv if self._history else self._rv + 1
        if rv + 1 < first:
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({first - 1})")
        start = rv + 1 - first
        return [self._history[i] for i in range(start, len(self._history))]


def _spec_of(rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
    skip = {"metadata", "status"} if rt.status_subresource else {"metadata"}
    return {k: v for k, v in obj.items() if k not in skip}


# ---------------------------------------------------------------------------------------------
# Tables for kubectl


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    try:
        secs = int(time.time() - datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
    except ValueError:
        return "<unknown>"
    secs = max(secs, 0)
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    if secs < 172800:
        return f"{secs // 3600}h"
    return f"{secs // 86400}d"


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == ctype:
            return c
    return {}


def _cell(obj: dict[str, Any], spec: str) -> Any:
    if spec == "@age":
        return _age(obj.get("metadata", {}).get("creationTimestamp"))
    if spec == "@ready":
        return _condition(obj, "Ready").get("status", "")
    if spec == "@message":
        return _condition(obj, "Ready").get("message", "")
    if spec == "@node-status":
        status = {"True": "Ready", "False": "NotReady"}.get(_condition(obj, "Ready").get("status", ""), "Unknown")
        if (obj.get("spec") or {}).get("unschedulable"):
            status += ",SchedulingDisabled"
        return status
    if spec == "@node-roles":
        prefix = "node-role.kubernetes.io/"
        roles = sorted(k[len(prefix):] for k in (obj["metadata"].get("labels") or {}) if k.startswith(prefix))
        return ",".join(roles) or "<none>"
    if spec == "@deploy-ready":
        st = obj.get("status") or {}
        return f"{st.get('readyReplicas', 0)}/{(obj.get('spec') or {}).get('replicas', 1)}"
    value = _field_value(obj, spec)
    return value


def _table(rt: ResourceType, objs: list[dict[str, Any]], list_meta: dict[str, Any]) -> dict[str, Any]:
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    columns += [{"name": h, "type": "string", "format": "", "description": h, "priority": 0} for h, _ in rt.columns]
    rows = []
    for obj in objs:
        meta = obj.get("metadata", {})
        rows.append({
            "cells": [meta.get("name", "")] + [_cell(obj, s) for _, s in rt.columns],
            "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta},
        })
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta,
            "columnDefinitions": columns, "rows": rows}


# ---------------------------------------------------------------------------------------------
# HTTP


class _Stopping(Exception):
    pass


class _Blackholed(Exception):
    pass


def _watch_timeout(rv: int, current: int) -> ApiError:
    """The 504 a watch ends with under watch-504: the Status kube-apiserver's watch cache sends
    (k8s.io/apiserver pkg/storage/errors.go NewTooLargeResourceVersionError, built on
    apimachinery errors.NewTimeoutError: reason Timeout, retryAfterSeconds)."""
    err = ApiError(504, "Timeout", f"Timeout: Too large resource version: {rv}, current: {current}")
    err.details = {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                   "retryAfterSeconds": 1}
    return err


def _peer_closed(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are counted, not logged

    def setup(self) -> None:
        super().setup()
        self.server.api._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api._track(self.connection, add=False)

    def do_GET(self) -> None:
        self.server.api._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.api._handle(self, "POST")

    def do_PUT(self) -> None:
        self.server.api._handle(self, "PUT")

    def do_PATCH(self) -> None:
        self.server.api._handle(self, "PATCH")

    def do_DELETE(self) -> None:
        self.server.api._handle(self, "DELETE")


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: KubeApiServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that drops its connection is normal for watches; nothing goes to stderr


_PUBLIC_PATHS = {"/version", "/healthz", "/livez", "/readyz"}


class KubeApiServer:
    """The HTTP face of a `KubeStore` for the kubernetes client and kubectl."""

    def __init__(self, store: KubeStore, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 anonymous: bool = True) -> None:
        self.store = store
        self.host, self.port = host, port
        self.token = token
        self.anonymous = anonymous
        self._available = True
        self.flaky_share = 0.0
        self.added_latency_s = 0.0
        # kube-throttle: this share of requests is refused as APF/max-in-flight refuses them.
        self.throttle_share = 0.0
        # kube-blackhole: until this monotonic time connections are accepted and never answered.
        self._blackhole_until = 0.0
        self._blackhole_changed = threading.Condition()
        # watch-504: every watch ends this many seconds after it started with a 504 Timeout error event.
        self.watch_504_after_s: float | None = None
        # kube-apiserver's watch cache sends a bookmark about once a minute (cacher bookmarkFrequency).
        self.bookmark_interval_s = 60.0
        self.request_count: dict[str, int] = {}
        self.rng = random.Random()
        self._count_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self.url = ""

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.api = self
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"kubeapi:{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._conns_lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)
        deadline = time.monotonic() + 1.0
        for _, thread in conns:
            if thread is not threading.current_thread():
                thread.join(timeout=max(deadline - time.monotonic(), 0))
        self._httpd = None
        self._thread = None

    def __enter__(self) -> KubeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def available(self) -> bool:
        return self._available

    @available.setter
    def available(self, value: bool) -> None:
        # A control plane that goes down ends its open watches at once.
        self._available = value
        with self.store.changed:
            self.store.changed.notify_all()

    def blackhole_for(self, seconds: float) -> None:
        """From now on, for ``seconds``, accept connections and answer nothing; 0 ends it now."""
        with self._blackhole_changed:
            self._blackhole_until = time.monotonic() + seconds if seconds > 0 else 0.0
            self._blackhole_changed.notify_all()
        with self.store.changed:
            self.store.changed.notify_all()  # open watches fall silent too

    @property
    def blackholed(self) -> bool:
        return time.monotonic() < self._blackhole_until

    def _hold_silently(self, h: _Handler) -> None:
        """A blackholed endpoint (a power-cycled node, an address that moved): the request is never
        answered. When the window ends the peer has forgotten the connection, so it is reset, not closed."""
        with self._blackhole_changed:
            while self.blackholed and not self._stopping.is_set():
                if _peer_closed(h.connection):
                    break
                self._blackhole_changed.wait(min(0.1, max(0.0, self._blackhole_until - time.monotonic())))
        h.close_connection = True
        try:  # SO_LINGER 0: the close that follows sends RST, as a peer that lost its state does
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass

    def count(self, verb: str, kind: str | None = None) -> int:
        with self._count_lock:
            if kind is not None:
                return self.request_count.get(f"{verb}:{kind}", 0)
            return sum(n for k, n in self.request_count.items() if k.split(":", 1)[0] == verb)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns[conn] = threading.current_thread()
            else:
                self._conns.pop(conn, None)

    def _tick(self, verb: str, kind: str) -> None:
        with self._count_lock:
            key = f"{verb}:{kind}"
            self.request_count[key] = self.request_count.get(key, 0) + 1

    # -- request handling -------------------------------------------------------------------

    def _handle(self, h: _Handler, method: str) -> None:
        try:
            url = urlsplit(h.path)
            path = url.path.rstrip("/") or "/"
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            length = int(h.headers.get("Content-Length") or 0)
            body = h.rfile.read(length) if length else b""
            if self.blackholed:
                self._tick("fault", "blackhole")
                return self._hold_silently(h)
            if self.added_latency_s > 0:
                time.sleep(self.added_latency_s)
            if not self.available:
                raise ApiError(503, "ServiceUnavailable", "the Kubernetes API server is unavailable "
                               "(the control plane is down); retry when it is back")
            if self.token is not None and path not in _PUBLIC_PATHS:
                # kubectl sends a kubeconfig's credentials only over TLS, so over plain http a
                # request without any is let in as anonymous; a wrong token is still refused.
                auth = h.headers.get("Authorization")
                if (auth is None and not self.anonymous) or (auth is not None and auth != f"Bearer {self.token}"):
                    raise ApiError(401, "Unauthorized", "Unauthorized: the bearer token is missing or wrong")
            if self.throttle_share > 0 and path not in _PUBLIC_PATHS and self.rng.random() < self.throttle_share:
                self._tick("fault", "throttle")
                return self._too_many_requests(h)
            if self.flaky_share > 0 and self.rng.random() < self.flaky_share:
                self._tick("fault", "")
                raise ApiError(500, "InternalError", "Internal error occurred: injected kube-flaky fault")
            self._route(h, method, path, query, body)
        except ApiError as e:
            self._send_json(h, e.code, e.status())
        except (BrokenPipeError, ConnectionResetError, _Stopping):
            h.close_connection = True
        except Exception as e:  # noqa: BLE001 - the server answers 500 like the real one
            self._send_json(h, 500, ApiError(500, "InternalError", f"Internal error occurred: {type(e).__name__}: {e}").status())

    @staticmethod
    def _too_many_requests(h: _Handler) -> None:
        # apiserver pkg/server/filters/maxinflight.go tooManyRequests (APF rejects through the same
        # function): Retry-After: 1 and http.Error's text/plain body, not a Status object.
        data = b"Too many requests, please try again later.\n"
        h.send_response(429)
        h.send_header("Retry-After", "1")
        h.send_header("Content-Type", "text/plain; charset=utf-8")
        h.send_header("X-Content-Type-Options", "nosniff")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _send_json(self, h: _Handler, code: int, payload: Any, raw: bytes | None = None) -> None:
        data = raw if raw is not None else _dumps(payload)
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Cache-Control", "no-cache, private")
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _route(self, h: _Handler, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        parts = [p for p in path.split("/") if p]
        if path == "/version":
            self._tick("get", "version")
            return self._send_json(h, 200, self._version())
        if path in ("/healthz", "/livez", "/readyz"):
            data = b"ok"
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return None
        if not parts or parts[0] not in ("api", "apis"):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
        if parts[0] == "api":
            group, rest = "", parts[1:]
            if not rest:
                self._tick("get", "discovery")
                return self._send_json(h, 200, {"kind": "APIVersions", "versions": ["v1"],
                                                "serverAddressByClientCIDRs": [
                                                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]})
        else:
            if len(parts) == 1:
                self._tick("get", "discovery")
                return self._send_json(h, 200, self._group_list())
            group, rest = parts[1], parts[2:]
            if not rest:
                self._tick("get", "discovery")
                groups = [g for g in self._group_list()["groups"] if g["name"] == group]
                if not groups:
                    raise ApiError(404, "NotFound", f"the server could not find the requested resource (group {group})")
                return self._send_json(h, 200, {"kind": "APIGroup", "apiVersion": "v1", **groups[0]})
        version, rest = rest[0], rest[1:]
        if not rest:
            self._tick("get", "discovery")
            return self._send_json(h, 200, self._resource_list(group, version))
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and self.store.resource(group, version, rest[2]):
            namespace, rest = rest[1], rest[2:]
        rt = self.store.resource(group, version, rest[0])
        if rt is None or len(rest) > 3:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
        if namespace is not None and not rt.namespaced:
            raise ApiError(404, "NotFound", f"{rt.kind} is cluster-scoped: it has no namespaced path {path}")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and (sub != "status" or not rt.status_subresource):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
        if rt.namespaced and name is not None and namespace is None:
            raise ApiError(404, "NotFound", f"{rt.kind} is namespaced: use /namespaces/<ns>/{rt.plural}/{name}")
        return self._resource(h, method, rt, namespace, name, sub, query, body)

    def _resource(self, h: _Handler, method: str, rt: ResourceType, namespace: str | None, name: str | None,
                  sub: str | None, query: dict[str, str], body: bytes) -> None:
        store = self.store
        want_table = "as=Table" in (h.headers.get("Accept") or "")
        if name is None:
            check_field_selector(rt, query.get("fieldSelector"))
            if method == "GET":
                if query.get("watch") in ("true", "1"):
                    self._tick("watch", rt.kind)
                    return self._watch(h, rt, namespace, query, want_table)
                self._tick("list", rt.kind)
                return self._list(h, rt, namespace, query, want_table)
            if method == "POST":
                self._tick("create", rt.kind)
                obj = self._body_object(body, rt)
                meta = obj.setdefault("metadata", {})
                if rt.namespaced:
                    if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                        raise ApiError(400, "BadRequest", f"the namespace of the object ({meta['namespace']}) does not "
                                       f"match the namespace on the request ({namespace})")
                    meta["namespace"] = namespace or meta.get("namespace") or "default"
                if query.get("dryRun"):
                    return self._send_json(h, 201, obj)
                return self._send_json(h, 201, store.create(obj, keep_status=False))
            if method == "DELETE":
                self._tick("deletecollection", rt.kind)
                _, raws, _ = store.list_raw(rt.api_version, rt.kind, namespace, query.get("labelSelector"),
                                            query.get("fieldSelector"))
                deleted = []
                for raw in raws:
                    o = json.loads(raw)
                    d = store.delete(rt.api_version, rt.kind, o["metadata"].get("namespace"), o["metadata"]["name"])
                    if d is not None:
                        deleted.append(d)
                return self._send_json(h, 200, {"kind": rt.list_kind, "apiVersion": rt.api_version,
                                                "metadata": {"resourceVersion": str(store.resource_version)},
                                                "items": deleted})
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on the {rt.plural} collection")
        subresource = "status" if sub == "status" else "main"
        if method == "GET":
            self._tick("get", rt.kind)
            found = store.get(rt.api_version, rt.kind, namespace, name)
            if found is None:
                raise _not_found(rt, name)
            if want_table:
                return self._send_json(h, 200, _table(rt, [found], {"resourceVersion": found["metadata"]["resourceVersion"]}))
            return self._send_json(h, 200, found)
        if method == "PUT":
            self._tick("update", rt.kind)
            obj = self._body_object(body, rt)
            meta = obj.setdefault("metadata", {})
            if meta.get("name") and meta["name"] != name:
                raise ApiError(400, "BadRequest", f"the name of the object ({meta['name']}) does not match the name "
                               f"on the URL ({name})")
            meta["name"] = name
            if rt.namespaced:
                meta["namespace"] = namespace
            if not meta.get("resourceVersion"):
                if not rt.builtin:
                    # Custom resources refuse an update without resourceVersion: their strategy's
                    # AllowUnconditionalUpdate is false (apiextensions-apiserver customresource strategy),
                    # and the registry store answers with this Invalid error (genericregistry Store.Update).
                    err = ApiError(422, "Invalid", f'{rt.plural}{"." + rt.group if rt.group else ""} "{name}" is invalid: '
                                   "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                                   kind=rt.plural, name=name, group=rt.group)
                    err.details["causes"] = [{"reason": "FieldValueInvalid", "field": "metadata.resourceVersion",
                                              "message": "Invalid value: 0x0: must be specified for an update"}]
                    raise err
                # Built-in kinds allow an unconditional update; keep the current version so it passes.
                meta.pop("resourceVersion", None)
            if query.get("dryRun"):
                return self._send_json(h, 200, store.replace(obj, check_version=True, subresource=subresource,
                                                             dry_run=True))
            return self._send_json(h, 200, store.replace(obj, check_version=True, subresource=subresource))
        if method == "PATCH":
            self._tick("patch", rt.kind)
            ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip()
            patch_type = {"application/merge-patch+json": "merge", "application/json-patch+json": "json",
                          "application/strategic-merge-patch+json": "strategic"}.get(ctype)
            if patch_type is None:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                               f"({ctype!r}) - accepted media types include: application/json-patch+json, "
                               f"application/merge-patch+json, application/strategic-merge-patch+json")
            try:
                patch = json.loads(body or b"null")
            except ValueError as e:
                raise ApiError(400, "BadRequest", f"the patch body is not JSON: {e}") from None
            # A dry run answers the object as the patch would leave it, and stores nothing.
            return self._send_json(h, 200, store.patch(rt.api_version, rt.kind, namespace, name, patch,
                                                       patch_type, subresource=subresource,
                                                       dry_run=bool(query.get("dryRun"))))
        if method == "DELETE":
            self._tick("delete", rt.kind)
            gone_obj = store.delete(rt.api_version, rt.kind, namespace, name)
            if gone_obj is None:
                raise _not_found(rt, name)
            if rt.delete_returns_object or gone_obj["metadata"].get("deletionTimestamp"):
                return self._send_json(h, 200, gone_obj)
            details = {"name": name, "kind": rt.plural, "uid": gone_obj["metadata"].get("uid")}
            if rt.group:
                details["group"] = rt.group
            return self._send_json(h, 200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                            "status": "Success", "details": details})
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on {rt.plural}/{name}")

    @staticmethod
    def _body_object(body: bytes, rt: ResourceType) -> dict[str, Any]:
        try:
            obj = json.loads(body or b"null")
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"the request body is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", f"the request body must be a {rt.kind} object")
        if obj.get("kind", rt.kind) != rt.kind or obj.get("apiVersion", rt.api_version) != rt.api_version:
            raise ApiError(400, "BadRequest", f"the body is a {obj.get('apiVersion')}/{obj.get('kind')}, "
                           f"expected {rt.api_version}/{rt.kind}")
        obj["kind"], obj["apiVersion"] = rt.kind, rt.api_version
        return obj

    def _list(self, h: _Handler, rt: ResourceType, namespace: str | None, query: dict[str, str],
              want_table: bool) -> None:
        _, raws, rv = self.store.list_raw(rt.api_version, rt.kind, namespace, query.get("labelSelector"),
                                          query.get("fieldSelector"))
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        limit = int(query.get("limit") or 0)
        start = 0
        if query.get("continue"):
            try:
                start = int(json.loads(base64.urlsafe_b64decode(query["continue"].encode()))["start"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(400, "BadRequest", "the continue token is not one this server issued") from None
        if limit > 0 and start + limit < len(raws):
            meta["continue"] = base64.urlsafe_b64encode(_dumps({"start": start + limit, "rv": rv})).decode()
            meta["remainingItemCount"] = len(raws) - start - limit
            raws = raws[start:start + limit]
        elif start:
            raws = raws[start:]
        if want_table:
            return self._send_json(h, 200, _table(rt, [json.loads(r) for r in raws], meta))
        head = _dumps({"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta})[:-1]
        data = head + b',"items":[' + b",".join(raws) + b"]}"
        return self._send_json(h, 200, None, raw=data)

    # -- watch ------------------------------------------------------------------------------

    def _watch(self, h: _Handler, rt: ResourceType, namespace: str | None, query: dict[str, str],
               want_table: bool = False) -> None:
        store = self.store
        match = store._matcher(query.get("labelSelector"), query.get("fieldSelector"))
        timeout = float(query.get("timeoutSeconds") or 0) or 1800.0
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        rv_param = query.get("resourceVersion") or ""

        def in_scope(obj: dict[str, Any]) -> bool:
            return not (rt.namespaced and namespace) or obj["metadata"].get("namespace") == namespace

        def line(etype: str, raw: bytes, obj: dict[str, Any] | None = None) -> bytes:
            if want_table and etype in ("ADDED", "MODIFIED", "DELETED"):
                raw = _dumps(_table(rt, [obj if obj is not None else json.loads(raw)], {}))
            return b'{"type":"' + etype.encode() + b'","object":' + raw + b"}\n"

        def send(lines: list[bytes]) -> None:
            if not lines:
                return
            data = b"".join(lines)
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        initial: list[bytes] = []
        gone: ApiError | None = None
        with store.changed:
            if rv_param in ("", "0"):
                _, raws, last = store.list_raw(rt.api_version, rt.kind, namespace, query.get("labelSelector"),
                                               query.get("fieldSelector"))
                initial = [line("ADDED", r) for r in raws]
            else:
                try:
                    last = int(rv_param)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"resourceVersion {rv_param!r} is not a number") from None
                try:
                    store.events_since(last)
                except ApiError as e:
                    gone = e
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Cache-Control", "no-cache, private")
        h.end_headers()
        h.wfile.flush()
        try:
            send(initial)
            if gone is not None:
                send([b'{"type":"ERROR","object":' + _dumps(gone.status()) + b"}\n"])
                return self._end_chunks(h)
            last_sent = started = time.monotonic()
            every = self.bookmark_interval_s
            while True:
                lines: list[bytes] = []
                with store.changed:
                    while True:
                        if self._stopping.is_set() or not self.available:
                            raise _Stopping
                        if self.blackholed:
                            raise _Blackholed
                        if _peer_closed(h.connection):
                            raise ConnectionResetError  # the client went away while nothing happened
                        now = time.monotonic()
                        if now >= deadline:
                            break
                        if self.watch_504_after_s is not None and now - started >= self.watch_504_after_s:
                            gone = _watch_timeout(last, store.resource_version)
                            break
                        try:
                            events = store.events_since(last)
                        except ApiError as e:
                            gone = e
                            break
                        if events:
                            break
                        if bookmarks and now - last_sent >= every:
                            break
                        store.changed.wait(timeout=min(deadline - now, 0.5))
                    if gone is None and time.monotonic() < deadline:
                        for ev in events:
                            last = ev.rv
                            if ev.rt is not rt or not in_scope(ev.obj):
                                continue
                            now_match = ev.type != "DELETED" and match(ev.obj)
                            was_match = ev.old is not None and match(ev.old)
                            if ev.type == "DELETED":
                                etype = "DELETED" if was_match else None
                            elif now_match:
                                etype = "MODIFIED" if was_match else "ADDED"
                            else:
                                etype = "DELETED" if was_match else None
                            if etype:
                                lines.append(line(etype, ev.raw, ev.obj))
                        if not lines and bookmarks and time.monotonic() - last_sent >= every:
                            lines.append(b'{"type":"BOOKMARK","object":' + _dumps(
                                {"kind": rt.kind, "apiVersion": rt.api_version,
                                 "metadata": {"resourceVersion": str(store.resource_version)}}) + b"}\n")
                if gone is not None:
                    send([b'{"type":"ERROR","object":' + _dumps(gone.status()) + b"}\n"])
                    break
                if time.monotonic() >= deadline:
                    break
                if lines:
                    send(lines)
                    last_sent = time.monotonic()
            self._end_chunks(h)
        except _Stopping:
            # A control plane going away drops the connection, it does not finish the stream.
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except _Blackholed:
            self._hold_silently(h)  # an open stream falls silent, then is reset, as new requests are
        except (BrokenPipeError, ConnectionResetError, OSError):
            h.close_connection = True

    @staticmethod
    def _end_chunks(h: _Handler) -> None:
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    # -- discovery --------------------------------------------------------------------------

    def _version(self) -> dict[str, Any]:
        v = self.store.server_version
        m = re.match(r"^v?(\d+)\.(\d+)", v)
        major, minor = (m.group(1), m.group(2)) if m else ("1", "32")
        return {"major": major, "minor": minor, "emulationMajor": major, "emulationMinor": minor,
                "minCompatibilityMajor": major, "minCompatibilityMinor": str(max(int(minor) - 1, 0)),
                "gitVersion": v if v.startswith("v") else f"v{v}",
                "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                "buildDate": "2024-12-11T18:04:20Z", "goVersion": "go1.23.4", "compiler": "gc",
                "platform": "linux/amd64"}

    def _group_list(self) -> dict[str, Any]:
        groups: dict[str, list[str]] = {}
        for rt in self.store.kinds():
            if rt.group:
                versions = groups.setdefault(rt.group, [])
                if rt.version not in versions:
                    versions.append(rt.version)
        out = []
        for name, versions in groups.items():
            vs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
            out.append({"name": name, "versions": vs, "preferredVersion": vs[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": out}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources = []
        for rt in self.store.kinds():
            if rt.group != group or rt.version != version:
                continue
            entry: dict[str, Any] = {
                "name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced, "kind": rt.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            }
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            resources.append(entry)
            if rt.status_subresource:
                resources.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                                  "kind": rt.kind, "verbs": ["get", "patch", "update"]})
        if not resources:
            gv = f"{group}/{version}" if group else version
            raise ApiError(404, "NotFound", f"the server could not find the requested resource (groupVersion {gv})")
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}
