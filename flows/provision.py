"""Flow `provision`: the Proxmox VM cluster of clusters/<cluster>/cluster.yaml, from nothing (or from a
failed run) to a bootstrapped Talos cluster whose Nodes are Ready; or, asked for by flag, its teardown.

1. Plan: cluster.yaml against what Proxmox reports cluster-wide (`/cluster/resources`), with the token's
   privileges checked (PROXMOX_TOKEN_PRIVILEGES: a missing one is named here, not met as a 403 half-way),
   the Talos template checked (or planned to be made from the Image Factory ISO), each new VM placed on a
   PVE node (pinned, or spread as Omni does), and only VMs that carry this cluster's marker line in their
   description ever changed. A table artifact; plan mode stops here.
2. Approval (a pause form) unless require_approval is off.
3. Apply, under the homelab-disruption lock: the template if missing (download-url, create, convert), then
   VM by VM in cluster.yaml's order: clone, set cores/memory/CPU type/onboot/agent/boot order/tags and
   net0's MAC and bridge only, grow the disk, start. Every task's UPID is recorded (a Prefect Variable)
   before it is awaited (about once a second, backing off) under a deadline; `WARNINGS: N` is success, its
   WARN lines logged; a VM locked by a backup or migration is waited for. A later run settles a recorded
   task instead of repeating the call. A disk shrink is refused at plan time.
4. Talos: `talosctl gen config` with the cluster's identity (the tree's talsecret.sops.yaml, decrypted with
   the block's age key; else the secrets kept in the Prefect Secret block `talos-secrets-<cluster>`), the
   tree's patches, and on control planes the Cilium install manifest (the tree's contract is `cni: none`);
   each VM's maintenance address read through the QEMU guest agent (its DHCP lease), `apply-config
   --insecure` there with its static address and install disk; etcd bootstrapped exactly once (`talosctl
   service etcd` Running anywhere = done; bootstrap retried while FailedPrecondition, AlreadyExists = done);
   the kubeconfig merged into the Kubernetes block; `talosctl health` and every Node Ready.
5. A rerun re-reads everything, so it converges without a second VM or a second bootstrap.
6. Teardown (`destroy`, or `prune` for VMs removed from cluster.yaml): plan, approval, stop then delete,
   every UPID awaited; never without its flag.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import typer
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, SecretStr

from blocks import Homelab, load_homelab
from flows import _runtime
from flows._guard import StepFailed as GateFailed
from flows._guard import checkpoint, disruption_lock
from flows._names import run_name
from homelab import safeyaml
from homelab.config import ProxmoxCluster, load_tree
from homelab.problems import ConfigError, Problem
from homelab.provision import (
    GIB,
    Action,
    ClusterView,
    ObservedVM,
    ProvisionPlan,
    TemplatePlan,
    VMPlan,
    apply_config_argv,
    cilium_install_patch,
    config_updates,
    gen_config_argv,
    install_disk_of,
    maintenance_ip,
    merge_kubeconfig,
    merge_talosconfig,
    missing_privileges,
    owner_marker,
    parse_service_state,
    plan_destroy,
    plan_provision,
    render_plan_table,
    required_privileges,
    talos_plan_rows,
    template_create_params,
    vm_patch_yaml,
)
from tasks import proxmox as px
from tasks import sops
from tasks import talos as tl
from tasks.kube import Kube, KubeError
from tasks.lock import DisruptionLock

FAILED, COMPLETED, PLANNED = "failed", "completed", "planned"
PROBE_SECONDS = 15.0
POLL_SECONDS = 0.5
VM_STEPS = ("clone", "config", "resize", "start", "stop", "delete")
TEMPLATE_STEPS = ("download", "create", "template")
# The Cilium HelmRelease Flux owns after bootstrap: its chart version and values install Cilium at bootstrap.
CILIUM_HELMRELEASE = "infrastructure/core/base/cilium/helmrelease.yaml"


class Deadlines(BaseModel):
    """How long each kind of wait may take before the run stops and says what it saw."""

    proxmox_task_seconds: float = Field(default=300, gt=0, description="One Proxmox task (clone, config, resize, start).")
    talos_api_seconds: float = Field(
        default=600, gt=0, description="A started VM's Talos API to answer (maintenance mode, or installed after apply-config).")
    health_seconds: float = Field(default=900, gt=0, description="`talosctl health` and every Node Ready after bootstrap.")
    approval_seconds: int = Field(default=24 * 3600, gt=0, description="The approval form stays open this long.")
    lock_seconds: float = Field(default=600, gt=0, description="Waiting for the homelab-disruption lock.")
    task_poll_seconds: float = Field(
        default=1.0, gt=0, description="First pause between two polls of a Proxmox task's status (backs off to 5 s).")
    bootstrap_seconds: float = Field(
        default=600, gt=0, description="`talosctl bootstrap` retried while the node answers FailedPrecondition "
                                       "(CRI not up, time not in sync), as terraform-provider-talos does.")


class ProvisionFailed(_runtime.FlowFailed):
    """The run stopped; `result` is the flow's result dict (status failed)."""


class StepFailed(RuntimeError):
    """A step that did not reach its goal; the message names the object, the last state and the next step."""


# --- reading ---------------------------------------------------------------------------------------


