"""Kubernetes, the external system: Nodes and custom objects (the Flux kinds), read, patched and watched.

Built on the official client's ApiClient (configuration, TLS, tokens, TCP keepalive) with JSON in and out
as plain dicts: one code path for lists, gets and watch events, and no dependence on typed models that
reject a partial object. Errors map to a small vocabulary whose ``retryable`` says whether running again
can help: KubeUnavailable (connection refused or reset, a read that timed out, 429/5xx, a dropped stream)
or KubeError (404, 409, 403, a bad request).

Connections die without closing on real networks (a power-cycled node, an address that moved), so no
single request may hold a step: each attempt has a read timeout of its own (REQUEST_TIMEOUT_S), each watch
asks the server to end it after WATCH_TIMEOUT_S and reads with a little more than that, and TCP
keepalive is on. Every call retries what can pass (429 after its Retry-After, 5xx, resets, timeouts)
with tenacity until the deadline it was given, never past it. Waits are watches bounded by a monotonic
deadline: a dropped watch resumes from the last resourceVersion, and a 410 (too old) or 504 (the watch
cache timed out) lists again. Importable without Prefect.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import tenacity
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import utils as k8s_utils
from kubernetes.watch.watch import iter_resp_lines

from homelab.gates import NodeView, talos_version_of_os_image

# Timings of the wire. Module attributes, so a test can make them short.
CONNECT_TIMEOUT_S = 5.0
# One attempt of a plain request: a connection that went silent is given up after this and retried.
REQUEST_TIMEOUT_S = 15.0
# timeoutSeconds of each watch (client-go's reflectors ask for 5-10 minutes; a minute bounds how long
# a silently dead stream can hide), and how much longer than that a watch read may stay silent.
WATCH_TIMEOUT_S = 60.0
WATCH_READ_SLACK_S = 5.0
DEFAULT_TIMEOUT_S = 30.0
# Backoff between attempts when the server gives no Retry-After; bounded by the deadline.
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.1, 2.0
# An attempt that could not even start before the deadline is not made.
_MIN_ATTEMPT_S = 0.05
# The annotation Talos puts on a Node it cordons for an upgrade (pkg/machinery/constants AnnotationCordonedKey).
TALOS_CORDONED = "talos.dev/cordoned"


class KubeError(Exception):
    """A Kubernetes API call failed; ``retryable`` says whether running again can help."""

    retryable = False

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class KubeUnavailable(KubeError):
    """The API server did not answer, timed out, or answered 429/5xx: a retry can help."""

    retryable = True


class KubeNotFound(KubeError):
    pass


class KubeConflict(KubeError):
    pass


class KubeStreamBroken(KubeUnavailable):
    """An established watch stream ended abnormally; resuming from the last resourceVersion is safe."""


class KubeGone(KubeError):
    """The watch cannot go on from its resourceVersion (410 Expired, or the watch cache's 504 Timeout):
    list again."""


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
        boot_id=str(info.get("bootID") or ""),
        talos_cordoned=TALOS_CORDONED in (meta.get("annotations") or {}),
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


def _error_for(status: int, what: str, message: str, retry_after: float | None = None) -> KubeError:
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
        return KubeUnavailable(text, status, retry_after)
    return KubeError(text, status)


def _retry_after(headers: Any) -> float | None:
    """Retry-After in seconds, read as client-go reads it (integer seconds; anything else is ignored)."""
    carrier = k8s_client.ApiException(status=429)
    carrier.headers = dict(headers or {})
    return k8s_utils.retry_after_seconds(carrier)


def backoff_s(attempt: int, error: BaseException | None = None) -> float:
    """How long to wait before the next attempt: the server's Retry-After when it sent one, else a
    jittered exponential backoff (0.1 s doubling to 2 s)."""
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        return float(retry_after)
    base = min(_BACKOFF_MAX_S, _BACKOFF_MIN_S * 2 ** max(0, attempt - 1))
    return base * (0.5 + random.random() / 2)


def _retrying(deadline: float) -> tenacity.Retrying:
    """Retry what can pass (KubeError.retryable) until the monotonic ``deadline``; never sleep past it."""

    def wait(rs: tenacity.RetryCallState) -> float:
        error = rs.outcome.exception() if rs.outcome is not None else None
        return max(0.0, min(backoff_s(rs.attempt_number, error), deadline - time.monotonic()))

    def stop(rs: tenacity.RetryCallState) -> bool:
        return time.monotonic() + (rs.upcoming_sleep or 0.0) >= deadline - _MIN_ATTEMPT_S

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, KubeError) and e.retryable),
        wait=wait, stop=stop, sleep=time.sleep, reraise=True)


class Kube:
    """One Kubernetes API server, through an ApiClient of the official client."""

    def __init__(self, api: k8s_client.ApiClient):
        # The deadline of each call is ours to keep: urllib3's own retries would multiply it.
        api.configuration.retries = False
        # TCP keepalive with client-go's timings, so the kernel notices a peer that vanished.
        api.configuration.keep_alive = True
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
              content_type: str | None = None, read_timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        """One attempt: the raw response (unread) and a label of the request."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        what = f"{method} {path}"
        if read_timeout_s <= 0:
            raise KubeTimeout(f"{what}: not sent, the deadline has passed")
        req = self.api.param_serialize(method, path, query_params=query or [], header_params=headers, body=body,
                                       auth_settings=["BearerToken"])
        try:
            resp = self.api.call_api(*req, _request_timeout=(min(CONNECT_TIMEOUT_S, read_timeout_s), read_timeout_s))
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubeUnavailable(f"{what}: no answer from the API server ({type(e).__name__})") from None
        except k8s_client.ApiException as e:
            raise KubeError(f"{what}: {e.reason}", e.status) from None
        return resp.response, what

    def _json_once(self, method: str, path: str, query: list[tuple[str, Any]] | None, body: Any,
                   content_type: str | None, deadline: float) -> dict[str, Any]:
        left = deadline - time.monotonic()
        raw, what = self._send(method, path, query, body, content_type, min(REQUEST_TIMEOUT_S, left))
        try:
            data = raw.data
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubeUnavailable(f"{what}: the reply broke off ({type(e).__name__})") from None
        finally:
            raw.release_conn()
        if not 200 <= raw.status <= 299:
            raise _error_for(raw.status, what, _status_message(data), _retry_after(raw.headers))
        try:
            return dict(json.loads(data))
        except ValueError:
            raise KubeError(f"{what}: the reply is not JSON") from None

    def _json(self, method: str, path: str, query: list[tuple[str, Any]] | None = None, body: Any = None,
              content_type: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
              deadline: float | None = None) -> dict[str, Any]:
        """The request, retried while it can pass, until ``deadline`` (default: ``timeout_s`` from now)."""
        if deadline is None:
            deadline = time.monotonic() + timeout_s
        result: dict[str, Any] = _retrying(deadline)(self._json_once, method, path, query, body, content_type,
                                                     deadline)
        return result

    # -- generic objects (core group is "") --

    def get_object(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                   timeout_s: float = DEFAULT_TIMEOUT_S, deadline: float | None = None) -> dict[str, Any]:
        return self._json("GET", _path(group, version, plural, namespace, name), timeout_s=timeout_s,
                          deadline=deadline)

    def list_objects(self, group: str, version: str, plural: str, namespace: str | None = None,
                     label_selector: str | None = None, field_selector: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S, deadline: float | None = None,
                     ) -> tuple[list[dict[str, Any]], str]:
        """(items, the list's resourceVersion): watch from that version to see every later change."""
        query: list[tuple[str, Any]] = []
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        doc = self._json("GET", _path(group, version, plural, namespace), query, timeout_s=timeout_s,
                         deadline=deadline)
        return list(doc.get("items") or []), str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def merge_patch(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                    patch: Mapping[str, Any], subresource: str | None = None,
                    timeout_s: float = DEFAULT_TIMEOUT_S, deadline: float | None = None) -> dict[str, Any]:
        # A merge patch sets the same values however often it lands: retrying one that may have
        # been applied before its answer was lost is safe.
        return self._json("PATCH", _path(group, version, plural, namespace, name, subresource), body=dict(patch),
                          content_type="application/merge-patch+json", timeout_s=timeout_s, deadline=deadline)

    def watch_objects(self, group: str, version: str, plural: str, namespace: str | None = None,
                      resource_version: str | None = None, timeout_s: float = WATCH_TIMEOUT_S,
                      label_selector: str | None = None, field_selector: str | None = None,
                      deadline: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) events from ``resource_version`` on, until the server ends the watch
        (``timeout_s``). Raises KubeGone when it must list again (410, or a 504 error event) and
        KubeUnavailable when the stream breaks or stays silent longer than the server's own end of it."""
        query: list[tuple[str, Any]] = [("watch", "true"), ("allowWatchBookmarks", "true"),
                                        ("timeoutSeconds", max(1, math.ceil(timeout_s)))]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        # The read timeout is a little longer than the server's own end of the watch (and a bookmark
        # arrives within a minute), so only a stream that went silently dead times out, and never past
        # the caller's deadline.
        read_timeout = max(1, math.ceil(timeout_s)) + WATCH_READ_SLACK_S
        if deadline is not None:
            read_timeout = min(read_timeout, deadline - time.monotonic())
        raw, what = self._send("GET", _path(group, version, plural, namespace), query, read_timeout_s=read_timeout)
        try:
            if not 200 <= raw.status <= 299:
                raise _error_for(raw.status, what, _status_message(raw.data), _retry_after(raw.headers))
            for line in iter_resp_lines(raw):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise KubeStreamBroken(f"{what}: a watch event is not JSON") from None
                etype, obj = event.get("type"), event.get("object") or {}
                if etype == "ERROR":
                    code = int(obj.get("code") or 500)
                    message = str(obj.get("message") or "")
                    if code in (410, 504):
                        # 410 Expired, or the watch cache's 504 Timeout (NewTooLargeResourceVersionError):
                        # this watch cannot go on; a fresh list can.
                        raise KubeGone(f"{what}: HTTP {code}: {message}", code)
                    raise _error_for(code, what, message)
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
                    tolerate_unavailable: bool = True,
                    stop: Callable[[dict[str, Any] | None], bool] | None = None) -> dict[str, Any]:
        """Watch one object until ``predicate`` holds; the object when it does, KubeTimeout at the deadline.

        An API server that refuses, times out or answers 429/5xx is waited for until the deadline (a single
        control plane rebooting, a throttled client); a dropped stream resumes from the last resourceVersion;
        a 410 or a watch's 504 starts again from a fresh list. ``stop(obj)`` returning True ends the wait
        early with that object (the caller decides what it means). ``tolerate_unavailable`` is kept for
        callers that still pass it: every wait tolerates an unavailable server until its deadline.
        """
        kind = f"{plural}/{name}" + (f" in {namespace}" if namespace else "")
        selector = f"metadata.name={name}"
        last: dict[str, Any] | None = None
        seen = False
        rv: str | None = None
        failures = 0
        unavailable: str | None = None

        def done(obj: dict[str, Any] | None) -> bool:
            return obj is not None and (predicate(obj) or (stop is not None and stop(obj)))

        while True:
            left = deadline - time.monotonic()
            if left <= _MIN_ATTEMPT_S:
                state = describe(last) if seen else "never read"
                if unavailable:
                    state += f"; the API server was unreachable at the end ({unavailable})"
                raise KubeTimeout(f"{kind}: waited for {what} until the deadline; last seen: {state}; "
                                  f"next step: {next_step}", last)
            try:
                if rv is None:
                    items, rv = self.list_objects(group, version, plural, namespace, field_selector=selector,
                                                  deadline=deadline)
                    last, seen = (items[0] if items else None), True
                    unavailable, failures = None, 0
                    if done(last):
                        return last  # type: ignore[return-value]
                for etype, obj in self.watch_objects(group, version, plural, namespace, rv,
                                                     timeout_s=min(WATCH_TIMEOUT_S, max(1.0, left)),
                                                     field_selector=selector, deadline=deadline):
                    unavailable, failures = None, 0
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if etype == "BOOKMARK":
                        continue
                    last = None if etype == "DELETED" else obj
                    if done(last):
                        return last  # type: ignore[return-value]
                    if time.monotonic() >= deadline:
                        break
            except KubeGone:
                rv = None
            except KubeUnavailable as e:
                # A broken stream resumes from rv at once; an unanswered or refused request backs off first.
                unavailable = str(e)
                failures += 1
                if failures > 1 or not isinstance(e, KubeStreamBroken):
                    time.sleep(max(0.0, min(backoff_s(failures, e), deadline - time.monotonic())))
            except KubeTimeout:
                continue

    # -- Nodes --

    def nodes(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[NodeView]:
        items, _ = self.list_objects("", "v1", "nodes", timeout_s=timeout_s)
        return [node_view(o) for o in items]

    def node(self, name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> NodeView:
        return node_view(self.get_object("", "v1", "nodes", None, name, timeout_s=timeout_s))

    def uncordon(self, name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> NodeView:
        """Mark the Node schedulable and confirm it by reading it back (both within ``timeout_s``).

        Talos's `talos.dev/cordoned` goes with the cordon: Talos lifts only a cordon so marked, so a mark left
        behind would make it lift a cordon someone sets later (talos v1.11.5
        internal/app/machined/pkg/controllers/k8s/node_apply.go ApplyCordoned)."""
        deadline = time.monotonic() + timeout_s
        patch = {"spec": {"unschedulable": False}, "metadata": {"annotations": {TALOS_CORDONED: None}}}
        self.merge_patch("", "v1", "nodes", None, name, patch, deadline=deadline)
        view = node_view(self.get_object("", "v1", "nodes", None, name, deadline=deadline))
        if view.unschedulable:
            raise KubeError(f"Node {name}: still cordoned after the uncordon patch (spec.unschedulable is true); "
                            f"something re-cordons it (a drain in progress?): kubectl uncordon {name}")
        return view

    def wait_node(self, name: str, predicate: Callable[[NodeView], bool], deadline: float,
                  tolerate_unavailable: bool = True, what: str | None = None,
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
