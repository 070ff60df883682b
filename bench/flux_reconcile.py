"""Benchmark: flux-reconcile of the whole m720q tree on the twin against a real Prefect server.

Prints one JSON line {"wall_s", "critical_path_s", ...}: wall_s from the flow function's first line
to its return; critical_path_s the sum of the twin's reconcile times along the longest dependsOn
chain, the GitRepository included. Target: wall_s within 10% of critical_path_s.

    .venv/bin/python -m bench.flux_reconcile [--delay 1.0] [--cluster m720q]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on sys.path and bench/twin.py would shadow the twin package.
sys.path.insert(0, str(REPO))


def critical_path(tree, durations: dict[str, float], source_s: float) -> float:
    """Longest dependsOn chain by summed reconcile time, plus the source's."""
    memo: dict[tuple[str, str], float] = {}

    def longest(key: tuple[str, str]) -> float:
        if key not in memo:
            ks = tree.kustomizations[key]
            memo[key] = durations.get(ks.name, 0.0) + max(
                (longest(d) for d in ks.depends_on if d in tree.kustomizations), default=0.0)
        return memo[key]

    return source_s + max((longest(k) for k in tree.kustomizations), default=0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=1.0, help="The twin's Flux reconcile time (s).")
    parser.add_argument("--cluster", default="m720q")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from prefect.testing.utilities import prefect_test_harness

    from flows.flux_reconcile import flux_reconcile, result_of
    from twin import Knobs, Twin
    from twin.register import homelab_block

    with tempfile.TemporaryDirectory(prefix="bench-flux-") as tmp, prefect_test_harness(server_startup_timeout=60):
        with Twin(REPO / "k8s", Path(tmp), knobs=Knobs(flux_delay_seconds=args.delay)) as twin:
            homelab_block(twin).save("bench-twin", overwrite=True)
            result = result_of(flux_reconcile(homelab="bench-twin", cluster=args.cluster, return_state=True))
            if result["status"] != "completed":
                print(json.dumps({"error": result}), file=sys.stderr)
                raise SystemExit(1)
            tree = twin.tree.clusters[args.cluster].flux
            recs = twin.record.reconciles_of()
            durations = {r.name: r.end - r.start for r in recs if r.kind == "Kustomization" and r.end}
            source_s = sum(r.end - r.start for r in recs if r.kind == "GitRepository" and r.end)
            cp = critical_path(tree, durations, source_s)
    wall = result["wall_seconds"]
    print(json.dumps({"wall_s": round(wall, 3), "critical_path_s": round(cp, 3),
                      "overhead_pct": round(100 * (wall - cp) / cp, 1), "flux_delay_s": args.delay,
                      "kustomizations": len(result["kustomizations"])}))


if __name__ == "__main__":
    main()