def read_cluster(tree_root: Path, cluster: str) -> ProxmoxCluster:
    """cluster.yaml of `cluster`; ConfigError with every problem of that cluster's files."""
    tree = load_tree(tree_root)
    marker = f"/clusters/{cluster}/"
    mine = [p for p in tree.problems if marker in f"/{p.file}" or p.file.endswith(f"/clusters/{cluster}")]
    if mine:
        raise ConfigError(mine)
    c = tree.cluster(cluster)
    if c.proxmox is None:
        raise ConfigError([Problem(f"{tree.shown_root}/clusters/{cluster}", "cluster.yaml",
                                   "missing; provisioning needs the Proxmox cluster's cluster.yaml "
                                   f"(cluster {cluster!r} is described by a talconfig.yaml)")])
    return c.proxmox


def _patch_files(tree_root: Path, cluster: str) -> list[str]:
    d = tree_root / "clusters" / cluster / "talos" / "patches"
    return [str(p) for p in sorted(d.glob("*.yaml"))] if d.is_dir() else []


def _secret_text(value: SecretStr | None, path: str | None) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if path and Path(path).expanduser().is_file():
        return Path(path).expanduser().read_text()
    return None


@contextmanager
def talos_client(block: Homelab, cluster: str) -> Iterator[tl.Talosctl]:
    """talosctl with the block's talosconfig in a private temp file (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="homelab-talos-") as tmp:
        cfg_path: Path | None = None
        text = _secret_text(block.talos.talosconfig, block.talos.talosconfig_path)
        if text is not None:
            cfg_path = Path(tmp) / "talosconfig"
            cfg_path.write_text(text)
            cfg_path.chmod(0o600)
        yield tl.Talosctl(block.talos.talosctl_path, cfg_path, block.talos_context(cluster), block.talos.env)


def etcd_service_state(talos: tl.Talosctl, ip: str) -> str | None:
    """STATE of `talosctl service etcd` on a control plane: "Running" once bootstrapped (or joined),
    "Preparing" while etcd waits for a bootstrap; None when the node does not answer. Not `etcd members`:
    before bootstrap machined's EtcdMemberList only relays the etcd client's dial error (or hangs)."""
    try:
        return parse_service_state(talos.run(["service", "etcd", "--nodes", ip], timeout_s=PROBE_SECONDS))
    except tl.TalosError:
        return None


def etcd_bootstrapped(talos: tl.Talosctl, cp_ip: str, deadline: float | None = None) -> bool | None:
    """True when etcd runs on the control plane, False while it waits for a bootstrap, None when unknown."""
    state = etcd_service_state(talos, cp_ip)
    return None if state is None else state == "Running"


def _disk_key(vm: ObservedVM | None) -> str | None:
    return vm.disk_key if vm is not None else None


def _age_key(block: Homelab) -> str | None:
    key = getattr(block, "sops_age_key", None)
    return key.get_secret_value() if key is not None else None


def proxmox_block(block: Homelab, cluster: str) -> Any:
    if block.proxmox is None:
        raise ConfigError([Problem("Homelab block", "proxmox", f"missing; provisioning {cluster} needs the Proxmox "
                                   "endpoint and an API token (see PROXMOX_TOKEN_PRIVILEGES) in the Homelab block")])
    return block.proxmox


def cluster_view(api: px.ProxmoxApi, cfg: ProxmoxCluster, block: Homelab, observed: list[ObservedVM]) -> ClusterView:
    """Nodes, storage facts and the token's privileges, for placement and the plan's refusals."""
    nodes = tuple(api.nodes())
    storages = api.storages()
    shared = frozenset(str(s["storage"]) for s in storages if str(s.get("shared", 0)) in ("1", "True", "true"))
    iso = frozenset(str(s["storage"]) for s in storages if s.get("node") == cfg.proxmox.node
                    and "iso" in str(s.get("content", "")).split(","))
    make_template = not any(v.vmid == cfg.proxmox.template.vmid for v in observed)
    required = required_privileges(cfg, make_template)
    paths = list(required) + (["/"] if make_template else [])
    held = {path: api.privileges(path) for path in paths}
    host = proxmox_block(block, cfg.cluster.name).host
    return ClusterView(nodes, shared, iso, tuple(missing_privileges(required, held)), host)


def observe_and_plan(block: Homelab, cluster: str, destroy: bool = False,
                     prune: bool = False) -> tuple[ProxmoxCluster, ProvisionPlan, list[ObservedVM], bool]:
    """cluster.yaml, the plan against what Proxmox reports, the observed VMs, and whether etcd is bootstrapped."""
    cfg = read_cluster(block.gitops_tree(), cluster)
    api = px.ProxmoxApi.from_block(proxmox_block(block, cluster))
    observed = api.list_vms()
    if destroy:
        return cfg, plan_destroy(cfg, observed), observed, False
    plan = plan_provision(cfg, observed, cluster_view(api, cfg, block, observed), prune=prune)
    bootstrapped = False
    seen = {v.vmid: v for v in observed}
    running = [cp for cp in cfg.control_planes() if cp.vmid in seen and seen[cp.vmid].running]
    if running:
        with talos_client(block, cluster) as talos:
            bootstrapped = any(etcd_service_state(talos, cp.ip) == "Running" for cp in running)
    return cfg, plan, observed, bootstrapped


observe = task(name="proxmox-observe", task_run_name="observe VMs", cache_policy=NO_CACHE)(observe_and_plan)


def plan_rows(cfg: ProxmoxCluster, plan: ProvisionPlan, bootstrapped: bool) -> list[dict[str, str]]:
    teardown = bool(plan.to_delete) and not any(v.action != Action.DELETE for v in plan.vms if v.action != Action.REFUSED)
    return render_plan_table(plan) + ([] if teardown else talos_plan_rows(cfg, bootstrapped))


def plan_markdown(cfg: ProxmoxCluster, plan: ProvisionPlan, bootstrapped: bool) -> str:
    rows = plan_rows(cfg, plan, bootstrapped)
    lines = [f"### Provision {cfg.cluster.name} on Proxmox node {plan.node}", "",
             "| VM | VMID | action | changes | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['vm']} | {r['vmid']} | {r['action']} | {r['changes']} | {r['note']} |" for r in rows]
    if plan.notes:
        lines += ["", "**Notes:**"] + [f"- {n}" for n in plan.notes]
    if plan.refusals:
        lines += ["", "**Refused:**"] + [f"- {r}" for r in plan.refusals]
    return "\n".join(lines)


def needs_work(plan: ProvisionPlan, bootstrapped: bool, destroy: bool = False) -> bool:
    if destroy:
        return bool(plan.to_delete)
    return bool(plan.to_apply) or bool(plan.to_delete) or plan.template is not None or not bootstrapped


# --- Proxmox steps ------------------------------------------------------------------------------


@task(name="proxmox-step", task_run_name="{step} {vm_name}", cache_policy=NO_CACHE)
def vm_step(api: px.ProxmoxApi, cluster: str, node: str, vm_name: str, vmid: int, step: str,
            start: Callable[[], str | None], timeout_s: float, lock: DisruptionLock) -> None:
    """One Proxmox task of one VM: started (waited out while a backup or migration locks the VM), its UPID
    recorded, awaited, its exit status checked (warnings logged)."""
    logger = get_run_logger()
    what = f"{step} {vm_name} (VM {vmid})"
    deadline = px.deadline_in(timeout_s)

    def started() -> str | None:
        checkpoint(lock, vm_name, what)
        return api.while_locked(what, start, deadline,
                                on_wait=lambda held: logger.info("%s: VM %s is locked (%s); waiting", what, vmid, held))

    status = px.run_recorded(api, px.UpidRecord(), px.record_key(cluster, vmid, step), node, what, started, deadline)
    for line in (status or {}).get("warnings", []):
        logger.warning("%s ended with a warning: %s", what, line)


@task(name="settle-recorded-tasks", task_run_name="re-check recorded Proxmox tasks", cache_policy=NO_CACHE)
def settle(api: px.ProxmoxApi, cfg: ProxmoxCluster, timeout_s: float) -> list[str]:
    """Await the tasks an interrupted run started and never saw end (never repeat their calls)."""
    logger = get_run_logger()
    notes = []
    record = px.UpidRecord()
    keys = [(f"{step} {vm.name} (VM {vm.vmid}, started by an earlier run)", px.record_key(cfg.cluster.name, vm.vmid, step))
            for vm in cfg.vms for step in VM_STEPS]
    keys += [(f"{step} of template {cfg.proxmox.template.vmid} (started by an earlier run)",
              px.record_key(cfg.cluster.name, cfg.proxmox.template.vmid, step)) for step in TEMPLATE_STEPS]
    for what, key in keys:
        outcome = px.settle_recorded(api, record, key, what, px.deadline_in(timeout_s))
        if outcome is not None:
            logger.info("%s ended: %s", what, outcome)
            notes.append(f"{what}: {outcome}")
    return notes


def make_template(api: px.ProxmoxApi, cfg: ProxmoxCluster, t: TemplatePlan, deadlines: Deadlines,
                  lock: DisruptionLock) -> ObservedVM:
    """The Talos template from the Image Factory ISO: download-url (skipped when the ISO is there), a VM with
    an empty disk and the ISO, converted to a template; every UPID awaited. Returns the template as made."""
    cluster, tmo = cfg.cluster.name, deadlines.proxmox_task_seconds
    if t.iso_volume not in api.storage_files(t.node, t.iso_storage):
        vm_step(api, cluster, t.node, t.name, t.vmid, "download",
                lambda: api.download_url(t.node, t.iso_storage, t.url, t.iso_file), tmo, lock)
    vm_step(api, cluster, t.node, t.name, t.vmid, "create", lambda: api.create_vm(t.node, template_create_params(cfg, t)),
            tmo, lock)
    vm_step(api, cluster, t.node, t.name, t.vmid, "template", lambda: api.convert_to_template(t.node, t.vmid), tmo, lock)
    return ObservedVM.from_api({"vmid": t.vmid, "node": t.node, "status": "stopped"}, api.vm_config(t.node, t.vmid),
                               t.node)


def apply_vm(api: px.ProxmoxApi, cfg: ProxmoxCluster, vm_plan: VMPlan, template: ObservedVM | None,
             observed: ObservedVM | None, deadlines: Deadlines, lock: DisruptionLock) -> None:
    want = next(v for v in cfg.vms if v.vmid == vm_plan.vmid)
    cluster, t = cfg.cluster.name, deadlines.proxmox_task_seconds
    node = vm_plan.node or cfg.proxmox.node
    if vm_plan.action == Action.CREATE:
        assert template is not None  # plan_provision refuses or makes the template first
        vm_step(api, cluster, template.node, want.name, want.vmid, "clone",
                lambda: api.clone_template(template.node, template.vmid, want.vmid, want.name,
                                           storage=cfg.proxmox.storage, description=owner_marker(cluster),
                                           target=node),
                t, lock)
        base: ObservedVM = template
        disk_key, disk_bytes, running = template.disk_key or "scsi0", template.disk_bytes or 0, False
    else:
        assert observed is not None
        base = observed
        node = observed.node
        disk_key, disk_bytes, running = observed.disk_key or "scsi0", observed.disk_bytes or 0, observed.running
    params = config_updates(cfg, want, vm_plan, base)
    if params:
        vm_step(api, cluster, node, want.name, want.vmid, "config", lambda: api.set_config(node, want.vmid, params), t,
                lock)
    if disk_bytes < want.disk * GIB:
        vm_step(api, cluster, node, want.name, want.vmid, "resize",
                lambda: api.resize_disk(node, want.vmid, disk_key, want.disk), t, lock)
    if not running:
        vm_step(api, cluster, node, want.name, want.vmid, "start", lambda: api.start_vm(node, want.vmid), t, lock)


def delete_vm(api: px.ProxmoxApi, cfg: ProxmoxCluster, vm_plan: VMPlan, observed: ObservedVM | None,
              deadlines: Deadlines, lock: DisruptionLock) -> None:
    """Stop (when running), then delete with its disks; both UPIDs awaited."""
    cluster, t, node = cfg.cluster.name, deadlines.proxmox_task_seconds, vm_plan.node or cfg.proxmox.node
    if observed is None or not observed.owned_by(cluster):  # re-checked: the plan is only as fresh as its read
        raise StepFailed(f"{vm_plan.name} (VM {vm_plan.vmid}): no longer carries this cluster's marker; not deleted")
    if observed.running:
        vm_step(api, cluster, node, vm_plan.name, vm_plan.vmid, "stop", lambda: api.stop_vm(node, vm_plan.vmid), t, lock)
    vm_step(api, cluster, node, vm_plan.name, vm_plan.vmid, "delete", lambda: api.delete_vm(node, vm_plan.vmid), t, lock)


# --- Talos steps --------------------------------------------------------------------------------


def cluster_secrets(block: Homelab, cfg: ProxmoxCluster, talos: tl.Talosctl, dest: Path) -> str:
    """Write the cluster's secrets bundle to dest; say where it came from. One identity only: the tree's
    talsecret.sops.yaml (what talhelper-made configs carry) when it exists, decrypted with the block's age key,
    refused without that key; else the Prefect Secret block talos-secrets-<cluster>, made once."""
    from prefect.blocks.system import Secret

    tree = block.gitops_tree()
    rel = f"clusters/{cfg.cluster.name}/talos/talsecret.sops.yaml"
    talsecret = tree / rel
    if talsecret.is_file():
        key = _age_key(block)
        if key is None:
            raise StepFailed(f"{rel} holds this cluster's identity (its CAs and tokens), but the Homelab block has no "
                             "sops_age_key to decrypt it; set the block's sops_age_key to the age identity it is "
                             "encrypted to (not making a second identity that configs from the tree would not share)")
        dest.write_text(sops.decrypt(talsecret, key, shown=rel))
        dest.chmod(0o600)
        return rel
    name = f"talos-secrets-{cfg.cluster.name}".lower()
    try:
        dest.write_text(str(cast(Secret, Secret.load(name)).get()))
        origin = f"the Secret block {name}"
    except ValueError:  # no such block yet: this cluster's secrets are made once, then kept
        talos.run(["gen", "secrets", "--output-file", str(dest), "--force"])
        Secret(value=SecretStr(dest.read_text())).save(name, overwrite=False)
        origin = f"new secrets, kept in the Secret block {name} (the tree has no {rel})"
    dest.chmod(0o600)
    return origin


@task(name="talos-gen-config", task_run_name="generate machine configs", cache_policy=NO_CACHE)
def generate_configs(talos: tl.Talosctl, block: Homelab, cfg: ProxmoxCluster, out_dir: Path, patches: list[str]) -> Path:
    """controlplane.yaml, worker.yaml and talosconfig in out_dir, with the cluster's one identity; control
    planes also get the Cilium install manifest when the tree sets `cni: none` and has Cilium's HelmRelease."""
    secrets_file = out_dir / "secrets.yaml"
    origin = cluster_secrets(block, cfg, talos, secrets_file)
    get_run_logger().info("cluster identity of %s: %s", cfg.cluster.name, origin)
    cp_patches = []
    helmrelease = block.gitops_tree() / CILIUM_HELMRELEASE
    if _sets_cni_none(patches) and helmrelease.is_file():
        cilium = out_dir / "cilium-install.patch.yaml"
        cilium.write_text(yaml.safe_dump(cilium_install_patch((_tree_yaml(helmrelease) or [None])[0] or {}),
                                         sort_keys=False))
        cp_patches.append(str(cilium))
    argv = gen_config_argv(cfg, str(out_dir), talosctl=talos.path, secrets_file=str(secrets_file), patches=patches,
                           control_plane_patches=cp_patches)
    talos.run(argv[1:])
    for f in ("controlplane.yaml", "worker.yaml", "talosconfig"):
        if not (out_dir / f).is_file():
            raise StepFailed(f"talosctl gen config for {cfg.cluster.name} succeeded but wrote no {f} in its output "
                             "directory; check the talosctl version (v1.11 expected)")
    return out_dir


