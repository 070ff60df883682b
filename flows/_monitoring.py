"""The monitoring gates of a rolling upgrade, per node: what the homelab's Prometheus and Alertmanager know.

- before each node: the alert gate (no alert firing but the allowed ones and those this run's own silences
  cover), waiting up to its deadline for firing alerts to resolve;
- before the node is disrupted: a silence per label that names the node (and the Ceph warnings its noout
  raises), ending at the node's deadline, so that a crashed run's silence expires by itself;
- once the node has passed its gates: the silences expired and read back expired, in the background once the
  alerts they hold have resolved (the next node does not wait for Prometheus to catch up); at the end of a
  completed run those still settling are waited for, on every failure path they are expired at once;
- after each node: the health queries, each a gate with a deadline of its own.

Without a Monitoring block for the cluster (or with the run's `monitoring.enabled` off) every function here
is a no-op and the plan says the gates are skipped. The per-run state (the silences made, the health
results) lives here keyed by flow run, so the node sequence only calls these functions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows._guard import StepFailed
from homelab import monitoring as core
from homelab.ceph_gate import Verdict
from homelab.monitoring import HealthResult, MatcherError, MonitoringGates, NodeSilence, Settings
from tasks.monitoring import MonitoringClient, MonitoringError

POLL_S = 0.25
Mark = Callable[[str, str], None]


@dataclass
class MonitoringRun:
    """One run's monitoring: its client, settings, the silences it made and the health results per node."""

    client: MonitoringClient
    settings: Settings
    cluster: str
    runs_ceph: bool
    who: str  # names the flow run in each silence's comment
    silences: list[NodeSilence] = field(default_factory=list)
    health: dict[str, list[HealthResult]] = field(default_factory=dict)
    # A client of its own for each background settle (a requests Session is not shared across threads).
    new_client: Callable[[], MonitoringClient] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # the silences' states

    def own_matchers(self) -> list[tuple[core.Matcher, ...]]:
        """The matcher sets of this run's silences in force for a node still in progress: their alerts are this
        run's own doing. A passed node's silences, while they settle, are not: an alert about that node that
        still fires holds the next node's gate."""
        return [core.parse_matchers(s.matchers) for s in self.silences if s.state in ("active", "left")]


_RUNS: dict[str, MonitoringRun | None] = {}
# The futures of each run's background settles: apart from MonitoringRun, which is a task parameter (Prefect
# waits for every future it finds in a task's parameters before the task starts).
_SETTLING: dict[str, list[Any]] = {}
_PLAN: dict[str, str] = {}
_LOCK = threading.Lock()


def _run_key() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "local")


def _overrides() -> MonitoringGates | None:
    from prefect.runtime import flow_run

    raw = (flow_run.parameters or {}).get("monitoring")
    if raw is None:
        return None
    return raw if isinstance(raw, MonitoringGates) else MonitoringGates.model_validate(raw)


def _who() -> str:
    from prefect.runtime import flow_run

    return f"{flow_run.flow_name or 'flow'} run {flow_run.name or '-'} ({flow_run.id or 'local'})"


def prepare(block: Any, cluster: str, runs_ceph: bool, overrides: MonitoringGates | None = None) -> tuple[
        MonitoringRun | None, str]:
    """The run's monitoring (None when skipped) and the plan's line about it. A block whose matchers or
    queries do not parse refuses here, before any node is touched (StepFailed on "(all nodes)")."""
    mon_block = block.monitoring_for(cluster) if hasattr(block, "monitoring_for") else None
    if mon_block is None:
        return None, core.describe_plan(None, f"the Homelab block has no Monitoring block for {cluster}")
    if overrides is not None and not overrides.enabled:
        return None, core.describe_plan(None, "turned off for this run (monitoring.enabled = false)")
    try:
        s = core.settings(mon_block.allowed_alerts, mon_block.node_labels, mon_block.ceph_silenced_alerts,
                          mon_block.health_queries, mon_block.alert_gate_seconds, overrides,
                          settle_s=mon_block.silence_settle_seconds)
    except MatcherError as e:
        raise StepFailed("(all nodes)", "monitoring settings", str(e),
                         "fix allowed_alerts or health_queries (in the Monitoring block or this run's form); "
                         "nothing was changed") from None
    if not runs_ceph:
        s.ceph_silenced = []
    return (MonitoringRun(MonitoringClient.from_block(mon_block), s, cluster, runs_ceph, _who(),
                          new_client=lambda: MonitoringClient.from_block(mon_block)),
            core.describe_plan(s))


