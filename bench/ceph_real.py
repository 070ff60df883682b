"""Real Ceph in the homelab's shape (3 mons, 2 mgrs, one OSD per host): start time, and how soon
after a node's restart the clean gate opens.

Prints one JSON line: {"start_s", "gate_open_after_restart_s", "clean_after_restart_s",
"ceph_call_ms_p50", "mons", "mgrs"}. start_s: from the first daemon to HEALTH_OK with every PG
active+clean. Then m720q-2 goes down (its OSD, mon.b and the standby mgr.b) and, once PG_DEGRADED
shows, comes back; from that restart: when the plain clean gate (`CephCli.wait_clean`, no tolerated
flags: PG states from the active mgr, health, every mon in quorum) opens, and when an independent
observer polling `ceph pg stat -f json` and `ceph health detail` every 0.25 s first sees every PG
active+clean with HEALTH_OK. Target: the gate opens no later than 1.0 s after the cluster is clean.

    .venv/bin/python bench/ceph_real.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run as a script, bench/ comes first on sys.path and bench/twin.py would shadow the twin package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from homelab import ceph_gate  # noqa: E402
from tasks.ceph import CephCli, CephError  # noqa: E402
from twin.ceph_real import RealCeph  # noqa: E402

HOSTS = ["m720q-1", "m720q-2", "m720q-3"]
OBSERVER_INTERVAL_S = 0.25


class Observer(threading.Thread):
    """Polls `ceph pg stat` on its own; notes when a poll first finds the cluster clean."""

    def __init__(self, cli: CephCli, deadline: float):
        super().__init__(daemon=True)
        self.cli = cli
        self.deadline = deadline
        self.clean_at: float | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            asked = time.monotonic()
            try:
                if self.cli.pg_stat().all_clean and self.cli.health_detail().status == ceph_gate.HEALTH_OK:
                    # The state held when the poll was sent: the earliest moment it was seen.
                    self.clean_at = asked
                    return
            except CephError:
                pass
            self.stop_event.wait(max(0.0, asked + OBSERVER_INTERVAL_S - time.monotonic()))


def wait_degraded(cli: CephCli, deadline: float) -> None:
    while time.monotonic() < deadline:
        if "PG_DEGRADED" in cli.status().health.checks:
            return
        time.sleep(0.25)
    raise SystemExit("PG_DEGRADED never showed after stopping an OSD")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ceph-bench-") as tmp:
        cluster = RealCeph(Path(tmp) / "cluster", HOSTS)
        try:
            cluster.start()
            cli = CephCli(cluster.command, cluster.env(), timeout_s=15)

            costs = []
            for _ in range(10):
                t = time.monotonic()
                cli.run("status", "-f", "json")
                costs.append((time.monotonic() - t) * 1000)

            cluster.node_down("m720q-2")
            wait_degraded(cli, time.monotonic() + 60)

            observer = Observer(CephCli(cluster.command, cluster.env(), timeout_s=15), time.monotonic() + 120)
            restarted = time.monotonic()
            cluster.node_up("m720q-2")
            observer.start()
            cli.wait_clean(restarted + 120)
            gate_open = time.monotonic()
            observer.join(timeout=130)
            observer.stop_event.set()
            if observer.clean_at is None:
                raise SystemExit("the observer never saw the cluster clean")
            result = {
                "start_s": cluster.start_seconds,
                "gate_open_after_restart_s": round(gate_open - restarted, 2),
                "clean_after_restart_s": round(observer.clean_at - restarted, 2),
                "ceph_call_ms_p50": round(statistics.median(costs), 1),
                "mons": len(cluster.mon_of_host),
                "mgrs": len(cluster.mgr_of_host),
            }
        finally:
            cluster.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
