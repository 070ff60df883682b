"""The Proxmox VE API of the simulated homelab: fakepve, served by a process of its own.

Run as `python twin/pve_server.py` by twin.proxmox.FakeProxmox (by path, so the twin package and its
imports stay out of this process and it is ready sooner). fakepve is AGPL-3.0 test tooling: it is used only
through its Python API inside this process, never copied or imported by the program.

Protocol, one JSON object per line:
  stdin, first line   the seed: {"node", "nodes": [{"name", "maxmem_gib"}], "storage", "shared", "bridge",
                      "template": {"vmid", "name", "disk_gib", "disk_key", "iso"} | null,
                      "token": {"user", "name", "value"}, "privileges": [...] | null, "vms": [...],
                      "time_scale", "start_seconds", "port"}
  stdin, later        commands: {"id": n, "op": "fail_tasks" | "warn_tasks", "on": bool};
                      {"op": "agent", "vmid", "interfaces"}; {"op": "lock", "vmid", "lock", "seconds"};
                      {"op": "half_clone", "vmid", "node"}; {"op": "migrate", "vmid", "node"};
                      {"op": "revoke", "privilege"}; {"op": "stats"}
  stdout              {"event": "ready", "host", "port"} once listening; {"event": "ack", "id": n, ...};
                      {"event": "power", "name", "vmid", "running", "node", "mac", "disk", "agent"} on every
                      VM power change; {"event": "error", "message"} when the seed is unusable.
End of stdin stops the server: the process never outlives the twin that started it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from aiohttp import web
from fakepve import FakePve, TaskError
from fakepve.certs import make_cert
from fakepve.model import PveError

HOST = "127.0.0.1"
# How often the power watcher compares VM states; in-process, so it costs nothing on the wire.
POWER_POLL_SECONDS = 0.05
GIB = 1024**3
_SIZE = re.compile(r"size=(\d+(?:\.\d+)?)([KMGT]?)")
_UNITS = {"": GIB, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}

# What a failing task says, in Proxmox's own words for these failures.
FAILURE_MESSAGES = {
    "qmclone": "clone failed: lvcreate 'pve/vm-{vmid}-disk-0' error: Volume group \"pve\" has insufficient free space",
    "qmconfig": "can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout",
    "qmstart": "start failed: QEMU exited with code 1",
    "resize": "command '/sbin/lvextend -L {size}k pve/vm-{vmid}-disk-0' failed: exit code 5",
}
# What a task that ends `WARNINGS: 1` logged: PVE's fork_worker counts every perl warn as "WARN: <text>" and
# ends the task "TASK WARNINGS: <n>" (bpg/terraform-provider-proxmox proxmox/nodes/tasks/tasks_test.go has
# the same shape). The texts are qemu-server's own warnings for these steps.
WARNING_MESSAGES = {
    "qmclone": "WARN: found pending changes for 'memory', discarding for clone",
    "qmconfig": "WARN: iothread is only valid with virtio disk or virtio-scsi-single controller, ignoring",
    "qmstart": "WARN: iothread is only valid with virtio disk or virtio-scsi-single controller, ignoring",
    "resize": "WARN: no lock found trying to remove 'create'  lock",
}
GUEST_MIB_BASE = 2048
CLONE_SECONDS = 5.0  # PVE seconds a full clone copies its disk (times time_scale)  # what a PVE node uses itself, for the memory it reports


def _bridges(config: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(bridge, VLAN tag) of every net<n> of a config or of config parameters."""
    out = []
    for key, value in config.items():
        if re.fullmatch(r"net\d+", str(key)):
            opts = dict(p.partition("=")[::2] for p in str(value).split(","))
            if opts.get("bridge"):
                out.append((opts["bridge"], opts.get("tag") or None))
    return out


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _size_bytes(drive: str) -> int:
    m = _SIZE.search(drive)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


def _format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


