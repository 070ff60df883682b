"""The provision flow on the simulated homelab (fakepve + the twin's talosctl) against a real Prefect server."""

from __future__ import annotations

import json
import shutil
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner

from blocks import GitSource, Homelab, Kubernetes, Proxmox, Talos
from flows.provision import Deadlines, ProvisionFailed, cli, provision
from homelab.provision import merge_kubeconfig, merge_talosconfig, owner_marker
from tasks.proxmox import ProxmoxApi

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")]

ROOT = Path(__file__).resolve().parents[2]

@dataclass
class Lab:
    sim: Any
    block: str
    tree: Path

    def homelab(self) -> Homelab:
        return Homelab.load(self.block)

    def api(self) -> ProxmoxApi:
        h = self.homelab()
        assert h.proxmox is not None
        return ProxmoxApi.from_block(h.proxmox)

    def tasks(self) -> list[dict[str, Any]]:
        return list(self.api()._api.nodes("pve").tasks.get(limit=1000))

    def vms(self) -> dict[int, Any]:
        return {v.vmid: v for v in self.api().list_vms("pve")}

    def run(self, **kw: Any) -> dict[str, Any]:
        kw.setdefault("require_approval", False)
        kw.setdefault("deadlines", FAST)
        try:
            return dict(provision(homelab=self.block, cluster="homelab", **kw))
        except ProvisionFailed as e:
            return e.result


def talosctl_for(sim: Any) -> str:
    return str(sim.bin_dir / "talosctl")


def homelab_block_of(sim: Any, tree: Path, talosctl: str) -> Homelab:
    try:
        from twin.register import homelab_block
        block: Homelab = homelab_block(sim)
    except ImportError:
        px = sim.proxmox
        block = Homelab(
            kubernetes=Kubernetes(kubeconfig=SecretStr(sim.kubeconfig.read_text())),
            talos=Talos(talosctl_path=talosctl, talosconfig=SecretStr(sim.talosconfig.read_text())),
            proxmox=Proxmox(host=px.host, port=px.port, user=px.user, token_name=px.token_name,
                            token_value=SecretStr(px.token_value), verify_ssl=False),
            git=GitSource(url=str(sim.git_dir)), cluster="homelab")
    block.talos.talosctl_path = talosctl
    block.tree_path = str(tree)
    return block


FAST = Deadlines(proxmox_task_seconds=30, talos_api_seconds=30, health_seconds=30, approval_seconds=30,
                 task_poll_seconds=0.05, bootstrap_seconds=30)


@pytest.fixture
def make_lab(prefect_api_url: str, tmp_path: Path) -> Iterator[Any]:
    from twin import Twin
    from twin.state import Knobs

    sims: list[Any] = []

    def make(state: str = "pre-upgrade", faults: tuple[str, ...] = (), edit: Any = None,
             proxmox: dict[str, Any] | None = None) -> Lab:
        tree = tmp_path / f"k8s-{len(sims)}"
        shutil.copytree(ROOT / "k8s", tree)
        if edit is not None:
            edit(tree)
        sim = Twin(tree, tmp_path / f"twin-{len(sims)}", state=state, faults=list(faults),
                   knobs=Knobs(reboot_seconds=0.3, recovery_seconds=0.1, flux_delay_seconds=0.1), proxmox=proxmox)
        sim.start()
        sims.append(sim)
        name = f"provision-test-{uuid.uuid4().hex[:8]}"
        # The twin's own copy of the tree: its cluster.yaml names the simulated Proxmox, its talsecret is
        # encrypted to the twin's age key (which the block carries).
        homelab_block_of(sim, sim.git.tree, talosctl_for(sim)).save(name, overwrite=True)
        return Lab(sim, name, sim.git.tree)

    yield make
    for sim in sims:
        sim.stop()


def set_memory(tree: Path, vm_name: str, mib: int) -> None:
    path = tree / "clusters/homelab/cluster.yaml"
    doc = yaml.safe_load(path.read_text())
    next(v for v in doc["vms"] if v["name"] == vm_name)["memory"] = mib
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


# --- the flow on the twin -----------------------------------------------------------------------