def for_run(block: Any, cluster: str, runs_ceph: bool) -> MonitoringRun | None:
    """This flow run's monitoring, made at its first use (the block and the run's form read once)."""
    key = _run_key()
    with _LOCK:
        if key in _RUNS:
            return _RUNS[key]
    run, line = prepare(block, cluster, runs_ceph, _overrides())
    with _LOCK:
        _RUNS[key] = run
        _PLAN[key] = line
    if run is None:
        get_run_logger().info(line)
    return run


def plan_line(block: Any, cluster: str, runs_ceph: bool) -> str:
    """What the plan says about the monitoring gates of this run."""
    try:
        run, line = prepare(block, cluster, runs_ceph, _overrides())
    except StepFailed as e:
        return f"monitoring gates refused: {e.last_seen}"
    if run is not None:
        run.client.close()
    return line


def current() -> MonitoringRun | None:
    with _LOCK:
        return _RUNS.get(_run_key())


# --- the gates ----------------------------------------------------------------------------------


def _t(name: str) -> Any:
    return task(name=name, task_run_name=name + " {node}", cache_policy=NO_CACHE, persist_result=False)


def alert_verdict(mon: MonitoringRun) -> Verdict:
    try:
        alerts = mon.client.alerts()
    except MonitoringError as e:
        return Verdict(False, f"Prometheus not readable: {e}")
    return core.alert_gate(alerts, mon.settings.allowed, mon.own_matchers())


@_t("alert-gate")
def alert_gate_task(mon: MonitoringRun, node: str, mark: Mark | None = None) -> None:
    """No alert firing but the allowed ones: waited for up to the gate's deadline, then refused with the
    alerts still firing and their labels."""
    if mark is not None:
        mark(node, "alert-gate")
    deadline = time.monotonic() + mon.settings.alert_gate_s
    waited = False
    while True:
        verdict = alert_verdict(mon)
        if verdict.ok:
            if waited:
                get_run_logger().info(f"{node}: alert gate open: {verdict.reason}")
            return
        if not waited:
            get_run_logger().warning(f"{node}: waiting up to {mon.settings.alert_gate_s:g} s for alerts to resolve: "
                                     f"{verdict.reason}")
        waited = True
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepFailed(node, "no alert firing", verdict.reason,
                             "nothing was changed on this node; fix what the alerts say (or allow them in the "
                             "Monitoring block or this run's monitoring.allowed_alerts), then run again")
        time.sleep(min(POLL_S, left))


@_t("silence")
def silence_task(mon: MonitoringRun, node: str, ip: str, ends_in_s: float, mark: Mark | None = None) -> None:
    """A silence per label that names the node (and one for the Ceph noout warnings), each read back active."""
    if mark is not None:
        mark(node, "silence")
    sets = core.node_silence_matchers(node, ip, mon.settings.node_labels)
    sets += core.ceph_silence_matchers(mon.settings.ceph_silenced)
    comment = (f"{mon.who}: {node} ({ip}) of {mon.cluster} is being upgraded; the run expires this silence once "
               f"the node has passed its gates")
    ends = datetime.now(UTC) + timedelta(seconds=ends_in_s)
    for matchers in sets:
        try:
            s = mon.client.create_silence(matchers, ends_in_s, comment)
        except MonitoringError as e:
            raise StepFailed(node, "silence the node's alerts", str(e),
                             "nothing was changed on this node yet; check the Alertmanager (amtool silence query), "
                             "then run again") from None
        with mon.lock:
            mon.silences.append(NodeSilence(s.id, node, s.describe(), "active", ends.isoformat()))
    get_run_logger().info(f"{node}: {len(sets)} silence(s) until {ends.isoformat(timespec='seconds')}: "
                          + "; ".join(s.matchers for s in mon.silences if s.node == node and s.state == "active"))


