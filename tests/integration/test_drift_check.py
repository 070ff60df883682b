"""The drift-check flow on the simulated homelab against a real Prefect server.

Drift is seeded through the real protocols (the Kubernetes API, talosctl, the ceph CLI, Proxmox's API,
git), never through the twin's internals.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from flows.drift_check import drift_check
from tasks.kube import Kube

KS_API = ("kustomize.toolkit.fluxcd.io", "v1", "kustomizations")
GR_API = ("source.toolkit.fluxcd.io", "v1", "gitrepositories")
SETTLE_S = 30.0


@dataclass
class Lab:
    sim: Any
    block: str

    def kube(self, cluster: str) -> Kube:
        return Kube.from_kubeconfig(self.sim.kubeconfig, f"admin@{cluster}")

    def run(self, **kw: Any) -> tuple[Any, dict[str, Any]]:
        state = drift_check(homelab=self.block, return_state=True, **kw)
        return state, dict(state.result())

    def ceph(self, *args: str) -> str:
        proc = subprocess.run([*self.sim.ceph.command, *args], capture_output=True, text=True, timeout=30,
                              env=self.sim.subprocess_env(), check=True)
        return proc.stdout

    def talosctl(self, *args: str) -> str:
        proc = subprocess.run([str(self.sim.bin_dir / "talosctl"), "--talosconfig", str(self.sim.talosconfig),
                               *args], capture_output=True, text=True, timeout=60, env=self.sim.subprocess_env(),
                              check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def proxmox(self) -> Any:
        from proxmoxer import ProxmoxAPI

        px = self.sim.proxmox
        return ProxmoxAPI(px.host, port=px.port, user=px.user, token_name=px.token_name, token_value=px.token_value,
                          verify_ssl=False)


@pytest.fixture
def lab(prefect_api_url: str, twin: Callable[..., Any]) -> Iterator[Callable[..., Lab]]:
    from twin.register import homelab_block

    def make(state: str = "synced") -> Lab:
        sim = twin(state=state)
        name = f"drift-{uuid.uuid4().hex[:8]}"
        homelab_block(sim).save(name, overwrite=True)
        return Lab(sim, name)

    yield make


def keyed(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return sorted((f["area"], f["object"], f["desired"], f["live"]) for f in result["findings"])


def wait_until(what: str, check: Callable[[], bool], timeout: float = SETTLE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.05)


def nodes_ready(lab: Lab, cluster: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with lab.kube(cluster) as kube:
                return all(n.ready for n in kube.nodes(timeout_s=2))
        except Exception:
            return False
    return check


def ceph_ok(lab: Lab) -> bool:
    return '"HEALTH_OK"' in lab.ceph("status", "-f", "json")


# --- the states the twin starts in ------------------------------------------------------------


def test_synced_homelab_is_clean(lab: Callable[..., Lab]) -> None:
    state, result = lab("synced").run()
    assert result == {"status": "clean", "counts": {}, "findings": []}
    assert state.is_completed() and state.name == "Completed"


def test_pre_upgrade_reports_each_m720q_node_behind_and_the_unprovisioned_vms_only(lab: Callable[..., Lab]) -> None:
    state, result = lab("pre-upgrade").run()
    assert state.is_completed() and state.name == "Drifted"
    assert result["status"] == "drifted"
    assert keyed(result) == [
        ("proxmox", "homelab: VM 201 (homelab-cp-1)", "4 cores, 8192 MiB, 64 GiB", "absent"),
        ("proxmox", "homelab: VM 211 (homelab-worker-1)", "4 cores, 16384 MiB, 128 GiB", "absent"),
        ("talos", "m720q: node m720q-1", "v1.11.5", "v1.11.4"),
        ("talos", "m720q: node m720q-2", "v1.11.5", "v1.11.4"),
        ("talos", "m720q: node m720q-3", "v1.11.5", "v1.11.4"),
    ]
    assert result["counts"] == {"warning": 5}


def test_drift_event_carries_the_counts_per_cluster(lab: Callable[..., Lab], prefect_api_url: str) -> None:
    import httpx

    hl = lab("pre-upgrade")
    state, _ = hl.run()
    assert state.name == "Drifted"
    deadline = time.monotonic() + 15
    events: list[dict[str, Any]] = []
    while not events:
        assert time.monotonic() < deadline, "no homelab.drift.detected event for m720q from this run"
        r = httpx.post(f"{prefect_api_url}/events/filter", timeout=10, json={
            "filter": {"event": {"name": ["homelab.drift.detected"]}, "resource": {"id": ["homelab.cluster.m720q"]}},
            "limit": 50})
        r.raise_for_status()
        events = [e for e in r.json()["events"]
                  if any(rel.get("prefect.resource.name") == hl.block for rel in e.get("related") or [])]
        time.sleep(0.2)
    assert events[0]["payload"]["counts"] == {"warning": 3}
    homelab = [e for e in httpx.post(f"{prefect_api_url}/events/filter", timeout=10, json={
        "filter": {"event": {"name": ["homelab.drift.detected"]}, "resource": {"id": ["homelab.cluster.homelab"]}},
        "limit": 50}).json()["events"]
        if any(rel.get("prefect.resource.name") == hl.block for rel in e.get("related") or [])]
    assert [e["payload"]["counts"] for e in homelab] == [{"warning": 2}]


# --- each seeded drift on the synced state: exactly that finding -----------------------------------


def test_node_at_older_talos_is_the_only_finding(lab: Callable[..., Lab]) -> None:
    hl = lab("synced")
    node = hl.sim.world.node("m720q-2")
    image = node.installer_image.rsplit(":", 1)[0] + ":v1.11.4"
    hl.talosctl("upgrade", "--nodes", node.ip, "--image", image, "--wait", "--timeout", "60s")
    wait_until("m720q Ready at v1.11.4 and Ceph healthy",
               lambda: nodes_ready(hl, "m720q")() and ceph_ok(hl))
    _, result = hl.run()
    assert keyed(result) == [("talos", "m720q: node m720q-2", "v1.11.5", "v1.11.4")]


def test_suspended_kustomization_is_the_only_finding(lab: Callable[..., Lab]) -> None:
    hl = lab("synced")
    with hl.kube("m720q") as kube:
        kube.merge_patch(*KS_API, "flux-system", "smokeping", {"spec": {"suspend": True}})
    _, result = hl.run()
    assert keyed(result) == [("flux", "m720q: Kustomization flux-system/smokeping", "not suspended", "suspended")]


def test_stale_applied_revision_is_the_only_finding(lab: Callable[..., Lab]) -> None:
    hl = lab("synced")
    old = "main@sha1:" + hashlib.sha1(b"the commit before").hexdigest()
    with hl.kube("m720q") as kube:
        kube.merge_patch(*KS_API, "flux-system", "infrastructure", {"status": {"lastAppliedRevision": old}},
                         subresource="status")
    _, result = hl.run()
    head = f"main@sha1:{hl.sim.git.head()}"
    assert keyed(result) == [("flux", "m720q: Kustomization flux-system/infrastructure", head, old)]


def test_vm_with_other_memory_is_the_only_finding(lab: Callable[..., Lab]) -> None:
    from proxmoxer.tools import Tasks

    hl = lab("synced")
    pve = hl.proxmox().nodes("pve")
    Tasks.blocking_status(hl.proxmox(), pve.qemu(211).status.stop.post(), timeout=30)
    pve.qemu(211).config.post(memory=12288)
    Tasks.blocking_status(hl.proxmox(), pve.qemu(211).status.start.post(), timeout=30)
    wait_until("homelab-worker-1 running and Ready", nodes_ready(hl, "homelab"))
    _, result = hl.run()
    assert keyed(result) == [("proxmox", "homelab: VM 211 (homelab-worker-1) memory", "16384 MiB", "12288 MiB")]


def test_noout_left_set_is_the_only_finding(lab: Callable[..., Lab]) -> None:
    hl = lab("synced")
    hl.ceph("osd", "set", "noout")
    _, result = hl.run()
    assert keyed(result) == [("ceph", "m720q: flag noout", "unset", "set")]


def test_plaintext_secret_in_the_tree_is_the_only_finding(lab: Callable[..., Lab]) -> None:
    from tasks.flux import reconcile

    hl = lab("synced")
    secret = hl.sim.git.tree / "apps/base/smokeping/secret.yaml"
    secret.write_text("apiVersion: v1\nkind: Secret\nmetadata:\n  name: smokeping-admin\n  namespace: smokeping\n"
                      "stringData:\n  password: hunter2\n")
    git = ["git", "-C", str(hl.sim.git_dir), "-c", "user.name=t", "-c", "user.email=t@localhost",
           "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-A"], check=True, capture_output=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", "smokeping: admin password"], check=True, capture_output=True,
                   timeout=30)
    head = f"main@sha1:{hl.sim.git.head()}"
    for cluster in ("m720q", "homelab"):  # flux reconcile source git flux-system, as after a push
        with hl.kube(cluster) as kube:
            reconcile(kube, "GitRepository", "flux-system", "flux-system", time.monotonic() + SETTLE_S)

            def applied(kube: Kube = kube) -> bool:
                items, _ = kube.list_objects(*KS_API)
                return all((k.get("status") or {}).get("lastAppliedRevision") == head for k in items)
            wait_until(f"{cluster}'s Kustomizations at {head}", applied)
    _, result = hl.run()
    assert [(f["area"], f["desired"]) for f in result["findings"]] == [("repository", "valid")]
    assert "secret.yaml" in result["findings"][0]["object"]
    assert "hunter2" not in str(result)


# --- parts that cannot be reached -----------------------------------------------------------------


def test_proxmox_down_is_an_error_finding_and_the_rest_still_runs(lab: Callable[..., Lab]) -> None:
    from blocks import Homelab

    hl = lab("pre-upgrade")
    block = Homelab.load(hl.block)
    assert block.proxmox is not None
    block.proxmox.port = _closed_port()
    block.save(hl.block, overwrite=True)
    state, result = hl.run()
    assert state.name == "Drifted"
    areas = [(f["area"], f["severity"]) for f in result["findings"]]
    assert ("proxmox", "error") in areas
    assert sum(1 for f in result["findings"] if f["area"] == "talos") == 3
    assert "unreachable" in next(f["live"] for f in result["findings"] if f["area"] == "proxmox")


def test_cluster_parameter_limits_the_check_to_that_cluster(lab: Callable[..., Lab]) -> None:
    _, result = lab("pre-upgrade").run(cluster="m720q")
    assert {f["object"].split(":")[0] for f in result["findings"]} == {"m720q"}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def _commit(repo: Any, message: str) -> str:
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    (repo / "clusters").mkdir(exist_ok=True)
    (repo / "clusters" / "note.txt").write_text(message)
    subprocess.run([*git, "add", "-A"], check=True, capture_output=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", message], check=True, capture_output=True, timeout=30)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def test_desired_state_of_a_mirrored_remote_is_its_head_after_a_later_push(tmp_path: Any) -> None:
    from tasks.git import Repo

    origin = tmp_path / "origin"
    subprocess.run(["git", "init", "-q", "-b", "main", str(origin)], check=True, capture_output=True, timeout=30)
    _commit(origin, "first")
    mirror = tmp_path / "mirror.git"
    subprocess.run(["git", "clone", "-q", "--mirror", str(origin), str(mirror)], check=True, capture_output=True,
                   timeout=30)
    pushed = _commit(origin, "second")
    repo = Repo(mirror, mirror=True)
    assert repo.branch_head("main") == pushed
    assert (repo.export(pushed, "clusters", tmp_path / "out") / "note.txt").read_text() == "second"
