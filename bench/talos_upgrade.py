"""Talos rolling-upgrade benchmark; prints one JSON line
{"nodes", "physical_s", "wall_s", "overhead_per_node_s", "gate_reaction_s_p50", "baseline_wall_s",
"lock_check_ms_p50"} (lock_check_ms_p50: one confirmation of the disruption lock with the server, the
median over the run's confirmations; overhead_per_node_s includes them).

wall_s: the talos-upgrade flow function's first line to its return (TIMELINE marks), with a Prefect
server already running (PREFECT_API_URL, else a temporary one started before the clock runs).
physical_s: the simulated homelab's own time, nodes x (reboot_seconds + recovery_seconds).
gate_reaction_s_p50: from the moment the twin makes a gate's condition true (a node Ready again, Ceph
clean again) to the start of the flow's next step, over the gates the flow was waiting on.
baseline_wall_s: on a fresh twin in the same state, what users do today:
`talosctl upgrade --wait` per node, then `until ceph health | grep HEALTH_OK; do sleep 10; done`.

alert_gate_reaction_s_p50 (--monitoring real): an alert's condition clears -> the flow's next step after
the alert gate starts (target: 1 s plus one Prometheus evaluation interval); null without monitoring.

    .venv/bin/python bench/talos_upgrade.py [--reboot-seconds 1.0] [--recovery-seconds 0.5] [--monitoring real]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

BASELINE = """set -eu
for spec in "$@"; do
  ip="${spec%%=*}"; image="${spec#*=}"
  talosctl --talosconfig "$TALOSCONFIG" --context m720q upgrade --nodes "$ip" --image "$image" --wait >/dev/null 2>&1
  until ceph health | grep -q HEALTH_OK; do sleep 10; done
done
"""


@contextlib.contextmanager
def prefect_server() -> Iterator[None]:
    """PREFECT_API_URL's server, else a `homelab server` (leases in redis, as the lock runs for real)."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.server import free_port

    with tempfile.TemporaryDirectory(prefix="bench-server-") as home:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "homelab", "server", "--port", str(port), "--home", home],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "PREFECT_SERVER_UI_ENABLED": "false"})
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            if not url.startswith("http"):
                raise SystemExit(f"homelab server did not start (printed {url!r})")
            with temporary_settings({PREFECT_API_URL: url}):
                yield
        finally:
            proc.terminate()
            proc.wait(60)


class Conditions:
    """When the twin made each gate condition true: node Ready again, Ceph clean again."""

    def __init__(self, t: Any, cluster: str):
        self.t, self.cluster = t, cluster
        self.ready_at: list[tuple[float, str]] = []
        self.clean_at: list[float] = []
        self._ready: dict[str, bool] = {}
        self._clean = True
        self._lock = threading.Lock()
        t.world.subscribe(self._world)
        t.ceph.subscribe(self._ceph)

    def _world(self) -> None:
        now = time.monotonic()
        for h, n in self.t.world.clusters[self.cluster].nodes.items():
            up = n.phase == "running" and n.ready
            if up and self._ready.get(h) is False:
                self.ready_at.append((now, h))
            self._ready[h] = up

    def _ceph(self) -> None:
        now = time.monotonic()
        with self._lock:
            clean = self.t.ceph.clean()
            if clean and not self._clean:
                self.clean_at.append(now)
            self._clean = clean


def reactions(timeline: list[tuple[float, str, str]], cond: Conditions) -> list[float]:
    """Condition true -> the flow's next step, for the conditions the flow was waiting on."""
    out = []
    steps = [(t, node, step) for t, node, step in timeline if node != "(flow)"]
    for at, host in cond.ready_at:
        # The flow waits for the node inside `upgrade` (talosctl --wait) and `wait-ready`.
        before = [s for s in steps if s[0] <= at]
        after = [s for s in steps if s[0] > at]
        if before and after and before[-1][1] == host and before[-1][2] in ("upgrade", "verify-version", "wait-ready"):
            out.append(after[0][0] - at)
    for at in cond.clean_at:
        before = [s for s in steps if s[0] <= at]
        after = [s for s in steps if s[0] > at]
        if before and after and before[-1][2] in ("ceph-clean", "osds-up", "unset-noout"):
            out.append(after[0][0] - at)
    return out


def run_flow(knobs: dict[str, float], workdir: Path, monitoring: str = "none") -> dict[str, Any]:
    from flows import talos_upgrade as tu
    from twin import Knobs, Twin
    from twin.register import homelab_block

    with Twin(REPO / "k8s", workdir / f"flow-{monitoring}", knobs=Knobs(**knobs), monitoring=monitoring) as t:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        homelab_block(t).save(name, overwrite=True)
        cond = Conditions(t, "m720q")
        tu.TIMELINE.clear()
        state = tu.talos_upgrade(homelab=name, require_approval=False, snapshot_dir=str(workdir / "snap"),
                                 return_state=True)
        res = tu.state_result(state)
        if res["status"] != "completed":
            raise SystemExit(f"the flow did not complete: {res['error']}")
        marks = {step: at for at, node, step in tu.TIMELINE if node == "(flow)"}
        wall = marks["end"] - marks["start"]
        nodes = sum(1 for n in res["nodes"] if n["action"] == "upgraded")
        reacts = reactions(list(tu.TIMELINE), cond)
        return {"nodes": nodes, "wall_s": wall, "reactions": reacts,
                "max_concurrent": t.record.max_concurrent("m720q"),
                "lock_check_ms_p50": res["lock"]["confirm_ms_p50"]}


