"""The twin's Proxmox: fakepve in its own process, seeded from cluster.yaml, reached with proxmoxer."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException

from homelab.config import ProxmoxCluster, load_cluster_yaml
from twin.proxmox import FakeProxmox

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg() -> ProxmoxCluster:
    return load_cluster_yaml(ROOT / "k8s/clusters/homelab/cluster.yaml")


class PowerLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, bool]] = []
        self.changed = threading.Condition()

    def __call__(self, name: str, vmid: int, running: bool) -> None:
        with self.changed:
            self.events.append((name, vmid, running))
            self.changed.notify_all()

    def wait_for(self, event: tuple[str, int, bool], timeout: float = 3.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: event in self.events, timeout)


def client(pve: FakeProxmox) -> ProxmoxAPI:
    return ProxmoxAPI(pve.host, port=pve.port, user=pve.user, token_name=pve.token_name,
                      token_value=pve.token_value, verify_ssl=False)


def await_ok(api: ProxmoxAPI, node: str, upid: str, timeout: float = 5.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (status := api.nodes(node).tasks(upid).status.get())["status"] != "stopped":
        assert time.monotonic() < deadline, f"task {upid} still {status['status']}"
        time.sleep(0.05)
    return dict(status)


@pytest.fixture()
def power() -> PowerLog:
    return PowerLog()


@pytest.fixture()
def fresh(cfg: ProxmoxCluster, tmp_path: Path, power: PowerLog) -> Iterator[FakeProxmox]:
    with FakeProxmox(cfg, tmp_path, synced=False, on_vm_power=power) as pve:
        yield pve


def test_start_is_fast_and_stop_leaves_nothing_running(cfg: ProxmoxCluster, tmp_path: Path) -> None:
    pve = FakeProxmox(cfg, tmp_path, synced=False, on_vm_power=lambda *a: None)
    t0 = time.monotonic()
    pve.start()
    took = time.monotonic() - t0
    proc = pve._proc
    assert proc is not None and pve.running and pve.port > 0
    with socket.create_connection((pve.host, pve.port), timeout=1):
        pass
    t0 = time.monotonic()
    pve.stop()
    assert time.monotonic() - t0 < 3.5
    assert proc.poll() is not None and not pve.running
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    with pytest.raises(OSError):
        socket.create_connection((pve.host, pve.port), timeout=1).close()
    print(f"FakeProxmox.start() took {took:.3f} s")
    assert took < 1.5


def test_proxmoxer_lists_the_template_on_the_cluster_yaml_node(fresh: FakeProxmox, cfg: ProxmoxCluster) -> None:
    api = client(fresh)
    assert [n["node"] for n in api.nodes.get()] == [cfg.proxmox.node]
    (tpl,) = api.nodes(cfg.proxmox.node).qemu.get()
    assert (tpl["vmid"], tpl["name"], tpl.get("template")) == (9000, cfg.proxmox.template.name, 1)
    storages = {s["storage"] for s in api.nodes(cfg.proxmox.node).storage.get()}
    assert cfg.proxmox.storage in storages


def test_a_wrong_token_is_refused(fresh: FakeProxmox) -> None:
    api = ProxmoxAPI(fresh.host, port=fresh.port, user=fresh.user, token_name=fresh.token_name,
                     token_value="not-the-secret", verify_ssl=False)
    with pytest.raises((AuthenticationError, ResourceException)):
        api.nodes.get()


def test_synced_state_runs_every_vm_as_cluster_yaml_says(cfg: ProxmoxCluster, tmp_path: Path) -> None:
    with FakeProxmox(cfg, tmp_path, synced=True, on_vm_power=lambda *a: None) as pve:
        api = client(pve)
        listed = {v["vmid"]: v for v in api.nodes(cfg.proxmox.node).qemu.get()}
        for vm in cfg.vms:
            assert listed[vm.vmid]["status"] == "running"
            conf = api.nodes(cfg.proxmox.node).qemu(vm.vmid).config.get()
            assert (conf["name"], str(conf["cores"]), str(conf["memory"])) == (vm.name, str(vm.cores), str(vm.memory))
            assert f"size={vm.disk}G" in conf["scsi0"]
            assert conf["net0"] == f"virtio={vm.mac},bridge={cfg.proxmox.bridge}"
            assert sorted(conf["tags"].split(";")) == sorted(vm.tags)


def test_starting_a_cloned_vm_reports_power_on(fresh: FakeProxmox, cfg: ProxmoxCluster, power: PowerLog) -> None:
    api, node = client(fresh), cfg.proxmox.node
    assert await_ok(api, node, api.nodes(node).qemu(9000).clone.post(newid=201, name="homelab-cp-1", full=1))[
        "exitstatus"] == "OK"
    assert await_ok(api, node, api.nodes(node).qemu(201).status.start.post())["exitstatus"] == "OK"
    assert power.wait_for(("homelab-cp-1", 201, True))
    assert await_ok(api, node, api.nodes(node).qemu(201).status.stop.post())["exitstatus"] == "OK"
    assert power.wait_for(("homelab-cp-1", 201, False))


def test_fail_tasks_ends_mutating_tasks_stopped_with_an_error_and_a_log_line(
        fresh: FakeProxmox, cfg: ProxmoxCluster) -> None:
    api, node = client(fresh), cfg.proxmox.node
    fresh.fail_tasks(True)
    status = await_ok(api, node, upid := api.nodes(node).qemu(9000).clone.post(newid=201, name="x", full=1))
    assert status["status"] == "stopped" and status["exitstatus"] != "OK"
    last = api.nodes(node).tasks(upid).log.get()[-1]["t"]
    assert last.startswith("TASK ERROR: clone failed:")
    assert not [v for v in api.nodes(node).qemu.get() if v["vmid"] == 201]  # the failed clone left no VM
    fresh.fail_tasks(False)
    assert await_ok(api, node, api.nodes(node).qemu(9000).clone.post(newid=201, name="x", full=1))[
        "exitstatus"] == "OK"


def test_resize_grows_the_disk_and_refuses_a_shrink(fresh: FakeProxmox, cfg: ProxmoxCluster) -> None:
    api, node = client(fresh), cfg.proxmox.node
    await_ok(api, node, api.nodes(node).qemu(9000).clone.post(newid=201, name="homelab-cp-1", full=1))
    await_ok(api, node, api.nodes(node).qemu(201).resize.put(disk="scsi0", size="64G"))
    assert "size=64G" in api.nodes(node).qemu(201).config.get()["scsi0"]
    with pytest.raises(ResourceException, match="shrinking disks is not supported"):
        api.nodes(node).qemu(201).resize.put(disk="scsi0", size="32G")
