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
from homelab.versions import parse_version

# The privileges the provision flow's API token needs, on path `/` (Proxmox: Datacenter → Permissions →
# API Tokens, privilege separation on, a role holding exactly these).
PROXMOX_TOKEN_PRIVILEGES: tuple[str, ...] = (
    "VM.Audit",             # list VMs, read their config and pending changes
    "VM.Clone",             # clone the Talos template
    "VM.Allocate",          # create the clone's VMID
    "Datastore.AllocateSpace",  # the clone's disk on the storage
    "Datastore.Audit",      # see the storage
    "VM.Config.CPU",        # cores
    "VM.Config.Memory",     # memory
    "VM.Config.Disk",       # grow the disk
    "VM.Config.Network",    # net0: bridge and MAC
    "VM.Config.Options",    # name, tags
    "VM.PowerMgmt",         # start the VM
    "Sys.Audit",            # read task status and logs on the node
)

DISK_KEYS = ("scsi0", "virtio0", "sata0", "ide0")
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


def parse_tags(value: Any) -> tuple[str, ...]:
    """PVE keeps tags as "a;b;c" (older clients wrote commas or spaces)."""
    return tuple(t for t in re.split(r"[;,\s]+", str(value or "").strip()) if t)


def _fmt_gib(n: int) -> str:
    gib = n / GIB
    return f"{gib:g} GiB"


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

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def disk_gib(self) -> float | None:
        return None if self.disk_bytes is None else self.disk_bytes / GIB

    @classmethod
    def from_api(cls, listing: Mapping[str, Any], config: Mapping[str, Any] | None, node: str,
                 pending: Iterable[str] = ()) -> ObservedVM:
        """From a `GET /nodes/{node}/qemu` entry and, when read, `GET .../qemu/{vmid}/config`."""
        cfg = dict(config or {})
        vmid = _int(listing.get("vmid"))
        if vmid is None:
            raise ValueError(f"a VM list entry on node {node!r} has no vmid: {dict(listing)!r}")
        name = str(cfg.get("name") or listing.get("name") or f"VM {vmid}")
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
        return cls(vmid=vmid, name=name, node=node, status=str(listing.get("status") or "unknown"),
                   template=template, cores=cores, memory_mib=memory, disk_key=disk_key, disk_volume=disk_volume,
                   disk_bytes=disk_bytes, mac=mac, bridge=bridge, tags=tags, lock=str(lock) if lock else None,
                   pending=tuple(pending))


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


# --- the plan ---------------------------------------------------------------------------------


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    OK = "ok"
    UNMANAGED = "unmanaged"
    REFUSED = "refused"


@dataclass(frozen=True)
class FieldChange:
    field: str   # cores | memory | disk | bridge | mac | tags | power
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

    def change(self, name: str) -> FieldChange | None:
        return next((c for c in self.changes if c.field == name), None)


@dataclass(frozen=True)
class ProvisionPlan:
    cluster: str
    node: str
    vms: tuple[VMPlan, ...]
    refusals: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return bool(self.refusals)

    @property
    def to_apply(self) -> tuple[VMPlan, ...]:
        """The VMs apply acts on, in cluster.yaml's order (control planes first)."""
        return tuple(v for v in self.vms if v.action in (Action.CREATE, Action.UPDATE))

    @property
    def converged(self) -> bool:
        return not self.refused and not self.to_apply

    def vm(self, name: str) -> VMPlan | None:
        return next((v for v in self.vms if v.name == name), None)


def desired_tags(vm: VM) -> tuple[str, ...]:
    return tuple(sorted(set(vm.tags)))


def desired_net(cfg: ProxmoxCluster, vm: VM) -> str:
    return f"virtio={vm.mac.upper()},bridge={cfg.proxmox.bridge}"


def _is_ours(cfg: ProxmoxCluster, vm: ObservedVM) -> bool:
    """Tagged with the cluster's name or named with its prefix: a VM of this cluster, listed or not."""
    return cfg.cluster.name in vm.tags or vm.name.startswith(f"{cfg.cluster.name}-")


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
    if not seen.running:
        changes.append(FieldChange("power", seen.status, "running"))
    return changes, refusal