def expire_node_silences(mon: MonitoringRun, node: str | None, log: Any,
                         client: MonitoringClient | None = None) -> list[NodeSilence]:
    """Expire this run's silences still in force (of ``node``, or all), each read back expired. One that
    cannot be expired is left to end by itself at its end time: state "left", logged, and in the result."""
    left: list[NodeSilence] = []
    with mon.lock:
        todo = [s for s in mon.silences
                if s.state in ("active", "settling", "left") and (node is None or s.node == node)]
        for s in todo:
            s.state = "expiring"  # neither the background settle nor the run's end expires it twice
    for s in todo:
        try:
            (client or mon.client).expire_silence(s.id)
            s.state = "expired"
        except MonitoringError as e:
            s.state = "left"
            left.append(s)
            log.error(f"{s.node}: silence {s.id} could not be expired ({e}); it ends by itself at {s.ends_at}; to "
                      f"end it now: amtool silence expire {s.id}")
    return left


def held_alerts(mon: MonitoringRun, node: str, client: MonitoringClient) -> list[str]:
    """What the node's settling silences alone still hold (homelab.monitoring.still_held): an alert another
    silence of this run also covers (the next node's Ceph warning) is not theirs to wait for. Unreadable
    counts as held; nothing once they are no longer settling (the run's end expired them meanwhile)."""
    with mon.lock:
        mine = [s for s in mon.silences if s.node == node and s.state == "settling"]
        others = [s for s in mon.silences if s.node != node and s.state in ("active", "settling", "left")]
    if not mine:
        return []
    try:
        return core.still_held(client.alerts(), client.alertmanager_alerts(),
                               [core.parse_matchers(s.matchers) for s in mine], [s.id for s in mine],
                               [core.parse_matchers(s.matchers) for s in others], [s.id for s in others])
    except MonitoringError as e:
        return [f"(monitoring not readable: {e})"]


@_t("expire-silence")
def expire_silence_task(mon: MonitoringRun, node: str, mark: Mark | None = None) -> None:
    """Once the alerts the node's silences hold have resolved (up to the settle time), the silences end.
    Runs beside the next node's steps (submitted by node_passed), with a client of its own."""
    if mark is not None:
        mark(node, "expire-silence")
    log = get_run_logger()
    client = mon.new_client() if mon.new_client is not None else mon.client
    try:
        deadline = time.monotonic() + mon.settings.settle_s
        held = held_alerts(mon, node, client)
        if held:
            log.info(f"{node}: keeping its silences up to {mon.settings.settle_s:g} s while what they hold "
                     "resolves: " + "; ".join(held[:10]))
        while held and time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            held = held_alerts(mon, node, client)
        if held:
            log.warning(f"{node}: expiring its silences although {len(held)} alert(s) they hold still fire after "
                        f"{mon.settings.settle_s:g} s; they will notify: " + "; ".join(held[:10]))
        expire_node_silences(mon, node, log, client)
    finally:
        if client is not mon.client:
            client.close()


def health_verdict(mon: MonitoringRun, q: core.HealthQuery) -> Verdict:
    try:
        body = mon.client.query(q.expr, timeout_s=min(mon.client.timeout_s, q.deadline_seconds))
    except MonitoringError as e:
        return Verdict(False, f"{q.name}: Prometheus not readable: {e}")
    return core.health_verdict(q, body)


@_t("health-queries")
def health_task(mon: MonitoringRun, node: str, mark: Mark | None = None) -> None:
    """Each health query must hold within its deadline; the first that does not stops the run."""
    if mark is not None:
        mark(node, "health-queries")
    results = mon.health.setdefault(node, [])
    for q in mon.settings.health_queries:
        t0 = time.monotonic()
        deadline = t0 + q.deadline_seconds
        while True:
            verdict = health_verdict(mon, q)
            if verdict.ok or time.monotonic() >= deadline:
                break
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        results.append(HealthResult(q.name, verdict.ok, round(time.monotonic() - t0, 3), verdict.reason))
        if not verdict.ok:
            raise StepFailed(node, f"health query {q.name}", verdict.reason,
                             f"the node is upgraded; find why `{q.expr}` does not hold (Prometheus' graph page), "
                             f"then run again: finished nodes are not repeated")


