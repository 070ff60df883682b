"""A real Prometheus and Alertmanager beside the simulated homelab: Debian's `prometheus` and
`prometheus-alertmanager`, on loopback, with a configuration of their own.

Prometheus scrapes the twin's exporters (twin.metrics) every second as kube-prometheus-stack's jobs
would (kube-state-metrics, node-exporter per node, rook-ceph-mgr), evaluates real alerting rules every
second and sends what fires to the Alertmanager. The rules are kube-prometheus-stack's and Rook's, with
the same names and expressions; only their `for:` is shortened (a knob, as the twin's reboot times are):
- KubeNodeNotReady (kubernetes-monitoring/kubernetes-mixin alerts/kubelet.libsonnet, group
  kubernetes-system-kubelet): ``kube_node_status_condition{job="kube-state-metrics",condition="Ready",
  status="true"} == 0``, for 15m upstream;
- CephHealthWarning (ceph/ceph monitoring/ceph-mixin/prometheus_alerts.libsonnet, group "cluster
  health", shipped by Rook's chart): ``ceph_health_status == 1``, for 15m upstream;
and one rule per `alert-firing=<name>` fault, ``vector(1)``, firing until the fault clears.

Both daemons run in the foreground as children of this process and die with it (parent-death signal);
the Alertmanager's gossip listener is turned off (`--cluster.listen-address=`), so nothing listens
beyond 127.0.0.1. Everything lives in ``workdir``, removed by stop().
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from twin.ceph_real import _die_with_parent, free_ports
from twin.metrics import MetricsEndpoint, Source

PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"
INSTALL_HINT = ("run scripts/install-system-packages.sh as root (apt-get install --no-install-recommends "
                "prometheus prometheus-alertmanager)")
STOP_GRACE_S = 3.0


class MonitoringStartError(RuntimeError):
    """The pair did not come up; the message names the daemon and its log."""


def missing_daemons() -> list[str]:
    """The executables this machine lacks (empty when the pair can run)."""
    return [d for d in (PROMETHEUS, ALERTMANAGER) if shutil.which(d) is None]


@dataclass(frozen=True)
class Scrape:
    """What Prometheus scrapes: the monitored cluster's nodes (hostname, address) and whether it runs Ceph."""

    cluster: str
    nodes: tuple[tuple[str, str], ...]
    ceph: bool


def base_rules(for_s: float) -> list[dict[str, Any]]:
    for_ = f"{for_s:g}s"
    return [
        {"name": "kubernetes-system-kubelet", "rules": [{
            "alert": "KubeNodeNotReady",
            "expr": 'kube_node_status_condition{job="kube-state-metrics",condition="Ready",status="true"} == 0',
            "for": for_, "labels": {"severity": "warning"},
            "annotations": {"description": "{{ $labels.node }} has been unready.", "summary": "Node is not ready."},
        }]},
        {"name": "cluster health", "rules": [{
            "alert": "CephHealthWarning", "expr": "ceph_health_status == 1", "for": for_,
            "labels": {"severity": "warning", "type": "ceph_default"},
            "annotations": {"summary": "Ceph is in the WARNING state"},
        }]},
    ]