def plan_provision(cfg: ProxmoxCluster, observed: Iterable[ObservedVM]) -> ProvisionPlan:
    """Per VM of cluster.yaml: create, update (the fields that change), ok or refused; plus the VMs on the
    node that look like this cluster's but are not in cluster.yaml (unmanaged: reported, never deleted)."""
    node = cfg.proxmox.node
    seen = [v for v in observed if v.node == node]
    by_id = {v.vmid: v for v in seen}
    by_name: dict[str, list[ObservedVM]] = {}
    for v in seen:
        by_name.setdefault(v.name, []).append(v)
    plans: list[VMPlan] = []
    refusals: list[str] = []
    wanted_ids = {vm.vmid for vm in cfg.vms}
    template_id = cfg.proxmox.template.vmid

    if template_id not in by_id or not by_id[template_id].template:
        what = ("is missing" if template_id not in by_id
                else f"is {by_id[template_id].name!r}, which is not a template")
        if any(vm.vmid not in by_id for vm in cfg.vms):
            refusals.append(f"template VM {template_id} ({cfg.proxmox.template.name}) on node {node} {what}; "
                            "create the Talos template (or fix proxmox.template.vmid in cluster.yaml) before provisioning")

    for want in cfg.ordered_vms():
        have = by_id.get(want.vmid)
        elsewhere = [v for v in by_name.get(want.name, []) if v.vmid != want.vmid]
        if have is None:
            if elsewhere:
                msg = (f"{want.name}: cluster.yaml says VM {want.vmid} but a VM of that name exists as VM "
                       f"{elsewhere[0].vmid}; set vmid: {elsewhere[0].vmid} in cluster.yaml or remove that VM by hand")
                refusals.append(msg)
                plans.append(VMPlan(want.name, want.vmid, Action.REFUSED, note=msg))
                continue
            plans.append(VMPlan(want.name, want.vmid, Action.CREATE,
                                note=f"clone template {template_id}, configure, start"))
            continue
        if have.template or (have.name != want.name and not _is_ours(cfg, have)):
            kind = "a template" if have.template else f"{have.name!r}, not this cluster's"
            msg = (f"{want.name}: VM {want.vmid} is taken by {kind}; choose a free vmid in cluster.yaml "
                   "(nothing is changed on a VM this flow did not create)")
            refusals.append(msg)
            plans.append(VMPlan(want.name, want.vmid, Action.REFUSED, note=msg))
            continue
        changes, refusal = _diff(cfg, want, have)
        if have.name != want.name:
            changes.insert(0, FieldChange("name", have.name, want.name))
        if refusal is not None:
            refusals.append(refusal)
            plans.append(VMPlan(want.name, want.vmid, Action.REFUSED, tuple(changes), refusal))
            continue
        note = ""
        if have.lock:
            note = f"locked ({have.lock}); apply waits for the lock to clear"
        restart = [c.field for c in changes if c.field in ("cores", "memory", "bridge", "mac")]
        if have.running and (restart or have.pending):
            note = "; ".join(filter(None, [note, "takes effect at the next restart of the VM (pending in Proxmox)"]))
        plans.append(VMPlan(want.name, want.vmid, Action.UPDATE if changes else Action.OK, tuple(changes), note))

    for v in sorted(seen, key=lambda v: v.vmid):
        if v.vmid in wanted_ids or v.vmid == template_id or v.template or not _is_ours(cfg, v):
            continue
        plans.append(VMPlan(v.name, v.vmid, Action.UNMANAGED,
                            note="not in cluster.yaml: left alone; add it to cluster.yaml or remove it by hand"))
    return ProvisionPlan(cfg.cluster.name, node, tuple(plans), tuple(refusals))


