"""Provisioning the Proxmox VM cluster: what Proxmox reports, what cluster.yaml asks for, and the plan between.

Pure: ObservedVM parses Proxmox's answers (the VM list and each VM's config, values as strings),
`plan_provision` decides per VM, `render_plan_table` shows the plan, and the Talos helpers say which
`talosctl` commands generate and apply the machine configs. Nothing here talks to Proxmox or Talos.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml

from homelab.config import VM, ProxmoxCluster
from homelab.versions import parse_version, schematic_id

# The privileges the provision flow's API token needs (Proxmox: Datacenter → Permissions → API Tokens,
# privilege separation on, a role holding exactly these, granted on `/`). PVE 8 names them; each line says
# which call needs it (qemu-server 8.3 PVE/API2/Qemu.pm, pve-storage API2/Storage/Status.pm).
PROXMOX_TOKEN_PRIVILEGES: tuple[str, ...] = (
    "VM.Audit",             # list VMs cluster-wide, read their config and pending changes
    "VM.Clone",             # clone the Talos template (clone_vm)
    "VM.Allocate",          # the clone's VMID; make the template; destroy (teardown)
    "Datastore.AllocateSpace",  # the clone's disk on the storage
    "Datastore.Audit",      # see the storage
    "VM.Config.CPU",        # cores, CPU type
    "VM.Config.Memory",     # memory
    "VM.Config.Disk",       # grow the disk; the template's disk
    "VM.Config.Network",    # net0: bridge and MAC
    "VM.Config.Options",    # name, tags, description, onboot, agent, boot order
    "VM.Config.CDROM",      # the template's Talos ISO drive
    "VM.Config.HWType",     # the template's SCSI controller and OS type
    "VM.PowerMgmt",         # start; stop before a teardown
    "VM.Monitor",           # read the maintenance address through the guest agent (PVE 8's agent privilege)
    "SDN.Use",              # the bridge: checked at clone and at every net0 change (check_bridge_access)
    "Datastore.AllocateTemplate",  # download the Image Factory ISO (storage download-url)
    "Sys.AccessNetwork",    # download-url probes the host network: Sys.AccessNetwork on the node (PVE 8)
    "Sys.Audit",            # read task status and logs on the node, node memory for placement
)

DISK_KEYS = ("scsi0", "virtio0", "sata0", "ide0")
NET_MODELS = ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3")
# The description line that marks a VM as a cluster's own; earlier versions wrote the legacy text.
MARKER_PREFIX = "homelab-flows: cluster="
LEGACY_MARKER = "managed by the provision flow from cluster.yaml"
IMAGE_FACTORY = "https://factory.talos.dev"
# cilium-cli runs `cilium install` from the control plane's host network at bootstrap; pinned, not :latest.
CILIUM_CLI_IMAGE = "quay.io/cilium/cilium-cli:v0.18.5"
_SIZE = re.compile(r"(?:^|,)size=(\d+(?:\.\d+)?)([KMGT]?)(?:,|$)")
_UNIT_BYTES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
GIB = 1024**3
_MAC = re.compile(r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$")


# --- what Proxmox reports --------------------------------------------------------------------


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _flag(value: Any) -> bool | None:
    """PVE booleans come as 0/1, "0"/"1", or as the first field of a property string ("1,fstrim_cloned_disks=1")."""
    if value is None or value == "":
        return None
    head = str(value).split(",")[0].strip()
    key, sep, val = head.partition("=")
    head = val if sep and key == "enabled" else head
    return head in ("1", "true", "True", "on", "yes")


def parse_memory_mib(value: Any) -> int | None:
    """`8192`, "8192" or PVE 8.1's property string "current=8192,..." -> MiB."""
    if value is None:
        return None
    for part in str(value).split(","):
        key, sep, val = part.partition("=")
        if not sep:
            return _int(key)
        if key == "current":
            return _int(val)
    return None


def parse_disk_size(drive: str) -> int | None:
    """Bytes of "local-lvm:vm-201-disk-0,iothread=1,size=64G"; None when the value has no size."""
    m = _SIZE.search(drive)
    if not m:
        return None
    return int(float(m.group(1)) * _UNIT_BYTES[m.group(2)])


def parse_net(value: str) -> tuple[str | None, str | None, str | None]:
    """(model, MAC upper-case, bridge) of "virtio=BC:24:11:00:01:61,bridge=vmbr0,firewall=1"."""
    model = mac = bridge = None
    for part in value.split(","):
        key, sep, val = part.partition("=")
        if key == "bridge":
            bridge = val
        elif key == "macaddr":
            mac = val.upper()
        elif key == "model":
            model = val
        elif sep and _MAC.match(val) and model is None:
            model, mac = key, val.upper()
    return model, mac, bridge


def with_mac_and_bridge(net0: str | None, mac: str, bridge: str) -> str:
    """net0 with only its MAC and bridge replaced: the template's firewall, VLAN tag, mtu, queues, rate and
    link_down stay (PVE's print_net keeps them as given; overwriting net0 whole would drop them)."""
    parts = [p for p in (net0 or "").split(",") if p]
    out: list[str] = []
    have_bridge = False
    model_done = False
    for part in parts:
        key, sep, val = part.partition("=")
        if not model_done and (not sep or _MAC.match(val) or key in NET_MODELS):
            out.append(f"{key}={mac.upper()}")  # "virtio=<mac>" (or "virtio" with no MAC yet)
            model_done = True
        elif key == "model":
            out.append(part)
            model_done = True
        elif key == "macaddr":
            out.append(f"macaddr={mac.upper()}")
        elif key == "bridge":
            out.append(f"bridge={bridge}")
            have_bridge = True
        else:
            out.append(part)
    if not model_done:
        out.insert(0, f"virtio={mac.upper()}")
    if not have_bridge:
        out.insert(1, f"bridge={bridge}")
    return ",".join(out)


def parse_tags(value: Any) -> tuple[str, ...]:
    """PVE keeps tags as "a;b;c" (older clients wrote commas or spaces)."""
    return tuple(t for t in re.split(r"[;,\s]+", str(value or "").strip()) if t)