class RealMonitoring:
    """``RealMonitoring(workdir, scrape).start()``; ``attach(source)`` points the scrapes at a twin's exporters.

    ``prometheus_url`` and ``alertmanager_url`` are what a Monitoring block names. ``fire(name)`` /
    ``unfire(name)`` add and remove an always-firing rule (the alert-firing fault)."""

    def __init__(self, workdir: Path, scrape: Scrape, *, interval_s: float = 1.0, rule_for_s: float = 0.0,
                 start_timeout_s: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.scrape = scrape
        self.interval_s = interval_s
        self.rule_for_s = rule_for_s
        self.start_timeout_s = start_timeout_s
        self.endpoint = MetricsEndpoint(thread_name="monitoring-metrics")
        self.prometheus_url = ""
        self.alertmanager_url = ""
        self.start_seconds: float | None = None
        self._firing: set[str] = set()
        self._resolved: set[str] = set()  # rules of cleared faults, kept so that Prometheus resolves their alerts
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.RLock()
        self._created_dir = False

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> RealMonitoring:
        missing = missing_daemons()
        if missing:
            raise MonitoringStartError(f"cannot start Prometheus and Alertmanager: {', '.join(missing)} not "
                                       f"installed; {INSTALL_HINT}")
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._created_dir = True
        atexit.register(self.stop)
        try:
            self.endpoint.start()
            prom_port, am_port = free_ports(2)
            self.prometheus_url = f"http://127.0.0.1:{prom_port}"
            self.alertmanager_url = f"http://127.0.0.1:{am_port}"
            (self.workdir / "log").mkdir(exist_ok=True)
            self._write_alertmanager_config()
            self._write_rules()
            self._write_prometheus_config(am_port)
            self._spawn(ALERTMANAGER, [
                ALERTMANAGER, f"--config.file={self.workdir / 'alertmanager.yml'}",
                f"--storage.path={self.workdir / 'alertmanager'}", f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=", "--log.level=warn"])
            self._spawn(PROMETHEUS, [
                PROMETHEUS, f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'prometheus'}", "--storage.tsdb.retention.time=1d",
                f"--web.listen-address=127.0.0.1:{prom_port}", "--web.enable-lifecycle", "--log.level=warn",
                f"--web.console.templates={self.workdir}", f"--web.console.libraries={self.workdir}"])
            deadline = time.monotonic() + self.start_timeout_s
            self._wait_ready(self.alertmanager_url, ALERTMANAGER, deadline)
            self._wait_ready(self.prometheus_url, PROMETHEUS, deadline)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = round(time.monotonic() - t0, 2)
        return self

    def wait_scraping(self, timeout_s: float = 20.0) -> float:
        """Block until Prometheus has scraped every target once (its service discovery hands the targets
        over within about 5 s of the start); the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        targets = 1 + len(self.scrape.nodes) + (1 if self.scrape.ceph else 0)
        while True:
            body = self.query("up")
            if len((body.get("data") or {}).get("result") or []) >= targets:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise MonitoringStartError(f"Prometheus at {self.prometheus_url} has not scraped the twin's "
                                           f"exporters within {timeout_s:g} s; read {self.workdir / 'log'}")
            self._check_alive()
            time.sleep(0.1)

    def stop(self) -> None:
        with self._lock:
            for name in list(self._procs):
                self._terminate(name)
            self._procs.clear()
            self.endpoint.stop()
            if self._created_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self._created_dir = False
        atexit.unregister(self.stop)

    def __enter__(self) -> RealMonitoring:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self._procs.items() if p.poll() is None}

    # --- the twin side -----------------------------------------------------------------------------

    def attach(self, source: Source | None) -> None:
        """Scrape this source from now on (None: every exporter answers 404, as if gone); the always-firing
        rules of a former twin's faults go with it."""
        with self._lock:
            self.endpoint.source = source
            if self._firing or self._resolved:
                self._firing.clear()
                self._resolved.clear()
                self._write_rules()
                self.reload()

    def fire(self, alertname: str) -> None:
        """Add a rule `alertname` that fires from its first evaluation on (an instant later, not a scrape later)."""
        from homelab.monitoring import is_alert_name

        if not is_alert_name(alertname):
            raise ValueError(f"{alertname!r} is not a name Prometheus takes for an alert (letters, digits, _ and :, "
                             f"not starting with a digit)")
        with self._lock:
            if alertname in self._firing:
                return
            self._firing.add(alertname)
            self._resolved.discard(alertname)
            self._write_rules()
            self.reload()

    def unfire(self, alertname: str | None = None) -> None:
        with self._lock:
            before = set(self._firing)
            if alertname is None:
                self._firing.clear()
            else:
                self._firing.discard(alertname)
            if self._firing != before:
                # The rule stays with an expression that no longer holds: Prometheus resolves the alert at its
                # next evaluation and tells the Alertmanager, as when a real condition clears. (A rule removed
                # outright vanishes from Prometheus at once and is never resolved in the Alertmanager.)
                self._resolved |= before - self._firing
                self._write_rules()
                self.reload()

    def firing_faults(self) -> list[str]:
        return sorted(self._firing)

    # --- HTTP --------------------------------------------------------------------------------------

    def reload(self) -> None:
        """POST /-/reload: Prometheus re-reads its configuration and rules before it answers."""
        self._call("POST", self.prometheus_url + "/-/reload")

    def query(self, expr: str) -> dict[str, Any]:
        from urllib.parse import quote

        return dict(json.loads(self._call("GET", f"{self.prometheus_url}/api/v1/query?query={quote(expr)}")))

    def alerts(self) -> list[dict[str, Any]]:
        """Prometheus' pending and firing alerts."""
        return list(json.loads(self._call("GET", self.prometheus_url + "/api/v1/alerts"))["data"]["alerts"])

    def alertmanager_alerts(self) -> list[dict[str, Any]]:
        """What reached the Alertmanager, with each alert's status (active | suppressed, silencedBy)."""
        return list(json.loads(self._call("GET", self.alertmanager_url + "/api/v2/alerts")))

    @staticmethod
    def _call(method: str, url: str, timeout_s: float = 10.0) -> bytes:
        req = urllib.request.Request(url, method=method)
        with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 (a loopback URL of our own)
            return bytes(r.read())

    # --- files and processes -----------------------------------------------------------------------

    def _write_prometheus_config(self, am_port: int) -> None:
        iv = f"{self.interval_s:g}s"
        host = f"127.0.0.1:{self.endpoint.port}"
        cluster = self.scrape.cluster
        jobs: list[dict[str, Any]] = [{
            "job_name": "kube-state-metrics", "metrics_path": "/kube-state-metrics/metrics",
            "static_configs": [{"targets": [host], "labels": {"cluster": cluster}}],
        }, {
            # One target per node, labelled as kube-prometheus-stack's node-exporter ServiceMonitor labels it:
            # instance <node ip>:9100 (the pod's host network address).
            "job_name": "node-exporter",
            "static_configs": [{"targets": [host], "labels": {
                "__metrics_path__": f"/node-exporter/{name}/metrics", "instance": f"{ip}:9100",
                "cluster": cluster}} for name, ip in self.scrape.nodes],
        }]
        if self.scrape.ceph:
            jobs.append({"job_name": "rook-ceph-mgr", "metrics_path": "/ceph/metrics",
                         "static_configs": [{"targets": [host], "labels": {"cluster": cluster}}]})
        cfg = {
            "global": {"scrape_interval": iv, "scrape_timeout": iv, "evaluation_interval": iv},
            "rule_files": [str(self.workdir / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": jobs,
        }
        _write(self.workdir / "prometheus.yml", yaml.safe_dump(cfg, sort_keys=False))

    def _write_alertmanager_config(self) -> None:
        # No receiver sends anything anywhere: alerts are only held, grouped, inhibited and silenced.
        cfg = {"route": {"receiver": "null", "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h"},
               "receivers": [{"name": "null"}]}
        _write(self.workdir / "alertmanager.yml", yaml.safe_dump(cfg, sort_keys=False))

    def _write_rules(self) -> None:
        groups = base_rules(self.rule_for_s)
        if self._firing or self._resolved:
            groups.append({"name": "twin-faults", "rules": [
                {"alert": name, "expr": "vector(1)" if name in self._firing else "vector(1) == 0",
                 "labels": {"severity": "warning"},
                 "annotations": {"summary": f"fault alert-firing={name} of the simulated homelab"}}
                for name in sorted(self._firing | self._resolved)]})
        _write(self.workdir / "rules.yml", yaml.safe_dump({"groups": groups}, sort_keys=False))

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / "log" / f"{name}.log", "ab")
        with log:
            # PDEATHSIG fires when the thread that forked exits: only the main thread lives as long as the
            # process; elsewhere the atexit hook is the safety net.
            pre = _die_with_parent if threading.current_thread() is threading.main_thread() else None
            self._procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                 cwd=self.workdir, preexec_fn=pre)

    def _wait_ready(self, url: str, name: str, deadline: float) -> None:
        while True:
            with contextlib.suppress(OSError, urllib.error.URLError):
                self._call("GET", url + "/-/ready", timeout_s=1)
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise MonitoringStartError(f"{name} at {url} not ready within {self.start_timeout_s:g} s; read "
                                           f"{self.workdir / 'log' / (name + '.log')}")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                tail = ""
                with contextlib.suppress(OSError):
                    tail = (self.workdir / "log" / f"{name}.log").read_text(errors="replace")[-600:]
                raise MonitoringStartError(f"{name} exited with {p.returncode}: {tail.strip()}")

    def _terminate(self, name: str) -> None:
        p = self._procs.get(name)
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(timeout=5)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
