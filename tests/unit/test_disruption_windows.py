"""Each node's disruption window: from the first sight of it cordoned or NotReady to Ready and schedulable again."""

from __future__ import annotations

import re

from homelab.gates import NodeView
from tasks.kube_watch import DisruptionWatch

WINDOW = re.compile(r"\d\d:\d\d:\d\dZ → \d\d:\d\d:\d\dZ \((\d+\.\d) s\)")


def view(name: str, ready: bool = True, cordoned: bool = False) -> NodeView:
    return NodeView(name, ready, cordoned, "Talos (v1.11.5)", "v1.11.5", "v1.34.1", "1")


def unreachable() -> None:
    raise AssertionError("the watch thread is not started in these tests")


def test_a_window_opens_at_the_cordon_and_closes_when_ready_and_schedulable_again():
    w = DisruptionWatch(unreachable)
    w.observe([view("a"), view("b")])
    assert w.window("a") == ""
    w.observe([view("a", cordoned=True), view("b")])
    assert w.window("a").endswith("not Ready and schedulable again yet")
    w.observe([view("a", ready=False, cordoned=True), view("b")])
    w.observe([view("a", ready=True, cordoned=True), view("b")])  # Ready but still cordoned: still disrupted
    assert "not Ready and schedulable again yet" in w.window("a")
    w.observe([view("a"), view("b")])
    assert WINDOW.fullmatch(w.window("a")) and w.window("b") == ""
    assert len(w.windows["a"]) == 1 and w.max_disrupted == 1


def test_the_flows_own_sighting_closes_a_window_whose_event_is_late():
    w = DisruptionWatch(unreachable)
    w.observe([view("a", cordoned=True)])
    w.well_again("a")
    assert WINDOW.fullmatch(w.window("a"))
    w.observe([view("a")])  # the watch's own event after it changes nothing
    assert len(w.windows["a"]) == 1


def test_a_window_the_watch_never_saw_runs_from_the_moment_the_flow_began():
    # The API server the watch reads ran on the node and went before the cordon reached the watch.
    w = DisruptionWatch(unreachable)
    w.observe([view("a")])
    with w.disrupting("a"):
        pass
    w.well_again("a")
    assert WINDOW.fullmatch(w.window("a")) and len(w.windows["a"]) == 1
    assert w.max_disrupted == 1


def test_a_stale_event_after_the_flows_own_sighting_does_not_replace_the_window():
    w = DisruptionWatch(unreachable)
    w.observe([view("a")])
    with w.disrupting("a"):
        w.observe([view("a", ready=False, cordoned=True)])
    w.well_again("a")
    real = w.window("a")
    w.observe([view("a", cordoned=True)])  # a list read before the uncordon, applied after it
    assert w.window("a") == real and len(w.windows["a"]) == 2