def parse_boot_order(value: Any) -> tuple[str, ...]:
    """"order=scsi0;ide2;net0" -> ("scsi0", "ide2", "net0"); the legacy "cdn" letters are not a device list."""
    for part in str(value or "").split(","):
        key, sep, val = part.partition("=")
        if sep and key == "order":
            return tuple(x for x in val.split(";") if x)
    return ()


def _fmt_gib(n: int) -> str:
    gib = n / GIB
    return f"{gib:g} GiB"


def install_disk_of(disk_key: str | None) -> str:
    """The Linux device of the VM's boot disk as Talos sees it: virtio-blk is /dev/vda, SCSI and SATA
    (and IDE through libata) are /dev/sda (Talos docs v1.11, Proxmox guide: "install to /dev/sda ...
    Depending on your setup the virtual disk may be mounted differently Eg: /dev/vda")."""
    return "/dev/vda" if (disk_key or "").startswith("virtio") else "/dev/sda"


def owner_marker(cluster: str) -> str:
    """The description line that marks a VM as this cluster's (set at clone, checked before any change)."""
    return f"{MARKER_PREFIX}{cluster}"


@dataclass(frozen=True)
class ObservedVM:
    """One VM as Proxmox reports it (the list entry plus, when read, its config with pending applied)."""

    vmid: int
    name: str
    node: str
    status: str  # running | stopped | paused | unknown
    template: bool = False
    cores: int | None = None
    memory_mib: int | None = None
    disk_key: str | None = None
    disk_volume: str | None = None
    disk_bytes: int | None = None
    mac: str | None = None
    bridge: str | None = None
    tags: tuple[str, ...] = ()
    lock: str | None = None
    pending: tuple[str, ...] = ()  # config keys that take effect at the next restart
    net0: str | None = None
    description: str = ""
    cpu: str | None = None
    onboot: bool | None = None
    agent: bool | None = None
    boot: tuple[str, ...] = ()
    cdrom_keys: tuple[str, ...] = ()
    named: bool = True  # False: the config has no name (a clone still copying its disks, or one that died)

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def disk_gib(self) -> float | None:
        return None if self.disk_bytes is None else self.disk_bytes / GIB

    def owned_by(self, cluster: str) -> bool:
        """Carries this cluster's marker line in its description (or the one earlier versions wrote)."""
        lines = [ln.strip() for ln in self.description.splitlines()]
        return owner_marker(cluster) in lines or f"{cluster}: {LEGACY_MARKER}" in lines

    @property
    def half_cloned(self) -> bool:
        """PVE's clone writes "# qmclone temporary file\\nlock: clone" first and the name only once a disk
        is copied (qemu-server PVE/API2/Qemu.pm clone_vm): locked `clone` without a name."""
        return self.lock == "clone" and not self.named

    @classmethod
    def from_api(cls, listing: Mapping[str, Any], config: Mapping[str, Any] | None, node: str | None = None,
                 pending: Iterable[str] = ()) -> ObservedVM:
        """From a `GET /cluster/resources?type=vm` (or `/nodes/{node}/qemu`) entry and, when read, its config."""
        cfg = dict(config or {})
        node = str(listing.get("node") or node or "")
        vmid = _int(listing.get("vmid"))
        if vmid is None:
            raise ValueError(f"a VM list entry on node {node!r} has no vmid: {dict(listing)!r}")
        raw_name = cfg.get("name") if config is not None else listing.get("name")
        name = str(raw_name or listing.get("name") or f"VM {vmid}")
        template = str(cfg.get("template", listing.get("template", 0))) in ("1", "true", "True")
        cores = _int(cfg.get("cores"))
        if cores is None and not cfg:
            cores = _int(listing.get("cpus") or listing.get("maxcpu"))
        memory = parse_memory_mib(cfg.get("memory"))
        if memory is None and not cfg and _int(listing.get("maxmem")):
            memory = (_int(listing.get("maxmem")) or 0) // (1024 * 1024)
        disk_key = next((k for k in DISK_KEYS if k in cfg and "media=cdrom" not in str(cfg[k])), None)
        disk_volume = disk_bytes = None
        if disk_key is not None:
            drive = str(cfg[disk_key])
            disk_volume = drive.split(",")[0]
            disk_bytes = parse_disk_size(drive)
        elif not cfg and _int(listing.get("maxdisk")):
            disk_bytes = _int(listing.get("maxdisk"))
        mac = bridge = None
        if "net0" in cfg:
            _, mac, bridge = parse_net(str(cfg["net0"]))
        tags = parse_tags(cfg.get("tags", listing.get("tags")))
        lock = cfg.get("lock") or listing.get("lock") or None
        cdroms = tuple(sorted(k for k, v in cfg.items() if re.fullmatch(r"(ide|sata|scsi)\d+", k)
                              and "media=cdrom" in str(v)))
        return cls(vmid=vmid, name=name, node=node, status=str(listing.get("status") or "unknown"),
                   template=template, cores=cores, memory_mib=memory, disk_key=disk_key, disk_volume=disk_volume,
                   disk_bytes=disk_bytes, mac=mac, bridge=bridge, tags=tags, lock=str(lock) if lock else None,
                   pending=tuple(pending), net0=str(cfg["net0"]) if "net0" in cfg else None,
                   description=str(cfg.get("description") or ""), cpu=str(cfg["cpu"]) if cfg.get("cpu") else None,
                   onboot=_flag(cfg.get("onboot")), agent=_flag(cfg.get("agent")),
                   boot=parse_boot_order(cfg.get("boot")), cdrom_keys=cdroms,
                   named=bool(raw_name) if config is not None else bool(listing.get("name")))


