"""The simulated homelab (see docs/twin.md): `Twin(tree, workdir).start()`, or `with Twin(...) as twin:`.

Every endpoint listens on 127.0.0.1. Node addresses of the tree are labels that the twin's talosctl maps
to its World.
"""

from __future__ import annotations

import os
import secrets
import shlex
import threading
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from twin.state import Knobs, World, fault_value, parse_fault, seed_world

__all__ = ["Knobs", "Twin", "TwinError"]

STOP_BUDGET_SECONDS = 10.0
# Faults that act inside the simulated Ceph; real Ceph is made unhealthy by really stopping OSDs.
SIM_CEPH_FAULTS = ("ceph-stuck", "not-ok-to-stop")


class TwinError(RuntimeError):
    pass


class Twin:
    def __init__(self, tree: Path, workdir: Path, state: str = "pre-upgrade", faults: Iterable[str] = (),
                 knobs: Knobs | None = None, ceph: str = "sim", proxmox: dict[str, Any] | None = None,
                 monitoring: Any = "none") -> None:
        """proxmox: options of the simulated Proxmox (twin.proxmox.FakeProxmox: nodes, shared_storage,
        template_disk, with_template, time_scale). monitoring: "none", "real" (a real Prometheus and
        Alertmanager of its own, twin.monitoring_real) or a started RealMonitoring to attach to (tests share one)."""
        from homelab.config import load_tree

        self.tree_src = Path(tree)
        self.workdir = Path(workdir)
        self.state = state
        self.knobs = knobs or Knobs()
        if ceph not in ("sim", "real"):
            raise ValueError(f"ceph must be 'sim' or 'real', got {ceph!r}")
        self.ceph_kind = ceph
        if not (monitoring in ("none", "real") or hasattr(monitoring, "attach")):
            raise ValueError(f"monitoring must be 'none', 'real' or a RealMonitoring, got {monitoring!r}")
        self.monitoring_kind = "none" if monitoring == "none" else "real"
        self._shared_monitoring = None if isinstance(monitoring, str) else monitoring
        self.monitoring: Any = None  # the RealMonitoring serving this twin, once started
        self.monitoring_cluster: str | None = None
        self.monitoring_start_seconds: float | None = None
        self.proxmox_options = dict(proxmox or {})
        self.sops_age_key: str | None = None
        self._leases: dict[str, str] = {}
        self.tree = load_tree(self.tree_src)
        if not self.tree.clusters:
            problems = "; ".join(f"{p}" for p in self.tree.problems[:5]) or "no clusters/<name>/ directories"
            raise TwinError(f"the GitOps tree at {self.tree_src} has no cluster the twin can simulate: {problems}")
        self.world = World(self.knobs)
        seed_world(self.world, self.tree, state)
        self.record = self.world.record
        self._initial_faults = [parse_fault(f) for f in faults]
        for name, arg in self._initial_faults:
            self._check_fault_target(name, arg)
        self.bin_dir = self.workdir / "bin"
        self.git_dir = self.workdir / "git"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.talosconfig = self.workdir / "talosconfig"
        self.env_file = self.workdir / "env"
        self.kube: dict[str, Any] = {}
        self.stores: dict[str, Any] = {}
        self.proxmox: Any = None
        self.image_factory: Any = None
        self.ceph: Any = None
        self.git: Any = None
        self.control: Any = None
        self.rook: Any = None
        self.started_seconds: float | None = None
        self.ceph_start_seconds: float | None = None
        self.stop_leftovers: list[str] = []
        self._kube_token = secrets.token_hex(16)
        self._parts: list[Any] = []
        self._started = False

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Twin:
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.started_seconds = time.monotonic() - t0
        return self

    def _start(self) -> None:
        from twin import controllers, talos
        from twin.control import ControlServer
        from twin.gitrepo import GitRepo
        from twin.kubeapi import KubeApiServer, KubeStore
        from twin.shim import write_shim

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._started = True
        # fakepve is a process of its own: launch it first so it starts while the rest does.
        prox_cfg = next((c.proxmox for c in self.tree.clusters.values() if c.proxmox is not None), None)
        if prox_cfg is not None:
            from twin.proxmox import FakeProxmox
            self.proxmox = FakeProxmox(prox_cfg, self.workdir / "proxmox", self.state == "synced",
                                       self._on_vm_power, **self.proxmox_options)
            self.proxmox.launch()
            self._parts.append(self.proxmox)

        ceph_cluster = next((c for c in self.world.clusters.values() if c.ceph), None)
        ceph_hosts = list(ceph_cluster.nodes) if ceph_cluster else []
        if self.ceph_kind == "real":
            from twin.ceph_real import RealCeph
            self.ceph = RealCeph(self.workdir / "ceph", ceph_hosts)
            # The real CLI is the one on PATH; a shim left by an earlier simulated run would shadow it.
            (self.bin_dir / "ceph").unlink(missing_ok=True)
        else:
            from twin.ceph_sim import SimCeph

            def has_fault(name: str, arg: str | None) -> bool:
                return self.world.faults.has(name, arg)
            self.ceph = SimCeph(ceph_hosts, self.knobs.recovery_seconds, has_fault)
            self.ceph.command = [str(self.bin_dir / "ceph")]
        # Registered before start(): a start that fails half-way still stops what it started.
        self._parts.append(self.ceph)
        t_ceph = time.monotonic()
        self.ceph.start()
        self.ceph_start_seconds = time.monotonic() - t_ceph
        if ceph_cluster is not None:
            self.world.power_hooks.append(partial(self._ceph_power, ceph_cluster.name))

        self.git = GitRepo(self.git_dir)
        self.git.init(self.tree_src)
        if self.proxmox is not None:
            self._own_proxmox_tree()
        from twin.image_factory import ImageFactory
        self.image_factory = ImageFactory(self.world)
        self._parts.append(self.image_factory)
        self.image_factory.start()
        self._own_factory_tree()
        revision = self.git.revision()

        for name, cluster in self.world.clusters.items():
            store = KubeStore()
            server = KubeApiServer(store, token=self._kube_token)
            server.bookmark_interval_s = self.knobs.bookmark_seconds
            server.available = cluster.bootstrapped
            server.start()
            self.stores[name] = store
            self.kube[name] = server
            self._parts.append(server)
            self._seed_store(name, store, revision, with_ceph=cluster.ceph)

        self.loop = controllers.Loop()
        self.nodes = controllers.NodeLifecycle(self.world, self.stores, self.kube, self.loop)
        self.flux = [controllers.Flux(name, store, self.world, self.git, self.loop) for name, store in self.stores.items()]
        self.loop.start()
        self.nodes.start()
        for f in self.flux:
            f.start()
        if ceph_cluster is not None:
            self.rook = controllers.Rook(self.stores[ceph_cluster.name], self.ceph, self.world)
            self.rook.start()

        self.control = ControlServer(secrets.token_hex(16))
        self.control.register("talosctl", lambda argv, cwd, env: talos.run(
            self.world, argv, env, cwd, kubeconfig_for=self.kubeconfig_text))
        self.control.start()
        write_shim(self.bin_dir, "talosctl", self.control.url, self.control.token)
        if self.ceph_kind == "sim":
            self.control.register("ceph", lambda argv, cwd, env: self.ceph.run(argv))
            write_shim(self.bin_dir, "ceph", self.control.url, self.control.token)

        _write_private(self.kubeconfig, self.kubeconfig_text(None) or "")
        _write_private(self.talosconfig, self.talosconfig_text())
        if self.monitoring_kind == "real":
            self._start_monitoring()
        if self.proxmox is not None:
            self.proxmox.wait_ready()
        # After every part is up: proxmox-task-fails is a command to the running fakepve.
        for name, arg in self._initial_faults:
            self.inject(name, arg)
        _write_private(self.env_file, self.env_text())

    def _start_monitoring(self) -> None:
        """The real Prometheus and Alertmanager, scraping the exporters of the cluster that runs
        kube-prometheus-stack in the tree (m720q: k8s/infrastructure/monitoring)."""
        from twin.metrics import TwinExporters
        from twin.monitoring_real import RealMonitoring, Scrape

        t0 = time.monotonic()
        cluster = self._monitored_cluster()
        self.monitoring_cluster = cluster
        c = self.world.clusters[cluster]
        scrape = Scrape(cluster, tuple((n.hostname, n.ip) for n in c.nodes.values()), c.ceph)
        exporters = TwinExporters(self, cluster)
        if self._shared_monitoring is not None:
            mon = self._shared_monitoring
            if mon.scrape != scrape:
                raise TwinError(f"the shared Prometheus scrapes {mon.scrape}, this twin's {cluster} is {scrape}")
            mon.attach(exporters.render)
            self.monitoring = mon
            self._parts.append(_Detach(mon))
        else:
            mon = RealMonitoring(self.workdir / "monitoring", scrape)
            self._parts.append(mon)
            mon.start()
            mon.attach(exporters.render)
            self.monitoring = mon
            # Gates are only as good as the data: return once Prometheus has the twin's metrics.
            mon.wait_scraping()
        self.monitoring_start_seconds = round(time.monotonic() - t0, 2)

    def _monitored_cluster(self) -> str:
        for name in self.world.clusters:
            try:
                releases = self.stores[name].list("helm.toolkit.fluxcd.io/v2", "HelmRelease")
            except Exception:  # no HelmRelease kind served in that cluster
                continue
            if any((hr.get("metadata") or {}).get("name") == "kube-prometheus-stack" for hr in releases):
                return name
        return self._default_cluster()

    def _ceph_power(self, ceph_cluster: str, cluster: str, host: str, down: bool) -> None:
        """A node of the Ceph cluster powers off (its OSD stops) or is back (its OSD starts)."""
        if cluster != ceph_cluster or self.ceph is None:
            return
        try:
            (self.ceph.node_down if down else self.ceph.node_up)(host)
        except Exception:
            # A reboot that ends while the twin tears down finds Ceph stopped: nothing to start.
            if not self.world.stopping:
                raise

    def stop(self) -> None:
        """Tear every part down (threads joined, servers closed, subprocesses ended) within 10 s."""
        deadline = time.monotonic() + STOP_BUDGET_SECONDS
        left: list[str] = []
        # Rook first: with real Ceph it asks the mon, which must still be there to answer.
        if self.rook is not None:
            self.rook.stop()
        # Real daemons take the longest to end (SIGTERM, a grace, SIGKILL): they stop while the rest does.
        ceph_stopper: threading.Thread | None = None
        if self.ceph_kind == "real" and self.ceph in self._parts:
            self._parts.remove(self.ceph)
            ceph_stopper = threading.Thread(target=self._stop_part, args=(self.ceph, left), name="twin-ceph-stop",
                                            daemon=True)
            ceph_stopper.start()
        left += self.world.stop(timeout=3.0)
        for f in getattr(self, "flux", []):
            f.stop()
        if getattr(self, "nodes", None) is not None:
            self.nodes.stop()
        if getattr(self, "loop", None) is not None:
            self.loop.stop()
        if self.control is not None:
            self.control.stop()
        for part in reversed(self._parts):
            if time.monotonic() > deadline:
                left.append(f"{type(part).__name__}: not stopped within {STOP_BUDGET_SECONDS:.0f} s")
                continue
            self._stop_part(part, left)
        self._parts.clear()
        if ceph_stopper is not None:
            ceph_stopper.join(max(0.1, deadline - time.monotonic()))
            if ceph_stopper.is_alive():
                left.append("real Ceph: daemons still stopping")
            else:
                left += [f"ceph daemon {name} (pid {pid})" for name, pid in self.ceph.pids().items()]
        if self.env_file.exists():
            self.env_file.unlink()
        self.stop_leftovers = left

    @staticmethod
    def _stop_part(part: Any, left: list[str]) -> None:
        try:
            part.stop()
        except Exception as e:  # stop the rest regardless
            left.append(f"{type(part).__name__}: {e}")

    def __enter__(self) -> Twin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults ----------------------------------------------------------------------------

    def _check_fault_target(self, name: str, arg: str | None) -> None:
        from twin.state import FAULTS
        if name in SIM_CEPH_FAULTS and self.ceph_kind == "real":
            raise ValueError(f"fault {name} acts on the simulated Ceph only; with real Ceph stop an OSD instead "
                             f"(Twin.ceph.node_down(<host>)) or set the pool's min_size to 3")
        if FAULTS[name] == "alertname" and self.monitoring_kind != "real":
            raise ValueError(f"fault {name} fires through the real Prometheus and Alertmanager: start the twin with "
                             f"monitoring real (--monitoring real)")
        if FAULTS[name] == "host" and arg not in self.world.hosts():
            raise ValueError(f"fault {name}={arg}: no node named {arg!r}; nodes: {', '.join(self.world.hosts())}")
        if FAULTS[name] == "kustomization":
            known = {k.name for c in self.tree.clusters.values() for k in c.flux.kustomizations.values()}
            if arg not in known:
                raise ValueError(f"fault {name}={arg}: no Kustomization named {arg!r}; known: {', '.join(sorted(known))}")

    def inject(self, fault: str, arg: str | None = None) -> None:
        """Turn a fault on at run time (`inject("upgrade-fails", "m720q-2")` or `inject("upgrade-fails=m720q-2")`)."""
        name, arg = parse_fault(fault, arg)
        self._check_fault_target(name, arg)
        with self.world.lock:
            self.world.faults.add(name, arg)
        for server in self.kube.values():
            if name == "kube-flaky":
                server.flaky_share = fault_value(name, arg)
                server.added_latency_s = 0.05
            elif name == "kube-throttle":
                server.throttle_share = fault_value(name, arg)
            elif name == "kube-blackhole":
                server.blackhole_for(fault_value(name, arg))
            elif name == "watch-504":
                server.watch_504_after_s = self.knobs.watch_504_seconds
        if name == "proxmox-task-fails" and self.proxmox is not None:
            self.proxmox.fail_tasks(True)
        if name == "alert-firing" and self.monitoring is not None and arg:
            self.monitoring.fire(arg)
        # node-never-ready bites at the node's next boot: a node Ready now stays so until it reboots.
        self.world.changed()

    def clear(self, fault: str, arg: str | None = None) -> None:
        name, _, given = fault.partition("=")
        from twin.state import FAULTS
        if name not in FAULTS:
            parse_fault(name)  # raises the ValueError naming the known faults
        if name == "alert-firing" and self.monitoring is not None:
            self.monitoring.unfire(arg or given or None)
        with self.world.lock:
            self.world.faults.clear(name, arg or given or None)
            if name == "node-never-ready":
                c_arg = arg or given
                for n in ([self.world.node(c_arg)] if c_arg else [x for c in self.world.clusters.values()
                                                                 for x in c.nodes.values()]):
                    if n is not None and n.talos_up and self.world.clusters[n.cluster].bootstrapped:
                        n.ready = True
        for server in self.kube.values():
            if name == "kube-flaky":
                server.flaky_share = 0.0
                server.added_latency_s = 0.0
            elif name == "kube-throttle":
                server.throttle_share = 0.0
            elif name == "kube-blackhole":
                server.blackhole_for(0.0)
            elif name == "watch-504":
                server.watch_504_after_s = None
        if name == "proxmox-task-fails" and self.proxmox is not None:
            self.proxmox.fail_tasks(False)
        if name == "ceph-stuck" and hasattr(self.ceph, "_notify"):
            self.ceph._notify()
        self.world.changed()

    # --- files -----------------------------------------------------------------------------

    def kubeconfig_text(self, cluster: str | None) -> str | None:
        """A kubeconfig with context admin@<cluster> (one cluster, or every cluster when None)."""
        names = [cluster] if cluster else sorted(self.kube, key=lambda n: (n != self._default_cluster(), n))
        if any(n not in self.kube for n in names):
            return None
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": n, "cluster": {"server": self.kube[n].url}} for n in names],
            "users": [{"name": f"admin@{n}", "user": {"token": self._kube_token}} for n in names],
            "contexts": [{"name": f"admin@{n}", "context": {"cluster": n, "user": f"admin@{n}",
                                                             "namespace": "default"}} for n in names],
            "current-context": f"admin@{names[0]}", "preferences": {},
        }
        return yaml.safe_dump(cfg, sort_keys=False)

    def _default_cluster(self) -> str:
        return next((c.name for c in self.world.clusters.values() if c.ceph), sorted(self.world.clusters)[0])

    def talosconfig_text(self) -> str:
        contexts = {}
        for name, c in self.world.clusters.items():
            cps = [n.ip for n in c.control_planes()]
            contexts[name] = {"endpoints": cps, "nodes": cps[:1], "ca": _fake_pem("ca"), "crt": _fake_pem("crt"),
                              "key": _fake_pem("key")}
        return yaml.safe_dump({"context": self._default_cluster(), "contexts": contexts}, sort_keys=False)

    def env(self) -> dict[str, str]:
        env = {"KUBECONFIG": str(self.kubeconfig), "TALOSCONFIG": str(self.talosconfig)}
        env.update(self.ceph.env() if self.ceph is not None else {})
        if self.monitoring is not None:
            env.update({"HOMELAB_PROMETHEUS_URL": self.monitoring.prometheus_url,
                        "HOMELAB_ALERTMANAGER_URL": self.monitoring.alertmanager_url})
        if self.proxmox is not None:
            env.update({"HOMELAB_PROXMOX_URL": self.proxmox.url, "HOMELAB_PROXMOX_TOKEN_ID": self.proxmox.token_id,
                        "HOMELAB_PROXMOX_TOKEN_SECRET": self.proxmox.token_value})
        return env

    def env_text(self) -> str:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        lines.append(f'export PATH={shlex.quote(str(self.bin_dir))}:"$PATH"')
        return "\n".join(lines) + "\n"

    def subprocess_env(self) -> dict[str, str]:
        """os.environ plus what the env file exports: for running the executables from tests."""
        return {**os.environ, **self.env(), "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    # --- the Proxmox side ------------------------------------------------------------------

    def _own_proxmox_tree(self) -> None:
        """The twin's copy of the tree describes the twin's world: cluster.yaml's proxmox.endpoint is the
        simulated Proxmox (the flow cross-checks it against the block), and talsecret.sops.yaml is re-keyed:
        fresh cluster secrets, SOPS-encrypted to an age key of the twin's own (the real file is encrypted to a
        key the twin does not have); that key goes into the Homelab block the twin registers."""
        import re as _re

        from twin.talos_gen import rekey_talsecret
        changed = False
        for name, c in self.tree.clusters.items():
            if c.proxmox is None:
                continue
            path = self.git.tree / "clusters" / name / "cluster.yaml"
            text = path.read_text()
            new = _re.sub(r"(?m)^(proxmox:\n(?:[ \t].*\n)*?[ \t]+endpoint:[ \t]*)\S+",
                          lambda m: m.group(1) + self.proxmox.url, text, count=1)
            if new != text:
                path.write_text(new)
                changed = True
            secret = self.git.tree / "clusters" / name / "talos" / "talsecret.sops.yaml"
            if secret.exists():
                self.sops_age_key = rekey_talsecret(secret, self.sops_age_key)
                changed = True
        if changed:
            self.git.commit_all("twin: the simulated Proxmox endpoint and the twin's own SOPS key")

    def _own_factory_tree(self) -> None:
        """The twin's copy of each talconfig.yaml names the twin's Image Factory in `imageFactory` (talhelper's
        settings: registryURL, protocol), so that the flows register schematics with it, on loopback, exactly
        as they would with factory.talos.dev, and the installer images they plan are the twin factory's."""
        import re as _re

        from homelab.config import talconfig_path
        changed = False
        for name, c in self.tree.clusters.items():
            if c.proxmox is not None:
                # cluster.yaml takes the same mapping in its `cluster:` section.
                path = self.git.tree / "clusters" / name / "cluster.yaml"
                text = path.read_text()
                text = _re.sub(r"(?m)^  imageFactory:[^\n]*\n(?:    [^\n]*\n)*", "", text)
                text = _re.sub(r"(?m)^cluster:[ \t]*\n", lambda m: m.group(0) + (
                    f"  imageFactory:  # the simulated homelab's own Image Factory (this copy of the tree only)\n"
                    f"    registryURL: {self.image_factory.registry}\n    protocol: http\n"), text, count=1)
                path.write_text(text)
                changed = True
            if c.talconfig is None:
                continue
            path = talconfig_path(self.git.tree, name)
            if not path.exists():
                continue
            text = path.read_text()
            # Drop an imageFactory block the tree has (the key and its indented lines), then name the twin's.
            text = _re.sub(r"(?m)^imageFactory:[^\n]*\n(?:[ \t]+[^\n]*\n|[ \t]*\n)*", "", text)
            text = text.rstrip("\n") + (f"\n\n# The simulated homelab's own Image Factory (this copy of the tree only).\n"
                                        f"imageFactory:\n  registryURL: {self.image_factory.registry}\n"
                                        f"  protocol: http\n")
            path.write_text(text)
            changed = True
        if changed:
            self.git.commit_all("twin: the simulated Image Factory")

    def dhcp_lease(self, mac: str) -> str:
        """The address the homelab's DHCP server hands a VM booting into maintenance mode: one per MAC, from
        the top of the LAN's range (10.42.0.200 up), never a node's static address."""
        with self.world.lock:
            if mac not in self._leases:
                taken = {n.ip for c in self.world.clusters.values() for n in c.nodes.values()}
                host = 200 + len(self._leases)
                while f"10.42.0.{host % 256}" in taken:
                    host += 1
                self._leases[mac] = f"10.42.{host // 256}.{host % 256}"
            return self._leases[mac]

    def _agent_reports(self, vmid: int, mac: str, ip: str | None) -> None:
        """Tell the simulated Proxmox what the VM's guest agent now answers (the qemu-guest-agent extension
        of cluster.yaml's schematic runs from the image, maintenance mode included)."""
        if self.proxmox is None or not self.proxmox.running:
            return
        ifaces = None if ip is None else [
            {"name": "lo", "hardware-address": "00:00:00:00:00:00",
             "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}]},
            {"name": "eth0", "hardware-address": mac.lower(),
             "ip-addresses": [{"ip-address": ip, "ip-address-type": "ipv4", "prefix": 24}]}]
        try:
            self.proxmox.set_agent(vmid, ifaces)
        except Exception:  # the VM may be gone meanwhile; the agent's answer then does not matter
            pass

    def _on_vm_power(self, name: str, vmid: int, running: bool) -> None:
        n = self.world.node(name)
        if n is None:
            return
        info = self.proxmox.vm_info.get(vmid, {}) if self.proxmox is not None else {}
        mac = str(info.get("mac") or "")
        with self.world.lock:
            if running and n.phase == "off":
                n.disk = "/dev/vda" if str(info.get("disk", "")).startswith("virtio") else "/dev/sda"
                if n.installed:
                    self.world.update(n, phase="rebooting")
                    self.world.spawn(lambda: self._boot(n, vmid, mac), f"boot-{name}")
                else:
                    self.world.update(n, phase="maintenance", ready=False, dhcp_ip=self.dhcp_lease(mac))
            elif not running and n.phase != "off":
                self.world.update(n, phase="off", ready=False, etcd_running=False)
        if running and n.phase == "maintenance" and info.get("agent"):
            self._agent_reports(vmid, mac, n.dhcp_ip)
            self.world.spawn(lambda: self._report_installed(n, vmid, mac), f"agent-{name}")
        if not running:
            self.world.power(n, down=True)

    def _report_installed(self, n: Any, vmid: int, mac: str) -> None:
        """Once the VM runs the installed Talos, its agent reports the static address."""
        if self.world.wait_for(lambda: n.phase == "running" or n.phase == "off", 3600):
            if n.phase == "running":
                self._agent_reports(vmid, mac, n.ip)

    def _boot(self, n: Any, vmid: int = 0, mac: str = "") -> None:
        import uuid
        if not self.world.sleep(self.knobs.reboot_seconds):
            return
        with self.world.lock:
            if n.phase != "rebooting":
                return
            cluster = self.world.clusters[n.cluster]
            self.world.update(n, phase="running", boot_id=str(uuid.uuid4()), etcd_running=bool(n.etcd_member_id),
                              booted_at=time.monotonic(),
                              ready=cluster.bootstrapped and cluster.cni_ready
                              and not self.world.faults.has("node-never-ready", n.hostname))
        self.world.power(n, down=False)
        if mac:
            self._agent_reports(vmid, mac, n.ip)

    # --- seeding ---------------------------------------------------------------------------

    def _tree_doc(self, file: str, kind: str, name: str, index: int | None = None) -> dict[str, Any] | None:
        """The manifest of ``kind``/``name`` in ``file`` (a path as the tree names it, under its own root
        directory) as committed to the twin's repository; None when it is not there."""
        rel = Path(*Path(file).parts[1:])
        try:
            docs = [d for d in yaml.safe_load_all((self.git.tree / rel).read_text()) if isinstance(d, dict)]
        except (OSError, yaml.YAMLError):
            return None
        if index is not None and index < len(docs) and docs[index].get("kind") == kind:
            return docs[index]
        return next((d for d in docs if d.get("kind") == kind and (d.get("metadata") or {}).get("name") == name), None)

    def _seed_store(self, cluster: str, store: Any, revision: str, with_ceph: bool) -> None:
        from twin import controllers as ctl
        flux = self.tree.clusters[cluster].flux
        # What each Kustomization applies, from the git head: HelmReleases Ready as helm-controller leaves
        # them, and the sources they read (HelmRepositories, OCIRepositories, Buckets).
        releases: dict[tuple[str, str], dict[str, Any]] = {}
        applied_sources: dict[tuple[str, str, str], dict[str, Any]] = {}
        for k in sorted(flux.kustomizations.values(), key=lambda k: k.key):
            if k.suspend:
                continue
            for doc in ctl.flux_objects_at(self.git.path, k.path, ("HelmRelease", *ctl.SOURCE_KINDS)):
                meta = doc.get("metadata") or {}
                if doc["kind"] == "HelmRelease":
                    obj = ctl.helmrelease_object(doc, k.key)
                    releases.setdefault((obj["metadata"]["namespace"], obj["metadata"]["name"]), obj)
                else:
                    applied_sources.setdefault((doc["kind"], str(meta.get("namespace") or "default"),
                                                str(meta.get("name"))), doc)
        namespaces = ({"default", "kube-system", "flux-system"} | {k.namespace for k in flux.kustomizations.values()}
                      | {ns for ns, _ in releases} | {ns for _, ns, _ in applied_sources})
        if with_ceph:
            namespaces.add("rook-ceph")
        for ns in sorted(namespaces):
            store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                          "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
        # Every source a Kustomization reads: its manifest in the tree when there is one (the cluster's
        # flux-system sync), else the shape flux bootstrap or an operator would have created.
        sources: dict[tuple[str, str, str], dict[str, Any]] = dict(applied_sources)
        for fs in flux.sources.values():
            source_doc = self._tree_doc(fs.file, fs.kind, fs.name)
            if source_doc is not None:
                sources[(fs.kind, fs.namespace, fs.name)] = source_doc
        defaults = {
            "GitRepository": {"interval": "1m0s", "ref": {"branch": "main"}, "timeout": "60s",
                              "url": f"file://{self.git_dir}"},
            "OCIRepository": {"interval": "1m0s", "ref": {"tag": "latest"}, "url": "oci://registry.homelab.lan/k8s"},
            "Bucket": {"interval": "1m0s", "bucketName": "k8s", "endpoint": "minio.homelab.lan:9000",
                       "provider": "generic"},
        }
        for k in flux.kustomizations.values():
            key = (k.source_kind, k.source_namespace, k.source_name)
            if k.source_kind in defaults and key not in sources:
                sources[key] = {"spec": defaults[k.source_kind]}
        for (kind, ns, name), doc in sorted(sources.items()):
            obj = {"apiVersion": ctl.SRC_API, "kind": kind, "metadata": {"name": name, "namespace": ns},
                   "spec": dict(doc.get("spec") or {})}
            if kind == "GitRepository" and not obj["spec"].get("url"):
                obj["spec"]["url"] = f"file://{self.git_dir}"
            rev = ctl.source_revision(kind, obj, self.git)
            obj["status"] = {"observedGeneration": 1, "artifact": ctl.artifact(kind, ns, name, rev),
                             "conditions": [ctl.condition("Ready", "True", "Succeeded",
                                                          f"stored artifact for revision '{rev}'", 1)]}
            store.create(obj)
        for k in sorted(flux.kustomizations.values(), key=lambda k: k.key):
            ks_doc = self._tree_doc(k.file, "Kustomization", k.name, k.index)
            spec: dict[str, Any] = dict((ks_doc or {}).get("spec") or {}) or {
                "interval": k.interval or "10m0s", "path": k.path, "prune": True}
            spec["sourceRef"] = {"kind": k.source_kind, "name": k.source_name, "namespace": k.source_namespace}
            if k.depends_on:
                spec["dependsOn"] = [{"name": n, "namespace": ns} for ns, n in k.depends_on]
            if k.suspend:
                spec["suspend"] = True
            applied = revision if k.source_kind not in ctl.SOURCE_KINDS[1:3] else ctl.source_revision(
                k.source_kind, store.get(ctl.SRC_API, k.source_kind, k.source_namespace, k.source_name) or {},
                self.git)
            store.create({
                "apiVersion": ctl.KS_API, "kind": "Kustomization", "metadata": {"name": k.name, "namespace": k.namespace},
                "spec": spec,
                "status": {"observedGeneration": 1, "lastAppliedRevision": applied, "lastAttemptedRevision": applied,
                           "conditions": [ctl.condition("Ready", "True", "ReconciliationSucceeded",
                                                        f"Applied revision: {applied}", 1)]}})
        for _, obj in sorted(releases.items()):
            store.create(obj)
            chart = ctl.helmchart_object(obj)
            if chart is not None and store.get(ctl.SRC_API, "HelmChart", chart["metadata"]["namespace"],
                                               chart["metadata"]["name"]) is None:
                store.create(chart)
        if with_ceph:
            store.create(ctl.ceph_cluster_object(self.ceph.health()))


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fake_pem(what: str) -> str:
    # Not key material: the twin's talosctl never does TLS. Shaped like talosconfig's base64 PEM fields.
    import base64
    return base64.b64encode(f"-----BEGIN TWIN {what.upper()}-----\nnot-a-real-{what}\n-----END TWIN {what.upper()}-----\n"
                            .encode()).decode()


class _Detach:
    """A shared Prometheus outlives the twin: stopping the twin only takes its exporters (and faults) away."""

    def __init__(self, monitoring: Any) -> None:
        self.monitoring = monitoring

    def stop(self) -> None:
        self.monitoring.attach(None)
