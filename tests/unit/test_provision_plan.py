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
    ClusterView,
    ObservedVM,
    PveNode,
    apply_config_argv,
    config_updates,
    effective_config,
    gen_config_argv,
    maintenance_ip,
    missing_privileges,
    owner_marker,
    parse_service_state,
    plan_provision,
    render_plan_table,
    required_privileges,
    vm_patch,
    with_mac_and_bridge,
)

ROOT = Path(__file__).resolve().parents[2]
REALWORLD = Path("/work/shared/realworld/proxmox")


@pytest.fixture(scope="module")
def cfg() -> ProxmoxCluster:
    return load_cluster_yaml(ROOT / "k8s/clusters/homelab/cluster.yaml")


def template(cfg: ProxmoxCluster) -> ObservedVM:
    t = cfg.proxmox.template
    return ObservedVM(vmid=t.vmid, name=t.name, node=cfg.proxmox.node, status="stopped", template=True,
                      cores=2, memory_mib=2048, disk_key="scsi0", disk_bytes=8 * GIB, tags=("talos",),
                      cdrom_keys=("ide2",), boot=("scsi0", "ide2", "net0"),
                      net0="virtio=BC:24:11:00:90:00,bridge=vmbr0,firewall=1,tag=42")


def as_built(cfg: ProxmoxCluster, **overrides: object) -> list[ObservedVM]:
    """The template plus every VM exactly as cluster.yaml says, running; overrides apply to the first VM."""
    vms = [template(cfg)]
    for i, vm in enumerate(cfg.vms):
        seen = ObservedVM(vmid=vm.vmid, name=vm.name, node=cfg.proxmox.node, status="running", cores=vm.cores,
                          memory_mib=vm.memory, disk_key="scsi0", disk_volume=f"local-lvm:vm-{vm.vmid}-disk-0",
                          disk_bytes=vm.disk * GIB, mac=vm.mac, bridge=cfg.proxmox.bridge, tags=tuple(vm.tags),
                          description=owner_marker(cfg.cluster.name), cpu=cfg.proxmox.cpu, onboot=True, agent=True,
                          net0=f"virtio={vm.mac},bridge={cfg.proxmox.bridge},firewall=1,tag=42")
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
    assert config_updates(cfg, cfg.vms[0], vm, as_built(cfg, bridge="vmbr1", mac="BC:24:11:AA:BB:CC")[1]) == {
        "cores": "4", "net0": "virtio=BC:24:11:00:01:61,bridge=vmbr0,firewall=1,tag=42",
        "tags": "controlplane;homelab;talos"}


def test_disk_shrink_is_refused_naming_vm_sizes_and_next_step(cfg: ProxmoxCluster) -> None:
    plan = plan_provision(cfg, as_built(cfg, disk_bytes=100 * GIB))
    vm = plan.vm(cfg.vms[0].name)
    assert vm is not None and vm.action == Action.REFUSED
    assert plan.refused and vm not in plan.to_apply
    (msg,) = plan.refusals
    assert "homelab-cp-1 (VM 201)" in msg and "64 GiB" in msg and "100 GiB" in msg
    assert "cannot shrink" in msg and "disk: 100" in msg


def test_extra_vm_of_the_cluster_is_unmanaged_and_never_applied(cfg: ProxmoxCluster) -> None:
    extra = ObservedVM(vmid=299, name="homelab-worker-9", node="pve", status="running", tags=("talos",),
                       description=owner_marker("homelab"))
    tagged = ObservedVM(vmid=298, name="scratch", node="pve", status="stopped", tags=("homelab",),
                        description="notes\n" + owner_marker("homelab"))
    foreign = ObservedVM(vmid=300, name="homelab-nas", node="pve", status="running", tags=("homelab",))
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
    assert "VM 201 on pve is taken by 'pihole', which is not this cluster's" in plan.refusals[0]


def test_missing_template_is_planned_from_the_image_factory_iso(cfg: ProxmoxCluster) -> None:
    plan = plan_provision(cfg, [])
    assert not plan.refused and plan.template is not None
    assert plan.template.url == ("https://factory.talos.dev/image/ce4c980550dd2ab1b17bbf2b08801c7eb59418eafe8f279833297925d67c7515"
                                 "/v1.11.5/nocloud-amd64.iso")
    refused = plan_provision(cfg, [], ClusterView(iso_storages=frozenset({"nas-iso"})))
    assert "storage 'local' on pve does not take ISO images" in refused.refusals[0]


def test_template_without_a_cdrom_is_refused_naming_the_fix(cfg: ProxmoxCluster) -> None:
    import dataclasses as dc
    plan = plan_provision(cfg, [dc.replace(template(cfg), cdrom_keys=(), boot=("scsi0",))])
    assert "has no CD-ROM with the Talos ISO" in plan.refusals[0] and "qm set 9000 --ide2" in plan.refusals[0]


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
    assert argv[:3] == ["talosctl", "gen", "config"]
    assert argv[-3:] == ["--", "homelab", "https://10.42.0.161:6443"]  # positionals after `--`
    flags = {a: argv[i + 1] for i, a in enumerate(argv[:-3]) if a.startswith("--")}
    assert flags["--kubernetes-version"] == "1.32.0" and flags["--talos-version"] == "v1.11"
    assert flags["--install-image"].startswith("factory.talos.dev/installer/")
    assert flags["--install-image"].endswith(":v1.11.5")
    assert flags["--with-secrets"] == "secrets.yaml"
    assert argv[-5:-3] == ["--config-patch", "@talos/patches/cluster.yaml"]