def test_fresh_provision_creates_vms_bootstraps_once_and_nodes_get_ready(make_lab: Any) -> None:
    lab = make_lab()
    result = lab.run()
    assert result["status"] == "completed", result["error"]
    assert result["bootstrapped"] is True
    assert [(v["name"], v["action"]) for v in result["vms"]] == [("homelab-cp-1", "create"),
                                                                  ("homelab-worker-1", "create")]
    vms = lab.vms()
    cp, worker = vms[201], vms[211]
    assert (cp.name, cp.running, cp.cores, cp.memory_mib, cp.disk_gib, cp.mac) == \
        ("homelab-cp-1", True, 4, 8192, 64, "BC:24:11:00:01:61")
    assert (worker.memory_mib, worker.disk_gib, worker.bridge) == (16384, 128, "vmbr0")
    world = lab.sim.world.clusters["homelab"]
    assert world.bootstrapped and [n.hostname for n in world.etcd_members()] == ["homelab-cp-1"]
    assert all(n.ready and n.phase == "running" for n in world.nodes.values())
    kubeconfig = yaml.safe_load(lab.homelab().kubernetes.kubeconfig.get_secret_value())  # type: ignore[union-attr]
    assert "admin@homelab" in [c["name"] for c in kubeconfig["contexts"]]
    acts = [c.argv for c in lab.sim.control.acts()]
    # Maintenance mode answered only at the DHCP lease the guest agent reported, never at the final address.
    applied = [a[a.index("--nodes") + 1] for a in acts if "apply-config" in a]
    assert applied == [lab.sim.dhcp_lease("BC:24:11:00:01:61"), lab.sim.dhcp_lease("BC:24:11:00:01:71")]
    assert not {"10.42.0.161", "10.42.0.171"} & set(applied)
    # etcd bootstrapped exactly once, after the pre-bootstrap answers of v1.11.5 (service etcd: Preparing).
    assert len([a for a in acts if "bootstrap" in a]) >= 1 and len(world.etcd_members()) == 1
    cfg = lab.api().vm_config("pve", 201)
    assert (cfg["cpu"], str(cfg["onboot"]), str(cfg["agent"])) == ("x86-64-v2-AES", "1", "1")
    # net0: MAC and bridge from cluster.yaml, the template's firewall, VLAN tag, mtu and queues kept.
    assert cfg["net0"].split(",") == ["virtio=BC:24:11:00:01:61", "bridge=vmbr0", "firewall=1", "tag=42", "mtu=1500",
                                      "queues=2"]
    assert "homelab-flows: cluster=homelab" in cfg["description"]
    machine = yaml.safe_load(world.nodes["homelab-cp-1"].machine_config)
    assert machine["machine"]["install"]["disk"] == "/dev/sda"  # the template's scsi0
    assert machine["cluster"]["network"]["cni"]["name"] == "none"
    assert [m["name"] for m in machine["cluster"]["inlineManifests"]] == ["cilium-install"]
    assert world.cni_ready


def test_rerun_after_provision_starts_no_proxmox_task_and_bootstraps_nothing(make_lab: Any) -> None:
    lab = make_lab()
    assert lab.run()["status"] == "completed"
    tasks_before = {t["upid"] for t in lab.tasks()}
    member = lab.sim.world.clusters["homelab"].etcd_members()[0].etcd_member_id
    bootstraps_before = len([c for c in lab.sim.control.acts() if "bootstrap" in c.argv])
    again = lab.run()
    assert again["status"] == "completed", again["error"]
    assert [v["action"] for v in again["vms"]] == ["ok", "ok"]
    assert again["bootstrapped"] is True
    assert {t["upid"] for t in lab.tasks()} == tasks_before
    assert [n.etcd_member_id for n in lab.sim.world.clusters["homelab"].etcd_members()] == [member]
    # The rerun read `talosctl service etcd` (Running) and never called bootstrap again.
    assert len([c for c in lab.sim.control.acts() if "bootstrap" in c.argv]) == bootstraps_before