def _tree_yaml(path: Path) -> list[Any]:
    """A file of the GitOps tree, through the tree's one YAML loader (size, duplicate keys, aliases)."""
    try:
        return safeyaml.read_all(path)
    except safeyaml.YamlRefused as e:
        raise StepFailed(f"{path}: {e}: fix the file (`homelab validate` lists every problem)") from None


def _sets_cni_none(patches: list[str]) -> bool:
    for path in patches:
        for doc in _tree_yaml(Path(path)):
            cni = (((doc or {}).get("cluster") or {}).get("network") or {}).get("cni") if isinstance(doc, dict) else None
            if isinstance(cni, dict) and cni.get("name") == "none":
                return True
    return False


def _save_homelab(block_name: str, block: Homelab) -> None:
    block.save(block_name, overwrite=True)


@task(name="talos-merge-talosconfig", task_run_name="merge the talosconfig into the Talos block", cache_policy=NO_CACHE)
def merge_talos_block(block_name: str, block: Homelab, cfg: ProxmoxCluster, generated: Path) -> bool:
    current = _secret_text(block.talos.talosconfig, block.talos.talosconfig_path)
    merged = merge_talosconfig(current, generated.read_text(), block.talos_context(cfg.cluster.name),
                               [v.ip for v in cfg.control_planes()])
    if current is not None and yaml.safe_load(current) == yaml.safe_load(merged):
        return False
    block.talos.talosconfig = SecretStr(merged)
    _save_homelab(block_name, block)
    return True


