"""Proxmox VE through proxmoxer, in the domain's words: list the VMs, clone, configure, grow, start, await.

Every mutating call returns the task's UPID; `wait_task` awaits it under a monotonic deadline and checks
its exit status (a stopped task is not a successful one; `WARNINGS: N` is one, as PVE::Tools
upid_status_is_error and bpg/terraform-provider-proxmox read it). Record the UPID before waiting: after a crash,
`task_status` re-checks it instead of repeating the call. Errors say whether a retry can help
(`.retryable`); connection trouble is retried here, within the caller's deadline, for reads, and for
writes only when the request never left (so a clone is never sent twice).

Example:
    api = ProxmoxApi.from_block(Homelab.load("default").proxmox)
    upid = api.start_vm("pve", 201)
    api.wait_task("pve", upid, deadline=deadline_in(120))
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import requests
import tenacity
from prefect import task
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException
from urllib3.exceptions import NewConnectionError

from homelab.provision import ObservedVM, PveNode, effective_config

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from blocks import Proxmox as ProxmoxBlock

T = TypeVar("T")
# Task status is polled about once a second, backing off to 5 s for long tasks (a clone of a big disk):
# every poll is a request the PVE node's pveproxy serves.
POLL_SECONDS = 1.0
POLL_MAX_SECONDS = 5.0
POLL_BACKOFF = 1.5
CALL_SECONDS = 30.0
# PVE::UPID::status_is_error: "OK" and "WARNINGS: <n>" are success, anything else an error.
_WARNINGS = re.compile(r"^WARNINGS: \d+$")
# PVE::AbstractConfig::check_lock dies "VM is locked (<lock>)"; a config POST meets it synchronously (500).
_LOCKED = re.compile(r"VM is locked \((\w+)\)")
# Proxmox's own "the node did not answer" codes, from its proxy between nodes.
_PROXY_DOWN = {595, 596}


def deadline_in(seconds: float) -> float:
    return time.monotonic() + seconds


class ProxmoxError(RuntimeError):
    """A Proxmox call that did not do what was asked. `retryable`: whether running it again can help."""

    retryable = False


class ProxmoxUnavailable(ProxmoxError):
    retryable = True


class ProxmoxApiError(ProxmoxError):
    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class ProxmoxTaskFailed(ProxmoxError):
    """The task stopped with an exit status other than OK; the message carries its own last log line."""

    def __init__(self, message: str, upid: str, exitstatus: str, log_line: str) -> None:
        super().__init__(message)
        self.upid = upid
        self.exitstatus = exitstatus
        self.log_line = log_line


class ProxmoxTimeout(ProxmoxError):
    retryable = True

    def __init__(self, message: str, upid: str, last_status: str) -> None:
        super().__init__(message)
        self.upid = upid
        self.last_status = last_status


def _never_sent(e: BaseException) -> bool:
    """True when the request could not have reached Proxmox (so repeating a write cannot do it twice)."""
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(e, requests.exceptions.ConnectionError):
        reason = getattr(e.args[0], "reason", None) if e.args else None
        return isinstance(reason, NewConnectionError) or isinstance(e.args[0] if e.args else None, NewConnectionError)
    return False


def _transient(e: BaseException) -> bool:
    if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    return isinstance(e, ResourceException) and e.status_code in _PROXY_DOWN


class ProxmoxApi:
    """One Proxmox VE API endpoint, authenticated with an API token."""

    def __init__(self, host: str, port: int, user: str, token_name: str, token_value: str,
                 verify_ssl: bool = True, timeout: float = 10.0) -> None:
        self.host, self.port, self.user, self.token_name = host, port, user, token_name
        # proxmoxer's verify_ssl goes to each request, so REQUESTS_CA_BUNDLE does not override it.
        self._api = ProxmoxAPI(host, port=port, user=user, token_name=token_name, token_value=token_value,
                               verify_ssl=verify_ssl, timeout=timeout)
        self.clock: Callable[[], float] = time.monotonic
        self.sleep: Callable[[float], None] = time.sleep
        self.poll_seconds = POLL_SECONDS

    @classmethod
    def from_block(cls, block: ProxmoxBlock) -> ProxmoxApi:
        return cls(block.host, block.port, block.user, block.token_name, block.token_value.get_secret_value(),
                   verify_ssl=block.verify_ssl)

    def __repr__(self) -> str:  # never the token's secret
        return f"ProxmoxApi({self.user}!{self.token_name} at {self.host}:{self.port})"

    # --- the protocol ---------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T], *, write: bool = False, deadline: float | None = None) -> T:
        """fn() with transient failures retried until the deadline; errors named by `what`."""
        end = deadline if deadline is not None else self.clock() + CALL_SECONDS
        retry_if = (lambda e: _never_sent(e)) if write else _transient

        def remaining(_: tenacity.RetryCallState) -> bool:
            return self.clock() >= end

        try:
            for attempt in tenacity.Retrying(
                    retry=tenacity.retry_if_exception(retry_if), stop=remaining,
                    wait=tenacity.wait_exponential(multiplier=0.2, max=2.0), sleep=self.sleep, reraise=True):
                with attempt:
                    return fn()
        except AuthenticationError as e:
            raise ProxmoxApiError(f"{what}: Proxmox at {self.host}:{self.port} refused the API token "
                                  f"{self.user}!{self.token_name} ({e}); check the token in the Proxmox block",
                                  401) from None
        except ResourceException as e:
            status = int(e.status_code)
            hint = {401: "check the API token in the Proxmox block",
                    403: f"grant the token {self.user}!{self.token_name} the privilege named above",
                    }.get(status, "see the message; rerunning re-reads the state and goes on")
            raise ProxmoxApiError(f"{what}: Proxmox answered {status} {e.status_message}: "
                                  f"{str(e.content).strip()}{' - ' + str(e.errors) if e.errors else ''}; {hint}",
                                  status, retryable=status in _PROXY_DOWN) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise ProxmoxUnavailable(f"{what}: Proxmox at {self.host}:{self.port} did not answer "
                                     f"({type(e).__name__}); check the host and port in the Proxmox block "
                                     "and that the API is up, then rerun") from None
        raise AssertionError("unreachable")  # pragma: no cover - Retrying either returns or raises

    # --- reading ----------------------------------------------------------------------------------

    def _listing(self, node: str, deadline: float | None) -> list[dict[str, Any]]:
        listing = self._call(f"list the VMs of node {node}", lambda: self._api.nodes(node).qemu.get(),
                             deadline=deadline)
        return sorted(listing or [], key=lambda i: int(i["vmid"]))

    def list_vm_summaries(self, node: str, *, deadline: float | None = None) -> list[ObservedVM]:
        """Every VM on the node from the VM list alone (one request): cores, memory and boot disk size as
        the list reports them; no MAC, bridge or pending changes. For checks that must not cost a request
        per VM; `list_vms` when the values of the next start matter."""
        return [ObservedVM.from_api(item, None, node) for item in self._listing(node, deadline)]

    def list_vms(self, node: str | None = None, *, deadline: float | None = None) -> list[ObservedVM]:
        """Every VM of the Proxmox cluster (`/cluster/resources?type=vm`: a VM migrated to another node is
        still found), each with its config as its next start will have it (pending applied), read on the node
        it is on. `node` is accepted for older callers and ignored."""
        listing = self._call("list the VMs of the Proxmox cluster",
                             lambda: self._api.cluster.resources.get(type="vm"), deadline=deadline)
        out = []
        for item in sorted((i for i in listing or [] if i.get("type", "qemu") == "qemu"), key=lambda i: int(i["vmid"])):
            vmid, where = int(item["vmid"]), str(item.get("node"))
            pending = self._call(f"read the config of VM {vmid} on node {where}",
                                 partial(self._pending, where, vmid), deadline=deadline)
            cfg, keys = effective_config(pending or [])
            out.append(ObservedVM.from_api(item, cfg, where, keys))
        return out

    def nodes(self, *, deadline: float | None = None) -> list[PveNode]:
        """The cluster's nodes with their memory use (`/cluster/resources?type=node`)."""
        items = self._call("list the Proxmox nodes", lambda: self._api.cluster.resources.get(type="node"),
                           deadline=deadline)
        return sorted((PveNode.from_api(i) for i in items or []), key=lambda n: n.name)

    def storages(self, *, deadline: float | None = None) -> list[dict[str, Any]]:
        """Every storage on every node (`/cluster/resources?type=storage`: node, storage, content, shared)."""
        items = self._call("list the storages", lambda: self._api.cluster.resources.get(type="storage"),
                           deadline=deadline)
        return [dict(i) for i in items or []]

    def privileges(self, path: str, *, deadline: float | None = None) -> set[str]:
        """The token's effective privileges on an ACL path (`GET /access/permissions?path=`)."""
        data = self._call(f"read the API token's privileges on {path}",
                          lambda: self._api.access.permissions.get(path=path), deadline=deadline)
        held: set[str] = set()
        for privs in (data or {}).values():
            held.update(k for k, v in (privs or {}).items() if v not in (0, "0", False))
        return held

    def vm_config(self, node: str, vmid: int, *, deadline: float | None = None) -> dict[str, Any]:
        data: dict[str, Any] = self._call(f"read the config of VM {vmid} on node {node}",
                                          lambda: self._api.nodes(node).qemu(vmid).config.get(), deadline=deadline)
        return data or {}

    def agent_interfaces(self, node: str, vmid: int, *, deadline: float | None = None) -> list[dict[str, Any]]:
        """The guest's NICs as the QEMU guest agent reports them (`agent/network-get-interfaces`); raises
        ProxmoxApiError 500 "QEMU guest agent is not running" until the guest's agent answers."""
        data = self._call(f"ask the guest agent of VM {vmid} on node {node} for its addresses",
                          lambda: self._api.nodes(node).qemu(vmid).agent("network-get-interfaces").get(),
                          deadline=deadline)
        result = (data or {}).get("result") if isinstance(data, dict) else data
        return [dict(i) for i in result or []]

    def _pending(self, node: str, vmid: int) -> Any:
        return self._api.nodes(node).qemu(vmid).pending.get()

    def task_status(self, node: str, upid: str, *, deadline: float | None = None) -> dict[str, Any]:
        data: dict[str, Any] = self._call(f"read task {upid}", lambda: self._api.nodes(node).tasks(upid).status.get(),
                                          deadline=deadline)
        return data

    def task_log(self, node: str, upid: str, *, deadline: float | None = None) -> list[str]:
        # The log is paged (50 lines by default); ask for its tail's worth in one call.
        lines = self._call(f"read the log of task {upid}",
                           lambda: self._api.nodes(node).tasks(upid).log.get(limit=500), deadline=deadline)
        return [str(line.get("t", "")) for line in sorted(lines or [], key=lambda x: int(x.get("n", 0)))]

    # --- acting: each returns the UPID to await ----------------------------------------------------

    def clone_template(self, node: str, template_vmid: int, vmid: int, name: str, *, storage: str | None = None,
                       full: bool = True, description: str | None = None, target: str | None = None) -> str:
        params: dict[str, Any] = {"newid": vmid, "name": name, "full": 1 if full else 0}
        if storage and full:
            params["storage"] = storage
        if description:
            params["description"] = description
        if target and target != node:
            params["target"] = target
        return self._upid(f"clone template {template_vmid} to VM {vmid} ({name}) on node {target or node}",
                          lambda: self._api.nodes(node).qemu(template_vmid).clone.post(**params))

    def create_vm(self, node: str, params: Mapping[str, Any]) -> str:
        return self._upid(f"create VM {params.get('vmid')} on node {node}",
                          lambda: self._api.nodes(node).qemu.post(**dict(params)))

    def convert_to_template(self, node: str, vmid: int) -> str:
        return self._upid(f"convert VM {vmid} on node {node} to a template",
                          lambda: self._api.nodes(node).qemu(vmid).template.post())

    def download_url(self, node: str, storage: str, url: str, filename: str, content: str = "iso") -> str:
        """Proxmox downloads the file itself (the flow's worker never does): pve-storage download_url."""
        return self._upid(f"download {url} to {storage}:{content}/{filename} on node {node}",
                          lambda: self._api.nodes(node).storage(storage)("download-url").post(
                              url=url, filename=filename, content=content))

    def storage_files(self, node: str, storage: str, content: str = "iso") -> set[str]:
        items = self._call(f"list {content} files of storage {storage} on node {node}",
                           lambda: self._api.nodes(node).storage(storage).content.get(content=content))
        return {str(i.get("volid")) for i in items or []}

    def stop_vm(self, node: str, vmid: int) -> str:
        return self._upid(f"stop VM {vmid} on node {node}", lambda: self._api.nodes(node).qemu(vmid).status.stop.post())

    def delete_vm(self, node: str, vmid: int) -> str:
        """Destroy the VM with its disks (`purge` drops it from backup jobs and HA as well)."""
        return self._upid(f"delete VM {vmid} on node {node}",
                          lambda: self._api.nodes(node).qemu(vmid).delete(**{"purge": 1,
                                                                              "destroy-unreferenced-disks": 1}))

    def set_config(self, node: str, vmid: int, params: Mapping[str, Any]) -> str:
        """The asynchronous config update (POST): a qmconfig task."""
        keys = ", ".join(sorted(params))
        return self._upid(f"set {keys} of VM {vmid} on node {node}",
                          lambda: self._api.nodes(node).qemu(vmid).config.post(**dict(params)))

    def resize_disk(self, node: str, vmid: int, disk: str, size_gib: int) -> str | None:
        """Grow a disk to size_gib (absolute). PVE 8+ answers with a task; older versions resize inline (None)."""
        what = f"grow {disk} of VM {vmid} on node {node} to {size_gib} GiB"
        result = self._call(what, lambda: self._api.nodes(node).qemu(vmid).resize.put(disk=disk, size=f"{size_gib}G"),
                            write=True)
        return str(result) if result else None

    def start_vm(self, node: str, vmid: int) -> str:
        return self._upid(f"start VM {vmid} on node {node}",
                          lambda: self._api.nodes(node).qemu(vmid).status.start.post())

    def _upid(self, what: str, fn: Callable[[], Any]) -> str:
        upid = self._call(what, fn, write=True)
        if not isinstance(upid, str) or not upid.startswith("UPID:"):
            raise ProxmoxApiError(f"{what}: expected a task ID (UPID:...), Proxmox answered {upid!r}; "
                                  "check the Proxmox version (8 or later)")
        return upid

    # --- awaiting --------------------------------------------------------------------------------

    def wait_task(self, node: str, upid: str, deadline: float, *, what: str | None = None) -> dict[str, Any]:
        """Poll the task until it stopped, before the monotonic deadline; its status when it ended OK or with
        warnings (then `status["warnings"]` holds the task log's WARN lines, which the caller logs).

        Raises ProxmoxTaskFailed (exit status not OK, with the task's last log line) or ProxmoxTimeout.
        """
        what = what or f"task {upid}"
        status: dict[str, Any] = {}
        pause = self.poll_seconds
        while True:
            status = self.task_status(node, upid, deadline=deadline)
            if status.get("status") == "stopped":
                break
            left = deadline - self.clock()
            if left <= 0:
                raise ProxmoxTimeout(
                    f"{what} on node {node} was still {status.get('status', 'unknown')} at the deadline; it may yet "
                    f"finish: look at it in Proxmox (node {node} → Task History, {upid}) and rerun, which "
                    "re-checks this task instead of starting another", upid, str(status.get("status")))
            self.sleep(min(pause, left))
            pause = min(pause * POLL_BACKOFF, max(POLL_MAX_SECONDS, self.poll_seconds))
        exitstatus = str(status.get("exitstatus", ""))
        if exitstatus == "OK":
            return status
        try:
            lines = self.task_log(node, upid, deadline=max(deadline, self.clock() + 5))
        except ProxmoxError:
            lines = []
        if _WARNINGS.match(exitstatus):
            status["warnings"] = [ln for ln in lines if ln.startswith("WARN")] or [exitstatus]
            for line in status["warnings"]:
                log.warning("%s on node %s: %s", what, node, line)
            return status
        last = next((ln for ln in reversed(lines) if ln.strip()), f"TASK ERROR: {exitstatus}")
        raise ProxmoxTaskFailed(
            f"{what} on node {node} failed: {last} (exit status {exitstatus!r}, {upid}); fix the cause in Proxmox, "
            "then rerun: the run re-reads what exists and goes on from there", upid, exitstatus, last)

    def while_locked(self, what: str, call: Callable[[], T], deadline: float,
                     on_wait: Callable[[str], None] | None = None) -> T:
        """call(), waited out while PVE refuses it because the VM is locked (a backup or a migration holds
        it: "VM is locked (backup)", 500, synchronous); until the deadline, then the refusal with advice."""
        pause = self.poll_seconds
        while True:
            try:
                return call()
            except ProxmoxApiError as e:
                m = _LOCKED.search(str(e))
                if e.status != 500 or m is None:
                    raise
                if self.clock() + pause > deadline:
                    raise ProxmoxApiError(
                        f"{what}: the VM stayed locked ({m.group(1)}) until the deadline; let the {m.group(1)} "
                        "finish (node → Task History), or if nothing runs, `qm unlock <vmid>`; then rerun",
                        500, retryable=True) from None
                if on_wait is not None:
                    on_wait(m.group(1))
                self.sleep(pause)
                pause = min(pause * POLL_BACKOFF, max(POLL_MAX_SECONDS, self.poll_seconds))

    def run(self, node: str, what: str, call: Callable[[], str], deadline: float) -> dict[str, Any]:
        """Start a task and await it: for callers that need not record the UPID in between."""
        return self.wait_task(node, call(), deadline, what=what)