def test_changed_memory_is_planned_then_applied_as_an_update(make_lab: Any) -> None:
    lab = make_lab(state="synced")
    set_memory(lab.tree, "homelab-worker-1", 24576)
    planned = lab.run(plan_only=True)
    assert planned["status"] == "planned"
    assert {v["name"]: v["action"] for v in planned["vms"]} == {"homelab-cp-1": "ok", "homelab-worker-1": "update"}
    assert lab.vms()[211].memory_mib == 16384  # plan mode changed nothing
    from prefect.artifacts import Artifact

    artifact = Artifact.get("provision-plan-homelab")
    assert artifact is not None
    rows = {r["vm"]: r for r in json.loads(str(artifact.data))}
    assert rows["homelab-worker-1"]["changes"] == "memory 16384 MiB → 24576 MiB"
    applied = lab.run()
    assert applied["status"] == "completed", applied["error"]
    assert lab.vms()[211].memory_mib == 24576
    assert [t for t in lab.tasks() if t.get("type") == "qmclone"] == []
    assert [v["action"] for v in lab.run(plan_only=True)["vms"]] == ["ok", "ok"]


def test_extra_vm_of_the_cluster_is_reported_unmanaged_and_left_alone(make_lab: Any) -> None:
    lab = make_lab(state="synced")
    api = lab.api()
    api.wait_task("pve", api.clone_template("pve", 9000, 250, "homelab-extra-1",
                                            description=owner_marker("homelab")), px_deadline(30))
    result = lab.run()
    assert result["status"] == "completed", result["error"]
    assert {"name": "homelab-extra-1", "vmid": 250, "action": "unmanaged"} in result["vms"]
    extra = lab.vms()[250]
    assert extra.name == "homelab-extra-1" and not extra.running


def test_failed_proxmox_task_stops_with_its_log_line_and_a_rerun_finishes(make_lab: Any) -> None:
    lab = make_lab(faults=("proxmox-task-fails",))
    state = provision(homelab=lab.block, cluster="homelab", require_approval=False, deadlines=FAST,
                      return_state=True)
    assert state.is_failed()
    failed = state.result(raise_on_failure=False)
    assert isinstance(failed, ProvisionFailed)
    result = failed.result
    assert result["status"] == "failed" and result["bootstrapped"] is False
    assert "clone homelab-cp-1" in result["error"]
    assert "insufficient free space" in result["error"]  # the task's own log line
    assert set(lab.vms()) == {9000}
    lab.sim.clear("proxmox-task-fails")
    again = lab.run()
    assert again["status"] == "completed", again["error"]
    assert sorted(lab.vms()) == [201, 211, 9000]
    assert len([t for t in lab.tasks() if t.get("type") == "qmclone" and t.get("status") == "OK"]) == 2


def test_node_never_ready_fails_at_the_wait_and_a_rerun_converges_without_second_bootstrap(make_lab: Any) -> None:
    lab = make_lab(faults=("node-never-ready=homelab-worker-1",))
    failed = lab.run(deadlines=FAST.model_copy(update={"health_seconds": 2}))
    assert failed["status"] == "failed" and failed["bootstrapped"] is True
    assert failed["error"].startswith("talosctl health:") and "rerun" in failed["error"]
    assert "homelab-worker-1: NotReady" in failed["error"]  # the last state seen
    member = lab.sim.world.clusters["homelab"].etcd_members()[0].etcd_member_id
    clones = len([t for t in lab.tasks() if t.get("type") == "qmclone"])
    lab.sim.clear("node-never-ready")
    again = lab.run()
    assert again["status"] == "completed", again["error"]
    assert [v["action"] for v in again["vms"]] == ["ok", "ok"]
    assert [n.etcd_member_id for n in lab.sim.world.clusters["homelab"].etcd_members()] == [member]
    assert len([t for t in lab.tasks() if t.get("type") == "qmclone"]) == clones == 2


def test_rejected_approval_ends_failed_before_any_proxmox_task(make_lab: Any) -> None:
    import threading
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    from flows.approval import approve

    lab = make_lab()
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(lab.run(require_approval=True)), daemon=True)
    runner.start()
    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + 60
    runs: list[Any] = []
    with get_client(sync_client=True) as client:
        while not runs and time.monotonic() < deadline:
            runs = [r for r in client.read_flow_runs(flow_run_filter=paused)
                    if r.parameters.get("homelab") == lab.block]
            time.sleep(0.2)
    assert runs, "the run never paused for approval"
    assert lab.tasks() == []
    approve(str(runs[0].id), reject=True, comment="not today")
    runner.join(60)
    assert outcome["status"] == "failed" and outcome["error"] == "rejected"
    assert lab.tasks() == [] and set(lab.vms()) == {9000}


