"""Flow `provision`: the Proxmox VM cluster of clusters/<cluster>/cluster.yaml, from nothing (or from a
failed run) to a bootstrapped Talos cluster whose Nodes are Ready.

1. Plan: cluster.yaml against what Proxmox reports (a table artifact); plan mode stops here.
2. Approval (a pause form) unless require_approval is off.
3. Apply, VM by VM in cluster.yaml's order: clone the Talos template, set cores/memory/net0/tags, grow
   the disk, start. Every task's UPID is recorded (a Prefect Variable) before it is awaited under a
   deadline with its exit status checked; a later run first settles a recorded task instead of
   repeating the call. A disk shrink is refused at plan time.
4. Talos: `talosctl gen config` (cluster secrets kept in the Prefect Secret block
   `talos-secrets-<cluster>`, so a rerun makes the same cluster), the talosconfig context merged into
   the Talos block; each VM's maintenance API awaited through talosctl, `apply-config --insecure`;
   etcd bootstrapped exactly once (etcd members answer → already done); the kubeconfig fetched and
   merged into the Kubernetes block; `talosctl health` and every Node Ready.
5. A rerun re-reads everything, so it converges without a second VM or a second bootstrap.

The Proxmox API token needs exactly these privileges on `/` (homelab.provision.PROXMOX_TOKEN_PRIVILEGES):
VM.Audit, VM.Clone, VM.Allocate, Datastore.AllocateSpace, Datastore.Audit, VM.Config.CPU,
VM.Config.Memory, VM.Config.Disk, VM.Config.Network, VM.Config.Options, VM.PowerMgmt, Sys.Audit.
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
from homelab.config import ProxmoxCluster, load_tree
from homelab.problems import ConfigError, Problem
from homelab.provision import (
    GIB,
    Action,
    ObservedVM,
    ProvisionPlan,
    VMPlan,
    apply_config_argv,
    config_updates,
    gen_config_argv,
    merge_kubeconfig,
    merge_talosconfig,
    plan_provision,
    render_plan_table,
    talos_plan_rows,
    vm_patch_yaml,
)
from tasks import proxmox as px
from tasks import talos as tl
from tasks.kube import Kube, KubeError

FAILED, COMPLETED, PLANNED = "failed", "completed", "planned"
PROBE_SECONDS = 15.0
POLL_SECONDS = 0.5
VM_STEPS = ("clone", "config", "resize", "start")


class Deadlines(BaseModel):
    """How long each kind of wait may take before the run stops and says what it saw."""

    proxmox_task_seconds: float = Field(default=300, gt=0, description="One Proxmox task (clone, config, resize, start).")
    talos_api_seconds: float = Field(
        default=600, gt=0, description="A started VM's Talos API to answer (maintenance mode, or installed after apply-config).")
    health_seconds: float = Field(default=900, gt=0, description="`talosctl health` and every Node Ready after bootstrap.")
    approval_seconds: int = Field(default=24 * 3600, gt=0, description="The approval form stays open this long.")


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


def etcd_bootstrapped(talos: tl.Talosctl, cp_ip: str, deadline: float | None = None) -> bool | None:
    """True when etcd on the first control plane lists members; False when Talos answers that etcd is not
    running; None when the node does not answer (unknown)."""
    try:
        return bool(talos.etcd_members(cp_ip, deadline=deadline))
    except tl.TalosUnavailable:
        return None
    except tl.TalosCommandError as e:
        if "etcd is not running" in str(e) or "not bootstrapped" in str(e).lower():
            return False
        return None


def proxmox_block(block: Homelab, cluster: str) -> Any:
    if block.proxmox is None:
        raise ConfigError([Problem("Homelab block", "proxmox", f"missing; provisioning {cluster} needs the Proxmox "
                                   "endpoint and an API token (see PROXMOX_TOKEN_PRIVILEGES) in the Homelab block")])
    return block.proxmox


def observe_and_plan(block: Homelab, cluster: str) -> tuple[ProxmoxCluster, ProvisionPlan, list[ObservedVM], bool]:
    """cluster.yaml, the plan against what Proxmox reports, the observed VMs, and whether etcd is bootstrapped."""
    cfg = read_cluster(block.gitops_tree(), cluster)
    observed = px.ProxmoxApi.from_block(proxmox_block(block, cluster)).list_vms(cfg.proxmox.node)
    plan = plan_provision(cfg, observed)
    bootstrapped = False
    cp = cfg.control_planes()[0]
    seen = {v.vmid: v for v in observed}
    if cp.vmid in seen and seen[cp.vmid].running:
        with talos_client(block, cluster) as talos:
            bootstrapped = etcd_bootstrapped(talos, cp.ip, time.monotonic() + PROBE_SECONDS) is True
    return cfg, plan, observed, bootstrapped


observe = task(name="proxmox-observe", task_run_name="observe VMs", cache_policy=NO_CACHE)(observe_and_plan)


def plan_markdown(cfg: ProxmoxCluster, plan: ProvisionPlan, bootstrapped: bool) -> str:
    rows = render_plan_table(plan) + talos_plan_rows(cfg, bootstrapped)
    lines = [f"### Provision {cfg.cluster.name} on Proxmox node {plan.node}", "",
             "| VM | VMID | action | changes | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['vm']} | {r['vmid']} | {r['action']} | {r['changes']} | {r['note']} |" for r in rows]
    if plan.refusals:
        lines += ["", "**Refused:**"] + [f"- {r}" for r in plan.refusals]
    return "\n".join(lines)


def needs_work(plan: ProvisionPlan, bootstrapped: bool) -> bool:
    return bool(plan.to_apply) or not bootstrapped


# --- Proxmox steps ------------------------------------------------------------------------------


@task(name="proxmox-step", task_run_name="{step} {vm_name}", cache_policy=NO_CACHE)
def vm_step(api: px.ProxmoxApi, cluster: str, node: str, vm_name: str, vmid: int, step: str,
            start: Callable[[], str | None], timeout_s: float) -> None:
    """One Proxmox task of one VM: started, its UPID recorded, awaited, its exit status checked."""
    what = f"{step} {vm_name} (VM {vmid})"
    px.run_recorded(api, px.UpidRecord(), px.record_key(cluster, vmid, step), node, what, start,
                    px.deadline_in(timeout_s))


@task(name="settle-recorded-tasks", task_run_name="re-check recorded Proxmox tasks", cache_policy=NO_CACHE)
def settle(api: px.ProxmoxApi, cfg: ProxmoxCluster, timeout_s: float) -> list[str]:
    """Await the tasks an interrupted run started and never saw end (never repeat their calls)."""
    logger = get_run_logger()
    notes = []
    record = px.UpidRecord()
    for vm in cfg.vms:
        for step in VM_STEPS:
            what = f"{step} {vm.name} (VM {vm.vmid}, started by an earlier run)"
            outcome = px.settle_recorded(api, record, px.record_key(cfg.cluster.name, vm.vmid, step), what,
                                         px.deadline_in(timeout_s))
            if outcome is not None:
                logger.info("%s ended: %s", what, outcome)
                notes.append(f"{what}: {outcome}")
    return notes


def apply_vm(api: px.ProxmoxApi, cfg: ProxmoxCluster, vm_plan: VMPlan, template: ObservedVM | None,
             observed: ObservedVM | None, deadlines: Deadlines) -> None:
    want = next(v for v in cfg.vms if v.vmid == vm_plan.vmid)
    node, cluster, t = cfg.proxmox.node, cfg.cluster.name, deadlines.proxmox_task_seconds
    if vm_plan.action == Action.CREATE:
        assert template is not None  # plan_provision refuses a create without the template
        vm_step(api, cluster, node, want.name, want.vmid, "clone",
                lambda: api.clone_template(node, template.vmid, want.vmid, want.name, storage=cfg.proxmox.storage,
                                           description=f"{cluster}: managed by the provision flow from cluster.yaml"),
                t)
        disk_key, disk_bytes, running = template.disk_key or "scsi0", template.disk_bytes or 0, False
    else:
        assert observed is not None
        disk_key, disk_bytes, running = observed.disk_key or "scsi0", observed.disk_bytes or 0, observed.running
    params = config_updates(cfg, want, vm_plan)
    if params:
        vm_step(api, cluster, node, want.name, want.vmid, "config", lambda: api.set_config(node, want.vmid, params), t)
    if disk_bytes < want.disk * GIB:
        vm_step(api, cluster, node, want.name, want.vmid, "resize",
                lambda: api.resize_disk(node, want.vmid, disk_key, want.disk), t)
    if not running:
        vm_step(api, cluster, node, want.name, want.vmid, "start", lambda: api.start_vm(node, want.vmid), t)


# --- Talos steps --------------------------------------------------------------------------------


@task(name="talos-gen-config", task_run_name="generate machine configs", cache_policy=NO_CACHE)
def generate_configs(talos: tl.Talosctl, cfg: ProxmoxCluster, out_dir: Path, patches: list[str]) -> Path:
    """controlplane.yaml, worker.yaml and talosconfig in out_dir, from the cluster's kept secrets."""
    from prefect.blocks.system import Secret

    name = f"talos-secrets-{cfg.cluster.name}".lower()
    secrets_file = out_dir / "secrets.yaml"
    try:
        secrets_file.write_text(str(cast(Secret, Secret.load(name)).get()))
    except ValueError:  # no such block yet: this cluster's secrets are made once, then kept
        talos.run(["gen", "secrets", "--output-file", str(secrets_file), "--force"])
        Secret(value=SecretStr(secrets_file.read_text())).save(name, overwrite=False)
    secrets_file.chmod(0o600)
    argv = gen_config_argv(cfg, str(out_dir), talosctl=talos.path, secrets_file=str(secrets_file), patches=patches)
    talos.run(argv[1:])
    for f in ("controlplane.yaml", "worker.yaml", "talosconfig"):
        if not (out_dir / f).is_file():
            raise StepFailed(f"talosctl gen config for {cfg.cluster.name} succeeded but wrote no {f} in its output "
                             "directory; check the talosctl version (v1.11 expected)")
    return out_dir


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


