"""The kubernetes-upgrade flow on the simulated homelab, against a real Prefect server."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("prefect_api_url")

FAST = {"node_ready": 5, "etcd": 3, "osds_up": 3, "ceph_clean": 2, "lock": 60, "upgrade": 30}
M720Q = ["m720q-1", "m720q-2", "m720q-3"]


def save_block(t: Any) -> str:
    from twin.register import homelab_block

    name = f"twin-{uuid.uuid4().hex[:8]}"
    homelab_block(t).save(name, overwrite=True)
    return name


def run(t: Any, tmp_path: Path, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from flows.kubernetes_upgrade import kubernetes_upgrade
    from flows.talos_upgrade import Deadlines, state_result

    kw.setdefault("require_approval", False)
    state = kubernetes_upgrade(homelab=save_block(t), deadlines=Deadlines(**FAST),
                               snapshot_dir=str(tmp_path / "snap"), return_state=True, **kw)
    return state, state_result(state)


def kubelets(t: Any, cluster: str = "m720q") -> dict[str, str]:
    with t.world.lock:
        return {h: n.kubelet_version for h, n in t.world.clusters[cluster].nodes.items()}


def test_kubernetes_upgrade_moves_every_kubelet_one_minor(twin, tmp_path):
    t = twin(reboot_seconds=0.2)
    state, res = run(t, tmp_path, to="v1.33.0")
    assert state.is_completed(), res["error"]
    assert res["status"] == "completed" and res["target_version"] == "v1.33.0"
    assert [(n["name"], n["from"], n["action"]) for n in res["nodes"]] == [(h, "v1.32.0", "upgraded") for h in M720Q]
    assert kubelets(t) == dict.fromkeys(M720Q, "v1.33.0")
    assert res["etcd_snapshot"] and Path(res["etcd_snapshot"]).is_file()
    assert res["noout"] == "untouched" and res["max_disrupted"] == 0


def test_kubernetes_dry_run_plans_and_changes_nothing(twin, tmp_path):
    t = twin(reboot_seconds=0.2)
    state, res = run(t, tmp_path, to="v1.33.0", dry_run=True)
    assert state.is_completed() and res["status"] == "planned"
    assert res["plan"]["dry_run_argv"][-1] == "--dry-run" and "upgrade-k8s" in res["plan"]["argv"]
    assert [n["action"] for n in res["nodes"]] == ["would-upgrade"] * 3
    assert kubelets(t) == dict.fromkeys(M720Q, "v1.32.0")


def test_kubernetes_upgrade_refuses_skipped_minor(twin, tmp_path):
    t = twin(reboot_seconds=0.2)
    state, res = run(t, tmp_path, to="v1.34.0")
    assert state.is_failed() and "skips a Kubernetes minor" in res["error"]
    assert kubelets(t) == dict.fromkeys(M720Q, "v1.32.0")


def test_kubernetes_upgrade_skips_at_target_and_refuses_downgrade(twin, tmp_path):
    t = twin(reboot_seconds=0.2)
    state, res = run(t, tmp_path, to="v1.32.0", cluster="m720q")
    assert state.is_completed() and res["status"] == "completed"  # already there: nothing to do
    state, res = run(t, tmp_path, to="v1.31.0")
    assert state.is_failed() and "downgrade" in res["error"]


def test_kubernetes_upgrade_gates_refuse_unhealthy_etcd(twin, tmp_path):
    t = twin(reboot_seconds=0.2, faults=["etcd-unhealthy=m720q-3"])
    state, res = run(t, tmp_path, to="v1.33.0")
    assert state.is_failed() and "etcd not healthy" in res["error"]
    assert kubelets(t) == dict.fromkeys(M720Q, "v1.32.0")