def run_alert_reactions(knobs: dict[str, float], workdir: Path, hold_s: float = 1.5) -> list[float]:
    """With monitoring on: an alert fires before each node; once the flow has waited at the alert gate for
    `hold_s`, the alert's condition is cleared (the fault's rule stops holding) and the time until the flow's
    next step starts is one reaction. It includes Prometheus' wait for its next evaluation (1 s interval)."""
    from flows import talos_upgrade as tu
    from twin import Knobs, Twin
    from twin.register import homelab_block

    cleared: list[tuple[float, str]] = []
    with Twin(REPO / "k8s", workdir / "flow-alerts", knobs=Knobs(**knobs), monitoring="real",
              faults=["alert-firing=BenchAlert"]) as t:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        block = homelab_block(t)
        block.monitoring.alert_gate_seconds = 30
        block.save(name, overwrite=True)
        tu.TIMELINE.clear()
        done = threading.Event()

        def conductor() -> None:
            for host in ("m720q-1", "m720q-2", "m720q-3"):
                while not done.is_set() and not any(n == host and st == "alert-gate" for _, n, st in tu.TIMELINE):
                    time.sleep(0.01)
                if done.wait(hold_s):
                    return
                t.clear("alert-firing")
                cleared.append((time.monotonic(), host))
                while not done.is_set() and not any(n == host and st not in ("alert-gate",) and at > cleared[-1][0]
                                                    for at, n, st in tu.TIMELINE):
                    time.sleep(0.01)
                t.inject("alert-firing=BenchAlert")  # fires again before the next node's gate looks

        th = threading.Thread(target=conductor, daemon=True)
        th.start()
        state = tu.talos_upgrade(homelab=name, require_approval=False, snapshot_dir=str(workdir / "snap-alerts"),
                                 return_state=True)
        done.set()
        th.join(5)
        res = tu.state_result(state)
        if res["status"] != "completed":
            raise SystemExit(f"the flow with alerts did not complete: {res['error']}")
        out = []
        for at, host in cleared:
            nxt = [m for m, n, st in tu.TIMELINE if n == host and m > at and st != "alert-gate"]
            if nxt:
                out.append(min(nxt) - at)
        return out


def run_baseline(knobs: dict[str, float], workdir: Path) -> float:
    from flows.talos_upgrade import load_target, observe_versions
    from homelab.upgrade import plan_talos_upgrade
    from tasks.connect import Clients
    from tasks.talos import Talosctl
    from twin import Knobs, Twin

    with Twin(REPO / "k8s", workdir / "baseline", knobs=Knobs(**knobs)) as t:
        target = load_target(REPO / "k8s", "m720q")
        talos = Talosctl(str(t.bin_dir / "talosctl"), t.talosconfig, "m720q")
        observed = observe_versions(Clients("m720q", None, talos, None, REPO / "k8s"), target)  # type: ignore[arg-type]
        plan = plan_talos_upgrade(target.config, observed)
        specs = [f"{s.ip}={s.image}" for s in plan.to_upgrade]
        script = workdir / "baseline.sh"
        script.write_text(BASELINE)
        t0 = time.monotonic()
        subprocess.run(["bash", str(script), *specs], env=t.subprocess_env(), check=True, timeout=600)
        return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reboot-seconds", type=float, default=1.0)
    ap.add_argument("--recovery-seconds", type=float, default=0.5)
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline script (it sleeps 10 s a node)")
    ap.add_argument("--monitoring", choices=("none", "real"), default="none",
                    help="real: the flow's monitoring gates against a real Prometheus and Alertmanager (1 s "
                         "intervals), and alert_gate_reaction_s_p50 from a second run")
    args = ap.parse_args()
    knobs = {"reboot_seconds": args.reboot_seconds, "recovery_seconds": args.recovery_seconds}
    alert_reactions: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-talos-") as tmp, prefect_server():
        work = Path(tmp)
        flow = run_flow(knobs, work, args.monitoring)
        if args.monitoring == "real":
            alert_reactions = run_alert_reactions(knobs, work)
        baseline = None if args.no_baseline else run_baseline(knobs, work)
    nodes = flow["nodes"]
    physical = nodes * (args.reboot_seconds + args.recovery_seconds)
    print(json.dumps({
        "nodes": nodes,
        "physical_s": round(physical, 3),
        "wall_s": round(flow["wall_s"], 3),
        "overhead_per_node_s": round((flow["wall_s"] - physical) / nodes, 3),
        "gate_reaction_s_p50": round(statistics.median(flow["reactions"]), 3) if flow["reactions"] else None,
        "baseline_wall_s": None if baseline is None else round(baseline, 3),
        "lock_check_ms_p50": flow["lock_check_ms_p50"],
        "monitoring": args.monitoring,
        "alert_gate_reaction_s_p50": round(statistics.median(alert_reactions), 3) if alert_reactions else None,
    }))


if __name__ == "__main__":
    main()