def render_plan_table(plan: ProvisionPlan) -> list[dict[str, str]]:
    """Rows for a Prefect table artifact: one per VM, the changes spelled out."""
    return [{"vm": v.name, "vmid": str(v.vmid), "action": v.action.value,
             "changes": "; ".join(str(c) for c in v.changes) or "-", "note": v.note or "-"} for v in plan.vms]


def config_updates(cfg: ProxmoxCluster, want: VM, plan: VMPlan) -> dict[str, str]:
    """The `POST .../config` parameters that bring a VM to cluster.yaml (disk and power are separate calls)."""
    params: dict[str, str] = {}
    fields = {c.field for c in plan.changes} if plan.action == Action.UPDATE else \
        {"name", "cores", "memory", "bridge", "mac", "tags"}
    if "name" in fields:
        params["name"] = want.name
    if "cores" in fields:
        params["cores"] = str(want.cores)
    if "memory" in fields:
        params["memory"] = str(want.memory)
    if fields & {"bridge", "mac"}:
        params["net0"] = desired_net(cfg, want)
    if "tags" in fields:
        params["tags"] = ";".join(desired_tags(want))
    return params


# --- Talos machine configs ------------------------------------------------------------------


def talos_contract(version: str) -> str:
    """talosctl gen config's --talos-version takes the minor: v1.11.5 -> v1.11."""
    v = parse_version(version)
    return f"v{v.major}.{v.minor}"


def gen_config_argv(cfg: ProxmoxCluster, out_dir: str, *, talosctl: str = "talosctl",
                    secrets_file: str | None = None, patches: Iterable[str] = ()) -> list[str]:
    """`talosctl gen config` for the cluster: controlplane.yaml, worker.yaml and talosconfig in out_dir.

    patches are files applied to every machine (`--config-patch @file`), e.g. talos/patches/cluster.yaml;
    secrets_file (`talosctl gen secrets`) keeps the cluster's identity across regenerations.
    """
    argv = [talosctl, "gen", "config", cfg.cluster.name, cfg.cluster.endpoint,
            "--kubernetes-version", cfg.cluster.kubernetes_version.removeprefix("v"),
            "--talos-version", talos_contract(cfg.cluster.talos_version),
            "--install-image", cfg.installer(cfg.cluster.talos_version),
            "--install-disk", "/dev/sda",
            "--output", out_dir, "--output-types", "controlplane,worker,talosconfig", "--force"]
    if secrets_file:
        argv += ["--with-secrets", secrets_file]
    for p in patches:
        argv += ["--config-patch", f"@{p}"]
    return argv


def vm_patch(cfg: ProxmoxCluster, vm: VM) -> dict[str, Any]:
    """The per-VM machine-config patch: hostname, static address on the NIC with the VM's MAC, gateway, DNS."""
    return {"machine": {"network": {
        "hostname": vm.name,
        "interfaces": [{"deviceSelector": {"hardwareAddr": vm.mac.lower()},
                        "addresses": [f"{vm.ip}/{cfg.network.prefix}"],
                        "routes": [{"network": "0.0.0.0/0", "gateway": cfg.network.gateway}],
                        "dhcp": False}],
        "nameservers": list(cfg.network.nameservers),
    }}}


def vm_patch_yaml(cfg: ProxmoxCluster, vm: VM) -> str:
    return yaml.safe_dump(vm_patch(cfg, vm), sort_keys=False)


def machine_config_file(vm: VM) -> str:
    return "controlplane.yaml" if vm.role == "controlplane" else "worker.yaml"


def apply_config_argv(vm: VM, config_dir: str, patch_file: str, *, talosctl: str = "talosctl",
                      insecure: bool = True) -> list[str]:
    """`talosctl apply-config` of one VM: its role's config plus its own patch, to its maintenance API."""
    argv = [talosctl, "apply-config", "--nodes", vm.ip, "--file", f"{config_dir}/{machine_config_file(vm)}",
            "--config-patch", f"@{patch_file}"]
    if insecure:
        argv.append("--insecure")
    return argv


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
