"""The twin with real Ceph behind its Ceph seam: a Talos reboot stops and restarts a real OSD.

One real twin serves the in-process tests (class scope: it is stopped before `homelab twin up`
starts its own cluster, so at most one real cluster runs at a time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from twin import Knobs, Twin, talos

pytestmark = pytest.mark.ceph

REPO = Path(__file__).resolve().parents[2]
TREE = REPO / "k8s"
M2_IP = "10.42.0.102"
# The nodes' own schematic (i915 + intel-ucode), which the simulated Image Factory knows.
NEW_IMAGE = "factory.talos.dev/installer/4b3cd373a192c8469e859b7a0cfbed3ecc3577c4a2d346a37b0aeff9cd17cdb0:v1.11.5"
# Long enough for the mon to mark the node's OSD down and for a CephCluster update while it is away.
REBOOT_S = 6.0


def ceph_processes(under: Path) -> list[str]:
    """Live ceph-* daemons whose command line names a path under `under` (their ceph.conf)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and argv and os.path.basename(argv[0]).startswith(b"ceph-") and str(under).encode() in b" ".join(argv):
            found.append(f"{pid} {b' '.join(argv).decode(errors='replace')}")
    return found


def real_status(conf: Path) -> dict[str, Any]:
    out = subprocess.run(["ceph", "--connect-timeout", "10", "status", "-f", "json"],
                         env={**os.environ, "CEPH_CONF": str(conf)}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def all_clean(st: dict[str, Any]) -> bool:
    pgs = st["pgmap"]
    return pgs["num_pgs"] > 0 and all(s["state_name"] == "active+clean" for s in pgs["pgs_by_state"])


@pytest.fixture(scope="class")
def real_twin(tmp_path_factory: pytest.TempPathFactory, ceph_installed: None) -> Iterator[Twin]:
    t = Twin(TREE, tmp_path_factory.mktemp("real-twin"), ceph="real",
             knobs=Knobs(reboot_seconds=REBOOT_S, recovery_seconds=0.1, flux_delay_seconds=0.05))
    try:
        t.start()
        print(f"\ntwin with real Ceph started in {t.started_seconds:.1f} s (Ceph {t.ceph_start_seconds:.1f} s)")
        yield t
    finally:
        t.stop()
    assert not t.stop_leftovers, t.stop_leftovers
    assert ceph_processes(t.workdir) == []


class TestTwinWithRealCeph:
    def test_upgrade_of_a_node_stops_its_real_osd_and_health_returns_after(self, real_twin: Twin) -> None:
        t = real_twin
        store = t.stores["m720q"]
        rook_seen: list[str] = []

        def on_write(ev: str, obj: dict[str, Any]) -> None:
            if obj.get("kind") == "CephCluster":
                health = ((obj.get("status") or {}).get("ceph") or {}).get("health")
                if not rook_seen or rook_seen[-1] != health:
                    rook_seen.append(health)
        unsubscribe = store.subscribe(on_write)
        pid_before = t.ceph.osd_pid("m720q-2")
        daemons_before = t.ceph.pids()
        assert pid_before is not None and t.ceph.health() == "HEALTH_OK"
        assert {"mon.a", "mon.b", "mon.c", "mgr.a", "mgr.b"} <= set(daemons_before)

        out, err, code = talos.run(t.world, ["-n", M2_IP, "upgrade", "--image", NEW_IMAGE, "--wait=false"],
                                   {"TALOSCONFIG": str(t.talosconfig)}, t.workdir, kubeconfig_for=t.kubeconfig_text)
        assert code == 0, err
        seen: list[tuple[float, str, frozenset[str]]] = []
        osd_gone = False
        t0 = time.monotonic()
        deadline = t0 + 90
        try:
            while time.monotonic() < deadline:
                osd_gone = osd_gone or t.ceph.osd_pid("m720q-2") is None
                st = json.loads(t.ceph.ceph("status", "-f", "json", timeout_s=15))
                health = st["health"]
                seen.append((round(time.monotonic() - t0, 1), health["status"], frozenset(health["checks"])))
                node = t.world.node("m720q-2")
                back = node.phase == "running" and node.talos_version == "v1.11.5"
                # HEALTH_OK comes a moment before the last PG is active+clean (peering, a scrub).
                if back and health["status"] == "HEALTH_OK" and all_clean(st) and rook_seen[-1:] == ["HEALTH_OK"]:
                    break
                time.sleep(0.25)
        finally:
            unsubscribe()
        timeline = [(s, status, sorted(checks)) for s, status, checks in seen]
        # The OSD says it goes, so OSD_DOWN shows at once. PG_DEGRADED may not show while the node is
        # away: mon.b went with it, and the mons commit nothing until they re-elect (10-20 s).
        down_at = next((i for i, (_, _, c) in enumerate(seen) if "OSD_DOWN" in c), None)
        assert down_at is not None, timeline
        assert seen[-1][1] == "HEALTH_OK", timeline
        assert osd_gone, "the OSD process of m720q-2 never stopped during its reboot"
        pid_after = t.ceph.osd_pid("m720q-2")
        assert pid_after is not None and pid_after != pid_before
        # Its mon and mgr went down and came back with it; the other nodes' daemons were left alone.
        after = t.ceph.pids()
        assert after["mon.b"] != daemons_before["mon.b"] and after["mgr.b"] != daemons_before["mgr.b"]
        assert all(after[n] == daemons_before[n] for n in ("mon.a", "mon.c", "mgr.a"))
        assert "HEALTH_WARN" in rook_seen and rook_seen[-1] == "HEALTH_OK", rook_seen
        assert [d.node for d in t.record.intervals("m720q")] == ["m720q-2"]
        # Give the shared cluster back whole: mgr.b re-registers as standby after HEALTH_OK.
        t.ceph.wait_healthy(time.monotonic() + 60)

    def test_env_file_puts_the_real_ceph_cli_first(self, real_twin: Twin) -> None:
        t = real_twin
        assert not (t.bin_dir / "ceph").exists()
        assert f"export CEPH_CONF={t.ceph.conf}" in t.env_file.read_text()
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
        out = subprocess.run(["sh", "-c", f". {t.env_file} && command -v ceph && ceph status -f json"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        where, _, body = out.stdout.partition("\n")
        assert not where.startswith(str(t.workdir)), f"`ceph` resolved to {where}, not the real CLI"
        st = json.loads(body)
        fsid = next(line.split("=", 1)[1].strip() for line in t.ceph.conf.read_text().splitlines()
                    if line.startswith("fsid"))
        assert st["fsid"] == fsid
        assert st["osdmap"]["num_up_osds"] == 3
        assert st["monmap"]["num_mons"] == 3 and sorted(st["quorum_names"]) == ["a", "b", "c"]
        assert st["mgrmap"]["available"] and st["mgrmap"]["num_standbys"] == 1

    def test_sim_only_faults_are_refused_with_real_ceph(self, real_twin: Twin) -> None:
        with pytest.raises(ValueError, match="simulated Ceph only"):
            real_twin.inject("ceph-stuck")


def test_twin_up_real_ceph_writes_env_only_when_clean_and_stops_on_sigterm(tmp_path: Path, ceph_installed: None) -> None:
    workdir = tmp_path / "up"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'homelab'; from homelab.cli import main; main()",
         "twin", "up", "--ceph", "real", "--dir", str(workdir), "--tree", str(TREE)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    reader.start()
    env = workdir / "env"
    daemons_before_env = False
    status: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 120
        while not env.exists():
            if proc.poll() is not None:
                raise AssertionError(f"twin up exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
            assert time.monotonic() < deadline, "no env file within 120 s"
            daemons_before_env = daemons_before_env or bool(ceph_processes(workdir))
            time.sleep(0.1)
        # The moment the env file exists, the cluster must already be clean.
        status = real_status(workdir / "ceph" / "ceph.conf")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(20)
        stopped_in = time.monotonic() - t0
        reader.join(5)
    assert daemons_before_env, "the env file appeared before any Ceph daemon ran"
    assert status["health"]["status"] == "HEALTH_OK" and all_clean(status), status["health"]
    assert status["osdmap"]["num_up_osds"] == 3
    assert stopped_in < 10 and proc.returncode == 0, (stopped_in, proc.returncode)
    assert ceph_processes(workdir) == []
    assert not env.exists() and not (workdir / "ceph").exists()
    text = "".join(output)
    assert "real Ceph: HEALTH_OK, every PG active+clean after" in text, text
