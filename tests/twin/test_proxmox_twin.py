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
            assert conf["net0"].startswith(f"virtio={vm.mac},bridge={cfg.proxmox.bridge},")
            assert conf["description"] == "homelab-flows: cluster=homelab"
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


# --- what PVE 8 refuses, as qemu-server and pve-common do (docs/twin.md cites each) ----------------------


def test_clone_without_sdn_use_is_a_synchronous_403_naming_the_bridge(fresh: FakeProxmox, cfg: ProxmoxCluster) -> None:
    fresh.revoke("SDN.Use")
    api = client(fresh)
    with pytest.raises(ResourceException) as err:
        api.nodes("pve").qemu(9000).clone.post(newid=201, name="homelab-cp-1", full=1)
    assert err.value.status_code == 403
    assert "/sdn/zones/localnetwork/vmbr0/42" in str(err.value) and "SDN.Use" in str(err.value)
    assert [v["vmid"] for v in api.cluster.resources.get(type="vm")] == [9000]


def test_config_on_a_backup_locked_vm_is_refused_before_any_task(fresh: FakeProxmox, cfg: ProxmoxCluster) -> None:
    api = client(fresh)
    await_ok(api, "pve", api.nodes("pve").qemu(9000).clone.post(newid=201, name="homelab-cp-1", full=1))
    fresh.lock_vm(201, "backup", 30)
    tasks_before = len(api.nodes("pve").tasks.get())
    with pytest.raises(ResourceException, match=r"VM is locked \(backup\)") as err:
        api.nodes("pve").qemu(201).config.post(memory=4096)
    assert err.value.status_code == 500 and len(api.nodes("pve").tasks.get()) == tasks_before


def test_a_clone_in_progress_has_only_lock_clone_and_no_name(cfg: ProxmoxCluster, tmp_path: Path) -> None:
    with FakeProxmox(cfg, tmp_path, synced=False, on_vm_power=lambda *a: None, time_scale=0.2) as pve:
        api = client(pve)
        upid = api.nodes("pve").qemu(9000).clone.post(newid=201, name="homelab-cp-1", full=1)
        during = api.nodes("pve").qemu(201).config.get()
        listed = next(v for v in api.cluster.resources.get(type="vm") if v["vmid"] == 201)
        assert during.get("lock") == "clone" and "name" not in during and "name" not in listed
        await_ok(api, "pve", upid, timeout=10)
        after = api.nodes("pve").qemu(201).config.get()
        assert after["name"] == "homelab-cp-1" and "lock" not in after and "tag=42" in after["net0"]


def test_warning_tasks_end_warnings_n_with_their_warn_line(fresh: FakeProxmox, cfg: ProxmoxCluster) -> None:
    fresh.warn_tasks(True)
    api = client(fresh)
    upid = api.nodes("pve").qemu(9000).clone.post(newid=201, name="homelab-cp-1", full=1)
    assert await_ok(api, "pve", upid)["exitstatus"] == "WARNINGS: 1"
    log = [line["t"] for line in api.nodes("pve").tasks(upid).log.get()]
    assert log[-1] == "TASK WARNINGS: 1" and any(line.startswith("WARN: ") for line in log)


def test_guest_agent_needs_vm_monitor_and_a_running_agent(fresh: FakeProxmox, cfg: ProxmoxCluster) -> None:
    api = client(fresh)
    await_ok(api, "pve", api.nodes("pve").qemu(9000).clone.post(newid=201, name="homelab-cp-1", full=1))
    await_ok(api, "pve", api.nodes("pve").qemu(201).status.start.post())
    with pytest.raises(ResourceException, match="QEMU guest agent is not running"):
        api.nodes("pve").qemu(201).agent("network-get-interfaces").get()
    fresh.set_agent(201, [{"name": "eth0", "hardware-address": "bc:24:11:00:01:61",
                           "ip-addresses": [{"ip-address": "10.42.0.200", "ip-address-type": "ipv4", "prefix": 24}]}])
    assert api.nodes("pve").qemu(201).agent("network-get-interfaces").get()["result"][0]["hardware-address"] == \
        "bc:24:11:00:01:61"
    fresh.revoke("VM.Monitor")
    with pytest.raises(ResourceException, match="VM.Monitor"):
        api.nodes("pve").qemu(201).agent("network-get-interfaces").get()