# --- Prefect tasks --------------------------------------------------------------------------------


def _retry_if_retryable(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except ProxmoxError as e:
        return e.retryable
    except Exception:
        return False
    return False


@task(name="proxmox-list-vms", retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_if_retryable)
def observe_vms(block: ProxmoxBlock, node: str) -> list[ObservedVM]:
    """The VMs on the node as Proxmox reports them (read-only)."""
    return ProxmoxApi.from_block(block).list_vms(node)


@task(name="proxmox-await-task")
def await_task(block: ProxmoxBlock, node: str, upid: str, timeout_seconds: float, what: str) -> dict[str, Any]:
    """Await a recorded UPID (also after a crash: a stopped task is only checked, never repeated)."""
    return ProxmoxApi.from_block(block).wait_task(node, upid, deadline_in(timeout_seconds), what=what)


# --- recorded tasks: a crashed run re-checks the task it started instead of starting another -------


def record_key(cluster: str, vmid: int, step: str) -> str:
    """The name a step's UPID is recorded under (a Prefect Variable name: lowercase, digits, dashes)."""
    raw = f"provision-{cluster}-{vmid}-{step}".lower()
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in raw)


class UpidRecord:
    """UPIDs of started, not yet settled Proxmox tasks, kept as Prefect Variables (they outlive the run)."""

    def get(self, key: str) -> str | None:
        from prefect.variables import Variable

        value = Variable.get(key, default=None)
        return value if isinstance(value, str) and value.startswith("UPID:") else None

    def set(self, key: str, upid: str) -> None:
        from prefect.variables import Variable

        Variable.set(key, upid, overwrite=True)

    def clear(self, key: str) -> None:
        from prefect.variables import Variable

        Variable.unset(key)