def talos_state(talos: tl.Talosctl, ip: str) -> tuple[str, str]:
    """("installed", stage) when the node answers with the cluster's certificates, ("maintenance", "")
    when only its maintenance API answers, else ("unreachable", talosctl's last error)."""
    try:
        items = tl.parse_machinestatus(talos.run(["get", "machinestatus", "--nodes", ip, "-o", "json"],
                                                 timeout_s=PROBE_SECONDS))
        return "installed", items[0].describe() if items else "no machinestatus"
    except tl.TalosError as e:
        secure_error = e.stderr_tail or str(e)
    try:
        items = tl.parse_machinestatus(talos.run(["get", "machinestatus", "--insecure", "--nodes", ip, "-o", "json"],
                                                 timeout_s=PROBE_SECONDS))
        if items and items[0].stage == "maintenance":
            return "maintenance", ""
        return "unreachable", items[0].describe() if items else secure_error
    except tl.TalosError as e:
        return "unreachable", e.stderr_tail or secure_error


def wait_talos(talos: tl.Talosctl, vm_name: str, ip: str, want: tuple[str, ...], deadline: float, next_step: str) -> str:
    last = ("unreachable", "not asked yet")
    while True:
        last = talos_state(talos, ip)
        if last[0] in want:
            return last[0]
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepFailed(f"{vm_name} ({ip}): waited for its Talos API to answer ({' or '.join(want)}); last seen: "
                             f"{last[0]}{': ' + last[1] if last[1] else ''}; {next_step}")
        time.sleep(min(POLL_SECONDS, left))