def effective_config(pending_list: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """From `GET .../qemu/{vmid}/pending`: the config as the next start will have it, and the pending keys."""
    cfg: dict[str, Any] = {}
    keys: list[str] = []
    for item in pending_list:
        key = str(item.get("key"))
        if item.get("delete"):
            keys.append(key)
            continue
        if "pending" in item:
            cfg[key] = item["pending"]
            keys.append(key)
        elif "value" in item:
            cfg[key] = item["value"]
    return cfg, tuple(keys)


@dataclass(frozen=True)
class PveNode:
    """A Proxmox node of the cluster, from `GET /cluster/resources?type=node`."""

    name: str
    online: bool
    mem: int = 0
    maxmem: int = 0

    @property
    def free_share(self) -> float:
        return (self.maxmem - self.mem) / self.maxmem if self.maxmem else 0.0

    @classmethod
    def from_api(cls, item: Mapping[str, Any]) -> PveNode:
        return cls(str(item.get("node")), item.get("status") == "online", _int(item.get("mem")) or 0,
                   _int(item.get("maxmem")) or 0)


@dataclass(frozen=True)
class ClusterView:
    """What the plan needs beyond the VMs: the nodes, storage facts, the token's privileges, the API host."""

    nodes: tuple[PveNode, ...] = ()
    shared_storages: frozenset[str] = frozenset()
    iso_storages: frozenset[str] = frozenset()  # storages whose content includes iso (on the template's node)
    missing_privileges: tuple[str, ...] = ()  # "SDN.Use on /sdn/zones/localnetwork/vmbr0 (why)"
    api_host: str | None = None  # the Proxmox block's host


# --- the plan ---------------------------------------------------------------------------------


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    OK = "ok"
    UNMANAGED = "unmanaged"
    REFUSED = "refused"
    DELETE = "delete"


@dataclass(frozen=True)
class FieldChange:
    field: str   # cores | memory | disk | bridge | mac | tags | cpu | onboot | agent | boot | power
    current: str
    desired: str

    def __str__(self) -> str:
        return f"{self.field} {self.current} → {self.desired}"


@dataclass(frozen=True)
class VMPlan:
    name: str
    vmid: int
    action: Action
    changes: tuple[FieldChange, ...] = ()
    note: str = ""
    node: str = ""  # the PVE node it is on, or will be created on

    def change(self, name: str) -> FieldChange | None:
        return next((c for c in self.changes if c.field == name), None)


@dataclass(frozen=True)
class TemplatePlan:
    """Make the Talos template: the Image Factory ISO downloaded to iso_storage, a VM with an empty disk and
    that ISO, converted to a template."""

    vmid: int
    name: str
    node: str
    url: str
    iso_storage: str
    iso_file: str

    @property
    def iso_volume(self) -> str:
        return f"{self.iso_storage}:iso/{self.iso_file}"


@dataclass(frozen=True)
class ProvisionPlan:
    cluster: str
    node: str
    vms: tuple[VMPlan, ...]
    refusals: tuple[str, ...] = ()
    template: TemplatePlan | None = None
    notes: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return bool(self.refusals)

    @property
    def to_apply(self) -> tuple[VMPlan, ...]:
        """The VMs apply creates or updates, in cluster.yaml's order (control planes first)."""
        return tuple(v for v in self.vms if v.action in (Action.CREATE, Action.UPDATE))

    @property
    def to_delete(self) -> tuple[VMPlan, ...]:
        return tuple(v for v in self.vms if v.action == Action.DELETE)

    @property
    def converged(self) -> bool:
        return not self.refused and not self.to_apply and not self.to_delete and self.template is None

    def vm(self, name: str) -> VMPlan | None:
        return next((v for v in self.vms if v.name == name), None)


def desired_tags(vm: VM) -> tuple[str, ...]:
    return tuple(sorted(set(vm.tags)))


def desired_net(cfg: ProxmoxCluster, vm: VM, current: str | None = None) -> str:
    return with_mac_and_bridge(current, vm.mac, cfg.proxmox.bridge)


def desired_boot(seen: ObservedVM) -> tuple[str, ...] | None:
    """The boot order with the disk ahead of every CD-ROM, or None when it already is. The Talos ISO carries
    talos.halt_if_installed=1: booted again once Talos is on the disk, it halts (talos v1.11.5
    internal/app/machined/pkg/runtime/v1alpha1/v1alpha1_sequencer.go, phase haltIfInstalled)."""
    if seen.disk_key is None:
        return None
    order = list(seen.boot) or [seen.disk_key, *seen.cdrom_keys]
    if seen.disk_key in order and all(order.index(seen.disk_key) < order.index(c) for c in seen.cdrom_keys
                                      if c in order):
        return None if seen.boot else tuple(order)
    rest = [x for x in order if x != seen.disk_key]
    return (seen.disk_key, *rest)


def _diff(cfg: ProxmoxCluster, want: VM, seen: ObservedVM) -> tuple[list[FieldChange], str | None]:
    """Field changes from what Proxmox has to cluster.yaml, and a refusal when one cannot be made."""
    changes: list[FieldChange] = []
    refusal = None
    if seen.cores != want.cores:
        changes.append(FieldChange("cores", str(seen.cores), str(want.cores)))
    if seen.memory_mib != want.memory:
        changes.append(FieldChange("memory", f"{seen.memory_mib} MiB", f"{want.memory} MiB"))
    want_bytes = want.disk * GIB
    if seen.disk_bytes is None:
        refusal = (f"{want.name} (VM {want.vmid}): Proxmox reports no sized boot disk (scsi0/virtio0) but "
                   f"cluster.yaml asks for {want.disk} GiB; attach the disk in Proxmox or recreate the VM by hand")
    elif seen.disk_bytes < want_bytes:
        changes.append(FieldChange("disk", _fmt_gib(seen.disk_bytes), f"{want.disk} GiB"))
    elif seen.disk_bytes > want_bytes:
        refusal = (f"{want.name} (VM {want.vmid}): cluster.yaml asks for a {want.disk} GiB disk but "
                   f"{seen.disk_key} is {_fmt_gib(seen.disk_bytes)}; Proxmox cannot shrink a disk. Set "
                   f"disk: {seen.disk_bytes // GIB if seen.disk_bytes % GIB == 0 else seen.disk_bytes / GIB:g} "
                   "(or more) in cluster.yaml, or move the data off and recreate the VM by hand")
    if seen.bridge != cfg.proxmox.bridge:
        changes.append(FieldChange("bridge", str(seen.bridge), cfg.proxmox.bridge))
    if seen.mac != want.mac.upper():
        changes.append(FieldChange("mac", str(seen.mac), want.mac.upper()))
    if tuple(sorted(set(seen.tags))) != desired_tags(want):
        changes.append(FieldChange("tags", ";".join(sorted(set(seen.tags))) or "(none)", ";".join(desired_tags(want))))
    if seen.cpu != cfg.proxmox.cpu:
        changes.append(FieldChange("cpu", seen.cpu or "(default kvm64)", cfg.proxmox.cpu))
    if seen.onboot is not True:
        changes.append(FieldChange("onboot", "0", "1"))
    if seen.agent is not True:
        changes.append(FieldChange("agent", "0", "1"))
    boot = desired_boot(seen)
    if boot is not None and seen.boot:
        changes.append(FieldChange("boot", "order=" + ";".join(seen.boot), "order=" + ";".join(boot)))
    if not seen.running:
        changes.append(FieldChange("power", seen.status, "running"))
    return changes, refusal


def _template_refusals(cfg: ProxmoxCluster, tpl: ObservedVM) -> list[str]:
    """What the existing template lacks for a Talos VM, each with the fix."""
    t = cfg.proxmox.template
    out = []
    if tpl.disk_key is None:
        out.append(f"template VM {t.vmid} ({tpl.name}) has no boot disk (scsi0, virtio0 or sata0): Talos installs "
                   f"to it; add one (qm set {t.vmid} --scsi0 {cfg.proxmox.storage}:8) or fix proxmox.template "
                   "in cluster.yaml")
    if not tpl.cdrom_keys:
        out.append(f"template VM {t.vmid} ({tpl.name}) has no CD-ROM with the Talos ISO: a clone's empty disk "
                   f"boots nothing; attach the Image Factory ISO (qm set {t.vmid} --ide2 "
                   f"{cfg.proxmox.iso_storage}:iso/<talos>.iso,media=cdrom), or remove the template and let the "
                   "flow make it")
    return out


def template_plan(cfg: ProxmoxCluster, node: str) -> TemplatePlan:
    """The Image Factory ISO of cluster.yaml's schematic (nocloud: Proxmox's cloud-init drive is read
    as NoCloud, as omni-infra-provider-proxmox uses it) and where it goes."""
    sid = schematic_id(cfg.cluster.schematic)
    version = cfg.cluster.talos_version
    url = f"{IMAGE_FACTORY}/image/{sid}/{version}/nocloud-amd64.iso"
    iso_file = f"talos-{version}-{sid[:12]}-nocloud-amd64.iso"
    t = cfg.proxmox.template
    return TemplatePlan(t.vmid, t.name, node, url, cfg.proxmox.iso_storage, iso_file)


def place_vms(cfg: ProxmoxCluster, observed: Mapping[int, ObservedVM], view: ClusterView,
              template_shared: bool) -> tuple[dict[int, str], list[str], list[str]]:
    """The PVE node of every VM of cluster.yaml: where it is, where cluster.yaml pins it, else spread —
    as omni-infra-provider-proxmox's pickNode does: fewest VMs of the same kind already there, then the
    largest share of free memory. (node by vmid, refusals, notes)."""
    home = cfg.proxmox.node
    online = [n for n in view.nodes if n.online] or [PveNode(home, True)]
    names = {n.name for n in view.nodes}
    refusals: list[str] = []
    notes: list[str] = []
    candidates = online if template_shared else [n for n in online if n.name == home] or [PveNode(home, True)]
    if not template_shared and len(online) > 1 and any(v.node is None for v in cfg.vms):
        notes.append(f"VMs are not spread over the nodes: the template's disk is on storage that is not shared, so "
                     f"clones stay on {home} (PVE refuses \"can't clone VM to node ... (VM uses local storage)\"); "
                     "put the template on shared storage to spread them, or pin node: per VM")
    free = {n.name: n.maxmem - n.mem for n in candidates}
    share = {n.name: n.free_share for n in candidates}
    same_kind: dict[tuple[str, str], int] = {}
    placed: dict[int, str] = {}
    for want in cfg.ordered_vms():
        have = observed.get(want.vmid)
        if have is not None:
            placed[want.vmid] = have.node
            same_kind[(have.node, want.role)] = same_kind.get((have.node, want.role), 0) + 1
            if want.node and want.node != have.node:
                notes.append(f"{want.name} (VM {want.vmid}) runs on {have.node}, cluster.yaml pins {want.node}: "
                             "left where it is; migrate it in Proxmox if you want it moved")
    for want in cfg.ordered_vms():
        if want.vmid in placed:
            continue
        if want.node:
            if view.nodes and want.node not in names:
                refusals.append(f"{want.name}: cluster.yaml pins node {want.node!r}, which this Proxmox cluster does "
                                f"not have (nodes: {', '.join(sorted(names))})")
            elif view.nodes and not any(n.name == want.node and n.online for n in view.nodes):
                refusals.append(f"{want.name}: node {want.node} is offline; bring it back or pin another node")
            elif want.node != home and not template_shared:
                refusals.append(f"{want.name}: cluster.yaml pins node {want.node} but the template {cfg.proxmox.template.vmid} "
                                f"is on {home} with its disk on storage that is not shared, and PVE clones across "
                                "nodes only from shared storage; put the template on shared storage, or pin "
                                f"node: {home}")
            placed[want.vmid] = want.node
            continue
        best = min(candidates, key=lambda n: (same_kind.get((n.name, want.role), 0), -share[n.name], n.name))
        placed[want.vmid] = best.name
        same_kind[(best.name, want.role)] = same_kind.get((best.name, want.role), 0) + 1
        mib = want.memory * 1024 * 1024
        free[best.name] -= mib
        maxmem = next((n.maxmem for n in candidates if n.name == best.name), 0)
        share[best.name] = free[best.name] / maxmem if maxmem else 0.0
    return placed, refusals, notes


def _endpoint_host(endpoint: str) -> str:
    return re.sub(r"^https://", "", endpoint).split("/")[0].rsplit(":", 1)[0].strip("[]").lower()


def plan_provision(cfg: ProxmoxCluster, observed: Iterable[ObservedVM], view: ClusterView | None = None,
                   *, prune: bool = False) -> ProvisionPlan:
    """Per VM of cluster.yaml: create, update (the fields that change), ok or refused; plus the VMs that carry
    this cluster's marker but are not in cluster.yaml (unmanaged: reported; deleted only with `prune`).

    VMs are found cluster-wide (a VM migrated to another PVE node is the same VM); only a VM with this
    cluster's marker line in its description is ever changed."""
    view = view or ClusterView()
    home = cfg.proxmox.node
    seen = list(observed)
    by_id = {v.vmid: v for v in seen}
    by_name: dict[str, list[ObservedVM]] = {}
    for v in seen:
        by_name.setdefault(v.name, []).append(v)
    plans: list[VMPlan] = []
    refusals: list[str] = [f"the API token lacks {m}; grant it to the token's role, then rerun"
                           for m in view.missing_privileges]
    notes: list[str] = []
    cluster = cfg.cluster.name
    wanted_ids = {vm.vmid for vm in cfg.vms}
    tpl_cfg = cfg.proxmox.template
    template_id = tpl_cfg.vmid
    tpl = by_id.get(template_id)
    template: TemplatePlan | None = None

    if view.api_host is not None and _endpoint_host(cfg.proxmox.endpoint) != view.api_host.lower():
        refusals.append(f"cluster.yaml says proxmox.endpoint {cfg.proxmox.endpoint} but the Proxmox block points at "
                        f"{view.api_host}: the plan would act on another Proxmox than the one cluster.yaml describes; "
                        "fix one of the two")

    need_create = any(vm.vmid not in by_id for vm in cfg.vms)
    if tpl is None:
        if need_create:
            template = template_plan(cfg, home)
            if view.iso_storages and cfg.proxmox.iso_storage not in view.iso_storages:
                refusals.append(f"template VM {template_id} ({tpl_cfg.name}) is missing and would be made from the Image "
                                f"Factory ISO, but storage {cfg.proxmox.iso_storage!r} on {home} does not take ISO images "
                                f"(storages that do: {', '.join(sorted(view.iso_storages)) or 'none'}); set "
                                "proxmox.isoStorage in cluster.yaml")
    elif not tpl.template:
        if need_create:
            refusals.append(f"template VM {template_id} ({tpl_cfg.name}) is {tpl.name!r}, which is not a template; "
                            "fix proxmox.template.vmid in cluster.yaml (or convert that VM to a template)")
    elif need_create:
        refusals += _template_refusals(cfg, tpl)
    home = tpl.node if tpl is not None else home
    tpl_storage = (tpl.disk_volume or "").split(":")[0] if tpl is not None else cfg.proxmox.storage
    shared = tpl_storage in view.shared_storages and cfg.proxmox.storage in view.shared_storages
    placed, place_refusals, place_notes = place_vms(cfg.model_copy(update={"proxmox": cfg.proxmox.model_copy(
        update={"node": home})}), by_id, view, shared)
    refusals += place_refusals
    notes += place_notes

    for want in cfg.ordered_vms():
        have = by_id.get(want.vmid)
        node = placed.get(want.vmid, home)
        elsewhere = [v for v in by_name.get(want.name, []) if v.vmid != want.vmid and v.owned_by(cluster)]
        if have is None:
            if elsewhere:
                msg = (f"{want.name}: cluster.yaml says VM {want.vmid} but this cluster's VM of that name exists as VM "
                       f"{elsewhere[0].vmid}; set vmid: {elsewhere[0].vmid} in cluster.yaml or remove that VM by hand")
                refusals.append(msg)
                plans.append(VMPlan(want.name, want.vmid, Action.REFUSED, note=msg, node=node))
                continue
            how = f"clone template {template_id} to {node}" if node != home else f"clone template {template_id}"
            plans.append(VMPlan(want.name, want.vmid, Action.CREATE, note=f"{how}, configure, start", node=node))
            continue
        if have.half_cloned:
            msg = (f"{want.name}: VM {want.vmid} on {have.node} is locked (clone) and has no name: a clone is in "
                   f"progress or failed; wait for it, or `qm unlock {want.vmid}` then `qm destroy {want.vmid}` on "
                   f"{have.node}, then rerun")
            refusals.append(msg)
            plans.append(VMPlan(want.name, want.vmid, Action.REFUSED, note=msg, node=have.node))
            continue
        if have.template or not have.owned_by(cluster):
            kind = "a template" if have.template else f"{have.name!r}, which is not this cluster's"
            msg = (f"{want.name}: VM {want.vmid} on {have.node} is taken by {kind} (its description has no "
                   f"'{owner_marker(cluster)}' line); choose a free vmid in cluster.yaml. Nothing is changed on a VM "
                   "without this cluster's marker; if it is this cluster's, add that line to its description in "
                   "Proxmox and rerun")
            refusals.append(msg)
            plans.append(VMPlan(want.name, want.vmid, Action.REFUSED, note=msg, node=have.node))
            continue
        changes, refusal = _diff(cfg, want, have)
        if have.name != want.name:
            changes.insert(0, FieldChange("name", have.name, want.name))
        if refusal is not None:
            refusals.append(refusal)
            plans.append(VMPlan(want.name, want.vmid, Action.REFUSED, tuple(changes), refusal, node=have.node))
            continue
        note = ""
        if have.lock:
            note = f"locked ({have.lock}); apply waits for the lock to clear"
        restart = [c.field for c in changes if c.field in ("cores", "memory", "bridge", "mac", "cpu", "agent")]
        if have.running and (restart or have.pending):
            note = "; ".join(filter(None, [note, "takes effect at the next restart of the VM (pending in Proxmox)"]))
        plans.append(VMPlan(want.name, want.vmid, Action.UPDATE if changes else Action.OK, tuple(changes), note,
                            node=have.node))

    for v in sorted(seen, key=lambda v: v.vmid):
        if v.vmid in wanted_ids or v.vmid == template_id or v.template or not v.owned_by(cluster):
            continue
        if prune:
            plans.append(VMPlan(v.name, v.vmid, Action.DELETE, note="not in cluster.yaml: "
                                + ("stop, then delete" if v.running else "delete"), node=v.node))
        else:
            plans.append(VMPlan(v.name, v.vmid, Action.UNMANAGED, node=v.node,
                                note="not in cluster.yaml: left alone; rerun with --prune to delete it, or add it "
                                     "to cluster.yaml"))
    return ProvisionPlan(cluster, cfg.proxmox.node, tuple(plans), tuple(refusals), template, tuple(notes))


def plan_destroy(cfg: ProxmoxCluster, observed: Iterable[ObservedVM]) -> ProvisionPlan:
    """Teardown: every VM carrying this cluster's marker is stopped and deleted (the template stays). A VM at
    one of cluster.yaml's vmids without the marker is listed as refused: it is never touched."""
    cluster = cfg.cluster.name
    plans: list[VMPlan] = []
    refusals: list[str] = []
    by_id = {v.vmid: v for v in observed}
    for v in sorted(by_id.values(), key=lambda v: v.vmid):
        if v.template or v.vmid == cfg.proxmox.template.vmid:
            continue
        if v.owned_by(cluster):
            plans.append(VMPlan(v.name, v.vmid, Action.DELETE, node=v.node,
                                note=("stop, then delete" if v.running else "delete") + " with its disks"))
        elif v.vmid in {vm.vmid for vm in cfg.vms}:
            msg = (f"VM {v.vmid} ({v.name}) on {v.node} has cluster.yaml's vmid but not this cluster's marker: "
                   "left alone")
            plans.append(VMPlan(v.name, v.vmid, Action.REFUSED, note=msg, node=v.node))
    return ProvisionPlan(cluster, cfg.proxmox.node, tuple(plans), tuple(refusals))


def render_plan_table(plan: ProvisionPlan) -> list[dict[str, str]]:
    """Rows for a Prefect table artifact: one per VM, the changes spelled out."""
    rows = []
    if plan.template is not None:
        t = plan.template
        rows.append({"vm": t.name, "vmid": str(t.vmid), "action": "create template",
                     "changes": f"download {t.url} to {t.iso_volume}; a VM with an empty disk and that ISO; "
                                "convert to template", "note": f"on node {t.node}"})
    rows += [{"vm": v.name, "vmid": str(v.vmid), "action": v.action.value,
              "changes": "; ".join(str(c) for c in v.changes) or "-", "note": v.note or "-"} for v in plan.vms]
    return rows


def config_updates(cfg: ProxmoxCluster, want: VM, plan: VMPlan, base: ObservedVM | None = None) -> dict[str, str]:
    """The `POST .../config` parameters that bring a VM to cluster.yaml (disk and power are separate calls).

    base: the VM as it is (for a new clone: the template), so net0 keeps every option but MAC and bridge."""
    params: dict[str, str] = {}
    fields = {c.field for c in plan.changes} if plan.action == Action.UPDATE else \
        {"name", "cores", "memory", "bridge", "mac", "tags", "cpu", "onboot", "agent", "boot"}
    if "name" in fields:
        params["name"] = want.name
    if "cores" in fields:
        params["cores"] = str(want.cores)
    if "memory" in fields:
        params["memory"] = str(want.memory)
    if fields & {"bridge", "mac"}:
        params["net0"] = desired_net(cfg, want, base.net0 if base is not None else None)
    if "tags" in fields:
        params["tags"] = ";".join(desired_tags(want))
    if "cpu" in fields:
        params["cpu"] = cfg.proxmox.cpu
    if "onboot" in fields:
        params["onboot"] = "1"
    if "agent" in fields:
        params["agent"] = "1"
    if "boot" in fields and base is not None and (boot := desired_boot(base)) is not None:
        params["boot"] = "order=" + ";".join(boot)
    return params


def template_create_params(cfg: ProxmoxCluster, t: TemplatePlan) -> dict[str, str]:
    """`POST /nodes/{node}/qemu` of the template: an empty disk first in the boot order, the ISO second (a
    clone boots the ISO into maintenance mode once; after the install the disk comes first, so the ISO's
    halt_if_installed never bites), the guest agent on, a CPU with x86-64-v2, as omni-infra-provider-proxmox
    creates its VMs (cpu x86-64-v2-AES, scsihw virtio-scsi-single, agent, onboot)."""
    return {"vmid": str(t.vmid), "name": t.name, "description": "Talos Linux template (Image Factory nocloud ISO, "
            f"schematic {schematic_id(cfg.cluster.schematic)}, {cfg.cluster.talos_version})",
            "ostype": "l26", "cpu": cfg.proxmox.cpu, "cores": "2", "memory": "2048", "scsihw": "virtio-scsi-single",
            "scsi0": f"{cfg.proxmox.storage}:{cfg.proxmox.template_disk}", "ide2": f"{t.iso_volume},media=cdrom",
            "net0": f"virtio,bridge={cfg.proxmox.bridge}", "boot": "order=scsi0;ide2", "agent": "1", "onboot": "0",
            "tags": "talos;template"}


def required_privileges(cfg: ProxmoxCluster, make_template: bool) -> dict[str, list[tuple[str, str]]]:
    """ACL path -> [(privilege, what needs it)] for the calls this plan makes (PVE 8's checks)."""
    px = cfg.proxmox
    vms = [("VM.Audit", "list and read the VMs"), ("VM.Clone", "clone the template"),
           ("VM.Allocate", "create the clones"), ("VM.Config.CPU", "set cores and CPU type"),
           ("VM.Config.Memory", "set memory"), ("VM.Config.Disk", "grow the disk"),
           ("VM.Config.Network", "set net0"), ("VM.Config.Options", "set name, tags, onboot, agent, boot order"),
           ("VM.PowerMgmt", "start the VMs")]
    if px.maintenance_address == "agent":
        vms.append(("VM.Monitor", "read the maintenance address through the QEMU guest agent"))
    if make_template:
        vms += [("VM.Config.CDROM", "attach the Talos ISO to the template"),
                ("VM.Config.HWType", "the template's SCSI controller and OS type")]
    out: dict[str, list[tuple[str, str]]] = {
        "/vms": vms,
        f"/storage/{px.storage}": [("Datastore.AllocateSpace", "the clones' disks")],
        f"/sdn/zones/localnetwork/{px.bridge}": [
            ("SDN.Use", f"use bridge {px.bridge} (PVE 8 checks it at clone and at every net0 change)")],
        f"/nodes/{px.node}": [("Sys.Audit", "read the tasks' status and logs")],
    }
    if make_template:
        out.setdefault(f"/storage/{px.iso_storage}", []).append(
            ("Datastore.AllocateTemplate", "download the Image Factory ISO"))
        out[f"/nodes/{px.node}"].append(("Sys.AccessNetwork", "let Proxmox download the ISO (download-url)"))
    return out


def missing_privileges(required: Mapping[str, list[tuple[str, str]]],
                       held: Mapping[str, Iterable[str]]) -> list[str]:
    """"<privilege> on <path> (needed to <why>)" for each required privilege not held on its path."""
    out = []
    for path, needs in required.items():
        have = set(held.get(path, ()))
        for priv, why in needs:
            if priv == "Sys.AccessNetwork" and {"Sys.Audit", "Sys.Modify"} <= set(held.get("/", ())):
                continue  # download-url's older alternative: Sys.Audit and Sys.Modify on /
            if priv not in have:
                out.append(f"{priv} on {path} (needed to {why})")
    return out


def maintenance_ip(interfaces: Iterable[Mapping[str, Any]], mac: str) -> str | None:
    """The IPv4 address the guest agent reports on the NIC with this MAC (`network-get-interfaces`), skipping
    loopback and link-local addresses; None while it has none."""
    for iface in interfaces:
        if str(iface.get("hardware-address", "")).lower() != mac.lower():
            continue
        for addr in iface.get("ip-addresses") or []:
            ip = str(addr.get("ip-address", ""))
            if addr.get("ip-address-type") == "ipv4" and not ip.startswith(("127.", "169.254.")):
                return ip
    return None


# --- Talos machine configs ------------------------------------------------------------------


def talos_contract(version: str) -> str:
    """talosctl gen config's --talos-version takes the minor: v1.11.5 -> v1.11."""
    v = parse_version(version)
    return f"v{v.major}.{v.minor}"


def gen_config_argv(cfg: ProxmoxCluster, out_dir: str, *, talosctl: str = "talosctl",
                    secrets_file: str | None = None, patches: Iterable[str] = (),
                    control_plane_patches: Iterable[str] = ()) -> list[str]:
    """`talosctl gen config` for the cluster: controlplane.yaml, worker.yaml and talosconfig in out_dir.

    patches are files applied to every machine (`--config-patch @file`), e.g. talos/patches/cluster.yaml;
    control_plane_patches only to control planes (the Cilium install manifest); secrets_file (`talosctl gen
    secrets` format, as talhelper's talsecret) keeps the cluster's identity across regenerations. The install
    disk is set per VM (its patch), from the VM's own disk bus.
    """
    argv = [talosctl, "gen", "config",
            "--kubernetes-version", cfg.cluster.kubernetes_version.removeprefix("v"),
            "--talos-version", talos_contract(cfg.cluster.talos_version),
            "--install-image", cfg.installer(cfg.cluster.talos_version),
            "--output", out_dir, "--output-types", "controlplane,worker,talosconfig", "--force"]
    if secrets_file:
        argv += ["--with-secrets", secrets_file]
    for p in patches:
        argv += ["--config-patch", f"@{p}"]
    for p in control_plane_patches:
        argv += ["--config-patch-control-plane", f"@{p}"]
    # The cluster's name and endpoint come from cluster.yaml (a push can change it): after `--`, cobra
    # reads them as positional arguments whatever they look like, on top of their validation as a DNS
    # label and an https URL (homelab.config).
    return [*argv, "--", cfg.cluster.name, cfg.cluster.endpoint]


def vm_patch(cfg: ProxmoxCluster, vm: VM, install_disk: str = "/dev/sda") -> dict[str, Any]:
    """The per-VM machine-config patch: hostname, static address on the NIC with the VM's MAC, gateway, DNS,
    and the disk to install to."""
    return {"machine": {"network": {
        "hostname": vm.name,
        "interfaces": [{"deviceSelector": {"hardwareAddr": vm.mac.lower()},
                        "addresses": [f"{vm.ip}/{cfg.network.prefix}"],
                        "routes": [{"network": "0.0.0.0/0", "gateway": cfg.network.gateway}],
                        "dhcp": False}],
        "nameservers": list(cfg.network.nameservers),
    }, "install": {"disk": install_disk}}}


def vm_patch_yaml(cfg: ProxmoxCluster, vm: VM, install_disk: str = "/dev/sda") -> str:
    return yaml.safe_dump(vm_patch(cfg, vm, install_disk), sort_keys=False)


def machine_config_file(vm: VM) -> str:
    return "controlplane.yaml" if vm.role == "controlplane" else "worker.yaml"


def apply_config_argv(vm: VM, config_dir: str, patch_file: str, *, talosctl: str = "talosctl",
                      insecure: bool = True, address: str | None = None) -> list[str]:
    """`talosctl apply-config` of one VM: its role's config plus its own patch, to its maintenance API at
    `address` (its DHCP address in maintenance mode; default its final one)."""
    argv = [talosctl, "apply-config", "--nodes", address or vm.ip, "--file", f"{config_dir}/{machine_config_file(vm)}",
            "--config-patch", f"@{patch_file}"]
    if insecure:
        argv.append("--insecure")
    return argv


def parse_service_state(text: str) -> str | None:
    """STATE of `talosctl service <id>` (formatters.RenderServicesInfo: "STATE   Preparing"); None if absent."""
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "STATE" and value.strip():
            return value.strip()
    return None


def cilium_install_patch(helmrelease: Mapping[str, Any], image: str = CILIUM_CLI_IMAGE) -> dict[str, Any]:
    """The control-plane patch that installs Cilium at bootstrap: cluster.inlineManifests with a Job that runs
    `cilium install` on the host network with the HelmRelease's chart version and values (Talos v1.11 docs,
    kubernetes-guides/network/deploying-cilium.md, "Method 5: Using a job"). Helm release `cilium` in
    kube-system, so Flux's HelmRelease of the same name adopts it afterwards."""
    spec = dict(helmrelease.get("spec") or {})
    version = str(((spec.get("chart") or {}).get("spec") or {}).get("version") or "")
    values = yaml.safe_dump(spec.get("values") or {}, sort_keys=True)
    ns, name = "kube-system", "cilium-install"
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
         "data": {"values.yaml": values}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": ns},
         "spec": {"backoffLimit": 10, "template": {"metadata": {"labels": {"app": name}}, "spec": {
             "restartPolicy": "OnFailure", "serviceAccountName": name, "hostNetwork": True,
             "tolerations": [{"operator": "Exists"}],
             "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                 {"matchExpressions": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}]}}},
             "containers": [{
                 "name": name, "image": image,
                 # No CNI yet, so no Service IP: reach the API on this node's host network.
                 "env": [{"name": "KUBERNETES_SERVICE_HOST",
                          "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
                         {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}],
                 "command": ["cilium", "install", "--namespace", ns, "--version", version,
                             "--values", "/values/values.yaml"],
                 "volumeMounts": [{"name": "values", "mountPath": "/values"}]}],
             "volumes": [{"name": "values", "configMap": {"name": name}}]}}}},
    ]
    contents = "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs)
    return {"cluster": {"inlineManifests": [{"name": name, "contents": contents}]}}