def test_vm_patch_sets_hostname_static_address_gateway_and_dns(cfg: ProxmoxCluster) -> None:
    assert vm_patch(cfg, cfg.vms[0], "/dev/vda")["machine"]["install"] == {"disk": "/dev/vda"}
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


# --- ownership, placement, privileges, net0, maintenance address ------------------------------


def test_foreign_vm_named_like_the_cluster_is_refused_not_updated(cfg: ProxmoxCluster) -> None:
    nas = dataclasses.replace(as_built(cfg)[1], name="homelab-nas", description="my NAS")
    plan = plan_provision(cfg, [template(cfg), nas, as_built(cfg)[2]])
    vm = plan.vm("homelab-cp-1")
    assert vm is not None and vm.action == Action.REFUSED and not vm.changes
    assert "'homelab-flows: cluster=homelab'" in plan.refusals[0]


def test_half_cloned_vm_gets_the_unlock_then_destroy_advice(cfg: ProxmoxCluster) -> None:
    half = ObservedVM.from_api({"vmid": 201, "node": "pve", "status": "stopped"}, {"lock": "clone"})
    assert half.half_cloned and not half.named
    plan = plan_provision(cfg, [template(cfg), half])
    assert "a clone is in progress or failed; wait for it, or `qm unlock 201` then `qm destroy 201`" in plan.refusals[0]


def test_net0_keeps_every_option_but_mac_and_bridge() -> None:
    assert with_mac_and_bridge("virtio=BC:24:11:00:90:00,bridge=vmbr0,firewall=1,tag=42,mtu=1500,queues=4",
                               "bc:24:11:00:01:61", "vmbr1") == \
        "virtio=BC:24:11:00:01:61,bridge=vmbr1,firewall=1,tag=42,mtu=1500,queues=4"
    assert with_mac_and_bridge("model=e1000,macaddr=AA:AA:AA:AA:AA:AA,bridge=vmbr0,tag=7", "BC:24:11:00:01:61",
                               "vmbr0") == "model=e1000,macaddr=BC:24:11:00:01:61,bridge=vmbr0,tag=7"
    assert with_mac_and_bridge(None, "BC:24:11:00:01:61", "vmbr0") == "virtio=BC:24:11:00:01:61,bridge=vmbr0"


def test_control_planes_spread_over_nodes_by_count_then_free_memory(cfg: ProxmoxCluster) -> None:
    two = cfg.model_copy(deep=True)
    two.vms.append(two.vms[0].model_copy(update={"name": "homelab-cp-2", "vmid": 202, "ip": "10.42.0.162",
                                                 "mac": "BC:24:11:00:01:62"}))
    nodes = (PveNode("pve", True, 40 * GIB, 64 * GIB), PveNode("pve2", True, 8 * GIB, 64 * GIB))
    view = ClusterView(nodes, shared_storages=frozenset({"local-lvm"}))
    tpl = dataclasses.replace(template(two), disk_volume="local-lvm:base-9000-disk-0")
    plan = plan_provision(two, [tpl], view)
    placed = {v.name: v.node for v in plan.vms}
    assert placed["homelab-cp-1"] == "pve2"  # most free memory first
    assert placed["homelab-cp-2"] == "pve"   # then the node without a control plane
    local = plan_provision(two, [dataclasses.replace(tpl, disk_volume="local:base-9000-disk-0")],
                           ClusterView(nodes, shared_storages=frozenset()))
    assert {v.node for v in local.vms} == {"pve"} and "not shared" in local.notes[0]


def test_missing_sdn_use_is_named_with_its_path(cfg: ProxmoxCluster) -> None:
    required = required_privileges(cfg, make_template=False)
    held = {path: {p for p, _ in needs} for path, needs in required.items()}
    held["/sdn/zones/localnetwork/vmbr0"] = set()
    (missing,) = missing_privileges(required, held)
    assert missing.startswith("SDN.Use on /sdn/zones/localnetwork/vmbr0")
    plan = plan_provision(cfg, [template(cfg)], ClusterView(missing_privileges=(missing,)))
    assert plan.refused and "lacks SDN.Use on /sdn/zones/localnetwork/vmbr0" in plan.refusals[0]


def test_maintenance_address_is_the_ipv4_on_the_vms_mac() -> None:
    ifaces = [{"name": "lo", "hardware-address": "00:00:00:00:00:00",
               "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4"}]},
              {"name": "eth0", "hardware-address": "bc:24:11:00:01:61",
               "ip-addresses": [{"ip-address": "fe80::1", "ip-address-type": "ipv6"},
                                {"ip-address": "169.254.3.3", "ip-address-type": "ipv4"},
                                {"ip-address": "10.42.0.203", "ip-address-type": "ipv4"}]}]
    assert maintenance_ip(ifaces, "BC:24:11:00:01:61") == "10.42.0.203"
    assert maintenance_ip(ifaces, "BC:24:11:00:01:71") is None


def test_service_state_is_read_from_talosctls_layout() -> None:
    text = Path("/work/shared/realworld/talos/siderolabs__talos__docs-v1.11-service-etcd-preparing.txt")
    sample = text.read_text() if text.is_file() else "NODE     172.20.0.2\nID       etcd\nSTATE    Preparing\n"
    assert parse_service_state(sample) == "Preparing"
    assert parse_service_state("ID   etcd\nSTATE   Running\nHEALTH   OK\n") == "Running"