# --- what the node sequence calls ---------------------------------------------------------------


def before_node(block: Any, cluster: str, runs_ceph: bool, node: str, mark: Mark | None = None) -> bool:
    """The alert gate before a node (and before the next one after the pause); False when there is none."""
    mon = for_run(block, cluster, runs_ceph)
    if mon is not None:
        alert_gate_task(mon, node=node, mark=mark)
    return mon is not None


def silence_node(block: Any, cluster: str, runs_ceph: bool, node: str, ip: str, ends_in_s: float,
                 mark: Mark | None = None) -> None:
    """Right before the node is disrupted: its silences, ending at the node's deadline."""
    mon = for_run(block, cluster, runs_ceph)
    if mon is not None:
        silence_task(mon, node=node, ip=ip, ends_in_s=ends_in_s, mark=mark)


def node_passed(node: str, mark: Mark | None = None) -> None:
    """The node has passed its gates: its silences settle in the background, then end (expire_silence_task)."""
    mon = current()
    if mon is None:
        return
    with mon.lock:
        mine = [s for s in mon.silences if s.node == node and s.state == "active"]
        for s in mine:
            s.state = "settling"
    if mine:
        future = expire_silence_task.submit(mon, node=node, mark=mark)
        with _LOCK:
            _SETTLING.setdefault(_run_key(), []).append(future)


def after_node(node: str, mark: Mark | None = None) -> bool:
    """The health queries after the node; False when there are none."""
    mon = current()
    if mon is not None and mon.settings.health_queries:
        health_task(mon, node=node, mark=mark)
        return True
    return False


def end_of_run(log: Any, settle: bool = False) -> list[dict[str, str]]:
    """Whatever ended the run: every silence still in force expired (or reported left); the result's list.
    With ``settle`` (a completed run) the nodes' silences still settling are waited for first (each within
    its settle time); a failed run's end expires them at once: what fires now should be seen. Call it after
    the outcome rows are made (they read the health results). Safe outside a run that has monitoring."""
    mon = current()
    if mon is None:
        return []
    with _LOCK:
        settling = _SETTLING.pop(_run_key(), [])
    if settle:
        for future in settling:
            with contextlib.suppress(Exception):
                future.wait(timeout=mon.settings.settle_s + 30)
    with contextlib.suppress(Exception):
        expire_node_silences(mon, None, log)
    for future in settling:  # a settle caught mid-expiry finishes it: the states below are final
        with contextlib.suppress(Exception):
            future.wait(timeout=30)
    out = [s.as_result() for s in mon.silences]
    forget_run()  # the run is over: its client closes, and a long-lived worker keeps nothing of it
    return out


def silences_result() -> list[dict[str, str]]:
    mon = current()
    return [s.as_result() for s in mon.silences] if mon is not None else []


def health_cell(node: str) -> str:
    """The outcome table's health column of a node: each query, true or not, and how long it took."""
    mon = current()
    if mon is None:
        return ""
    return ", ".join(f"{r.name} {'ok' if r.ok else 'FALSE'} {r.seconds:.1f}s" for r in mon.health.get(node, []))


def plan_of_run() -> str | None:
    with _LOCK:
        return _PLAN.get(_run_key())


def forget_run() -> None:
    """Drop this run's state (the client closed); its silences must have been expired by end_of_run."""
    with _LOCK:
        mon = _RUNS.pop(_run_key(), None)
        _PLAN.pop(_run_key(), None)
        _SETTLING.pop(_run_key(), None)
    if mon is not None:
        mon.client.close()


def node_deadline_s(deadlines: Any) -> float:
    """How long a node may take from its silence to its last gate: the sum of its steps' deadlines. The
    silence ends then, so a run that dies meanwhile leaves nothing silenced for longer."""
    steps = ("upgrade", "node_ready", "node_ready", "etcd", "osds_up", "ceph_clean", "hook", "hook")
    return float(sum(float(getattr(deadlines, s, 0) or 0) for s in steps)) + 60.0