# --- client configs fetched from the new cluster ------------------------------------------------


def _named(items: Any) -> list[dict[str, Any]]:
    return [dict(x) for x in (items or []) if isinstance(x, Mapping) and x.get("name")]


def merge_kubeconfig(current: str | None, fetched: str, context: str) -> str:
    """`current` with the fetched kubeconfig's context, cluster and user added (same names replaced).

    The fetched context is renamed `context` (the Homelab block's name for this cluster); every other
    entry of `current`, and its current-context, stay as they were.
    """
    new = yaml.safe_load(fetched) or {}
    cur = (yaml.safe_load(current) if current and current.strip() else None) or {}
    if not isinstance(new, Mapping) or not isinstance(cur, Mapping):
        raise ValueError("a kubeconfig is not a YAML mapping")
    ctxs = _named(new.get("contexts"))
    chosen = next((c for c in ctxs if c["name"] == new.get("current-context")), ctxs[0] if ctxs else None)
    if chosen is None:
        raise ValueError("the fetched kubeconfig has no context")
    inner = dict(chosen.get("context") or {})
    cluster_name, user_name = inner.get("cluster"), inner.get("user")
    clusters = [c for c in _named(new.get("clusters")) if c["name"] == cluster_name]
    users = [u for u in _named(new.get("users")) if u["name"] == user_name]
    if not clusters or not users:
        raise ValueError(f"the fetched kubeconfig's context {chosen['name']!r} names a cluster or user it does not hold")
    out: dict[str, Any] = {"apiVersion": cur.get("apiVersion", "v1"), "kind": cur.get("kind", "Config")}
    out.update({k: v for k, v in cur.items() if k not in ("clusters", "contexts", "users")})
    out["clusters"] = [c for c in _named(cur.get("clusters")) if c["name"] != cluster_name] + clusters
    out["users"] = [u for u in _named(cur.get("users")) if u["name"] != user_name] + users
    out["contexts"] = [c for c in _named(cur.get("contexts")) if c["name"] != context] + \
        [{"name": context, "context": inner}]
    out["current-context"] = cur.get("current-context") or context
    return yaml.safe_dump(out, sort_keys=False)


