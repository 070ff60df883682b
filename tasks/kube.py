"""Kubernetes, the external system: Nodes and custom objects (the Flux kinds), read, patched and watched.

Built on the official client's ApiClient (configuration, TLS, tokens) with JSON in and out as plain
dicts: one code path for lists, gets and watch events, and no dependence on typed models that
reject a partial object. Errors map to a small vocabulary whose ``retryable`` says whether running
again can help: KubeUnavailable (connection refused, 429/5xx, a dropped stream) or KubeError
(404, 409, 403, a bad request). Waits are watches bounded by a monotonic deadline: every request
gets the remaining time as its timeout, a dropped watch resumes from the last resourceVersion, and
a 410 (resourceVersion too old) starts again from a fresh list. Importable without Prefect.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.watch.watch import iter_resp_lines

from homelab.gates import NodeView, talos_version_of_os_image

CONNECT_TIMEOUT_S = 5.0
DEFAULT_TIMEOUT_S = 30.0
# Backoff while the API server is away (a single control plane rebooting); bounded by the deadline.
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.1, 2.0


class KubeError(Exception):
    """A Kubernetes API call failed; ``retryable`` says whether running again can help."""

    retryable = False

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


class KubeUnavailable(KubeError):
    """The API server did not answer or answered 429/5xx: a retry can help."""

    retryable = True


class KubeNotFound(KubeError):
    pass


class KubeConflict(KubeError):
    pass


class KubeStreamBroken(KubeUnavailable):
    """An established watch stream ended abnormally; resuming from the last resourceVersion is safe."""


class KubeGone(KubeError):
    """410: the resourceVersion a watch resumed from is too old; list again."""


class KubeTimeout(KubeError):
    """A wait reached its deadline; the message names the object, the wait, the last state and the next step."""

    def __init__(self, message: str, last: Any = None):
        self.last = last
        super().__init__(message)


# --- plain-dict views -------------------------------------------------------------------------


def condition(obj: Mapping[str, Any], ctype: str) -> dict[str, Any] | None:
    """A copy of the status condition of that type; None when there is none."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == ctype:
            return dict(c)
    return None


def node_view(obj: Mapping[str, Any]) -> NodeView:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    info = status.get("nodeInfo") or {}
    ready = condition(obj, "Ready") or {}
    os_image = info.get("osImage") or ""
    return NodeView(
        name=meta.get("name", ""),
        ready=ready.get("status") == "True",
        unschedulable=bool(spec.get("unschedulable")),
        os_image=os_image,
        talos_version=talos_version_of_os_image(os_image),
        kubelet_version=info.get("kubeletVersion") or "",
        resource_version=str(meta.get("resourceVersion") or ""),
        ready_reason="" if ready.get("status") == "True" else str(ready.get("reason") or "no Ready condition"),
    )


def ready_and_schedulable(node: NodeView) -> bool:
    """Ready and not cordoned."""
    return node.ready and not node.unschedulable


def at_talos_version(tag: str) -> Callable[[NodeView], bool]:
    def check(node: NodeView) -> bool:
        return node.talos_version == tag

    check.__doc__ = f"osImage Talos ({tag})"
    return check


def _path(group: str, version: str, plural: str, namespace: str | None, name: str | None = None,
          subresource: str | None = None) -> str:
    base = f"/api/{version}" if group in ("", "core") else f"/apis/{group}/{version}"
    if namespace:
        base += f"/namespaces/{quote(namespace, safe='')}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name, safe='')}"
    if subresource:
        base += f"/{subresource}"
    return base


def _status_message(body: bytes) -> str:
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return body[:200].decode(errors="replace").strip()
    return str(doc.get("message") or doc.get("reason") or "") if isinstance(doc, dict) else ""


def _error_for(status: int, what: str, message: str) -> KubeError:
    text = f"{what}: HTTP {status}" + (f": {message}" if message else "")
    if status == 404:
        return KubeNotFound(text, status)
    if status == 409:
        return KubeConflict(text, status)
    if status == 410:
        return KubeGone(text, status)
    if status in (401, 403):
        return KubeError(text + " (check the kubeconfig's credentials or the ServiceAccount's RBAC)", status)
    if status == 429 or status >= 500:
        return KubeUnavailable(text, status)
    return KubeError(text, status)