def test_recorded_task_of_an_interrupted_run_is_rechecked_not_repeated(make_lab: Any) -> None:
    from tasks.proxmox import UpidRecord, record_key

    lab = make_lab()
    api = lab.api()
    # An earlier run sent the clone, recorded its UPID and died before it saw the task end.
    UpidRecord().set(record_key("homelab", 201, "clone"), api.clone_template(
        "pve", 9000, 201, "homelab-cp-1", storage="local-lvm", description=owner_marker("homelab")))
    result = lab.run()
    assert result["status"] == "completed", result["error"]
    assert {v["name"]: v["action"] for v in result["vms"]}["homelab-cp-1"] == "update"
    clones = [t for t in lab.tasks() if t.get("type") == "qmclone"]
    assert len(clones) == 2  # one per VM: the recorded one was awaited, not sent again
    assert UpidRecord().get(record_key("homelab", 201, "clone")) is None


# --- the command line -----------------------------------------------------------------------------


def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def main(homelab: str = "default", cluster: str = "homelab", plan: bool = False, yes: bool = False,
             twin: bool = False, twin_state: str = "pre-upgrade", fault: list[str] = [],  # noqa: B006
             json_: bool = typer.Option(False, "--json")) -> None:
        cli(homelab, cluster, plan, yes, twin, twin_state, fault, json_)

    return app


def test_cli_refuses_plan_with_yes_as_usage_error() -> None:
    out = CliRunner().invoke(cli_app(), ["--plan", "--yes"])
    assert out.exit_code == 2
    assert "--plan and --yes" in out.output


def test_cli_broken_cluster_yaml_exits_2_with_the_problem_lines(prefect_api_url: str, tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", tree)
    path = tree / "clusters/homelab/cluster.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["vms"][0]["memory"] = "lots"
    doc["vms"][1]["mac"] = "not-a-mac"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    name = f"provision-broken-{uuid.uuid4().hex[:8]}"
    Homelab(kubernetes=Kubernetes(), talos=Talos(), git=GitSource(url=str(tmp_path)), tree_path=str(tree),
            proxmox=Proxmox(host="127.0.0.1", port=9, token_name="t", token_value=SecretStr("x"))).save(name)
    out = CliRunner().invoke(cli_app(), ["--homelab", name, "--yes", "--json"])
    assert out.exit_code == 2, out.output
    assert "cluster.yaml: vms[0].memory:" in out.output
    assert "cluster.yaml: vms[1].mac:" in out.output


def test_cli_plan_on_the_twin_prints_the_planned_result_as_json(prefect_api_url: str) -> None:
    out = CliRunner().invoke(cli_app(), ["--twin", "--plan", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output.strip().splitlines()[-1])
    assert result["status"] == "planned"
    assert [v["action"] for v in result["vms"]] == ["create", "create"]


# --- the merges (pure) --------------------------------------------------------------------------


def test_merged_kubeconfig_keeps_other_clusters_and_replaces_this_one() -> None:
    current = yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "admin@m720q",
                              "clusters": [{"name": "m720q", "cluster": {"server": "https://a"}},
                                           {"name": "homelab", "cluster": {"server": "https://old"}}],
                              "users": [{"name": "admin@m720q", "user": {"token": "t1"}}],
                              "contexts": [{"name": "admin@m720q", "context": {"cluster": "m720q", "user": "admin@m720q"}}]})
    fetched = textwrap.dedent("""\
        apiVersion: v1
        kind: Config
        clusters: [{name: homelab, cluster: {server: "https://new"}}]
        users: [{name: admin@homelab, user: {token: t2}}]
        contexts: [{name: admin@homelab, context: {cluster: homelab, user: admin@homelab}}]
        current-context: admin@homelab
        """)
    merged = yaml.safe_load(merge_kubeconfig(current, fetched, "admin@homelab"))
    assert merged["current-context"] == "admin@m720q"
    assert {c["name"]: c["cluster"]["server"] for c in merged["clusters"]} == {"m720q": "https://a", "homelab": "https://new"}
    assert [c["name"] for c in merged["contexts"]] == ["admin@m720q", "admin@homelab"]


