"""Connections that die and servers that push back: a blackholed API during a node's reboot, and every
flow on an API that answers 30 % of requests with 500 and another 30 % with 429."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tasks import kube as kubeapi
from tasks.kube import Kube

pytestmark = pytest.mark.usefixtures("prefect_api_url")


@pytest.fixture
def short_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wire's timings in seconds, not minutes: the blackhole must outlast a read, not the test."""
    monkeypatch.setattr(kubeapi, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(kubeapi, "WATCH_TIMEOUT_S", 1.0)
    monkeypatch.setattr(kubeapi, "WATCH_READ_SLACK_S", 0.5)


def test_a_node_wait_recovers_once_a_blackholed_api_answers_again(twin: Any, short_wire: None) -> None:
    from twin import talos

    t = twin(reboot_seconds=1.0)
    boot = t.world.node("m720q-2").boot_id
    with Kube.from_kubeconfig(t.kubeconfig, "admin@m720q") as kube:
        kube.node("m720q-2")  # a connection in the pool, as a flow's would be
        upgrading = threading.Thread(target=talos.run, args=(t.world, [
            "-n", "10.42.0.102", "upgrade", "--image", "ghcr.io/siderolabs/installer:v1.11.5"],
            {"TALOSCONFIG": str(t.talosconfig)}))
        upgrading.start()
        assert t.world.wait_for(lambda: t.world.node("m720q-2").phase != "running", 5)
        t.inject("kube-blackhole", "2.5")  # the API's address moves while the node reboots
        started = time.monotonic()
        view = kube.wait_node("m720q-2", lambda v: v.ready and v.talos_version == "v1.11.5",
                              deadline=time.monotonic() + 20, what="back at v1.11.5")
        waited = time.monotonic() - started
        upgrading.join(10)
    assert view.ready and view.talos_version == "v1.11.5" and t.world.node("m720q-2").boot_id != boot
    assert 2.3 <= waited < 6, f"the wait ended {waited:.1f} s after the 2.5 s blackhole began"
    assert t.kube["m720q"].count("fault", "blackhole") >= 2  # it did keep trying while nothing answered


def save_block(t: Any) -> str:
    from twin.register import homelab_block

    name = f"twin-{uuid.uuid4().hex[:8]}"
    homelab_block(t).save(name, overwrite=True)
    return name


def test_every_flow_completes_against_a_flaky_and_throttling_api(twin: Any, tmp_path: Path) -> None:
    from flows.drift_check import drift_check
    from flows.flux_reconcile import flux_reconcile, result_of
    from flows.git_push import git_push
    from flows.kubernetes_upgrade import kubernetes_upgrade
    from flows.talos_upgrade import Deadlines, state_result, talos_upgrade

    t = twin(faults=["kube-flaky", "kube-throttle"], reboot_seconds=0.3, recovery_seconds=0.1,
             flux_delay_seconds=0.05, requeue_dependency_seconds=0.3)
    server = t.kube["m720q"]
    assert (server.flaky_share, server.throttle_share) == (0.3, 0.3)  # the faults' defaults
    block = save_block(t)
    deadlines = Deadlines(node_ready=60, etcd=30, osds_up=30, ceph_clean=30, lock=60, hook=10, upgrade=60)

    drift = drift_check(homelab=block, cluster="m720q", return_state=True)
    assert drift.is_completed(), drift.message

    flux = result_of(flux_reconcile(homelab=block, cluster="m720q", timeout_seconds=120, return_state=True))
    assert flux["status"] == "completed", flux

    rel = "k8s/apps/overlays/m720q/smokeping/pvc-patch.yaml"
    before = t.git.head()
    (t.git.path / rel).write_text((t.git.path / rel).read_text() + "# retuned\n")
    after = t.git.commit_all("smokeping: retuned")
    push = git_push(repository="example/homelab", ref="refs/heads/main", before=before, after=after, homelab=block,
                    timeout_seconds=120, return_state=True)
    assert push.is_completed(), push.message

    state = talos_upgrade(homelab=block, cluster="m720q", require_approval=False, deadlines=deadlines,
                          snapshot_dir=str(tmp_path / "snap-talos"), return_state=True)
    assert state.is_completed(), state_result(state).get("error")

    state = kubernetes_upgrade(homelab=block, cluster="m720q", to="v1.33.0", require_approval=False,
                               deadlines=deadlines, snapshot_dir=str(tmp_path / "snap-k8s"), return_state=True)
    assert state.is_completed(), state_result(state).get("error")
    assert server.count("fault", "") > 10 and server.count("fault", "throttle") > 10
