"""The twin as a whole: the env file from another shell, the executables, proxmoxer, faults, teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_env_file_works_from_a_subprocess_shell(twin):
    t = twin()
    script = (f". {t.env_file} && talosctl -n 10.42.0.101 version --json && ceph status -f json "
              f"&& kubectl get nodes")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert json.loads(lines[0])["version"]["tag"] == "v1.11.4"
    assert json.loads(lines[1])["health"]["status"] == "HEALTH_OK"
    assert lines[2].split()[:2] == ["NAME", "STATUS"]


def test_env_file_is_written_last_and_exports_every_endpoint(twin):
    t = twin()
    text = t.env_file.read_text()
    for key in ("KUBECONFIG", "TALOSCONFIG", "PATH", "HOMELAB_PROXMOX_URL", "HOMELAB_PROXMOX_TOKEN_ID",
                "HOMELAB_PROXMOX_TOKEN_SECRET"):
        assert f"export {key}=" in text
    assert t.env_file.stat().st_mtime >= t.kubeconfig.stat().st_mtime
    assert oct(t.env_file.stat().st_mode & 0o777) == "0o600"


def test_talosctl_executable_forwards_exit_code_and_streams(twin):
    t = twin()
    out = subprocess.run([str(t.bin_dir / "talosctl"), "-n", "10.42.0.101", "bogus"], env=t.subprocess_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and 'unknown command "bogus"' in out.stderr
    out = subprocess.run(["ceph", "osd", "ok-to-stop", "0", "-f", "json"], env=t.subprocess_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout)["ok_to_stop"]


def test_talosctl_resolves_relative_paths_against_the_callers_directory(twin, tmp_path):
    t = twin()
    out = subprocess.run(["talosctl", "-n", "10.42.0.101", "etcd", "snapshot", "snap.db"], env=t.subprocess_env(),
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "snap.db").exists()


def test_proxmoxer_reaches_the_fake_proxmox_with_the_twins_token(twin):
    from proxmoxer import ProxmoxAPI
    t = twin()
    px = ProxmoxAPI(t.proxmox.host, port=t.proxmox.port, user=t.proxmox.user, token_name=t.proxmox.token_name,
                    token_value=t.proxmox.token_value, verify_ssl=False)
    nodes = [n["node"] for n in px.nodes.get()]
    assert nodes == [t.proxmox.node]


def test_a_vm_started_through_proxmox_boots_into_maintenance_mode(twin):
    from proxmoxer import ProxmoxAPI
    from proxmoxer.tools import Tasks
    t = twin()
    px = ProxmoxAPI(t.proxmox.host, port=t.proxmox.port, user=t.proxmox.user, token_name=t.proxmox.token_name,
                    token_value=t.proxmox.token_value, verify_ssl=False)
    cfg = t.tree.clusters["homelab"].proxmox
    vm = cfg.vms[0]
    node = px.nodes(cfg.proxmox.node)
    upid = node.qemu(cfg.proxmox.template.vmid).clone.post(newid=vm.vmid, name=vm.name, full=1)
    assert Tasks.blocking_status(px, upid, timeout=10, polling_interval=0.05)["exitstatus"] == "OK"
    node.qemu(vm.vmid).status.start.post()
    assert t.world.wait_for(lambda: t.world.node(vm.name).phase == "maintenance", 10)


def test_a_bad_fault_name_is_a_clear_error(tmp_path):
    from twin import Twin
    with pytest.raises(ValueError, match="unknown fault 'disk-fails'; known faults: .*ceph-stuck"):
        Twin(Path(__file__).resolve().parents[2] / "k8s", tmp_path, faults=["disk-fails=m720q-1"])
    with pytest.raises(ValueError, match="no node named 'm720q-9'"):
        Twin(Path(__file__).resolve().parents[2] / "k8s", tmp_path, faults=["upgrade-fails=m720q-9"])


def test_homelab_api_goes_away_while_its_single_control_plane_reboots(twin):
    from twin import talos
    t = twin(state="synced", reboot_seconds=0.3)
    out, err, code = talos.run(t.world, ["--context", "homelab", "reboot", "--wait=false"],
                               {"TALOSCONFIG": str(t.talosconfig)})
    assert code == 0, err
    assert t.world.wait_for(lambda: not t.kube["homelab"].available, 1)
    assert t.world.wait_for(lambda: t.kube["homelab"].available, 3)


def test_stop_is_fast_and_ends_the_proxmox_process(twin):
    t = twin()
    t0 = time.monotonic()
    t.stop()
    assert time.monotonic() - t0 < 10
    assert not t.proxmox.running and not t.env_file.exists()


def test_homelab_block_points_at_the_twin(twin):
    from twin.register import homelab_block
    t = twin()
    block = homelab_block(t)
    assert block.talos.talosctl_path == str(t.bin_dir / "talosctl")
    assert block.ceph.command == [str(t.bin_dir / "ceph")]
    assert block.proxmox.verify_ssl is False and block.proxmox.port == t.proxmox.port
    assert Path(block.gitops_tree()) == t.git.tree
    assert "admin@m720q" in block.kubernetes.kubeconfig.get_secret_value()


def test_twin_up_serves_until_sigterm_and_tears_down_within_ten_seconds(tmp_path):
    import signal
    repo = Path(__file__).resolve().parents[2]
    workdir = tmp_path / "up"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from twin.cli import twin_app; "
         "twin_app(sys.argv[2:])", str(repo), "up", "--dir", str(workdir), "--tree", str(repo / "k8s"),
         "--reboot-seconds", "0.2", "--fault", "ceph-stuck"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"simulated homelab running in {workdir}"), line + proc.stderr.read()
        assert (workdir / "env").exists()
        out = subprocess.run(["sh", "-c", f". {workdir}/env && talosctl -n 10.42.0.101 version --json"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(15)
    assert time.monotonic() - t0 < 10 and proc.returncode == 0
    assert not (workdir / "env").exists()


def test_proxmox_task_fails_fault_makes_proxmox_tasks_end_with_an_error(twin):
    from proxmoxer import ProxmoxAPI
    from proxmoxer.tools import Tasks
    t = twin(faults=["proxmox-task-fails"])
    px = ProxmoxAPI(t.proxmox.host, port=t.proxmox.port, user=t.proxmox.user, token_name=t.proxmox.token_name,
                    token_value=t.proxmox.token_value, verify_ssl=False)
    cfg = t.tree.clusters["homelab"].proxmox
    upid = px.nodes(cfg.proxmox.node).qemu(cfg.proxmox.template.vmid).clone.post(newid=cfg.vms[0].vmid,
                                                                              name=cfg.vms[0].name, full=1)
    status = Tasks.blocking_status(px, upid, timeout=10, polling_interval=0.05)
    assert status["status"] == "stopped" and status["exitstatus"] != "OK"
