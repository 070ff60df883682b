"""Benchmark of the twin: in-process start of every part (simulated Ceph) and watch latency.

Prints one JSON line {"start_s", "watch_latency_ms_p50"}.
"""

from __future__ import annotations

import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from kubernetes import client, config, watch

    from twin import Knobs, Twin

    with tempfile.TemporaryDirectory() as d:
        twin = Twin(REPO / "k8s", Path(d), knobs=Knobs())
        twin.start()
        try:
            start_s = twin.started_seconds
            api = client.CoreV1Api(config.new_client_from_config(str(twin.kubeconfig), context="admin@m720q"))
            store = twin.stores["m720q"]
            got: queue.Queue[tuple[str, float]] = queue.Queue()
            w = watch.Watch()
            rv = api.list_namespace().metadata.resource_version

            def consume() -> None:
                try:
                    for ev in w.stream(api.list_namespace, resource_version=rv, timeout_seconds=30):
                        got.put((ev["object"].metadata.name, time.monotonic()))
                except Exception:  # the server closing the watch at shutdown ends the stream
                    pass

            th = threading.Thread(target=consume, daemon=True)
            th.start()
            latencies = []
            for i in range(40):
                name = f"bench-{i}"
                t0 = time.monotonic()
                store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
                while True:
                    seen, at = got.get(timeout=5)
                    if seen == name:
                        latencies.append((at - t0) * 1000)
                        break
            w.stop()
        finally:
            twin.stop()
    print(json.dumps({"start_s": round(start_s or 0.0, 3),
                      "watch_latency_ms_p50": round(statistics.median(latencies), 2)}))


if __name__ == "__main__":
    main()