@task(name="talos-apply-config", task_run_name="apply-config {vm_name}", cache_policy=NO_CACHE)
def apply_machine_config(talos: tl.Talosctl, cfg: ProxmoxCluster, vm_name: str, config_dir: Path,
                         timeout_s: float) -> str:
    """Wait for the VM's Talos API; in maintenance mode, apply its machine config. Returns what was found."""
    vm = next(v for v in cfg.vms if v.name == vm_name)
    found = wait_talos(talos, vm.name, vm.ip, ("installed", "maintenance"), time.monotonic() + timeout_s,
                       f"check the VM's console in Proxmox (it should boot the Talos image of template "
                       f"{cfg.proxmox.template.vmid}) and that {vm.ip} is its address, then rerun")
    if found == "installed":
        return "already configured"
    patch = config_dir / f"{vm.name}.patch.yaml"
    patch.write_text(vm_patch_yaml(cfg, vm))
    argv = apply_config_argv(vm, str(config_dir), str(patch), talosctl=talos.path, insecure=True)
    talos.run(argv[1:], timeout_s=120)
    return "applied"


@task(name="talos-wait-installed", task_run_name="wait installed {vm_name}", cache_policy=NO_CACHE)
def wait_installed(talos: tl.Talosctl, cfg: ProxmoxCluster, vm_name: str, timeout_s: float) -> None:
    vm = next(v for v in cfg.vms if v.name == vm_name)
    wait_talos(talos, vm.name, vm.ip, ("installed",), time.monotonic() + timeout_s,
               "Talos is installing to disk and rebooting; look at the VM's console in Proxmox, then rerun")


