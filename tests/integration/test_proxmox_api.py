"""tasks.proxmox against the twin's Proxmox (fakepve in its own process): UPIDs awaited, failures explained."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from homelab.config import ProxmoxCluster, load_cluster_yaml
from homelab.provision import Action, config_updates, owner_marker, plan_provision
from tasks.proxmox import (
    ProxmoxApi,
    ProxmoxApiError,
    ProxmoxTaskFailed,
    ProxmoxTimeout,
    ProxmoxUnavailable,
    deadline_in,
)
from twin.proxmox import FakeProxmox

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


@pytest.fixture(scope="module")
def cfg() -> ProxmoxCluster:
    return load_cluster_yaml(ROOT / "k8s/clusters/homelab/cluster.yaml")


class Power:
    def __init__(self) -> None:
        self.on: set[str] = set()
        self.changed = threading.Condition()

    def __call__(self, name: str, vmid: int, running: bool) -> None:
        with self.changed:
            (self.on.add if running else self.on.discard)(name)
            self.changed.notify_all()

    def wait_on(self, name: str) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: name in self.on, 3.0)


@pytest.fixture()
def power() -> Power:
    return Power()


@pytest.fixture()
def pve(cfg: ProxmoxCluster, tmp_path: Path, power: Power) -> Iterator[FakeProxmox]:
    with FakeProxmox(cfg, tmp_path, synced=False, on_vm_power=power) as fake:
        yield fake


@pytest.fixture()
def api(pve: FakeProxmox) -> ProxmoxApi:
    return ProxmoxApi(pve.host, pve.port, pve.user, pve.token_name, pve.token_value, verify_ssl=False)


def provision(api: ProxmoxApi, cfg: ProxmoxCluster) -> None:
    """What the provision flow's apply does, in order: clone, configure, grow, start; every UPID awaited."""
    node = cfg.proxmox.node
    plan = plan_provision(cfg, api.list_vms(node))
    for step in plan.to_apply:
        want = next(v for v in cfg.vms if v.vmid == step.vmid)
        if step.action == Action.CREATE:
            api.wait_task(node, api.clone_template(node, cfg.proxmox.template.vmid, want.vmid, want.name,
                                                   storage=cfg.proxmox.storage, description=owner_marker("homelab")),
                          deadline_in(10))
            step = plan_provision(cfg, api.list_vms(node)).vm(want.name)  # type: ignore[assignment]
        base = next(v for v in api.list_vms() if v.vmid == want.vmid)
        if params := config_updates(cfg, want, step, base):
            api.wait_task(node, api.set_config(node, want.vmid, params), deadline_in(10))
        if step.change("disk"):
            upid = api.resize_disk(node, want.vmid, "scsi0", want.disk)
            assert upid is not None
            api.wait_task(node, upid, deadline_in(10))
        if step.change("power"):
            api.wait_task(node, api.start_vm(node, want.vmid), deadline_in(10))


def test_clone_configure_grow_start_awaits_each_upid_and_powers_vms_on(
        api: ProxmoxApi, cfg: ProxmoxCluster, power: Power) -> None:
    provision(api, cfg)
    for vm in cfg.vms:
        assert power.wait_on(vm.name)
    observed = {v.vmid: v for v in api.list_vms(cfg.proxmox.node)}
    assert observed[201].disk_gib == 64 and observed[201].memory_mib == 8192 and observed[201].mac == cfg.vms[0].mac
    assert plan_provision(cfg, observed.values()).converged  # a rerun finds everything ok


def test_memory_change_on_a_running_vm_is_applied_and_replans_ok(
        api: ProxmoxApi, cfg: ProxmoxCluster) -> None:
    provision(api, cfg)
    bigger = cfg.model_copy(deep=True)
    bigger.vms[0].memory = 12288
    plan = plan_provision(bigger, api.list_vms(cfg.proxmox.node))
    step = plan.vm("homelab-cp-1")
    assert step is not None and [(c.field, c.desired) for c in step.changes] == [("memory", "12288 MiB")]
    provision(api, bigger)
    after = plan_provision(bigger, api.list_vms(cfg.proxmox.node))
    assert after.converged
    assert "memory" in next(v for v in api.list_vms("pve") if v.vmid == 201).pending  # applied at next restart


def test_failed_task_raises_with_its_own_log_line_and_a_rerun_finishes(
        api: ProxmoxApi, pve: FakeProxmox, cfg: ProxmoxCluster) -> None:
    pve.fail_tasks(True)
    upid = api.clone_template("pve", 9000, 201, "homelab-cp-1", storage="local-lvm")
    with pytest.raises(ProxmoxTaskFailed) as err:
        api.wait_task("pve", upid, deadline_in(10), what="clone of homelab-cp-1")
    assert err.value.log_line.startswith("TASK ERROR: clone failed:")
    assert err.value.log_line in str(err.value) and upid in str(err.value)
    assert not err.value.retryable and pve.token_value not in str(err.value)
    pve.fail_tasks(False)
    provision(api, cfg)
    assert plan_provision(cfg, api.list_vms("pve")).converged


def test_wait_task_deadline_names_the_upid_and_what_to_do(api: ProxmoxApi, cfg: ProxmoxCluster) -> None:
    api.wait_task("pve", api.clone_template("pve", 9000, 201, "homelab-cp-1"), deadline_in(10))
    upid = api.start_vm("pve", 201)  # runs start_seconds x time_scale (0.1 s) in the twin
    with pytest.raises(ProxmoxTimeout) as err:
        api.wait_task("pve", upid, deadline_in(0.0))
    assert upid in str(err.value) and "rerun" in str(err.value) and err.value.retryable


def test_api_error_names_the_object_and_is_not_retryable(api: ProxmoxApi) -> None:
    with pytest.raises(ProxmoxApiError) as err:
        api.start_vm("pve", 4242)
    assert "start VM 4242 on node pve" in str(err.value) and not err.value.retryable


def test_unreachable_proxmox_is_retried_until_the_deadline_then_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there
    api = ProxmoxApi("127.0.0.1", port, "homelab@pve", "provision", "secret-value", verify_ssl=False, timeout=1)
    with pytest.raises(ProxmoxUnavailable) as err:
        api.list_vms("pve", deadline=deadline_in(0.5))
    assert err.value.retryable and f"127.0.0.1:{port}" in str(err.value) and "secret-value" not in str(err.value)
