"""The Proxmox VE API of the simulated homelab: fakepve, served by a process of its own.

Run as `python twin/pve_server.py` by twin.proxmox.FakeProxmox (by path, so the twin package and its
imports stay out of this process and it is ready sooner). fakepve is AGPL-3.0 test tooling: it is used only
through its Python API inside this process, never copied or imported by the program.

Protocol, one JSON object per line:
  stdin, first line   the seed: {"node", "storage", "bridge", "template": {"vmid", "name", "disk_gib"},
                      "token": {"user", "name", "value"}, "privileges": [...] | null, "vms": [...],
                      "time_scale", "start_seconds"}
  stdin, later        commands: {"id": n, "op": "fail_tasks", "on": bool}
  stdout              {"event": "ready", "host", "port"} once listening; {"event": "ack", "id": n};
                      {"event": "power", "name", "vmid", "running"} on every VM power change;
                      {"event": "error", "message"} when the seed is unusable.
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

from fakepve import FakePve, TaskError
from fakepve.certs import make_cert

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
    """fakepve with disk resize modelled and a switch that makes mutating tasks fail."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing_tasks = False
        # PVE seconds a VM takes to start (times time_scale): lets a client see a task still running.
        self.start_seconds = 0.0

    async def _failed(self, node: str, ttype: str, tid: Any, user: str, **fmt: Any) -> str:
        message = FAILURE_MESSAGES[ttype].format(**dict({"vmid": tid}, **fmt))

        async def body() -> None:
            raise TaskError(message)
        return str(await self.task(node, ttype, tid, user, body))

    async def _qm_clone(self, v: dict[str, Any], user: str) -> Any:
        if self.failing_tasks:
            self.find(v["node"], v["vmid"])
            # As PVE names it: the task is the source VM's, the disk that could not be made the new one's.
            return await self._failed(v["node"], "qmclone", int(v["vmid"]), user, vmid=int(v["newid"]))
        return await super()._qm_clone(v, user)

    async def _config_post(self, request: Any) -> Any:
        if self.failing_tasks:
            from fakepve.server import USER, ok
            vm = self._vm(request)
            return ok(await self._failed(vm.node, "qmconfig", vm.vmid, request[USER]))
        return await super()._config_post(request)

    async def _do_start(self, vm: Any, user: str, p: Any) -> Any:
        if self.failing_tasks:
            return await self._failed(vm.node, "qmstart", vm.vmid, user)
        vm.start_secs = self.start_seconds
        return await super()._do_start(vm, user, p)

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
    pve.nodes = {node: {"online": True}}
    pve.time_scale = float(s.get("time_scale", 0.0))
    pve.start_seconds = float(s.get("start_seconds", 0.0))
    tpl = s["template"]
    tpl_size = int(tpl.get("disk_gib", 8)) * GIB
    volume = _volume(pve, storage, f"base-{tpl['vmid']}-disk-0", tpl["vmid"], tpl_size)
    pve.add_vm(tpl["vmid"], tpl["name"], node=node, status="stopped", template=True, config={
        "name": tpl["name"], "template": 1, "cores": 2, "memory": "2048", "sockets": 1, "ostype": "l26",
        "scsihw": "virtio-scsi-single", "scsi0": f"{volume},size={_format_size(tpl_size)}",
        "net0": f"virtio=BC:24:11:00:90:00,bridge={s['bridge']}", "boot": "order=scsi0;net0", "agent": "1",
        "description": "Talos Linux template (nocloud image)", "tags": "talos;template"})
    for vm in s.get("vms", []):
        vol = _volume(pve, storage, f"vm-{vm['vmid']}-disk-0", vm["vmid"], int(vm["disk_gib"]) * GIB)
        pve.add_vm(vm["vmid"], vm["name"], node=node, status="running" if vm.get("running") else "stopped", config={
            "name": vm["name"], "cores": str(vm["cores"]), "memory": str(vm["memory"]), "sockets": "1",
            "ostype": "l26", "scsihw": "virtio-scsi-single",
            "scsi0": f"{vol},size={int(vm['disk_gib'])}G", "net0": f"virtio={vm['mac']},bridge={s['bridge']}",
            "boot": "order=scsi0;net0", "agent": "1", "tags": ";".join(vm.get("tags", []))})
    tok = s["token"]
    pve.apitokens[f"{tok['user']}!{tok['name']}"] = tok["value"]
    if s.get("privileges"):
        pve.grant(tok["user"], "/", *s["privileges"])


async def _watch_power(pve: HomelabPve) -> None:
    seen = {vm.vmid: vm.status == "running" for vm in pve.vms}
    while True:
        await asyncio.sleep(POWER_POLL_SECONDS)
        now = {vm.vmid: (vm.name, vm.status == "running") for vm in pve.vms}
        for vmid, (name, running) in now.items():
            if seen.get(vmid, False) != running:
                _emit({"event": "power", "name": name, "vmid": vmid, "running": running})
        for vmid in set(seen) - set(now):
            if seen[vmid]:
                _emit({"event": "power", "name": "", "vmid": vmid, "running": False})
        seen = {vmid: running for vmid, (_, running) in now.items()}


async def _commands(pve: HomelabPve, reader: asyncio.StreamReader) -> None:
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd.get("op") == "fail_tasks":
            pve.failing_tasks = bool(cmd.get("on"))
        _emit({"event": "ack", "id": cmd.get("id")})


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return
    pve = HomelabPve(host=HOST, port=0)
    try:
        seed(pve, json.loads(first))
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