def find_maintenance_address(api: px.ProxmoxApi, cfg: ProxmoxCluster, vm_name: str, node: str, vmid: int,
                             deadline: float, poll_s: float) -> str:
    """Where the VM's maintenance API answers. `static`: its final ip. `agent` (default): the IPv4 address the
    QEMU guest agent reports on the NIC with the VM's MAC — the DHCP lease it booted with (the qemu-guest-agent
    extension of the schematic runs in maintenance mode; agent=1 is set on every VM)."""
    vm = next(v for v in cfg.vms if v.name == vm_name)
    if cfg.proxmox.maintenance_address == "static":
        return vm.ip
    last = "not asked yet"
    pause = poll_s
    while True:
        try:
            found = maintenance_ip(api.agent_interfaces(node, vmid), vm.mac)
            if found:
                return found
            last = f"the agent reports no IPv4 address on {vm.mac}"
        except px.ProxmoxApiError as e:
            if "No QEMU guest agent configured" in str(e):
                raise StepFailed(f"{vm_name} (VM {vmid}): Proxmox says no QEMU guest agent is configured; set agent=1 "
                                 "on the VM (the flow sets it on the VMs it configures), then rerun") from None
            if e.status == 403:
                raise
            last = str(e).split(": Proxmox answered ", 1)[-1]
        if time.monotonic() >= deadline:
            raise StepFailed(f"{vm_name} (VM {vmid} on {node}): no maintenance address through the QEMU guest agent "
                             f"within the deadline; last: {last}. Check that the image has the qemu-guest-agent "
                             "extension and that the VM gets a DHCP lease on its bridge; with DHCP reservations or "
                             "ip= kernel arguments for the final addresses, set proxmox.maintenanceAddress: static")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        # The agent answers only once the VM has booted: back off as task polls do (tasks/proxmox.py), so
        # a slow boot costs a few requests, not one per poll interval.
        pause = min(pause * px.POLL_BACKOFF, max(px.POLL_MAX_SECONDS, poll_s))


@task(name="talos-apply-config", task_run_name="apply-config {vm_name}", cache_policy=NO_CACHE)
def apply_machine_config(talos: tl.Talosctl, api: px.ProxmoxApi, cfg: ProxmoxCluster, vm_name: str, node: str,
                         install_disk: str, config_dir: Path, timeout_s: float, poll_s: float,
                         lock: DisruptionLock) -> str:
    """Installed already (a rerun)? Else find its maintenance address and apply its machine config there."""
    vm = next(v for v in cfg.vms if v.name == vm_name)
    deadline = time.monotonic() + timeout_s
    if talos_state(talos, vm.ip)[0] == "installed":
        return "already configured"
    address = find_maintenance_address(api, cfg, vm.name, node, vm.vmid, deadline, poll_s)
    found = wait_talos(talos, vm.name, address, ("installed", "maintenance"), deadline,
                       f"check the VM's console in Proxmox (it should boot the Talos image of template "
                       f"{cfg.proxmox.template.vmid}) and that {address} is its address, then rerun")
    if found == "installed":
        return "already configured"
    patch = config_dir / f"{vm.name}.patch.yaml"
    patch.write_text(vm_patch_yaml(cfg, vm, install_disk))
    argv = apply_config_argv(vm, str(config_dir), str(patch), talosctl=talos.path, insecure=True, address=address)
    checkpoint(lock, vm.name, f"apply-config {vm.name}")
    talos.run(argv[1:], timeout_s=120, abort=lock.abort)
    return f"applied at its maintenance address {address} (install disk {install_disk})"


