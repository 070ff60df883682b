"""Proxmox VE of the simulated homelab: fakepve in a process of its own, seeded from cluster.yaml.

The server (twin/pve_server.py) holds the Proxmox node, its storage, the Talos template VM and an API
token with only the privileges provisioning uses. In the `synced` state the cluster's VMs exist, cloned
and configured as cluster.yaml says, and run. Every VM power change is reported to `on_vm_power` (the
twin boots a started VM into Talos maintenance mode), from a reader thread of this process.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from homelab.config import ProxmoxCluster
from homelab.provision import PROXMOX_TOKEN_PRIVILEGES, owner_marker, template_plan

log = logging.getLogger(__name__)

PVE_SERVER = Path(__file__).with_name("pve_server.py")
TEMPLATE_DISK_GIB = 8
READY_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 3.0


class FakeProxmoxError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeProxmox:
    """The Proxmox API at https://127.0.0.1:<port> (fakepve's self-signed certificate: verify_ssl=False).

    `launch()` starts the server process and returns at once; `wait_ready()` blocks until it listens.
    `start()` does both. Call `launch()` early when other parts of the twin start meanwhile.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        cluster: ProxmoxCluster,
        workdir: Path,
        synced: bool,
        on_vm_power: Callable[[str, int, bool], None],
        *,
        time_scale: float = 0.02,
        start_seconds: float = 5.0,
        user: str = "homelab@pve",
        token_name: str = "provision",
        least_privilege: bool = True,
        nodes: tuple[str, ...] = (),
        shared_storage: bool = False,
        template_disk: str = "scsi0",
        with_template: bool = True,
    ) -> None:
        """time_scale: real seconds per PVE second (0: every task done before the request returns).
        start_seconds: PVE seconds a VM start task runs, so that clients poll a running task.
        nodes: PVE nodes beyond cluster.yaml's (a cluster of several); shared_storage: cluster.yaml's storage is
        shared (clones may go to another node); template_disk: the template's disk bus (scsi0, virtio0);
        with_template: seed the Talos template (else the flow has to make it)."""
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.synced = synced
        self.on_vm_power = on_vm_power
        self.time_scale = time_scale
        self.start_seconds = start_seconds
        self.user = user
        self.token_name = token_name
        self.token_value = secrets.token_hex(16)
        self.least_privilege = least_privilege
        self.extra_nodes = tuple(n for n in nodes if n != cluster.proxmox.node)
        self.shared_storage = shared_storage
        self.template_disk = template_disk
        self.with_template = with_template
        # Chosen before launch, so the twin's tree can name the endpoint before the server listens.
        self.port = _free_port()
        # vmid -> the facts of its last power event (node, MAC, boot disk key, agent on).
        self.vm_info: dict[int, dict[str, Any]] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: str | None = None
        self._acks: dict[int, threading.Event] = {}
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._stderr: IO[str] | None = None
        self.failing = False

    # --- what clients need --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def node(self) -> str:
        return self.cluster.proxmox.node

    @property
    def token_id(self) -> str:
        return f"{self.user}!{self.token_name}"

    def env(self) -> dict[str, str]:
        """Environment lines for `twin up`'s env file (the token secret included: it is the twin's own)."""
        return {"PROXMOX_URL": self.url, "PROXMOX_HOST": self.host, "PROXMOX_PORT": str(self.port),
                "PROXMOX_USER": self.user, "PROXMOX_TOKEN_NAME": self.token_name,
                "PROXMOX_TOKEN_VALUE": self.token_value, "PROXMOX_VERIFY_SSL": "false"}

    # --- lifecycle ----------------------------------------------------------------------------

    def seed(self) -> dict[str, Any]:
        cfg = self.cluster
        vms = [{"vmid": vm.vmid, "name": vm.name, "cores": vm.cores, "memory": vm.memory, "disk_gib": vm.disk,
                "mac": vm.mac, "tags": vm.tags, "running": True, "node": vm.node or cfg.proxmox.node,
                "description": owner_marker(cfg.cluster.name)} for vm in cfg.vms] if self.synced else []
        tpl = template_plan(cfg, cfg.proxmox.node)
        return {
            "node": cfg.proxmox.node, "storage": cfg.proxmox.storage, "bridge": cfg.proxmox.bridge,
            "nodes": [{"name": n, "maxmem_gib": 64 - 16 * i} for i, n in enumerate((cfg.proxmox.node,
                                                                                   *self.extra_nodes))],
            "shared": self.shared_storage, "port": self.port,
            "template": {"vmid": tpl.vmid, "name": tpl.name, "disk_gib": TEMPLATE_DISK_GIB,
                         "disk_key": self.template_disk, "iso": tpl.iso_file} if self.with_template else None,
            "token": {"user": self.user, "name": self.token_name, "value": self.token_value},
            "privileges": list(PROXMOX_TOKEN_PRIVILEGES) if self.least_privilege else None,
            "vms": vms, "time_scale": self.time_scale, "start_seconds": self.start_seconds,
        }

    def launch(self) -> None:
        if self._proc is not None:
            raise FakeProxmoxError("the fake Proxmox API is already started; stop() it first")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.workdir / "proxmox.log", "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._ready.clear()
        self._error = None
        # By path, not `-m twin.pve_server`: the twin package's imports stay out of the server process.
        self._proc = subprocess.Popen(
            [sys.executable, str(PVE_SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, bufsize=1, cwd=self.workdir, start_new_session=True)
        assert self._proc.stdin is not None
        # The seed (with the token secret) goes through the pipe: never on argv, never on disk.
        self._proc.stdin.write(json.dumps(self.seed()) + "\n")
        self._proc.stdin.flush()
        self._reader = threading.Thread(target=self._read, name="fake-proxmox-events", daemon=True)
        self._reader.start()

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        if self._proc is None:
            raise FakeProxmoxError("the fake Proxmox API was never launched; call launch() or start()")
        if not self._ready.wait(timeout):
            self.stop()
            raise FakeProxmoxError(f"the fake Proxmox API did not listen within {timeout:.0f} s; "
                                   f"see {self.workdir / 'proxmox.log'}")
        if self._error is not None:
            error = self._error
            self.stop()
            raise FakeProxmoxError(f"the fake Proxmox API did not start: {error}; see {self.workdir / 'proxmox.log'}")

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin:
                    proc.stdin.close()  # end of stdin: the server stops listening and exits
            except OSError:
                pass
            try:
                proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_SECONDS)
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT_SECONDS)
            self._reader = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._ready.set()
        for ev in self._acks.values():
            ev.set()

    def __enter__(self) -> FakeProxmox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- faults -------------------------------------------------------------------------------

    def fail_tasks(self, on: bool) -> None:
        """proxmox-task-fails: clone, config, resize and start tasks end `stopped` with an error exit
        status and a task log line saying why, as Proxmox's do. Called before the server listens (a fault
        given at start), it waits for the server first."""
        if self._proc is not None and not self._ready.is_set():
            self.wait_ready()
        self._command({"op": "fail_tasks", "on": bool(on)})
        self.failing = bool(on)

    def warn_tasks(self, on: bool) -> None:
        """Clone, config, resize and start tasks end `WARNINGS: 1` with a WARN line in their log: success."""
        self._command({"op": "warn_tasks", "on": bool(on)})

    def set_agent(self, vmid: int, interfaces: list[dict[str, Any]] | None) -> None:
        """What the VM's guest agent answers to network-get-interfaces (None: the agent is not running)."""
        self._command({"op": "agent", "vmid": vmid, "interfaces": interfaces})

    def lock_vm(self, vmid: int, lock: str, seconds: float) -> None:
        """A backup (or migration) holds the VM's lock for `seconds` real seconds."""
        self._command({"op": "lock", "vmid": vmid, "lock": lock, "seconds": seconds})

    def half_clone(self, vmid: int, node: str | None = None) -> None:
        """What a clone leaves when its worker dies before the first disk is copied: `lock: clone`, no name."""
        self._command({"op": "half_clone", "vmid": vmid, "node": node})

    def migrate(self, vmid: int, node: str) -> None:
        """The VM now runs on another PVE node (as after `qm migrate`)."""
        self._command({"op": "migrate", "vmid": vmid, "node": node})

    def revoke(self, privilege: str) -> None:
        """Take a privilege away from the API token's user."""
        self._command({"op": "revoke", "privilege": privilege})

    def stats(self) -> dict[str, int]:
        """Requests served so far: every API request, and the task-status polls among them."""
        ack = self._command({"op": "stats"})
        return {"api_calls": int(ack.get("api_calls", 0)), "task_polls": int(ack.get("task_polls", 0))}

    def _command(self, cmd: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None or not self._ready.is_set():
            raise FakeProxmoxError("the fake Proxmox API is not running; start() it first")
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            ack = self._acks[ident] = threading.Event()
            proc.stdin.write(json.dumps(dict(cmd, id=ident)) + "\n")
            proc.stdin.flush()
        try:
            if not ack.wait(timeout) or self._proc is None:
                raise FakeProxmoxError(f"the fake Proxmox API did not acknowledge {cmd['op']} within {timeout:.0f} s")
        finally:
            self._acks.pop(ident, None)
        reply = self._replies.pop(ident, {})
        if reply.get("error"):
            raise FakeProxmoxError(f"the fake Proxmox API refused {cmd['op']}: {reply['error']}")
        return reply

    # --- events from the server ---------------------------------------------------------------

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("fake Proxmox API printed a line that is not an event: %r", line[:200])
                continue
            kind = event.get("event")
            if kind == "ready":
                self.port = int(event["port"])
                self._ready.set()
            elif kind == "error":
                self._error = str(event.get("message"))
                self._ready.set()
            elif kind == "ack":
                ack = self._acks.get(event.get("id"))
                if ack is not None:
                    self._replies[int(event["id"])] = event
                    ack.set()
            elif kind == "power":
                self.vm_info[int(event["vmid"])] = {k: event.get(k) for k in ("node", "mac", "disk", "agent")}
                try:
                    self.on_vm_power(str(event["name"]), int(event["vmid"]), bool(event["running"]))
                except Exception:  # a twin-side handler bug must not end the event stream
                    log.exception("on_vm_power(%s, %s, %s) failed", event.get("name"), event.get("vmid"),
                                  event.get("running"))
        if not self._ready.is_set():
            self._error = f"the server process exited (code {proc.wait()}) before listening"
            self._ready.set()
