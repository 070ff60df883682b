"""The twin's disruption record across clusters: the homelab-wide count that invariant 1 is checked
against (one node disrupted at any instant, across all flows and clusters)."""

from __future__ import annotations

from typing import Any

from twin import talos
from twin.state import Record

IMAGE = "ghcr.io/siderolabs/installer:v1.11.6"


def test_overlapping_disruptions_in_two_clusters_count_two_across_the_homelab_and_one_per_cluster():
    r = Record()
    r.node_down("m720q", "m720q-2", 10.0)
    r.node_down("homelab", "homelab-worker-1", 11.0)
    r.node_up("m720q", "m720q-2", 12.0)
    r.node_up("homelab", "homelab-worker-1", 13.0)
    assert r.max_concurrent("m720q") == 1 and r.max_concurrent("homelab") == 1
    assert r.max_concurrent() == 2


def test_back_to_back_disruptions_in_two_clusters_count_one_across_the_homelab():
    r = Record()
    r.node_down("m720q", "m720q-1", 10.0)
    r.node_up("m720q", "m720q-1", 12.0)
    # Starts at the very instant the other ends: the end comes first, as within one cluster.
    r.node_down("homelab", "homelab-cp-1", 12.0)
    r.node_up("homelab", "homelab-cp-1", 14.0)
    assert r.max_concurrent() == 1


def test_a_node_still_down_overlaps_everything_after_it_across_clusters():
    r = Record()
    r.node_down("homelab", "homelab-cp-1", 10.0)  # never came back
    r.node_down("m720q", "m720q-3", 50.0)
    r.node_up("m720q", "m720q-3", 51.0)
    assert r.max_concurrent() == 2


def test_twin_records_reboots_of_nodes_of_two_clusters_at_once_as_two_across_the_homelab(twin: Any):
    t = twin(state="synced", reboot_seconds=0.8)
    for node in ("m720q-2", "homelab-worker-1"):
        out, err, code = talos.run(t.world, ["-n", node, "upgrade", "--image", IMAGE, "--wait=false"],
                                   {"TALOSCONFIG": str(t.talosconfig)}, t.workdir, kubeconfig_for=t.kubeconfig_text)
        assert code == 0, err
    assert t.world.wait_for(lambda: t.record.max_concurrent() == 2, 3)
    assert t.world.wait_for(lambda: all(d.end is not None for d in t.record.intervals()), 5)
    assert t.record.max_concurrent("m720q") == 1 and t.record.max_concurrent("homelab") == 1
    assert {d.cluster for d in t.record.intervals()} == {"m720q", "homelab"}