def node_of_upid(upid: str) -> str:
    """UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>: -> node."""
    parts = upid.split(":")
    if len(parts) < 3 or parts[0] != "UPID":
        raise ValueError(f"{upid!r} is not a Proxmox task ID (UPID:node:...)")
    return parts[1]


def run_recorded(api: ProxmoxApi, record: UpidRecord, key: str, node: str, what: str,
                 start: Callable[[], str | None], deadline: float) -> dict[str, Any] | None:
    """Start a task, record its UPID, await it, clear the record once it stopped (OK or not).

    A timeout keeps the record: the next run re-checks that task instead of repeating the call.
    `start` returning None means Proxmox did the work inline (no task)."""
    upid = start()
    if upid is None:
        return None
    record.set(key, upid)
    try:
        status = api.wait_task(node, upid, deadline, what=what)
    except ProxmoxTaskFailed:
        record.clear(key)
        raise
    record.clear(key)
    return status


def settle_recorded(api: ProxmoxApi, record: UpidRecord, key: str, what: str, deadline: float) -> str | None:
    """A task an earlier run started and never saw end: await it now. None when nothing was recorded,
    else "OK" or the failed task's last log line (the caller re-reads the state either way)."""
    upid = record.get(key)
    if upid is None:
        return None
    try:
        api.wait_task(node_of_upid(upid), upid, deadline, what=what)
        outcome = "OK"
    except ProxmoxTaskFailed as e:
        outcome = e.log_line
    except ProxmoxApiError as e:
        if e.status not in (404, 500):
            raise
        outcome = f"unknown to Proxmox ({e})"  # the task log is gone (node reinstalled): nothing to await
    record.clear(key)
    return outcome