class HomelabPve(FakePve):  # type: ignore[misc]
    """fakepve with what provisioning meets on a real PVE 8 that fakepve leaves out: disk resize, SDN.Use on
    bridges for VMs, synchronous lock refusals, the half-made clone, tasks ending `WARNINGS: N`, the guest
    agent's PVE 8 privilege, download-url's PVE 8 privileges, per-node memory; plus a request count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing_tasks = False
        self.warning_tasks = False
        self.warned: set[str] = set()
        self._warn_holder: dict[str, str] | None = None
        # PVE seconds a VM takes to start (times time_scale): lets a client see a task still running.
        self.start_seconds = 0.0
        self.node_maxmem: dict[str, int] = {}
        # vmid -> (name, config) of a clone still copying its disks: PVE has only "lock: clone" until then.
        self._cloning: dict[int, tuple[str, dict[str, Any]]] = {}
        self.api_calls = 0
        self.task_polls = 0

    def _build_app(self) -> Any:
        app = super()._build_app()

        @web.middleware
        async def count(request: Any, handler: Any) -> Any:
            self.api_calls += 1
            if request.path.endswith("/status") and "/tasks/" in request.path:
                self.task_polls += 1
            return await handler(request)
        app.middlewares.insert(0, count)
        return app

    def _sdn_use(self, user: str, config: dict[str, Any]) -> None:
        """PVE::GuestHelpers::check_vnet_access (pve-guest-common), as qemu-server's check_bridge_access calls
        it for every net<n>: SDN.Use on /sdn/zones/localnetwork/<bridge>[/<tag>]; root@pam is exempt."""
        for bridge, tag in _bridges(config):
            path = f"/sdn/zones/localnetwork/{bridge}" + (f"/{tag}" if tag else "")
            self.require(user, path, "SDN.Use")

    async def _failed(self, node: str, ttype: str, tid: Any, user: str, **fmt: Any) -> str:
        message = FAILURE_MESSAGES[ttype].format(**dict({"vmid": tid}, **fmt))

        async def body() -> None:
            raise TaskError(message)
        return str(await self.task(node, ttype, tid, user, body))

    # --- tasks that end with warnings -------------------------------------------------------------

    def _upid(self, *args: Any) -> Any:
        made = super()._upid(*args)
        if self._warn_holder is not None:
            self._warn_holder["upid"] = made[0]
            self._warn_holder = None
        return made

    async def task(self, node: str, ttype: str, tid: Any, user: str, body: Any, vm: Any = None, lock: bool = True,
                   log: Any = ()) -> Any:
        if not (self.warning_tasks and ttype in WARNING_MESSAGES):
            return await super().task(node, ttype, tid, user, body, vm=vm, lock=lock, log=log)
        holder: dict[str, str] = {}
        self._warn_holder = holder

        async def warned() -> Any:
            note = await body()
            upid = holder["upid"]
            self.tasks[upid]["log"].append(WARNING_MESSAGES[ttype])
            self.tasks[upid]["log"] = _WarnLog(self.tasks[upid]["log"])
            self.warned.add(upid)
            return note
        return await super().task(node, ttype, tid, user, warned, vm=vm, lock=lock, log=log)

    def _task_view(self, task: Any, listing: bool = False) -> Any:
        view = super()._task_view(task, listing)
        key = "status" if listing else "exitstatus"
        if task.get("upid") in self.warned and view.get(key) == "OK":
            view[key] = "WARNINGS: 1"
        return view

    # --- clone: SDN.Use, and the half-made clone -----------------------------------------------------

    async def _qm_clone(self, v: dict[str, Any], user: str) -> Any:
        src = self.find(v["node"], v["vmid"])
        # qemu-server 8.3 PVE/API2/Qemu.pm clone_vm: $load_and_check runs check_bridge_access on the source's
        # config before the worker forks, so a missing SDN.Use is a synchronous 403.
        self._sdn_use(user, src.config)
        if self.failing_tasks:
            # As PVE names it: the task is the source VM's, the disk that could not be made the new one's.
            return await self._failed(v["node"], "qmclone", int(v["vmid"]), user, vmid=int(v["newid"]))
        upid = await super()._qm_clone(v, user)
        new = self.vm(int(v["newid"]))
        if new is not None and new.lock == "clone":
            # clone_vm writes "# qmclone temporary file\nlock: clone" first; name, net0 and the rest arrive
            # with the first copied disk, the lock goes at the end.
            self._cloning[new.vmid] = (new.name, dict(new.config))
            new.config = {"lock": "clone"}
            new.name = ""
        return upid

    async def ceph_io(self, vm: Any) -> None:
        await super().ceph_io(vm)
        if vm.vmid in self._cloning:
            await self.pause(CLONE_SECONDS)  # copying the disk takes a while: the half-made state is visible

    def _qm_lock(self, vm: Any, lock: Any) -> None:
        if not lock and vm.vmid in self._cloning:
            name, full = self._cloning.pop(vm.vmid)
            vm.config = {**full, **vm.config}
            vm.name = name
        super()._qm_lock(vm, lock)

    # --- config: locks and SDN.Use refused before any task, as PVE does ----------------------------------

    async def _config_post(self, request: Any) -> Any:
        from fakepve.server import USER, ok, params
        vm = self._vm(request)
        # qemu-server 8.3 $update_vm_api: check_bridge_access on the new net<n> before the update, then
        # PVE::QemuConfig->check_lock inside lock_config, before the qmconfig worker forks: both synchronous.
        self._sdn_use(request[USER], dict(await params(request)))
        if vm.lock:
            raise PveError(500, f"VM is locked ({vm.lock})")
        if self.failing_tasks:
            return ok(await self._failed(vm.node, "qmconfig", vm.vmid, request[USER]))
        return await super()._config_post(request)

    async def _do_start(self, vm: Any, user: str, p: Any) -> Any:
        if self.failing_tasks:
            return await self._failed(vm.node, "qmstart", vm.vmid, user)
        vm.start_secs = self.start_seconds
        return await super()._do_start(vm, user, p)

    # --- the guest agent, with PVE 8's privilege ---------------------------------------------------------

    async def _agent(self, request: Any) -> Any:
        from fakepve.server import USER, ok
        vm = self._vm(request)
        if request.match_info.get("command") != "network-get-interfaces" or request.method != "GET":
            return await super()._agent(request)
        # qemu-server 8.3 PVE/API2/Qemu/Agent.pm register_command: 'VM.Monitor' by default (PVE 9 split it
        # into VM.GuestAgent.*); PVE/QemuServer/Agent.pm agent_available: the three refusals below.
        self.require(request[USER], f"/vms/{vm.vmid}", "VM.Monitor")
        if "agent" not in vm.config:
            raise PveError(500, "No QEMU guest agent configured")
        if vm.status != "running":
            raise PveError(500, f"VM {vm.vmid} is not running")
        if vm.agent is None or "interfaces" not in vm.agent or \
                str(vm.config.get("agent", "0")).split(",")[0] in ("0", "enabled=0"):
            raise PveError(500, "QEMU guest agent is not running")
        return ok({"result": vm.agent["interfaces"]})

    # --- download-url, with PVE 8's privileges -----------------------------------------------------------

    async def _download_url(self, request: Any) -> Any:
        from fakepve.server import USER, ok, params
        user, node, storage = request[USER], request.match_info["node"], request.match_info["storage"]
        # pve-storage API2/Storage/Status.pm download_url (PVE 8): Datastore.AllocateTemplate on the storage,
        # and Sys.Audit+Sys.Modify on / or Sys.AccessNetwork on the node. Nothing is fetched: the twin never
        # opens a connection outside 127.0.0.0/8.
        self.require(user, f"/storage/{storage}", "Datastore.AllocateTemplate")
        if not (self.allowed(user, "/", "Sys.Audit") and self.allowed(user, "/", "Sys.Modify")):
            self.require(user, f"/nodes/{node}", "Sys.AccessNetwork")
        _, store = self._file_storage(request, "download")
        p = self._verify(request, dict(await params(request)))
        if p["content"] not in str(store.get("content", "")).split(","):
            raise PveError(500, f"storage '{storage}' is not configured for content-type '{p['content']}'")

        async def body() -> None:
            await self.pause(5)
            self.store_file(storage, p["filename"], 100 * 1024**2, p["content"])
        return ok(await self.task(node, "download", storage, user, body,
                                  log=[f"downloading {p['url']} to {p['filename']}"]))

    # --- per-node memory, and names as PVE lists them ---------------------------------------------------

    def _mem_of(self, node: str) -> tuple[int, int]:
        used = GUEST_MIB_BASE + sum(int(str(vm.config.get("memory", 512)).split("=")[-1]) for vm in self.vms
                                    if vm.node == node and vm.status == "running")
        return used * 1024 * 1024, self.node_maxmem.get(node, 64 * GIB)

    async def _resources(self, request: Any) -> Any:
        response = await super()._resources(request)
        data = json.loads(response.text)["data"]
        for item in data:
            if item.get("type") == "node" and item.get("status") == "online":
                item["mem"], item["maxmem"] = self._mem_of(item["node"])
            if item.get("type") == "qemu" and not item.get("name"):
                item.pop("name", None)  # a config without a name (a clone still copying) lists none
        from fakepve.server import ok
        return ok(data)

    # PUT /nodes/{node}/qemu/{vmid}/resize is not modelled by fakepve (a write that changes nothing);
    # provisioning grows disks, so the twin keeps the size, and refuses a shrink as PVE does.
    def _routes_homelab(self) -> list[tuple[str, str, Any]]:
        return [("PUT", "/nodes/{node}/qemu/{vmid}/resize", self._resize)]

    async def _resize(self, v: dict[str, Any], user: str) -> str:
        from fakepve.model import PveError
        vm = self.find(v["node"], v["vmid"])
        disk, size = str(v["disk"]), str(v["size"])
        drive = str(vm.config.get(disk) or "")
        if not drive:
            raise PveError(500, f"disk '{disk}' does not exist")
        current = _size_bytes(drive)
        m = re.fullmatch(r"(\+?)(\d+(?:\.\d+)?)([KMGT]?)", size)
        if not m:
            raise PveError(400, "Parameter verification failed.", {"size": f"value does not match the regex pattern: {size}"})
        # No unit: bytes, as PVE reads it.
        amount = int(float(m.group(2)) * (_UNITS[m.group(3)] if m.group(3) else 1))
        new = current + amount if m.group(1) else amount
        if self.failing_tasks:
            return await self._failed(vm.node, "resize", vm.vmid, user, size=new // 1024)
        if new < current:
            raise PveError(500, "shrinking disks is not supported")

        async def body() -> None:
            vm.config[disk] = _SIZE.sub(f"size={_format_size(new)}", drive) if _SIZE.search(drive) \
                else f"{drive},size={_format_size(new)}"
            volume = drive.split(",")[0]
            sid, _, name = volume.partition(":")
            vol = self.storages.get(sid, {}).get("volumes", {}).get(name)
            if vol is not None:
                vol["size"] = new
        return str(await self.task(vm.node, "resize", vm.vmid, user, body, vm=vm))


class _WarnLog(list):  # type: ignore[type-arg]
    """A task log whose closing "TASK OK" reads as PVE writes it for a task that warned."""

    def append(self, line: Any) -> None:
        super().append("TASK WARNINGS: 1" if line == "TASK OK" else line)


def _storage(pve: HomelabPve, name: str) -> dict[str, Any]:
    if name not in pve.storages:
        pve.storages[name] = {"type": "lvmthin", "active": 1, "content": "images,rootdir", "files": set(),
                              "vgname": "pve", "thinpool": "data"}
    store: dict[str, Any] = pve.storages[name]
    return store


def _volume(pve: HomelabPve, storage: str, name: str, vmid: int, size: int) -> str:
    _storage(pve, storage).setdefault("volumes", {})[name] = {
        "content": "images", "format": "raw", "size": size, "vmid": vmid, "ctime": int(time.time())}
    return f"{storage}:{name}"


def seed(pve: HomelabPve, s: dict[str, Any]) -> None:
    node, storage = s["node"], s["storage"]
    nodes = s.get("nodes") or [{"name": node, "maxmem_gib": 64}]
    pve.nodes = {n["name"]: {"online": True} for n in nodes}
    pve.node_maxmem = {n["name"]: int(n.get("maxmem_gib", 64)) * GIB for n in nodes}
    pve.time_scale = float(s.get("time_scale", 0.0))
    pve.start_seconds = float(s.get("start_seconds", 0.0))
    _storage(pve, storage)["shared"] = 1 if s.get("shared") else 0
    tpl = s.get("template")
    if tpl:
        tpl_size = int(tpl.get("disk_gib", 8)) * GIB
        volume = _volume(pve, storage, f"base-{tpl['vmid']}-disk-0", tpl["vmid"], tpl_size)
        disk_key = tpl.get("disk_key", "scsi0")
        pve.store_file("local", tpl["iso"], 100 * 1024**2)
        pve.add_vm(tpl["vmid"], tpl["name"], node=node, status="stopped", template=True, config={
            "name": tpl["name"], "template": 1, "cores": 2, "memory": "2048", "sockets": 1, "ostype": "l26",
            "cpu": "x86-64-v2-AES", "scsihw": "virtio-scsi-single", disk_key: f"{volume},size={_format_size(tpl_size)}",
            "ide2": f"local:iso/{tpl['iso']},media=cdrom",
            "net0": f"virtio=BC:24:11:00:90:00,bridge={s['bridge']},firewall=1,tag=42,mtu=1500,queues=2",
            "boot": f"order={disk_key};ide2;net0", "agent": "1",
            "description": "Talos Linux template (Image Factory nocloud ISO)", "tags": "talos;template"})
    for vm in s.get("vms", []):
        vol = _volume(pve, storage, f"vm-{vm['vmid']}-disk-0", vm["vmid"], int(vm["disk_gib"]) * GIB)
        pve.add_vm(vm["vmid"], vm["name"], node=vm.get("node", node),
                   status="running" if vm.get("running") else "stopped", config={
            "name": vm["name"], "cores": str(vm["cores"]), "memory": str(vm["memory"]), "sockets": "1",
            "ostype": "l26", "scsihw": "virtio-scsi-single", "cpu": "x86-64-v2-AES", "onboot": "1",
            "scsi0": f"{vol},size={int(vm['disk_gib'])}G", "ide2": "none,media=cdrom",
            "net0": f"virtio={vm['mac']},bridge={s['bridge']},firewall=1,tag=42,mtu=1500,queues=2",
            "boot": "order=scsi0;ide2;net0", "agent": "1", "tags": ";".join(vm.get("tags", [])),
            "description": vm.get("description", "")})
    tok = s["token"]
    pve.apitokens[f"{tok['user']}!{tok['name']}"] = tok["value"]
    if s.get("privileges"):
        pve.grant(tok["user"], "/", *s["privileges"])


def _vm_facts(vm: Any) -> dict[str, Any]:
    net = str(vm.config.get("net0", ""))
    mac = next((p.partition("=")[2] for p in net.split(",") if re.fullmatch(r"([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}",
                                                                            p.partition("=")[2])), "")
    disk = next((k for k in ("scsi0", "virtio0", "sata0", "ide0") if k in vm.config
                 and "media=cdrom" not in str(vm.config[k])), "")
    return {"node": vm.node, "mac": mac.upper(), "disk": disk,
            "agent": str(vm.config.get("agent", "0")).split(",")[0] not in ("0", "enabled=0")}


async def _watch_power(pve: HomelabPve) -> None:
    seen = {vm.vmid: vm.status == "running" for vm in pve.vms}
    while True:
        await asyncio.sleep(POWER_POLL_SECONDS)
        now = {vm.vmid: (vm, vm.status == "running") for vm in pve.vms}
        for vmid, (vm, running) in now.items():
            if seen.get(vmid, False) != running:
                if not running:
                    vm.agent = None  # the guest's agent went with it
                _emit({"event": "power", "name": vm.name, "vmid": vmid, "running": running, **_vm_facts(vm)})
        for vmid in set(seen) - set(now):
            if seen[vmid]:
                _emit({"event": "power", "name": "", "vmid": vmid, "running": False})
        seen = {vmid: running for vmid, (_, running) in now.items()}


def _command(pve: HomelabPve, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd.get("op")
    if op == "fail_tasks":
        pve.failing_tasks = bool(cmd.get("on"))
    elif op == "warn_tasks":
        pve.warning_tasks = bool(cmd.get("on"))
    elif op == "agent":
        vm = pve.vm(int(cmd["vmid"]))
        if vm is not None:
            vm.agent = {"interfaces": cmd["interfaces"]} if cmd.get("interfaces") is not None else None
    elif op == "lock":
        vm = pve.vm(int(cmd["vmid"]))
        if vm is not None:
            pve._qm_lock(vm, cmd["lock"])
            asyncio.get_running_loop().call_later(float(cmd.get("seconds", 1.0)), pve._qm_lock, vm, None)
    elif op == "half_clone":
        # What a clone leaves when its worker dies before the first disk is copied (a node reboot):
        # only "# qmclone temporary file\nlock: clone" (qemu-server PVE/API2/Qemu.pm clone_vm).
        vm = pve.add_vm(int(cmd["vmid"]), "", node=cmd.get("node") or sorted(pve.nodes)[0], status="stopped")
        vm.config = {"lock": "clone"}
        vm.lock = "clone"
    elif op == "migrate":
        vm = pve.vm(int(cmd["vmid"]))
        if vm is not None:
            pve.nodes.setdefault(cmd["node"], {"online": True})
            vm.node = cmd["node"]
    elif op == "revoke":
        for entries in (pve.acl or {}).values():
            for _path, privs in entries:
                privs.discard(cmd["privilege"])
    elif op == "stats":
        return {"api_calls": pve.api_calls, "task_polls": pve.task_polls}
    return {}


async def _commands(pve: HomelabPve, reader: asyncio.StreamReader) -> None:
    while line := await reader.readline():
        cmd = json.loads(line)
        try:
            extra = _command(pve, cmd)
        except Exception as e:  # a bad command must not end the server: report it with the ack
            extra = {"error": repr(e)}
        _emit({"event": "ack", "id": cmd.get("id"), **extra})


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return
    seeded = json.loads(first)
    pve = HomelabPve(host=HOST, port=int(seeded.get("port") or 0))
    try:
        seed(pve, seeded)
    except (KeyError, TypeError, ValueError) as e:
        _emit({"event": "error", "message": f"unusable seed: {e!r}"})
        return
    tmp = tempfile.mkdtemp(prefix="homelab-pve-")
    try:
        certfile, keyfile, _ = make_cert(tmp, hosts=(HOST,))
        await pve.start(certfile, keyfile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _emit({"event": "ready", "host": pve.host, "port": pve.port})
    watcher = asyncio.ensure_future(_watch_power(pve))
    try:
        await _commands(pve, reader)
    finally:
        watcher.cancel()
        await pve.stop()


def main() -> None:
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