@task(name="talos-wait-installed", task_run_name="wait installed {vm_name}", cache_policy=NO_CACHE)
def wait_installed(talos: tl.Talosctl, cfg: ProxmoxCluster, vm_name: str, timeout_s: float) -> None:
    vm = next(v for v in cfg.vms if v.name == vm_name)
    wait_talos(talos, vm.name, vm.ip, ("installed",), time.monotonic() + timeout_s,
               "Talos is installing to disk and rebooting; look at the VM's console in Proxmox (a VM back in "
               "maintenance mode did not find its install disk), then rerun")


_RETRY_BOOTSTRAP = ("bootstrap is not available yet", "time is not in sync yet")


@task(name="talos-bootstrap", task_run_name="bootstrap etcd", cache_policy=NO_CACHE)
def bootstrap_once(talos: tl.Talosctl, cfg: ProxmoxCluster, lock: DisruptionLock, timeout_s: float = 600) -> bool:
    """Bootstrap etcd on the first control plane unless etcd already runs on a control plane. True when this
    call bootstrapped. As siderolabs/terraform-provider-talos talos_machine_bootstrap_resource.go Create does,
    bootstrap is retried until the deadline while machined answers FailedPrecondition ("bootstrap is not
    available yet": CRI not up; "time is not in sync yet") or is unreachable; AlreadyExists ("etcd data
    directory is not empty") means it was done."""
    cp = cfg.control_planes()[0]
    if any(etcd_service_state(talos, c.ip) == "Running" for c in cfg.control_planes()):
        return False
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        checkpoint(lock, cp.name, f"bootstrapping etcd on {cp.name}")
        try:
            talos.bootstrap(cp.ip, deadline=deadline)
            return True
        except tl.TalosUnavailable as e:
            last = str(e)
        except tl.TalosCommandError as e:
            if "AlreadyExists" in str(e):
                return False
            if not any(t in str(e) for t in _RETRY_BOOTSTRAP):
                raise
            last = str(e)
        if time.monotonic() >= deadline:
            raise StepFailed(f"{cp.name} ({cp.ip}): talosctl bootstrap did not succeed within {timeout_s:g} s; last "
                             f"answer: {last}; check the node (talosctl -n {cp.ip} service cri; time sync), then rerun")
        time.sleep(POLL_SECONDS)


@task(name="kube-fetch-kubeconfig", task_run_name="fetch the kubeconfig", cache_policy=NO_CACHE)
def fetch_kubeconfig(talos: tl.Talosctl, block_name: str, block: Homelab, cfg: ProxmoxCluster, workdir: Path,
                     timeout_s: float) -> str:
    """The cluster's admin kubeconfig, merged into the Kubernetes block; returns the merged text."""
    cp = cfg.control_planes()[0]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            path = talos.kubeconfig(workdir / "kubeconfig", cp.ip, deadline=deadline)
            break
        except tl.TalosError as e:
            if time.monotonic() >= deadline or not (e.retryable or "NotFound" in str(e)):
                raise StepFailed(f"{cp.name} ({cp.ip}): talosctl kubeconfig failed: {e}; check the control plane "
                                 "(talosctl health), then rerun") from None
            time.sleep(POLL_SECONDS)
    kube = block.kubernetes
    current = _secret_text(kube.kubeconfig, kube.kubeconfig_path)
    merged = merge_kubeconfig(current, path.read_text(), block.kube_context(cfg.cluster.name))
    if current is None or yaml.safe_load(current) != yaml.safe_load(merged):
        kube.kubeconfig = SecretStr(merged)
        _save_homelab(block_name, block)
    return merged


@task(name="talos-health", task_run_name="talosctl health", cache_policy=NO_CACHE)
def talos_health(talos: tl.Talosctl, cfg: ProxmoxCluster, kubeconfig_text: str, context: str, timeout_s: float) -> None:
    cps = [v.ip for v in cfg.control_planes()]
    workers = [v.ip for v in cfg.vms if v.role == "worker"]
    try:
        talos.health(cps, workers, wait_timeout_s=timeout_s, deadline=time.monotonic() + timeout_s)
    except tl.TalosError as e:
        raise StepFailed(f"talosctl health did not pass within {timeout_s:g} s ({e}); Nodes as last seen: "
                         f"{node_states(kubeconfig_text, context)}; check the nodes that are not Ready "
                         "(talosctl -n <ip> dmesg, kubectl describe node), then rerun") from None


def node_states(kubeconfig_text: str, context: str) -> str:
    """"name: state" of every Node, for an error message (what the API says, or why it could not be read)."""
    with tempfile.NamedTemporaryFile("w", prefix="homelab-kubeconfig-", suffix=".yaml") as f:
        f.write(kubeconfig_text)
        f.flush()
        try:
            with Kube.from_kubeconfig(f.name, context) as kube:
                nodes = kube.nodes(timeout_s=PROBE_SECONDS)
        except KubeError as e:
            return f"unknown (the Kubernetes API did not answer: {e})"
    return "; ".join(f"{n.name}: {n.describe()}" for n in sorted(nodes, key=lambda n: n.name)) or "none registered"


