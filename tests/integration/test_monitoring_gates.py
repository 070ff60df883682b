"""The monitoring gates against a real Prometheus and Alertmanager (Debian's), the simulated homelab and a
real Prefect server.

One Prometheus/Alertmanager pair serves the whole module: it scrapes fixed loopback targets, and each
test's twin attaches its exporters to them (a new target would take Prometheus' service discovery 5 s).
Scrape and evaluation intervals are 1 s; the rules' `for:` is 0 s.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from twin.monitoring_real import INSTALL_HINT, RealMonitoring, Scrape, missing_daemons

pytestmark = pytest.mark.usefixtures("prefect_api_url")

REPO = Path(__file__).resolve().parents[2]
TREE = REPO / "k8s"
FAST = {"node_ready": 5, "etcd": 3, "osds_up": 3, "ceph_clean": 3, "lock": 60, "hook": 10, "upgrade": 30}
KNOBS = {"reboot_seconds": 0.4, "recovery_seconds": 0.2, "flux_delay_seconds": 0.05}
M720Q = ["m720q-1", "m720q-2", "m720q-3"]
# Every node's silences: one per node label (node, instance, kubernetes_node) and the Ceph noout warning.
SILENCES_PER_NODE = 4


@pytest.fixture(scope="module")
def monitoring_installed(require_package: Callable[[str], None]) -> None:
    """Skip without Prometheus and Alertmanager; in CI (CI=true) their absence is a failure."""
    missing = missing_daemons()
    if missing:
        require_package(f"the monitoring tests need {', '.join(missing)}: {INSTALL_HINT}")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, monitoring_installed: None) -> Iterator[RealMonitoring]:
    from homelab.config import load_tree

    c = load_tree(TREE).cluster("m720q")
    assert c.talconfig is not None
    scrape = Scrape("m720q", tuple((n.hostname, n.ip) for n in c.talconfig.nodes), True)
    mon = RealMonitoring(tmp_path_factory.mktemp("monitoring") / "pair", scrape)
    try:
        mon.start()
        mon.wait_scraping()
        yield mon
    finally:
        mon.stop()


@pytest.fixture
def mtwin(tmp_path: Path, pair: RealMonitoring) -> Iterator[Callable[..., Any]]:
    """Twins attached to the module's Prometheus; each returns once Prometheus reads its world (no alert
    of an earlier twin still firing)."""
    from twin import Knobs, Twin

    started: list[Any] = []

    def make(faults: tuple[str, ...] = (), **knobs: float) -> Any:
        t = Twin(TREE, tmp_path / f"twin{len(started)}", faults=faults, knobs=Knobs(**{**KNOBS, **knobs}),
                 monitoring=pair)
        started.append(t)
        t.start()
        wait_for(lambda: not [a for a in pair.alerts() if a["state"] == "firing"
                              and a["labels"]["alertname"] not in [f.split("=")[1] for f in faults]],
                 10, "the alerts of an earlier twin to resolve")
        return t

    yield make
    for t in started:
        t.stop()
        assert not t.stop_leftovers, t.stop_leftovers
    assert pair.pids().keys() == {"prometheus", "prometheus-alertmanager"}, "the shared pair must outlive a twin"


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def save_block(t: Any, *, health: list[dict[str, Any]] | None = None, **fields: Any) -> str:
    from blocks import Monitoring
    from homelab.monitoring import HealthQuery
    from twin.register import homelab_block

    block = homelab_block(t)
    assert isinstance(block.monitoring, Monitoring) and block.monitoring_clusters == ["m720q"]
    if health is not None:
        block.monitoring.health_queries = [HealthQuery(**h) for h in health]
    for k, v in fields.items():
        setattr(block, k, v)
    name = f"mon-{uuid.uuid4().hex[:8]}"
    block.save(name, overwrite=True)
    return name


def upgrade(block: str, tmp_path: Path, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from flows.talos_upgrade import Deadlines, state_result, talos_upgrade

    kw.setdefault("require_approval", False)
    kw.setdefault("deadlines", Deadlines(**FAST))
    state = talos_upgrade(homelab=block, snapshot_dir=str(tmp_path / "snapshots"), return_state=True, **kw)
    return state, state_result(state)


def silence_states(pair: RealMonitoring, ids: list[str]) -> set[str]:
    from tasks.monitoring import MonitoringClient

    with MonitoringClient(pair.prometheus_url, pair.alertmanager_url) as c:
        return {c.silence(i).state for i in ids}  # type: ignore[union-attr]


class AlertWatch:
    """What Prometheus and the Alertmanager show during a run, polled on a thread of its own."""

    def __init__(self, pair: RealMonitoring) -> None:
        self.pair = pair
        self.prometheus: set[tuple[str, str, str]] = set()  # (alertname, node, state)
        self.alertmanager: set[tuple[str, str, str]] = set()  # (alertname, node, active|suppressed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                for a in self.pair.alerts():
                    self.prometheus.add((a["labels"]["alertname"], a["labels"].get("node", ""), a["state"]))
                for a in self.pair.alertmanager_alerts():
                    self.alertmanager.add((a["labels"]["alertname"], a["labels"].get("node", ""),
                                           a["status"]["state"]))
            except OSError:
                pass

    def __enter__(self) -> AlertWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --- the client against the real pair ---------------------------------------------------------------


def test_silence_is_made_read_back_expired_and_expiring_again_is_harmless(pair):
    from homelab.monitoring import node_silence_matchers
    from tasks.monitoring import MonitoringClient, MonitoringError

    [matchers] = node_silence_matchers("m720q-1", "10.42.0.101", ["node"])
    with MonitoringClient(pair.prometheus_url, pair.alertmanager_url) as c:
        s = c.create_silence(matchers, 60, "test")
        assert s.state == "active" and s.matchers == matchers and s.created_by == "homelab-flows"
        assert c.expire_silence(s.id).state == "expired"
        assert c.expire_silence(s.id).state == "expired"
        with pytest.raises(MonitoringError, match="does not know silence"):
            c.expire_silence("00000000-0000-0000-0000-000000000000")


def test_health_queries_through_real_prometheus(pair):
    from homelab.monitoring import HealthQuery, health_verdict
    from tasks.monitoring import MonitoringClient

    with MonitoringClient(pair.prometheus_url, pair.alertmanager_url) as c:
        def verdict(expr: str) -> Any:
            return health_verdict(HealthQuery(name="q", expr=expr), c.query(expr))

        assert verdict("vector(1)").ok
        assert not verdict("vector(1) == 0").ok  # empty result
        assert not verdict("vector(0)").ok  # a false value
        bad = verdict("sum(")
        assert not bad.ok and "bad_data" in bad.reason


def test_credentials_never_appear_in_errors(pair):
    from deployments.server import free_port
    from tasks.monitoring import MonitoringClient, MonitoringError

    closed = f"http://127.0.0.1:{free_port()}"
    for kw in ({"bearer_token": "tok-s3cr3t"}, {"basic_auth": ("admin", "pw-s3cr3t")}):
        with MonitoringClient(closed, closed, **kw) as c:  # type: ignore[arg-type]
            with pytest.raises(MonitoringError) as e:
                c.alerts()
            assert "s3cr3t" not in str(e.value) and "did not answer" in str(e.value)


# --- the upgrade's gates --------------------------------------------------------------------------


def test_a_firing_alert_stops_the_run_before_the_next_node_naming_it(mtwin, pair, tmp_path):
    t = mtwin()
    flag = tmp_path / "first-node-done"
    # The post-hook of m720q-1 signals the test, which fires the alert, and gives Prometheus a few
    # evaluations to see it before the gate of m720q-2 looks.
    hook = f'if [ "$HOMELAB_NODE" = m720q-1 ]; then touch {flag}; sleep 3; fi'
    block = save_block(t, post_node_hook=hook)

    def fire_when_signalled() -> None:
        wait_for(flag.exists, 60, "m720q-1's post-hook")
        t.inject("alert-firing=BackupJobFailed")

    threading.Thread(target=fire_when_signalled, daemon=True).start()
    state, res = upgrade(block, tmp_path, monitoring={"alert_gate_seconds": 1.5})
    assert state.is_failed()
    assert "m720q-2: no alert firing failed" in res["error"] and "BackupJobFailed" in res["error"]
    assert 'severity="warning"' in res["error"]  # the alert's labels are named too
    assert [n["action"] for n in res["nodes"]] == ["upgraded", "failed", "not-started"]
    assert sum(1 for d in t.record.intervals() if d.node == "m720q-2") == 0, "m720q-2 must not be touched"
    assert {s["node"] for s in res["silences"]} == {"m720q-1"}
    assert {s["state"] for s in res["silences"]} == {"expired"}


def test_the_reboots_own_alerts_fire_are_silenced_and_never_stop_the_run(mtwin, pair, tmp_path):
    # Reboots long enough for Prometheus (1 s scrapes and evaluations) to see every node NotReady.
    t = mtwin(reboot_seconds=2.5, recovery_seconds=1.0)
    block = save_block(t, health=[{"name": "ceph-ok", "expr": "ceph_health_status == 0", "deadline_seconds": 10}])
    with AlertWatch(pair) as watch:
        state, res = upgrade(block, tmp_path)
    assert state.is_completed(), res["error"]
    assert [n["action"] for n in res["nodes"]] == ["upgraded"] * 3
    fired = {node for name, node, st in watch.prometheus if name == "KubeNodeNotReady" and st == "firing"}
    assert fired == set(M720Q), f"Prometheus showed KubeNodeNotReady firing for {fired} only"
    assert ("CephHealthWarning", "", "firing") in watch.prometheus  # the noout's own warning
    suppressed = {(name, node) for name, node, st in watch.alertmanager if st == "suppressed"}
    assert ("KubeNodeNotReady", "m720q-1") in suppressed or ("KubeNodeNotReady", "m720q-2") in suppressed, (
        f"the Alertmanager never held a node's alert silenced: {watch.alertmanager}")
    assert not {(n, node) for n, node, st in watch.alertmanager if st == "active" and n == "KubeNodeNotReady"}, (
        "a reboot's alert reached the Alertmanager unsilenced")
    assert len(res["silences"]) == SILENCES_PER_NODE * 3
    assert {s["node"] for s in res["silences"]} == set(M720Q)
    assert {s["state"] for s in res["silences"]} == {"expired"}
    assert silence_states(pair, [s["id"] for s in res["silences"]]) == {"expired"}
    assert all("ceph-ok ok" in n["health"] for n in res["nodes"]), res["nodes"]


def test_a_failed_node_expires_its_silence(mtwin, pair, tmp_path):
    t = mtwin(faults=("upgrade-fails=m720q-2",))
    state, res = upgrade(save_block(t), tmp_path)
    assert state.is_failed() and "m720q-2" in res["error"]
    assert {s["node"] for s in res["silences"]} == {"m720q-1", "m720q-2"}
    assert {s["state"] for s in res["silences"]} == {"expired"}
    assert silence_states(pair, [s["id"] for s in res["silences"]]) == {"expired"}


def test_a_health_query_that_turns_false_stops_the_run(mtwin, pair, tmp_path):
    t = mtwin(faults=("alert-firing=ProbeDown",))
    wait_for(lambda: any(a["labels"]["alertname"] == "ProbeDown" and a["state"] == "firing" for a in pair.alerts()),
             10, "ProbeDown to fire")
    # Allowed to fire (the alert gate lets it pass); the health query is false while it does.
    probe = {"name": "probe-up", "expr": 'absent(ALERTS{alertname="ProbeDown",alertstate="firing"})',
             "deadline_seconds": 1.0}
    state, res = upgrade(save_block(t, health=[probe]), tmp_path,
                         monitoring={"allowed_alerts": ['alertname=~"Watchdog|ProbeDown"']})
    assert state.is_failed()
    assert "m720q-1: health query probe-up failed" in res["error"] and "returned no series" in res["error"]
    assert [n["action"] for n in res["nodes"]] == ["failed", "not-started", "not-started"]
    assert "probe-up FALSE" in res["nodes"][0]["health"]
    assert {s["state"] for s in res["silences"]} == {"expired"} and len(res["silences"]) == SILENCES_PER_NODE


def test_without_a_monitoring_block_the_upgrade_runs_as_before_and_the_plan_says_so(twin, tmp_path):
    from twin.register import homelab_block

    t = twin(**KNOBS)
    block = homelab_block(t)
    assert block.monitoring is None
    name = f"plain-{uuid.uuid4().hex[:8]}"
    block.save(name, overwrite=True)
    _, planned = upgrade(name, tmp_path, dry_run=True)
    assert planned["plan"]["monitoring"].startswith("monitoring gates skipped: the Homelab block has no Monitoring")
    state, res = upgrade(name, tmp_path)
    assert state.is_completed(), res["error"]
    assert res["silences"] == [] and [n["action"] for n in res["nodes"]] == ["upgraded"] * 3


def test_drift_check_lists_a_firing_alert_and_a_stale_silence(mtwin, pair):
    from flows.drift_check import drift_check
    from homelab.monitoring import node_silence_matchers
    from tasks.monitoring import MonitoringClient

    t = mtwin(faults=("alert-firing=CertificateExpiring",))
    wait_for(lambda: any(a["labels"]["alertname"] == "CertificateExpiring" and a["state"] == "firing"
                         for a in pair.alerts()), 10, "CertificateExpiring to fire")
    with MonitoringClient(pair.prometheus_url, pair.alertmanager_url) as c:
        left = c.create_silence(node_silence_matchers("m720q-3", "10.42.0.103", ["node"])[0], 3600,
                                "talos-upgrade run crashed-run: m720q-3 is being upgraded")
    try:
        time.sleep(1.2)  # older than the block's stale_silence_seconds below
        name = save_block(t)
        from blocks import Homelab

        block = Homelab.load(name)
        block.monitoring.stale_silence_seconds = 1.0  # type: ignore[union-attr]
        block.save(name, overwrite=True)
        state = drift_check(homelab=name, cluster="m720q", return_state=True)
        res = state.result()
        found = [f for f in res["findings"] if f["area"] == "monitoring"]
        objects = " | ".join(f["object"] for f in found)
        assert "alert CertificateExpiring" in objects
        assert f"silence {left.id}" in objects
        assert "Watchdog" not in objects
    finally:
        with MonitoringClient(pair.prometheus_url, pair.alertmanager_url) as c:
            c.expire_silence(left.id)


def test_cli_twin_with_real_monitoring_refuses_on_a_firing_alert(prefect_api_url, monitoring_installed):
    from typer.testing import CliRunner

    from homelab.cli import app

    out = CliRunner().invoke(app, ["upgrade", "talos", "--twin", "--monitoring", "real", "--fault",
                                   "alert-firing=DiskWillFillIn4Hours", "--yes", "--json"])
    assert out.exit_code == 1, out.output
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "DiskWillFillIn4Hours" in res["error"] and res["nodes"][0]["action"] == "failed"
    bad = CliRunner().invoke(app, ["drift", "--twin", "--monitoring", "loud"])
    assert bad.exit_code == 2 and "--monitoring takes none or real" in bad.output