@task(name="talos-bootstrap", task_run_name="bootstrap etcd", cache_policy=NO_CACHE)
def bootstrap_once(talos: tl.Talosctl, cfg: ProxmoxCluster) -> bool:
    """Bootstrap etcd on the first control plane unless it already runs. True when this call bootstrapped."""
    cp = cfg.control_planes()[0]
    state = etcd_bootstrapped(talos, cp.ip, time.monotonic() + PROBE_SECONDS)
    if state is True:
        return False
    if state is None:
        raise StepFailed(f"{cp.name} ({cp.ip}): could not tell whether etcd is bootstrapped (talosctl etcd members "
                         "did not answer); not bootstrapping blindly: check the node, then rerun")
    try:
        talos.bootstrap(cp.ip)
    except tl.TalosCommandError as e:
        if "AlreadyExists" in str(e):
            return False
        raise
    return True


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


@flow(name="provision", validate_parameters=True)
def provision(
    homelab: str = "default",
    cluster: str = "homelab",
    plan_only: bool = False,
    require_approval: bool = True,
    deadlines: Deadlines = Deadlines(),  # noqa: B008 - a frozen default the schema shows
) -> dict[str, Any]:
    """Provision the Proxmox VM cluster from cluster.yaml: plan, approve, apply, bootstrap; safe to rerun.

    Args:
        homelab: The Homelab block to act on.
        cluster: The Proxmox cluster of the GitOps tree (clusters/<cluster>/cluster.yaml).
        plan_only: Show the plan (a table artifact) and stop; nothing is changed.
        require_approval: Pause for approval of the plan before changing anything.
        deadlines: How long each kind of wait may take.
    """
    logger = get_run_logger()
    block = load_homelab(homelab)
    cfg = read_cluster(block.gitops_tree(), cluster)
    api = px.ProxmoxApi.from_block(proxmox_block(block, cluster))
    plan: ProvisionPlan | None = None
    bootstrapped = False
    step = "observe the VMs"
    try:
        if not plan_only:
            step = "re-check the Proxmox tasks of an earlier run"
            settle(api, cfg, deadlines.proxmox_task_seconds)
        step = "observe the VMs"
        cfg, plan, observed, bootstrapped = observe(block, cluster)
        create_table_artifact(key=f"provision-plan-{cluster}".lower(),
                              table=render_plan_table(plan) + talos_plan_rows(cfg, bootstrapped),
                              description=f"Provision plan of {cluster} on Proxmox node {plan.node}")
        if plan.refused:
            raise StepFailed("the plan is refused: " + "; ".join(plan.refusals))
        if plan_only:
            return _result(PLANNED, plan, bootstrapped, None)
        if require_approval and needs_work(plan, bootstrapped):
            from flows.approval import request_approval

            step = "approval"
            answer = request_approval(plan_markdown(cfg, plan, bootstrapped), timeout_s=deadlines.approval_seconds)
            if not answer.approved:
                result = _result(FAILED, plan, bootstrapped, "rejected")
                raise ProvisionFailed(f"provision {cluster}: the plan was rejected"
                                      + (f" ({answer.comment})" if answer.comment else ""), result)
        seen = {v.vmid: v for v in observed}
        template = seen.get(cfg.proxmox.template.vmid)
        for vm_plan in plan.to_apply:
            step = f"{vm_plan.action.value} {vm_plan.name}"
            apply_vm(api, cfg, vm_plan, template, seen.get(vm_plan.vmid), deadlines)
        with tempfile.TemporaryDirectory(prefix="homelab-provision-") as tmp:
            work = Path(tmp)
            with talos_client(block, cluster) as talos:
                step = "generate machine configs"
                generate_configs(talos, cfg, work, _patch_files(block.gitops_tree(), cluster))
                step = "merge the talosconfig into the Talos block"
                merge_talos_block(homelab, block, cfg, work / "talosconfig")
            with talos_client(block, cluster) as talos:
                for vm in cfg.ordered_vms():
                    step = f"apply-config {vm.name}"
                    logger.info("%s: %s", vm.name, apply_machine_config(talos, cfg, vm.name, work,
                                                                       deadlines.talos_api_seconds))
                for vm in cfg.ordered_vms():
                    step = f"wait for {vm.name} to be installed"
                    wait_installed(talos, cfg, vm.name, deadlines.talos_api_seconds)
                step = "bootstrap etcd"
                if bootstrap_once(talos, cfg):
                    logger.info("etcd bootstrapped on %s", cfg.control_planes()[0].name)
                bootstrapped = True
                step = "fetch the kubeconfig"
                kubeconfig = fetch_kubeconfig(talos, homelab, block, cfg, work, deadlines.health_seconds)
                step = "talosctl health"
                talos_health(talos, cfg, kubeconfig, block.kube_context(cluster), deadlines.health_seconds)
            step = "wait every Node Ready"
            wait_nodes_ready(kubeconfig, block.kube_context(cluster), cfg, deadlines.health_seconds)
    except (px.ProxmoxError, tl.TalosError, KubeError, StepFailed) as e:
        text = str(e)
        if "rerun" not in text:
            text += ("; fix that, then rerun provision: it re-reads Proxmox and Talos and goes on from there "
                     "(no second VM, no second bootstrap)")
        result = _result(FAILED, plan, bootstrapped, f"{step}: {text}")
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
        as_json: bool) -> None:
    """`homelab provision`: exit 0 completed or planned, 1 failed, 2 bad usage or configuration."""
    if plan and yes:
        typer.echo("homelab provision: --plan and --yes exclude each other (--plan changes nothing, "
                   "--yes applies without asking)", err=True)
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
                cfg, p, _, booted = observe_and_plan(block, cluster)
                shown.update(cfg=cfg, plan=p, bootstrapped=booted)

            _runtime.config_errors_exit_2(ask_plan)
            typer.echo(plan_markdown(shown["cfg"], shown["plan"], shown["bootstrapped"]))
            if needs_work(shown["plan"], shown["bootstrapped"]) and not typer.confirm("Apply this plan?", default=False):
                _runtime.finish(_result(FAILED, shown["plan"], shown["bootstrapped"], "rejected"), as_json, summary,
                                ok=(COMPLETED, PLANNED))
            require_approval = False
        outcome: dict[str, Any] = {}

        def run() -> None:
            state = provision(homelab=block_name, cluster=cluster, plan_only=plan, require_approval=require_approval,
                              return_state=True)
            outcome.update(_runtime.result_of(state, _failed_result))

        _runtime.config_errors_exit_2(run)
    _runtime.finish(outcome, as_json, summary, ok=(COMPLETED, PLANNED))