class Kube:
    """One Kubernetes API server, through an ApiClient of the official client."""

    def __init__(self, api: k8s_client.ApiClient):
        # The deadline of each call is ours to keep: urllib3's own retries would multiply it.
        api.configuration.retries = False
        api.rest_client = k8s_client.rest.RESTClientObject(api.configuration)
        self.api = api

    @classmethod
    def from_kubeconfig(cls, path: Path | str, context: str | None = None) -> Kube:
        try:
            api = k8s_config.new_client_from_config(config_file=str(path), context=context, persist_config=False)
        except (k8s_config.ConfigException, OSError, ValueError) as e:
            raise KubeError(f"kubeconfig {path}: cannot load context {context or '(current)'}: {e}") from None
        return cls(api)

    @classmethod
    def in_cluster(cls) -> Kube:
        cfg = k8s_client.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
        except k8s_config.ConfigException as e:
            raise KubeError(f"not running in a pod with a ServiceAccount: {e}") from None
        return cls(k8s_client.ApiClient(cfg))

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP --

    def _send(self, method: str, path: str, query: list[tuple[str, Any]] | None = None, body: Any = None,
              content_type: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        what = f"{method} {path}"
        if timeout_s <= 0:
            raise KubeTimeout(f"{what}: not sent, the deadline has passed")
        req = self.api.param_serialize(method, path, query_params=query or [], header_params=headers, body=body,
                                       auth_settings=["BearerToken"])
        try:
            resp = self.api.call_api(*req, _request_timeout=(min(CONNECT_TIMEOUT_S, timeout_s), timeout_s))
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubeUnavailable(f"{what}: no answer from the API server ({type(e).__name__})") from None
        except k8s_client.ApiException as e:
            raise KubeError(f"{what}: {e.reason}", e.status) from None
        return resp.response, what

    def _json(self, method: str, path: str, query: list[tuple[str, Any]] | None = None, body: Any = None,
              content_type: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        raw, what = self._send(method, path, query, body, content_type, timeout_s)
        try:
            data = raw.data
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubeUnavailable(f"{what}: the reply broke off ({type(e).__name__})") from None
        finally:
            raw.release_conn()
        if not 200 <= raw.status <= 299:
            raise _error_for(raw.status, what, _status_message(data))
        try:
            return json.loads(data)
        except ValueError:
            raise KubeError(f"{what}: the reply is not JSON") from None

    # -- generic objects (core group is "") --

    def get_object(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        return self._json("GET", _path(group, version, plural, namespace, name), timeout_s=timeout_s)

    def list_objects(self, group: str, version: str, plural: str, namespace: str | None = None,
                     label_selector: str | None = None, field_selector: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[dict[str, Any]], str]:
        """(items, the list's resourceVersion): watch from that version to see every later change."""
        query: list[tuple[str, Any]] = []
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        doc = self._json("GET", _path(group, version, plural, namespace), query, timeout_s=timeout_s)
        return list(doc.get("items") or []), str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def merge_patch(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                    patch: Mapping[str, Any], subresource: str | None = None,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        return self._json("PATCH", _path(group, version, plural, namespace, name, subresource), body=dict(patch),
                          content_type="application/merge-patch+json", timeout_s=timeout_s)

    def watch_objects(self, group: str, version: str, plural: str, namespace: str | None = None,
                      resource_version: str | None = None, timeout_s: float = 60,
                      label_selector: str | None = None, field_selector: str | None = None,
                      ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) events from ``resource_version`` on, until the server ends the watch
        (``timeout_s``). Raises KubeGone on 410 and KubeUnavailable when the stream breaks."""
        query: list[tuple[str, Any]] = [("watch", "true"), ("allowWatchBookmarks", "true"),
                                        ("timeoutSeconds", max(1, math.ceil(timeout_s)))]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        # The read timeout is a little longer than the server's own end of the watch.
        raw, what = self._send("GET", _path(group, version, plural, namespace), query, timeout_s=timeout_s + 2)
        try:
            if not 200 <= raw.status <= 299:
                raise _error_for(raw.status, what, _status_message(raw.data))
            for line in iter_resp_lines(raw):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise KubeUnavailable(f"{what}: a watch event is not JSON") from None
                etype, obj = event.get("type"), event.get("object") or {}
                if etype == "ERROR":
                    raise _error_for(int(obj.get("code") or 500), what, str(obj.get("message") or ""))
                yield etype, obj
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubeStreamBroken(f"{what}: the watch broke off ({type(e).__name__})") from None
        finally:
            raw.release_conn()
            raw.close()

    def wait_object(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                    predicate: Callable[[dict[str, Any]], bool], deadline: float, what: str,
                    describe: Callable[[dict[str, Any] | None], str] = lambda o: "absent" if o is None else "present",
                    next_step: str = "look at the object and run again",
                    tolerate_unavailable: bool = False) -> dict[str, Any]:
        """Watch one object until ``predicate`` holds; the object when it does, KubeTimeout at the deadline.

        Every request is bounded by the time left. A dropped stream resumes from the last
        resourceVersion; a 410 starts again from a fresh list. With ``tolerate_unavailable`` an API
        server that refuses connections or answers 5xx is waited for (a single control plane rebooting).
        """
        kind = f"{plural}/{name}" + (f" in {namespace}" if namespace else "")
        selector = f"metadata.name={name}"
        last: dict[str, Any] | None = None
        seen = False
        rv: str | None = None
        backoff, failures = _BACKOFF_MIN_S, 0
        unavailable: str | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                state = describe(last) if seen else "never read"
                if unavailable:
                    state += f"; the API server was unreachable at the end ({unavailable})"
                raise KubeTimeout(f"{kind}: waited for {what} until the deadline; last seen: {state}; "
                                  f"next step: {next_step}", last)
            try:
                if rv is None:
                    items, rv = self.list_objects(group, version, plural, namespace, field_selector=selector,
                                                  timeout_s=left)
                    last, seen = (items[0] if items else None), True
                    unavailable, backoff, failures = None, _BACKOFF_MIN_S, 0
                    if last is not None and predicate(last):
                        return last
                for etype, obj in self.watch_objects(group, version, plural, namespace, rv,
                                                     timeout_s=max(0.001, deadline - time.monotonic()),
                                                     field_selector=selector):
                    unavailable, backoff, failures = None, _BACKOFF_MIN_S, 0
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if etype == "BOOKMARK":
                        continue
                    last = None if etype == "DELETED" else obj
                    if last is not None and predicate(last):
                        return last
                    if time.monotonic() >= deadline:
                        break
            except KubeGone:
                rv = None
            except KubeUnavailable as e:
                # A broken stream resumes from rv; an absent server is only waited for when asked.
                if not tolerate_unavailable and not isinstance(e, KubeStreamBroken):
                    raise
                unavailable = str(e)
                failures += 1
                if failures > 1:
                    time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
            except KubeTimeout:
                continue

    # -- Nodes --

    def nodes(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[NodeView]:
        items, _ = self.list_objects("", "v1", "nodes", timeout_s=timeout_s)
        return [node_view(o) for o in items]

    def node(self, name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> NodeView:
        return node_view(self.get_object("", "v1", "nodes", None, name, timeout_s=timeout_s))

    def uncordon(self, name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> NodeView:
        """Mark the Node schedulable and confirm it by reading it back."""
        self.merge_patch("", "v1", "nodes", None, name, {"spec": {"unschedulable": False}}, timeout_s=timeout_s)
        view = self.node(name, timeout_s=timeout_s)
        if view.unschedulable:
            raise KubeError(f"Node {name}: still cordoned after the uncordon patch (spec.unschedulable is true); "
                            f"something re-cordons it (a drain in progress?): kubectl uncordon {name}")
        return view

    def wait_node(self, name: str, predicate: Callable[[NodeView], bool], deadline: float,
                  tolerate_unavailable: bool = False, what: str | None = None,
                  next_step: str | None = None) -> NodeView:
        """Watch Node ``name`` until ``predicate(NodeView)`` holds; the last NodeView, or KubeTimeout."""
        if what is None:
            what = str(predicate.__doc__ or getattr(predicate, "__name__", "the condition")).strip().rstrip(".")
        obj = self.wait_object(
            "", "v1", "nodes", None, name, lambda o: predicate(node_view(o)), deadline, what,
            describe=lambda o: "no Node object" if o is None else node_view(o).describe(),
            next_step=next_step or (f"check the node (kubectl describe node {name}; talosctl dmesg) "
                                    f"and run the flow again"),
            tolerate_unavailable=tolerate_unavailable)
        return node_view(obj)
