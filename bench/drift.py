"""Drift-check benchmark; prints one JSON line {"objects", "seconds", "list_calls", ...}.

A synced twin is seeded with 1,000 Kustomizations and 1,000 HelmReleases (through the m720q KubeStore,
Ready at the git head, so the controllers leave them alone) and 100 VMs (created through Proxmox's API
with proxmoxer). None of them is in the tree, so each seeded Kustomization and VM is also an "extra"
finding: they are compared all the same. The drift-check flow then runs against a real Prefect server
(`prefect_test_harness`, started before the clock starts).

objects: live objects compared (Kustomizations, HelmReleases, GitRepositories, Nodes, VMs);
seconds: the flow call, Prefect's start excluded; list_calls: list requests the Kubernetes API servers
counted during the run (KubeApiServer.request_count), which stays the same for any number of objects.

    .venv/bin/python bench/drift.py [--kustomizations 1000] [--helmreleases 1000] [--vms 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def seed(sim: Any, kustomizations: int, helmreleases: int, vms: int) -> None:
    from twin import controllers as ctl

    store = sim.stores["m720q"]
    revision = sim.git.revision()
    ready = [ctl.condition("Ready", "True", "ReconciliationSucceeded", f"Applied revision: {revision}", 1)]
    store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}, "spec": {},
                  "status": {"phase": "Active"}})
    for i in range(kustomizations):
        store.create({"apiVersion": ctl.KS_API, "kind": "Kustomization",
                      "metadata": {"name": f"bench-{i:04d}", "namespace": "bench"},
                      "spec": {"interval": "10m", "path": f"./k8s/bench/{i}", "prune": True,
                               "sourceRef": {"kind": "GitRepository", "name": "flux-system",
                                             "namespace": "flux-system"}},
                      "status": {"observedGeneration": 1, "lastAppliedRevision": revision, "conditions": ready}})
    for i in range(helmreleases):
        store.create({"apiVersion": ctl.HELM_API, "kind": "HelmRelease",
                      "metadata": {"name": f"bench-{i:04d}", "namespace": "bench"},
                      "spec": {"interval": "30m", "chart": {"spec": {"chart": "podinfo"}}},
                      "status": {"observedGeneration": 1, "conditions": ready}})
    from proxmoxer import ProxmoxAPI

    px = sim.proxmox
    api = ProxmoxAPI(px.host, port=px.port, user=px.user, token_name=px.token_name, token_value=px.token_value,
                     verify_ssl=False)
    node = api.nodes(px.node)
    for i in range(vms):
        node.qemu.post(vmid=1000 + i, name=f"homelab-bench-{i:03d}", cores=2, memory=2048,
                       tags="talos;homelab")
    deadline = time.monotonic() + 60
    while len(node.qemu.get()) < vms + 3:  # the template and the cluster's two VMs
        if time.monotonic() > deadline:
            raise SystemExit(f"Proxmox did not list the {vms} seeded VMs within 60 s")
        time.sleep(0.1)


def list_calls(sim: Any) -> int:
    return sum(server.count("list") for server in sim.kube.values())


def run_once(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from flows.drift_check import drift_check
    from twin import Knobs, Twin
    from twin.register import homelab_block

    with Twin(ROOT / "k8s", workdir, state="synced", knobs=Knobs(reboot_seconds=0.2, flux_delay_seconds=0.05)) as sim:
        seed(sim, args.kustomizations, args.helmreleases, args.vms)
        name = f"bench-drift-{uuid.uuid4().hex[:8]}"
        homelab_block(sim).save(name, overwrite=True)
        before = list_calls(sim)
        t0 = time.perf_counter()
        state = drift_check(homelab=name, return_state=True)
        seconds = time.perf_counter() - t0
        calls = list_calls(sim) - before
        result = state.result()
        nodes = sum(len(c.nodes) for c in sim.world.clusters.values())
        gitrepos = sum(len(s.list("source.toolkit.fluxcd.io/v1", "GitRepository")) for s in sim.stores.values())
        kss = sum(len(s.list("kustomize.toolkit.fluxcd.io/v1", "Kustomization")) for s in sim.stores.values())
        hrs = sum(len(s.list("helm.toolkit.fluxcd.io/v2", "HelmRelease")) for s in sim.stores.values())
        objects = kss + hrs + gitrepos + nodes + args.vms + 3
        return {"objects": objects, "seconds": round(seconds, 3), "list_calls": calls,
                "findings": len(result["findings"]), "state": state.name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kustomizations", type=int, default=1000)
    p.add_argument("--helmreleases", type=int, default=1000)
    p.add_argument("--vms", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    runs = []
    with prefect_test_harness(server_startup_timeout=60), tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        for i in range(args.runs):
            runs.append(run_once(args, Path(tmp) / f"run{i}"))
    out = {"objects": runs[0]["objects"], "seconds": statistics.median(r["seconds"] for r in runs),
           "list_calls": int(statistics.median(r["list_calls"] for r in runs)), "runs": args.runs,
           "seconds_each": [r["seconds"] for r in runs], "findings": runs[0]["findings"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
