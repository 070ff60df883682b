"""The provisioning plan: a pure function of cluster.yaml and what Proxmox reports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from homelab.config import ProxmoxCluster, load_cluster_yaml
from homelab.provision import (
    GIB,
    Action,
    ObservedVM,
    apply_config_argv,
    config_updates,
    effective_config,
    gen_config_argv,
    plan_provision,
    render_plan_table,
    vm_patch,
)

ROOT = Path(__file__).resolve().parents[2]
REALWORLD = Path("/work/shared/realworld/proxmox")


@pytest.fixture(scope="module")
def cfg() -> ProxmoxCluster:
    return load_cluster_yaml(ROOT / "k8s/clusters/homelab/cluster.yaml")


def template(cfg: ProxmoxCluster) -> ObservedVM:
    t = cfg.proxmox.template
    return ObservedVM(vmid=t.vmid, name=t.name, node=cfg.proxmox.node, status="stopped", template=True,
                      cores=2, memory_mib=2048, disk_key="scsi0", disk_bytes=8 * GIB, tags=("talos",))


def as_built(cfg: ProxmoxCluster, **overrides: object) -> list[ObservedVM]:
    """The template plus every VM exactly as cluster.yaml says, running; overrides apply to the first VM."""
    vms = [template(cfg)]
    for i, vm in enumerate(cfg.vms):
        seen = ObservedVM(vmid=vm.vmid, name=vm.name, node=cfg.proxmox.node, status="running", cores=vm.cores,
                          memory_mib=vm.memory, disk_key="scsi0", disk_volume=f"local-lvm:vm-{vm.vmid}-disk-0",
                          disk_bytes=vm.disk * GIB, mac=vm.mac, bridge=cfg.proxmox.bridge, tags=tuple(vm.tags))
        vms.append(dataclasses.replace(seen, **overrides) if i == 0 else seen)  # type: ignore[arg-type]
    return vms


def test_fresh_node_plans_every_vm_create(cfg: ProxmoxCluster) -> None:
    plan = plan_provision(cfg, [template(cfg)])
    assert [(v.name, v.action) for v in plan.vms] == [(vm.name, Action.CREATE) for vm in cfg.ordered_vms()]
    assert not plan.refused and len(plan.to_apply) == len(cfg.vms)


def test_cluster_as_built_plans_everything_ok(cfg: ProxmoxCluster) -> None:
    plan = plan_provision(cfg, as_built(cfg))
    assert {v.action for v in plan.vms} == {Action.OK}
    assert plan.converged


def test_changed_memory_plans_update_of_memory_only_from_and_to(cfg: ProxmoxCluster) -> None:
    plan = plan_provision(cfg, as_built(cfg, memory_mib=4096))
    vm = plan.vm(cfg.vms[0].name)
    assert vm is not None and vm.action == Action.UPDATE
    assert [(c.field, c.current, c.desired) for c in vm.changes] == [("memory", "4096 MiB", "8192 MiB")]
    assert "restart" in vm.note  # a running VM takes memory at its next start
    assert config_updates(cfg, cfg.vms[0], vm) == {"memory": "8192"}


def test_disk_grow_cores_bridge_mac_tags_are_each_listed(cfg: ProxmoxCluster) -> None:
    plan = plan_provision(cfg, as_built(cfg, disk_bytes=32 * GIB, cores=2, bridge="vmbr1",
                                        mac="BC:24:11:AA:BB:CC", tags=("talos",)))
    vm = plan.vm(cfg.vms[0].name)
    assert vm is not None and vm.action == Action.UPDATE
    assert {c.field: (c.current, c.desired) for c in vm.changes} == {
        "cores": ("2", "4"), "disk": ("32 GiB", "64 GiB"), "bridge": ("vmbr1", "vmbr0"),
        "mac": ("BC:24:11:AA:BB:CC", "BC:24:11:00:01:61"), "tags": ("talos", "controlplane;homelab;talos")}
    assert config_updates(cfg, cfg.vms[0], vm) == {
        "cores": "4", "net0": "virtio=BC:24:11:00:01:61,bridge=vmbr0", "tags": "controlplane;homelab;talos"}


def test_disk_shrink_is_refused_naming_vm_sizes_and_next_step(cfg: ProxmoxCluster) -> None:
    plan = plan_provision(cfg, as_built(cfg, disk_bytes=100 * GIB))
    vm = plan.vm(cfg.vms[0].name)
    assert vm is not None and vm.action == Action.REFUSED
    assert plan.refused and vm not in plan.to_apply
    (msg,) = plan.refusals
    assert "homelab-cp-1 (VM 201)" in msg and "64 GiB" in msg and "100 GiB" in msg
    assert "cannot shrink" in msg and "disk: 100" in msg


def test_extra_vm_of_the_cluster_is_unmanaged_and_never_applied(cfg: ProxmoxCluster) -> None:
    extra = ObservedVM(vmid=299, name="homelab-worker-9", node="pve", status="running", tags=("talos",))
    tagged = ObservedVM(vmid=298, name="scratch", node="pve", status="stopped", tags=("homelab",))
    foreign = ObservedVM(vmid=300, name="pihole", node="pve", status="running", tags=("dns",))
    plan = plan_provision(cfg, [*as_built(cfg), extra, tagged, foreign])
    unmanaged = [(v.vmid, v.action) for v in plan.vms if v.action == Action.UNMANAGED]
    assert unmanaged == [(298, Action.UNMANAGED), (299, Action.UNMANAGED)]
    assert plan.converged  # reported, nothing to do: no deletion is ever planned
    assert all(v.name != cfg.proxmox.template.name for v in plan.vms)


def test_stopped_vm_plans_power_on(cfg: ProxmoxCluster) -> None:
    vm = plan_provision(cfg, as_built(cfg, status="stopped")).vm(cfg.vms[0].name)
    assert vm is not None and vm.action == Action.UPDATE
    assert [(c.field, c.current, c.desired) for c in vm.changes] == [("power", "stopped", "running")]


def test_vmid_taken_by_a_foreign_vm_is_refused(cfg: ProxmoxCluster) -> None:
    other = ObservedVM(vmid=cfg.vms[0].vmid, name="pihole", node="pve", status="running", tags=("dns",))
    plan = plan_provision(cfg, [template(cfg), other])
    assert plan.vm(cfg.vms[0].name).action == Action.REFUSED  # type: ignore[union-attr]
    assert "VM 201 is taken by 'pihole'" in plan.refusals[0]


def test_missing_template_refuses_creation(cfg: ProxmoxCluster) -> None:
    plan = plan_provision(cfg, [])
    assert plan.refused and "template VM 9000" in plan.refusals[0]


def test_plan_table_rows_spell_out_changes(cfg: ProxmoxCluster) -> None:
    rows = render_plan_table(plan_provision(cfg, as_built(cfg, memory_mib=4096)))
    assert rows[0] == {"vm": "homelab-cp-1", "vmid": "201", "action": "update",
                       "changes": "memory 4096 MiB → 8192 MiB",
                       "note": "takes effect at the next restart of the VM (pending in Proxmox)"}
    assert rows[1]["action"] == "ok"


# --- parsing what Proxmox reports -------------------------------------------------------------


def test_observed_vm_parses_string_config_values() -> None:
    listing = {"vmid": 201, "name": "homelab-cp-1", "status": "running", "cpus": 4, "maxmem": 8589934592}
    config = {"cores": "4", "memory": "8192", "scsi0": "local-lvm:vm-201-disk-0,iothread=1,size=64G",
              "net0": "virtio=bc:24:11:00:01:61,bridge=vmbr0,firewall=1", "tags": "homelab;talos;controlplane",
              "ide2": "none,media=cdrom", "digest": "abc"}
    vm = ObservedVM.from_api(listing, config, "pve")
    assert (vm.cores, vm.memory_mib, vm.disk_key, vm.disk_bytes) == (4, 8192, "scsi0", 64 * GIB)
    assert (vm.mac, vm.bridge, vm.tags) == ("BC:24:11:00:01:61", "vmbr0", ("homelab", "talos", "controlplane"))


def test_observed_vm_reads_memory_property_string_and_virtio_disk_in_mib() -> None:
    vm = ObservedVM.from_api({"vmid": "105", "status": "stopped"},
                             {"memory": "current=4096", "virtio0": "local:105/vm-105-disk-0.qcow2,size=32768M",
                              "net0": "model=e1000,macaddr=BC:24:11:00:00:05,bridge=vmbr1"}, "pve")
    assert (vm.vmid, vm.memory_mib, vm.disk_key, vm.disk_bytes) == (105, 4096, "virtio0", 32 * GIB)
    assert (vm.mac, vm.bridge) == ("BC:24:11:00:00:05", "vmbr1")


def test_pending_changes_count_as_the_config_the_vm_will_have() -> None:
    cfg, keys = effective_config([{"key": "memory", "value": "8192", "pending": "16384"},
                                  {"key": "cores", "value": "4"}, {"key": "tags", "value": "a", "delete": 1}])
    assert cfg == {"memory": "16384", "cores": "4"} and keys == ("memory", "tags")


def test_parses_real_pve8_cluster_resources() -> None:
    data = json.loads((REALWORLD / "go-proxmox__pve8x__cluster-resources.json").read_text())["data"]
    vms = {v.vmid: v for v in (ObservedVM.from_api(i, None, i["node"]) for i in data if i["type"] == "qemu")}
    assert vms[101].template and not vms[100].template
    assert vms[100].running and vms[100].cores == 1 and vms[100].memory_mib == 1024
    assert vms[101].disk_bytes == 68719476736 and vms[102].tags == ("go-proxmox+cloud-init",)


# --- Talos machine configs --------------------------------------------------------------------


def test_gen_config_argv_carries_versions_installer_and_patches(cfg: ProxmoxCluster) -> None:
    argv = gen_config_argv(cfg, "out", secrets_file="secrets.yaml", patches=["talos/patches/cluster.yaml"])
    assert argv[:5] == ["talosctl", "gen", "config", "homelab", "https://10.42.0.161:6443"]
    flags = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    assert flags["--kubernetes-version"] == "1.32.0" and flags["--talos-version"] == "v1.11"
    assert flags["--install-image"].startswith("factory.talos.dev/installer/")
    assert flags["--install-image"].endswith(":v1.11.5")
    assert flags["--with-secrets"] == "secrets.yaml"
    assert argv[-2:] == ["--config-patch", "@talos/patches/cluster.yaml"]


def test_vm_patch_sets_hostname_static_address_gateway_and_dns(cfg: ProxmoxCluster) -> None:
    net = vm_patch(cfg, cfg.vms[0])["machine"]["network"]
    assert net["hostname"] == "homelab-cp-1" and net["nameservers"] == ["10.42.0.1"]
    (iface,) = net["interfaces"]
    assert iface["deviceSelector"] == {"hardwareAddr": "bc:24:11:00:01:61"}
    assert iface["addresses"] == ["10.42.0.161/24"]
    assert iface["routes"] == [{"network": "0.0.0.0/0", "gateway": "10.42.0.1"}]


def test_apply_config_argv_targets_the_vm_maintenance_api_with_its_role(cfg: ProxmoxCluster) -> None:
    worker = next(v for v in cfg.vms if v.role == "worker")
    assert apply_config_argv(worker, "cfg", "cfg/homelab-worker-1.patch.yaml") == [
        "talosctl", "apply-config", "--nodes", "10.42.0.171", "--file", "cfg/worker.yaml",
        "--config-patch", "@cfg/homelab-worker-1.patch.yaml", "--insecure"]