@task(name="kube-wait-nodes-ready", task_run_name="wait every Node Ready", cache_policy=NO_CACHE)
def wait_nodes_ready(kubeconfig_text: str, context: str, cfg: ProxmoxCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with tempfile.NamedTemporaryFile("w", prefix="homelab-kubeconfig-", suffix=".yaml") as f:
        f.write(kubeconfig_text)
        f.flush()
        with Kube.from_kubeconfig(f.name, context) as kube:
            for vm in cfg.ordered_vms():
                def ready(node: Any) -> bool:
                    return bool(node.ready)
                ready.__doc__ = "Ready"
                kube.wait_node(vm.name, ready, deadline, tolerate_unavailable=True,
                               next_step=f"check the node (talosctl -n {vm.ip} dmesg; kubectl describe node "
                                         f"{vm.name}), then rerun")


# --- the flow -------------------------------------------------------------------------------------


def _vms(plan: ProvisionPlan | None) -> list[dict[str, Any]]:
    return [{"name": v.name, "vmid": v.vmid, "action": v.action.value} for v in (plan.vms if plan else ())]


def _result(status: str, plan: ProvisionPlan | None, bootstrapped: bool, error: str | None) -> dict[str, Any]:
    return {"status": status, "vms": _vms(plan), "bootstrapped": bootstrapped, "error": error}


@flow(name="provision", flow_run_name=run_name("provision"), validate_parameters=True)
def provision(
    homelab: str = "default",
    cluster: str = "homelab",
    plan_only: bool = False,
    require_approval: bool = True,
    deadlines: Deadlines = Deadlines(),  # noqa: B008 - a frozen default the schema shows
    destroy: bool = False,
    prune: bool = False,
) -> dict[str, Any]:
    """Provision the Proxmox VM cluster from cluster.yaml: plan, approve, apply, bootstrap; safe to rerun.

    Args:
        homelab: The Homelab block to act on.
        cluster: The Proxmox cluster of the GitOps tree (clusters/<cluster>/cluster.yaml).
        plan_only: Show the plan (a table artifact) and stop; nothing is changed.
        require_approval: Pause for approval of the plan before changing anything.
        deadlines: How long each kind of wait may take.
        destroy: Tear the cluster down instead: stop and delete every VM carrying its marker (never the template).
        prune: Also stop and delete this cluster's VMs that cluster.yaml no longer lists.
    """
    logger = get_run_logger()
    block = load_homelab(homelab)
    cfg = read_cluster(block.gitops_tree(), cluster)
    api = px.ProxmoxApi.from_block(proxmox_block(block, cluster))
    api.poll_seconds = deadlines.task_poll_seconds
    plan: ProvisionPlan | None = None
    bootstrapped = False
    step = "observe the VMs"
    try:
        if not plan_only:
            step = "re-check the Proxmox tasks of an earlier run"
            settle(api, cfg, deadlines.proxmox_task_seconds)
        step = "observe the VMs"
        cfg, plan, observed, bootstrapped = observe(block, cluster, destroy, prune)
        create_table_artifact(key=f"provision-plan-{cluster}".lower(), table=plan_rows(cfg, plan, bootstrapped),
                              description=f"Provision plan of {cluster} on Proxmox node {plan.node}")
        for note in plan.notes:
            logger.info("plan: %s", note)
        if plan.refused:
            raise StepFailed("the plan is refused: " + "; ".join(plan.refusals))
        if plan_only:
            return _result(PLANNED, plan, bootstrapped, None)
        if require_approval and needs_work(plan, bootstrapped, destroy):
            from flows.approval import request_approval

            step = "approval"
            answer = request_approval(plan_markdown(cfg, plan, bootstrapped), timeout_s=deadlines.approval_seconds)
            if not answer.approved:
                result = _result(FAILED, plan, bootstrapped, "rejected")
                raise ProvisionFailed(f"provision {cluster}: the plan was rejected"
                                      + (f" ({answer.comment})" if answer.comment else ""), result)
        step = "the homelab-disruption lock"
        with disruption_lock(deadlines.lock_seconds, logger) as lock:
            seen = {v.vmid: v for v in observed}
            for vm_plan in plan.to_delete:
                step = f"delete {vm_plan.name}"
                delete_vm(api, cfg, vm_plan, seen.get(vm_plan.vmid), deadlines, lock)
            if destroy:
                result = _result(COMPLETED, plan, False, None)
                _report(cluster, result)
                return result
            template = seen.get(cfg.proxmox.template.vmid)
            if plan.template is not None:
                step = f"make the Talos template {plan.template.vmid}"
                template = make_template(api, cfg, plan.template, deadlines, lock)
            for vm_plan in plan.to_apply:
                step = f"{vm_plan.action.value} {vm_plan.name}"
                apply_vm(api, cfg, vm_plan, template, seen.get(vm_plan.vmid), deadlines, lock)
            nodes = {v.vmid: v.node for v in plan.vms}
            disks = {vm.vmid: install_disk_of(_disk_key(seen.get(vm.vmid) or template)) for vm in cfg.vms}
            with tempfile.TemporaryDirectory(prefix="homelab-provision-") as tmp:
                work = Path(tmp)
                with talos_client(block, cluster) as talos:
                    step = "generate machine configs"
                    generate_configs(talos, block, cfg, work, _patch_files(block.gitops_tree(), cluster))
                    step = "merge the talosconfig into the Talos block"
                    merge_talos_block(homelab, block, cfg, work / "talosconfig")
                with talos_client(block, cluster) as talos:
                    for vm in cfg.ordered_vms():
                        step = f"apply-config {vm.name}"
                        logger.info("%s: %s", vm.name, apply_machine_config(
                            talos, api, cfg, vm.name, nodes.get(vm.vmid, cfg.proxmox.node), disks[vm.vmid], work,
                            deadlines.talos_api_seconds, deadlines.task_poll_seconds, lock))
                    for vm in cfg.ordered_vms():
                        step = f"wait for {vm.name} to be installed"
                        wait_installed(talos, cfg, vm.name, deadlines.talos_api_seconds)
                    step = "bootstrap etcd"
                    if bootstrap_once(talos, cfg, lock, deadlines.bootstrap_seconds):
                        logger.info("etcd bootstrapped on %s", cfg.control_planes()[0].name)
                    bootstrapped = True
                    step = "fetch the kubeconfig"
                    kubeconfig = fetch_kubeconfig(talos, homelab, block, cfg, work, deadlines.health_seconds)
                    step = "talosctl health"
                    talos_health(talos, cfg, kubeconfig, block.kube_context(cluster), deadlines.health_seconds)
                step = "wait every Node Ready"
                wait_nodes_ready(kubeconfig, block.kube_context(cluster), cfg, deadlines.health_seconds)
    except (px.ProxmoxError, tl.TalosError, KubeError, StepFailed, GateFailed, sops.SopsError) as e:
        text = str(e)
        if "rerun" not in text:
            text += ("; fix that, then rerun provision: it re-reads Proxmox and Talos and goes on from there "
                     "(no second VM, no second bootstrap)")
        result = _result(getattr(e, "status", FAILED), plan, bootstrapped, f"{step}: {text}")
        _report(cluster, result)
        raise ProvisionFailed(f"provision {cluster} stopped at `{step}`: {text}", result) from None
    result = _result(COMPLETED, plan, bootstrapped, None)
    _report(cluster, result)
    return result


def _report(cluster: str, result: dict[str, Any]) -> None:
    lines = [f"### provision {cluster}: {result['status']}", "",
             f"bootstrapped: {result['bootstrapped']}", ""]
    lines += [f"- {v['name']} (VM {v['vmid']}): {v['action']}" for v in result["vms"]]
    if result["error"]:
        lines += ["", f"**Error:** {result['error']}"]
    create_markdown_artifact("\n".join(lines), key=f"provision-result-{cluster}".lower(),
                             description=f"Result of provision {cluster}")


# --- command line ---------------------------------------------------------------------------------


def _failed_result(error: str) -> dict[str, Any]:
    return _result(FAILED, None, False, error)


def summary(result: dict[str, Any]) -> str:
    lines = [f"provision: {result['status']}"]
    lines += [f"  {v['name']:<24} VM {v['vmid']:<6} {v['action']}" for v in result.get("vms", [])]
    lines.append(f"  bootstrapped: {'yes' if result.get('bootstrapped') else 'no'}")
    if result.get("error"):
        lines.append(f"  error: {result['error']}")
    return "\n".join(lines)


def cli(homelab: str, cluster: str, plan: bool, yes: bool, twin: bool, twin_state: str, fault: list[str],
        as_json: bool, destroy: bool = False, prune: bool = False) -> None:
    """`homelab provision`: exit 0 completed or planned, 1 failed, 2 bad usage or configuration."""
    if plan and yes:
        typer.echo("homelab provision: --plan and --yes exclude each other (--plan changes nothing, "
                   "--yes applies without asking)", err=True)
        raise typer.Exit(2)
    if destroy and prune:
        typer.echo("homelab provision: --destroy deletes every VM of the cluster; --prune only those cluster.yaml no "
                   "longer lists: give one", err=True)
        raise typer.Exit(2)
    _runtime.quiet_prefect()
    with _runtime.target(homelab, twin, twin_state, fault) as block_name:
        try:
            load_homelab(block_name)
        except ValueError:
            typer.echo(f"homelab provision: no Homelab block named {block_name!r} on this Prefect server; "
                       "create it (prefect block register -m blocks, then save one) or use --twin", err=True)
            raise typer.Exit(2) from None
        require_approval = not yes
        if not plan and not yes and not _runtime.prefect_server_configured():
            # No server to hold an approval form: ask here, after showing the plan.
            shown: dict[str, Any] = {}

            def ask_plan() -> None:
                block = load_homelab(block_name)
                cfg, p, _, booted = observe_and_plan(block, cluster, destroy, prune)
                shown.update(cfg=cfg, plan=p, bootstrapped=booted)

            _runtime.config_errors_exit_2(ask_plan)
            typer.echo(plan_markdown(shown["cfg"], shown["plan"], shown["bootstrapped"]))
            if needs_work(shown["plan"], shown["bootstrapped"], destroy) and \
                    not typer.confirm("Apply this plan?", default=False):
                _runtime.finish(_result(FAILED, shown["plan"], shown["bootstrapped"], "rejected"), as_json, summary,
                                ok=(COMPLETED, PLANNED))
            require_approval = False
        outcome: dict[str, Any] = {}

        def run() -> None:
            state = provision(homelab=block_name, cluster=cluster, plan_only=plan, require_approval=require_approval,
                              destroy=destroy, prune=prune, return_state=True)
            outcome.update(_runtime.result_of(state, _failed_result))

        _runtime.config_errors_exit_2(run)
    _runtime.finish(outcome, as_json, summary, ok=(COMPLETED, PLANNED))