def merge_talosconfig(current: str | None, generated: str, context: str, endpoints: Iterable[str]) -> str:
    """`current` with the generated talosconfig's context added as `context`, its endpoints the control
    planes (talosctl gen config leaves them unset); every other context stays as it was."""
    new = yaml.safe_load(generated) or {}
    cur = (yaml.safe_load(current) if current and current.strip() else None) or {}
    if not isinstance(new, Mapping) or not isinstance(cur, Mapping):
        raise ValueError("a talosconfig is not a YAML mapping")
    contexts = new.get("contexts") or {}
    entry = contexts.get(new.get("context")) or next(iter(contexts.values()), None)
    if not isinstance(entry, Mapping):
        raise ValueError("the generated talosconfig has no context")
    entry = dict(entry)
    entry["endpoints"] = list(endpoints)
    entry.pop("nodes", None)
    out = dict(cur)
    merged = dict(cur.get("contexts") or {})
    merged[context] = entry
    out["contexts"] = merged
    out["context"] = cur.get("context") or context
    return yaml.safe_dump(out, sort_keys=False)


def talos_plan_rows(cfg: ProxmoxCluster, bootstrapped: bool) -> list[dict[str, str]]:
    """The Talos steps that follow the VMs, as rows of the plan table."""
    first = cfg.control_planes()[0].name
    if bootstrapped:
        return [{"vm": "(talos)", "vmid": "-", "action": "ok",
                 "changes": "-", "note": "bootstrapped; a VM found in maintenance mode gets its machine config "
                                         "and joins; then talosctl health and every Node Ready"}]
    return [{"vm": "(talos)", "vmid": "-", "action": "bootstrap",
             "changes": f"gen config; apply-config to each VM in maintenance mode; bootstrap etcd on {first}; "
                        "fetch the kubeconfig",
             "note": "then talosctl health and every Node Ready"}]
