"""talosctl of the twin: v1.11 flags and formats, reboots, etcd refusals, faults."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from twin import talos

M1, M2, M3 = "10.42.0.101", "10.42.0.102", "10.42.0.103"
IMAGE = "ghcr.io/siderolabs/installer:v1.11.5"


def tctl(t: Any, *argv: str) -> tuple[str, str, int]:
    return talos.run(t.world, list(argv), {"TALOSCONFIG": str(t.talosconfig)}, t.workdir,
                     kubeconfig_for=t.kubeconfig_text)


def test_version_json_prints_one_protojson_line_per_node(twin):
    t = twin()
    out, err, code = tctl(t, "-n", f"{M1},{M2}", "version", "--json")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    # apid names each proxied reply by its target, the --nodes value as given.
    assert [json.loads(x)["metadata"]["hostname"] for x in lines] == [M1, M2]
    assert first["version"]["tag"] == "v1.11.4"
    assert set(first["version"]) == {"tag", "sha", "built", "goVersion", "os", "arch"}


def test_nodes_default_to_the_talosconfig_context(twin):
    t = twin()
    out, _, code = tctl(t, "version", "--json")
    assert code == 0 and json.loads(out)["metadata"]["hostname"] == M1


def test_version_names_a_node_by_hostname_when_addressed_by_hostname(twin):
    t = twin()
    out, _, code = tctl(t, "-n", "m720q-2", "version", "--json")
    assert code == 0 and json.loads(out)["metadata"]["hostname"] == "m720q-2"


def test_unknown_flag_is_a_usage_error(twin):
    t = twin()
    out, err, code = tctl(t, "upgrade", "--drain", "-n", M1)
    assert code == 1 and "unknown flag: --drain" in err


def test_upgrade_reboots_the_node_into_the_new_version(twin):
    t = twin(reboot_seconds=0.3)
    seen: list[tuple[str, bool, bool]] = []
    n = t.world.node("m720q-2")
    t.world.subscribe(lambda: seen.append((n.phase, n.ready, n.etcd_running)))
    old_boot = n.boot_id
    out, err, code = tctl(t, "upgrade", "--nodes", M2, "--image", IMAGE)
    assert code == 0, err
    assert "post check passed" in err
    assert n.talos_version == "v1.11.5" and n.boot_id != old_boot and n.ready and not n.unschedulable
    assert ("rebooting", False, False) in seen  # NotReady, etcd member down meanwhile
    [d] = t.record.intervals("m720q")
    assert d.node == "m720q-2" and d.end is not None and d.end - d.start >= 0.3
    assert t.record.max_concurrent("m720q") == 1


def test_upgrade_without_wait_returns_at_once_with_the_ack_table(twin):
    t = twin(reboot_seconds=0.5)
    t0 = time.monotonic()
    out, err, code = tctl(t, "upgrade", "-n", M1, "--image", IMAGE, "--wait=false")
    assert code == 0 and time.monotonic() - t0 < 0.3
    assert out.startswith("NODE") and "Upgrade request received" in out
    assert t.world.wait_for(lambda: t.world.node("m720q-1").talos_version == "v1.11.5", 3)


def test_upgrade_refuses_while_another_etcd_member_is_down_unless_forced(twin):
    t = twin(reboot_seconds=0.6)
    tctl(t, "upgrade", "-n", M1, "--image", IMAGE, "--wait=false")
    out, err, code = tctl(t, "upgrade", "-n", M2, "--image", IMAGE)
    assert code == 1 and "is not healthy; all members must be healthy to perform an upgrade" in err
    out, err, code = tctl(t, "upgrade", "-n", M2, "--image", IMAGE, "--force", "--wait=false")
    assert code == 0, err
    assert t.world.wait_for(lambda: t.record.max_concurrent("m720q") == 2, 2)


def test_upgrade_refuses_with_exactly_two_etcd_members(twin):
    t = twin()
    with t.world.lock:
        t.world.node("m720q-3").etcd_member_id = ""
    out, err, code = tctl(t, "upgrade", "-n", M1, "--image", IMAGE)
    assert code == 1 and "etcd member count(2) is insufficient to maintain quorum" in err


def test_upgrade_fails_fault_leaves_the_node_up_cordoned_with_etcd_stopped_until_a_reboot(twin):
    t = twin(faults=["upgrade-fails=m720q-2"], reboot_seconds=0.3)
    n = t.world.node("m720q-2")
    boot = n.boot_id
    out, err, code = tctl(t, "upgrade", "-n", M2, "--image", IMAGE)
    assert code == 1
    assert err.rstrip().endswith('task "upgrade" failed: exit code 1') and "error running phase 9" in err
    # Nothing rebooted it: the same boot, its old version, cordoned by Talos, kubelet and etcd stopped.
    assert (n.boot_id, n.talos_version, n.phase) == (boot, "v1.11.4", "running")
    assert n.unschedulable and n.talos_cordoned and not n.kubelet_up and not n.etcd_running
    ms = json.loads(tctl(t, "get", "machinestatus", "-n", M2, "-o", "json")[0])
    assert ms["spec"]["stage"] == "rebooting"
    out, err, code = tctl(t, "etcd", "status", "-n", M2)
    assert code == 1 and "127.0.0.1:2379" in err
    # `talosctl reboot` boots the installed (old) version, and Talos lifts the cordon it made.
    out, err, code = tctl(t, "reboot", "-n", M2)
    assert code == 0, err
    assert (n.talos_version, n.unschedulable, n.talos_cordoned, n.etcd_running) == ("v1.11.4", False, False, True)
    assert n.boot_id != boot


def test_node_never_ready_fault_comes_back_upgraded_but_not_ready(twin):
    t = twin(faults=["node-never-ready=m720q-3"])
    out, err, code = tctl(t, "upgrade", "-n", M3, "--image", IMAGE)
    assert code == 0, err  # Talos itself is ready: only the Kubernetes Node is not
    n = t.world.node("m720q-3")
    assert n.talos_version == "v1.11.5" and not n.ready
    assert t.world.wait_for(lambda: _ready(t, "m720q-3") == "False", 2)
    out, err, code = tctl(t, "health", "--wait-timeout", "200ms")
    assert code == 1 and "some nodes are not ready: [m720q-3]" in err


def _ready(t: Any, host: str) -> str | None:
    node = t.stores["m720q"].get("v1", "Node", None, host)
    return next((c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"), None)


def test_etcd_status_shows_the_errors_column_for_an_unhealthy_member(twin):
    t = twin(faults=["etcd-unhealthy=m720q-2"])
    out, err, code = tctl(t, "-n", f"{M1},{M2}", "etcd", "status")
    assert code == 0, err
    header, row1, row2 = out.splitlines()
    assert header.split()[:2] == ["NODE", "MEMBER"] and header.endswith("PROTOCOL   STORAGE   ERRORS")
    assert row1.endswith("3.6.0") and row2.endswith("etcdserver: mvcc: database space exceeded")
    assert "(" in row1 and "%)" in row1
    out, err, code = tctl(t, "upgrade", "-n", M1, "--image", IMAGE)
    assert code == 1 and "not healthy" in err


def test_etcd_members_table_has_node_column_when_nodes_are_targeted(twin):
    t = twin()
    out, _, code = tctl(t, "-n", M1, "etcd", "members")
    assert code == 0
    assert out.startswith("NODE          ID                 HOSTNAME   PEER URLS")
    assert len(out.splitlines()) == 4
    endpoint_only = t.workdir / "endpoint-only"
    endpoint_only.write_text(f"context: m720q\ncontexts:\n  m720q:\n    endpoints: [{M1}]\n")
    out, _, code = tctl(t, "--talosconfig", str(endpoint_only), "etcd", "members")
    assert code == 0 and out.startswith("ID                 HOSTNAME")


def test_etcd_snapshot_writes_the_file_and_reports_its_size(twin):
    t = twin()
    out, err, code = tctl(t, "-n", M1, "etcd", "snapshot", "db.snapshot")
    size = (t.workdir / "db.snapshot").stat().st_size
    assert code == 0 and out.startswith(f'etcd snapshot saved to "db.snapshot" ({size} bytes)')


def test_health_fails_on_a_cordoned_node(twin):
    t = twin()
    t.world.update(t.world.node("m720q-1"), unschedulable=True)
    out, err, code = tctl(t, "health", "--wait-timeout", "100ms")
    assert code == 1 and "not schedulable: [m720q-1]" in err


def test_health_waits_until_a_rebooting_node_is_back(twin):
    t = twin(reboot_seconds=0.3)
    tctl(t, "reboot", "-n", M2, "--wait=false")
    out, err, code = tctl(t, "health", "--wait-timeout", "5s")
    assert code == 0, err
    assert t.world.node("m720q-2").ready


def test_machinestatus_is_a_stream_of_indented_json_objects(twin):
    t = twin()
    out, _, code = tctl(t, "-n", f"{M1},{M2}", "get", "machinestatus", "-o", "json")
    assert code == 0
    dec = json.JSONDecoder()
    objs, i = [], 0
    while i < len(out.strip()):
        obj, i = dec.raw_decode(out, i)
        objs.append(obj)
        while i < len(out) and out[i].isspace():
            i += 1
    assert [o["node"] for o in objs] == [M1, M2]
    assert objs[0]["spec"] == {"stage": "running", "status": {"ready": True, "unmetConditions": []}}


def test_upgrade_k8s_updates_every_kubelet_one_minor_at_a_time(twin):
    t = twin()
    out, err, code = tctl(t, "-n", M1, "upgrade-k8s", "--to", "1.34.0")
    assert code == 1 and "unsupported upgrade path" in err
    out, err, code = tctl(t, "-n", M1, "upgrade-k8s", "--to", "1.33.0", "--dry-run")
    assert code == 0 and all(n.kubelet_version == "v1.32.0" for n in t.world.clusters["m720q"].nodes.values())
    out, err, code = tctl(t, "-n", M1, "upgrade-k8s", "--to", "1.33.0")
    assert code == 0, err
    assert 'updating kubelet to version "1.33.0"' in out
    assert all(n.kubelet_version == "v1.33.0" for n in t.world.clusters["m720q"].nodes.values())


def test_apply_config_dry_run_prints_the_diff_or_no_changes(twin, tmp_path):
    t = twin()
    cfg = tmp_path / "m1.yaml"
    cfg.write_text("version: v1alpha1\nmachine:\n  type: controlplane\n  install:\n    image: " + IMAGE + "\n")
    out, err, code = tctl(t, "-n", M1, "apply-config", "--file", str(cfg), "--dry-run")
    assert code == 0 and out.startswith("Dry run summary:\nApplied configuration without a reboot (skipped in dry-run).")
    assert "Config diff:" in out and "+machine:" in out
    tctl(t, "-n", M1, "apply-config", "--file", str(cfg))
    out, _, _ = tctl(t, "-n", M1, "apply-config", "-f", str(cfg), "--dry-run")
    assert "No changes." in out


def test_bootstrap_a_second_time_fails_like_talos(twin):
    t = twin(state="synced")
    out, err, code = tctl(t, "--context", "homelab", "bootstrap")
    assert code == 1 and "AlreadyExists" in err and "etcd data directory is not empty" in err


def test_kubeconfig_writes_the_clusters_context(twin, tmp_path):
    t = twin()
    out, err, code = tctl(t, "-n", M1, "kubeconfig", str(tmp_path / "kc"), "--merge=false")
    assert code == 0, err
    import yaml
    cfg = yaml.safe_load((tmp_path / "kc").read_text())
    assert cfg["current-context"] == "admin@m720q"
    assert cfg["clusters"][0]["cluster"]["server"] == t.kube["m720q"].url
    out, err, code = tctl(t, "-n", M1, "kubeconfig", str(tmp_path / "kc"), "--merge=false")
    assert code == 1 and "--force" in err


def test_provisioning_a_vm_from_maintenance_mode_to_a_bootstrapped_cluster(twin, tmp_path):
    t = twin(reboot_seconds=0.1)
    cp = t.world.node("homelab-cp-1")
    assert cp.phase == "off" and not t.kube["homelab"].available
    t._on_vm_power("homelab-cp-1", 161, True)  # what fakepve reports when the VM starts
    # In maintenance mode the VM answers on its DHCP lease, not on the address its config will give it.
    lease = cp.dhcp_ip
    assert lease and lease != cp.ip
    out, err, code = tctl(t, "-n", lease, "version", "--json")
    assert code == 1 and "certificate signed by unknown authority" in err
    out, err, code = tctl(t, "-n", lease, "version", "--json", "--insecure")
    assert code == 0, err
    assert "metadata" not in json.loads(out), "the maintenance service has no apid to name the reply"
    cfg = tmp_path / "cp.yaml"
    cfg.write_text("machine:\n  type: controlplane\n  install:\n    image: factory.talos.dev/installer/abc:v1.11.5\n")
    out, err, code = tctl(t, "-n", lease, "apply-config", "--insecure", "--file", str(cfg))
    assert code == 0, err
    assert t.world.wait_for(lambda: cp.talos_up, 2)
    # Right after boot, bootstrap is refused until machined is ready for it (FailedPrecondition); then it is taken.
    deadline = time.monotonic() + 5
    while True:
        out, err, code = tctl(t, "-n", cp.ip, "-e", cp.ip, "bootstrap")
        if code == 0 or time.monotonic() > deadline:
            break
        assert "not available yet" in err or "time is not in sync" in err, err
        time.sleep(0.05)
    assert code == 0, err
    assert t.world.wait_for(lambda: t.kube["homelab"].available, 2)
    assert t.world.wait_for(lambda: t.stores["homelab"].get("v1", "Node", None, "homelab-cp-1") is not None, 2)


def test_concurrent_upgrade_commands_block_only_their_own_caller(twin):
    t = twin(reboot_seconds=0.3)
    results: list[int] = []
    th = threading.Thread(target=lambda: results.append(tctl(t, "upgrade", "-n", M1, "--image", IMAGE)[2]))
    th.start()
    out, _, code = tctl(t, "-n", M2, "version", "--json")
    assert code == 0 and th.is_alive()
    th.join(3)
    assert results == [0]
