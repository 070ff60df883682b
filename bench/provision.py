"""Provision benchmark: N VMs on the simulated homelab; prints one JSON line
{"vms", "wall_s", "api_calls", "task_polls", "api_calls_per_vm"}.

wall_s: the provision flow from its call to its return (approval off), with a Prefect server already running
(PREFECT_API_URL, else a `homelab server` started before the clock runs). api_calls: every request the
twin's Proxmox API served during the run (task polls included), counted at the server; task_polls: the
task-status polls among them. The cluster is cluster.yaml's with N VMs (one control plane, N-1 workers).

    .venv/bin/python bench/provision.py --vms 20 [--poll-seconds 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def cluster_of(tree: Path, vms: int) -> None:
    path = tree / "clusters/homelab/cluster.yaml"
    doc = yaml.safe_load(path.read_text())
    cp, worker = doc["vms"][0], doc["vms"][1]
    out = [dict(cp, cores=1, memory=1024, disk=16)]
    for i in range(1, vms):
        out.append(dict(worker, name=f"homelab-worker-{i}", vmid=300 + i, ip=f"10.42.0.{10 + i}", cores=1,
                        memory=1024, disk=16, mac=f"BC:24:11:00:02:{i:02X}"))
    doc["vms"] = out
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=2)
    parser.add_argument("--poll-seconds", type=float, default=0.05, help="first task-poll pause (the flow's knob)")
    args = parser.parse_args()
    from talos_upgrade import prefect_server  # type: ignore[import-not-found]

    from flows.provision import Deadlines, provision
    from twin import Twin
    from twin.register import homelab_block
    from twin.state import Knobs

    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp, prefect_server():
        tree = Path(tmp) / "k8s"
        shutil.copytree(REPO / "k8s", tree)
        cluster_of(tree, args.vms)
        with Twin(tree, Path(tmp) / "twin", knobs=Knobs(reboot_seconds=0.3, recovery_seconds=0.1,
                                                         flux_delay_seconds=0.1)) as t:
            name = f"bench-provision-{uuid.uuid4().hex[:8]}"
            homelab_block(t).save(name, overwrite=True)
            before = t.proxmox.stats()
            t0 = time.monotonic()
            result = provision(homelab=name, cluster="homelab", require_approval=False,
                               deadlines=Deadlines(task_poll_seconds=args.poll_seconds, proxmox_task_seconds=120,
                                                   talos_api_seconds=120, health_seconds=120, bootstrap_seconds=60))
            wall = time.monotonic() - t0
            after = t.proxmox.stats()
    if result["status"] != "completed":
        raise SystemExit(f"provision did not complete: {result['error']}")
    calls = after["api_calls"] - before["api_calls"]
    print(json.dumps({"vms": args.vms, "wall_s": round(wall, 2), "api_calls": calls,
                      "task_polls": after["task_polls"] - before["task_polls"],
                      "api_calls_per_vm": round(calls / args.vms, 2)}))


if __name__ == "__main__":
    main()
