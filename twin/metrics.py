"""The simulated homelab's metrics, in the Prometheus text format, on one loopback HTTP endpoint.

What the exporters of kube-prometheus-stack and Rook would expose about the twin's world, with their
metric and label names (text exposition format 0.0.4, https://prometheus.io/docs/instrumenting/exposition_formats/):
- ``/kube-state-metrics/metrics``: ``kube_node_status_condition{node, condition="Ready", status}`` (one
  series per status true/false/unknown, 1 for the current one: kubernetes/kube-state-metrics
  internal/store/node.go ``createNodeStatusConditionFamilyGenerator``), ``kube_node_spec_unschedulable``,
  ``kube_node_info``.
- ``/node-exporter/<host>/metrics``: answered while the machine runs, refused (503) while it is off or
  rebooting, so Prometheus' own ``up`` of that target drops to 0 as a real node-exporter's does.
- ``/ceph/metrics``: the mgr prometheus module's ``ceph_health_status`` (0 ok, 1 warn, 2 err),
  ``ceph_health_detail{name, severity}``, ``ceph_osd_up``/``ceph_osd_in`` and ``ceph_osd_metadata{hostname}``
  per OSD (ceph/ceph src/pybind/mgr/prometheus/module.py).

The endpoint is apart from its source (``MetricsEndpoint.source``) so that one real Prometheus scraping a
fixed set of targets can follow one twin after another without a reload (its service discovery passes a
new target on only every 5 s: prometheus/prometheus discovery/manager.go ``updatert``).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Source = Callable[[str], "tuple[int, str] | None"]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEALTH_CODES = {"HEALTH_OK": 0, "HEALTH_WARN": 1, "HEALTH_ERR": 2}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    endpoint: MetricsEndpoint


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        source = self.server.endpoint.source
        answer = None
        if source is not None:
            try:
                answer = source(self.path.split("?", 1)[0])
            except Exception as e:  # an exporter that fails answers 500, as a real one does
                answer = (500, f"# exporter error: {type(e).__name__}: {e}\n")
        status, text = answer if answer is not None else (404, "no such exporter\n")
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        pass


class MetricsEndpoint:
    """An HTTP server on 127.0.0.1 answering GET <path> with ``source(path)``; 404 while it has no source."""

    def __init__(self, thread_name: str = "twin-metrics") -> None:
        self.source: Source | None = None
        self.url = ""
        self.port = 0
        self._thread_name = thread_name
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsEndpoint:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.endpoint = self
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(2)
        self._httpd = None


# --- what the twin exports ---------------------------------------------------------------------------


def _labels(**kv: Any) -> str:
    return "{" + ",".join(f'{k}={json.dumps(str(v))}' for k, v in kv.items()) + "}"


class TwinExporters:
    """The exporters of one monitored cluster of a twin: ``render(path)`` for MetricsEndpoint.source."""

    def __init__(self, twin: Any, cluster: str, ceph_cache_s: float = 0.3) -> None:
        self.twin = twin
        self.cluster = cluster
        self.hosts = list(twin.world.clusters[cluster].nodes)
        self.runs_ceph = bool(twin.world.clusters[cluster].ceph)
        self._ceph_cache_s = ceph_cache_s
        self._ceph_at = 0.0
        self._ceph_text = ""
        self._ceph_lock = threading.Lock()

    def render(self, path: str) -> tuple[int, str] | None:
        if path == "/kube-state-metrics/metrics":
            return 200, self.kube_state_metrics()
        if path.startswith("/node-exporter/") and path.endswith("/metrics"):
            host = path[len("/node-exporter/"):-len("/metrics")]
            return self.node_exporter(host)
        if path == "/ceph/metrics" and self.runs_ceph:
            return 200, self.ceph_metrics()
        return None

    def kube_state_metrics(self) -> str:
        world = self.twin.world
        lines = ["# HELP kube_node_status_condition The condition of a cluster node.",
                 "# TYPE kube_node_status_condition gauge"]
        info = ["# HELP kube_node_info Information about a cluster node.", "# TYPE kube_node_info gauge"]
        unsched = ["# HELP kube_node_spec_unschedulable Whether a node can schedule new pods.",
                   "# TYPE kube_node_spec_unschedulable gauge"]
        with world.lock:
            c = world.clusters[self.cluster]
            if not c.bootstrapped:
                return "\n".join(lines) + "\n"
            for name, n in sorted(c.nodes.items()):
                ready = n.phase == "running" and n.ready
                for status in ("true", "false", "unknown"):
                    value = 1 if (status == "true") == ready and status != "unknown" else 0
                    lines.append(f"kube_node_status_condition{_labels(node=name, condition='Ready', status=status)} "
                                 f"{value}")
                info.append(f"kube_node_info{_labels(node=name, internal_ip=n.ip, os_image=f'Talos ({n.talos_version})', kubelet_version=n.kubelet_version)} 1")  # noqa: E501
                unsched.append(f"kube_node_spec_unschedulable{_labels(node=name)} {1 if n.unschedulable else 0}")
        return "\n".join(lines + info + unsched) + "\n"

    def node_exporter(self, host: str) -> tuple[int, str]:
        n = self.twin.world.node(host)
        if n is None or n.cluster != self.cluster:
            return 404, f"no node {host}\n"
        with self.twin.world.lock:
            running, booted, version = n.phase == "running", n.booted_at, n.talos_version
        if not running:
            return 503, "the machine is not running\n"
        boot = time.time() - (time.monotonic() - booted) if booted else time.time() - 3600
        return 200, ("# TYPE node_boot_time_seconds gauge\n"
                     f"node_boot_time_seconds {boot:.3f}\n"
                     "# TYPE node_uname_info gauge\n"
                     f"node_uname_info{_labels(nodename=host, release=version, sysname='Linux')} 1\n")

    def ceph_metrics(self) -> str:
        # The real `ceph` CLI takes a good part of a second: one reading serves the scrapes of a short while.
        with self._ceph_lock:
            now = time.monotonic()
            if now - self._ceph_at > self._ceph_cache_s or not self._ceph_text:
                self._ceph_text = self._read_ceph()
                self._ceph_at = now
            return self._ceph_text

    def _read_ceph(self) -> str:
        ceph = self.twin.ceph
        checks: dict[str, Any] = {}
        status: dict[str, Any] | None = None
        if hasattr(ceph, "status") and callable(ceph.status):  # the simulated Ceph
            status = ceph.status()
        else:
            with contextlib.suppress(Exception):
                status = json.loads(ceph.ceph("status", "-f", "json", timeout_s=5))
        health = str(((status or {}).get("health") or {}).get("status") or "HEALTH_ERR")
        checks = dict(((status or {}).get("health") or {}).get("checks") or {})
        lines = ["# HELP ceph_health_status Cluster health status", "# TYPE ceph_health_status untyped",
                 f"ceph_health_status {HEALTH_CODES.get(health, 2)}",
                 "# HELP ceph_health_detail healthcheck status by type (0=inactive, 1=active)",
                 "# TYPE ceph_health_detail untyped"]
        for name, check in sorted(checks.items()):
            lines.append(f"ceph_health_detail{_labels(name=name, severity=check.get('severity', ''))} 1")
        lines += ["# TYPE ceph_osd_up untyped", "# TYPE ceph_osd_in untyped", "# TYPE ceph_osd_metadata untyped"]
        for i, host in enumerate(self.hosts):
            daemon = f"osd.{i}"
            lines.append(f"ceph_osd_up{_labels(ceph_daemon=daemon)} {1 if self._osd_up(host) else 0}")
            lines.append(f"ceph_osd_in{_labels(ceph_daemon=daemon)} 1")
            lines.append(f"ceph_osd_metadata{_labels(ceph_daemon=daemon, hostname=host, device_class='ssd')} 1")
        return "\n".join(lines) + "\n"

    def _osd_up(self, host: str) -> bool:
        ceph = self.twin.ceph
        if hasattr(ceph, "osd_pid"):  # real Ceph: the daemon process runs
            return ceph.osd_pid(host) is not None
        osd = next((o for o, h in getattr(ceph, "osd_host", {}).items() if h == host), None)
        return osd is not None and f"osd.{osd}" in getattr(ceph, "_running", set())