def test_merged_talosconfig_points_the_new_context_at_the_control_planes() -> None:
    current = yaml.safe_dump({"context": "m720q", "contexts": {"m720q": {"endpoints": ["10.42.0.101"]}}})
    generated = yaml.safe_dump({"context": "homelab", "contexts": {"homelab": {"endpoints": ["127.0.0.1"], "ca": "c"}}})
    merged = yaml.safe_load(merge_talosconfig(current, generated, "homelab", ["10.42.0.161"]))
    assert merged["context"] == "m720q"
    assert merged["contexts"]["homelab"] == {"endpoints": ["10.42.0.161"], "ca": "c"}
    assert merged["contexts"]["m720q"] == {"endpoints": ["10.42.0.101"]}


def px_deadline(seconds: float) -> float:
    from tasks.proxmox import deadline_in

    return deadline_in(seconds)


def test_provision_and_an_upgrade_of_the_other_cluster_take_turns_under_one_lock(make_lab: Any, tmp_path: Path) -> None:
    import threading
    from datetime import datetime

    from flows.talos_upgrade import Deadlines as UpgradeDeadlines
    from flows.talos_upgrade import state_result, talos_upgrade

    lab = make_lab()
    results: dict[str, dict[str, Any]] = {}

    def provision_homelab() -> None:
        results["provision"] = lab.run()

    def upgrade_m720q() -> None:
        state = talos_upgrade(homelab=lab.block, cluster="m720q", require_approval=False,
                              snapshot_dir=str(tmp_path / "snapshots"), return_state=True,
                              deadlines=UpgradeDeadlines(node_ready=10, etcd=5, osds_up=5, ceph_clean=5, upgrade=30))
        results["upgrade"] = state_result(state)

    threads = [threading.Thread(target=provision_homelab), threading.Thread(target=upgrade_m720q)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert results["provision"]["status"] == "completed", results["provision"]["error"]
    assert results["upgrade"]["status"] == "completed", results["upgrade"]["error"]
    held = results["upgrade"]["lock"]
    start, end = (datetime.fromisoformat(held[k]).timestamp() for k in ("acquired_at", "released_at"))
    provision_acts = [c for c in lab.sim.control.acts() if {"apply-config", "bootstrap"} & set(c.argv)]
    assert provision_acts, "provision sent no apply-config or bootstrap"
    assert not [c.argv for c in provision_acts if start <= c.start <= end], "provision acted while the upgrade held the lock"
    # Across both clusters, never more than one node down at once.
    assert lab.sim.record.max_concurrent() == 1


# --- what a real PVE 8 and a real Talos v1.11 do, and the flow copes --------------------------------------


def test_tasks_ending_with_warnings_are_success_and_their_warn_lines_are_logged(make_lab: Any) -> None:
    lab = make_lab()
    lab.sim.proxmox.warn_tasks(True)
    result = lab.run()
    assert result["status"] == "completed", result["error"]
    ends = {t["type"]: t["status"] for t in lab.tasks()}
    assert ends["qmclone"] == "WARNINGS: 1" and ends["qmstart"] == "WARNINGS: 1"


def test_health_check_fails_without_a_cni_and_names_the_nodes(make_lab: Any) -> None:
    # No Cilium HelmRelease in the tree: `cni: none` and nothing installs a CNI, so no Node gets Ready.
    lab = make_lab(edit=lambda tree: (tree / "infrastructure/core/base/cilium/helmrelease.yaml").unlink())
    failed = lab.run(deadlines=FAST.model_copy(update={"health_seconds": 2}))
    assert failed["status"] == "failed" and failed["bootstrapped"] is True
    assert failed["error"].startswith("talosctl health:")
    assert "homelab-cp-1: NotReady" in failed["error"] and "homelab-worker-1: NotReady" in failed["error"]
    assert not lab.sim.world.clusters["homelab"].cni_ready


def test_plan_refuses_a_foreign_vm_a_half_clone_and_a_token_without_sdn_use(make_lab: Any) -> None:
    lab = make_lab()
    api = lab.api()
    # A NAS of the same name pattern at cluster.yaml's vmid 201, made by hand (no marker).
    api.wait_task("pve", api.clone_template("pve", 9000, 201, "homelab-nas"), px_deadline(30))
    lab.sim.proxmox.half_clone(211)
    lab.sim.proxmox.revoke("SDN.Use")
    result = lab.run()
    assert result["status"] == "failed" and result["error"].startswith("observe the VMs: the plan is refused")
    error = result["error"]
    assert "SDN.Use on /sdn/zones/localnetwork/vmbr0" in error
    assert "VM 201 on pve is taken by 'homelab-nas', which is not this cluster's" in error
    assert "a clone is in progress or failed; wait for it, or `qm unlock 211` then `qm destroy 211`" in error
    assert [t for t in lab.tasks() if t["type"] in ("qmconfig", "qmstart")] == []
    nas = lab.api().vm_config("pve", 201)
    assert nas["name"] == "homelab-nas" and "tag=42" in nas["net0"]  # untouched


def test_backup_locked_vm_is_waited_for_and_a_migrated_vm_is_found(make_lab: Any) -> None:
    lab = make_lab(state="synced", proxmox={"nodes": ("pve", "pve2")})
    set_memory(lab.tree, "homelab-worker-1", 24576)
    lab.sim.git.commit_all("worker memory")
    lab.sim.proxmox.migrate(211, "pve2")
    lab.sim.proxmox.lock_vm(211, "backup", 1.0)
    result = lab.run()
    assert result["status"] == "completed", result["error"]
    assert {v["name"]: v["action"] for v in result["vms"]} == {"homelab-cp-1": "ok", "homelab-worker-1": "update"}
    worker = lab.vms()[211]
    assert (worker.node, worker.memory_mib, worker.lock) == ("pve2", 24576, None)
    assert not [t for t in lab.tasks() if t["type"] == "qmclone"]  # found on pve2, not made again


def test_virtio_template_installs_to_vda(make_lab: Any) -> None:
    lab = make_lab(proxmox={"template_disk": "virtio0"})
    result = lab.run()
    assert result["status"] == "completed", result["error"]
    for name in ("homelab-cp-1", "homelab-worker-1"):
        node = lab.sim.world.clusters["homelab"].nodes[name]
        assert yaml.safe_load(node.machine_config)["machine"]["install"]["disk"] == "/dev/vda" and node.installed


def add_second_control_plane(tree: Path) -> None:
    path = tree / "clusters/homelab/cluster.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["vms"].insert(1, {"name": "homelab-cp-2", "vmid": 202, "role": "controlplane", "cores": 2, "memory": 4096,
                          "disk": 32, "ip": "10.42.0.162", "mac": "BC:24:11:00:01:62", "tags": ["talos", "homelab"]})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_missing_template_is_made_from_the_image_factory_iso_and_control_planes_spread(make_lab: Any) -> None:
    lab = make_lab(edit=add_second_control_plane,
                   proxmox={"nodes": ("pve", "pve2"), "shared_storage": True, "with_template": False})
    planned = lab.run(plan_only=True)
    assert planned["status"] == "planned", planned["error"]
    result = lab.run()
    assert result["status"] == "completed", result["error"]
    tasks = lab.tasks()
    assert [t["status"] for t in tasks if t["type"] == "download"] == ["OK"]
    template = lab.vms()[9000]
    assert template.template and template.boot[0] == "scsi0" and template.cdrom_keys == ("ide2",)
    vms = lab.vms()
    assert {vms[201].node, vms[202].node} == {"pve", "pve2"}  # pinned nowhere: one control plane per node


def test_destroy_deletes_only_what_its_plan_lists_and_only_with_its_flag(make_lab: Any) -> None:
    lab = make_lab(state="synced")
    api = lab.api()
    api.wait_task("pve", api.clone_template("pve", 9000, 300, "homelab-nas"), px_deadline(30))
    api.wait_task("pve", api.clone_template("pve", 9000, 250, "homelab-old-1", description=owner_marker("homelab")),
                  px_deadline(30))
    kept = lab.run()  # no flag: the cluster's VM cluster.yaml no longer lists is only reported
    assert kept["status"] == "completed" and 250 in lab.vms()
    planned = lab.run(plan_only=True, destroy=True)
    assert {v["vmid"]: v["action"] for v in planned["vms"]} == {201: "delete", 211: "delete", 250: "delete"}
    assert sorted(lab.vms()) == [201, 211, 250, 300, 9000]
    done = lab.run(destroy=True)
    assert done["status"] == "completed", done["error"]
    assert sorted(lab.vms()) == [300, 9000]
    ends = [(t["type"], t["status"]) for t in lab.tasks() if t["type"] in ("qmstop", "qmdestroy")]
    assert sorted(ends) == [("qmdestroy", "OK")] * 3 + [("qmstop", "OK")] * 2
