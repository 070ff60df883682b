"""A real, throw-away Ceph cluster on loopback: the twin's Ceph seam backed by the Debian daemons.

The shape of the homelab's CephCluster (k8s/infrastructure/rook-ceph: ``mon.count: 3``,
``mgr.count: 2``, ``allowMultiplePerNode: false``, one OSD per node): three mons ``a b c`` and
two mgrs ``a b`` as Rook names them, each on a node of its own, and one BlueStore OSD per node,
with a replicated pool of size 3 / min_size 2 and failure domain ``host``. A node's reboot
(``node_down``/``node_up``) stops and starts every daemon on that node: its OSD, its mon, and
its mgr — when that is the active one, the standby really takes over.

Each daemon runs with ``NODE_NAME=<node>`` in its environment, as Rook's pods do
(rook/rook pkg/operator/k8sutil/pod.go ``ClusterDaemonEnvVars``: ``NODE_NAME`` from
``spec.nodeName``, used for mon, mgr and OSD containers); Ceph reports that as the daemon's
hostname (ceph/ceph src/common/hostname.cc ``ceph_get_hostname``), so ``ceph mon metadata``
names the node a mon runs on, as it does under Rook. The CRUSH host of a node's OSD is the
node's name with dots turned into dashes (rook/rook pkg/daemon/ceph/client/crush.go
``NormalizeCrushName``, applied in pkg/operator/ceph/cluster/osd/topology/topology.go).

Everything (config, keys, data, logs, sockets) lives inside ``workdir``. The daemons run in
the foreground (``-f``) as children of this process, so the owner can always stop them and
nothing outlives it: ``stop()`` sends SIGTERM, then SIGKILL, and removes ``workdir``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("ceph-mon", "ceph-mgr", "ceph-osd")
INSTALL_HINT = (
    "run scripts/install-system-packages.sh as root (apt-get install --no-install-recommends ceph-mon ceph-mgr ceph-osd)"
)

POOL = "rbd"
PG_NUM = 16
# The homelab's CephCluster: mon.count 3, mgr.count 2 (k8s/infrastructure/rook-ceph/cluster/base).
MONS = 3
MGRS = 2
# Rook names mons and mgrs with letters, in order (rook/rook pkg/operator/k8sutil/name.go IndexToName).
DAEMON_LETTERS = "abcdefghijklmnopqrstuvwxyz"

# SIGTERM makes a daemon shut down cleanly (an OSD tells the mon to mark it down); one that
# ignores it this long gets SIGKILL.
STOP_GRACE_S = 4.5


class CephStartError(RuntimeError):
    """The throw-away cluster did not come up; the message names the step and the log to read."""


def missing_daemons() -> list[str]:
    """The Ceph daemon executables this machine lacks (empty when a real cluster can run)."""
    return [d for d in (*DAEMONS, "ceph", "rados", "ceph-authtool", "monmaptool") if shutil.which(d) is None]


def crush_host(node: str) -> str:
    """The CRUSH host bucket Rook gives a node's OSDs: its hostname with dots turned into dashes
    (rook/rook pkg/daemon/ceph/client/crush.go NormalizeCrushName)."""
    return node.replace(".", "-")


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's choice, so two clusters differ)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports nobody listens on: all held open until each is chosen."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _node_env(host: str) -> dict[str, str]:
    # Rook gives every Ceph daemon NODE_NAME=spec.nodeName (rook/rook pkg/operator/k8sutil/pod.go
    # ClusterDaemonEnvVars); Ceph takes it as its hostname (ceph/ceph src/common/hostname.cc).
    return {**os.environ, "NODE_NAME": host}


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if the owner dies without calling stop() (SIGKILL, crash), the kernel
    # sends the daemon SIGTERM, so no cluster outlives its owner.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


@dataclass
class _Daemon:
    name: str  # mon.a, mgr.a, osd.0
    argv: list[str]
    host: str  # the node it runs on (NODE_NAME)
    proc: subprocess.Popen[bytes] | None = None


class RealCeph:
    """A real Ceph cluster for the twin's Ceph seam (see docs/twin.md, "The Ceph seam").

    ``RealCeph(workdir, ["m720q-1", "m720q-2", "m720q-3"]).start()`` returns once the cluster is
    HEALTH_OK with every OSD up and in and every PG active+clean; ``start_seconds`` records how
    long that took. ``command`` + ``env()`` is how a client reaches it with the real ``ceph`` CLI.
    """

    command: list[str]

    def __init__(
        self,
        workdir: Path,
        hosts: list[str],
        osd_size: int = 4 * 1024**3,
        pool_size: int = 3,
        pool_min_size: int = 2,
        start_timeout_s: float = 120.0,
        mons: int = MONS,
        mgrs: int = MGRS,
    ) -> None:
        if not hosts:
            raise ValueError("RealCeph needs at least one host: one OSD runs per host")
        if len({crush_host(h) for h in hosts}) != len(hosts):
            raise ValueError(f"RealCeph hosts must be distinct (also as CRUSH names), got {hosts}")
        if not 1 <= mons <= len(hosts) or not 1 <= mgrs <= len(hosts):
            raise ValueError(f"RealCeph runs at most one mon and one mgr per host: {mons} mons, {mgrs} mgrs, "
                             f"{len(hosts)} hosts")
        self.workdir = Path(workdir)
        self.hosts = list(hosts)
        self.osd_size = osd_size
        self.pool = POOL
        self.pool_size = pool_size
        self.pool_min_size = pool_min_size
        self.start_timeout_s = start_timeout_s
        self.command = ["ceph"]
        self.conf = self.workdir / "ceph.conf"
        self.start_seconds: float | None = None
        self.osd_of_host = {host: i for i, host in enumerate(self.hosts)}
        # Rook spreads mons and mgrs over distinct nodes (allowMultiplePerNode: false), a, b, c in order.
        self.mon_of_host = {host: DAEMON_LETTERS[i] for i, host in enumerate(self.hosts[:mons])}
        self.mgr_of_host = {host: DAEMON_LETTERS[i] for i, host in enumerate(self.hosts[:mgrs])}
        self._daemons: dict[str, _Daemon] = {}
        self._lock = threading.RLock()
        self._stopped = False
        self._created_dir = False

    # ---- the seam -------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {"CEPH_CONF": str(self.conf)}

    def start(self) -> None:
        missing = missing_daemons()
        if missing:
            raise CephStartError(
                f"cannot start a real Ceph cluster: {', '.join(missing)} not installed; {INSTALL_HINT}"
            )
        t0 = time.monotonic()
        if self.workdir.exists() and any(self.workdir.iterdir()):
            raise CephStartError(
                f"{self.workdir} is not empty; give RealCeph a fresh directory it may delete"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._created_dir = True
        atexit.register(self.stop)
        try:
            self._bootstrap()
            deadline = time.monotonic() + self.start_timeout_s
            self.wait_healthy(deadline)
            self._seed_objects()
            self.wait_healthy(deadline)
        except BaseException:
            self._kill_all()
            raise
        self.start_seconds = round(time.monotonic() - t0, 2)

    def stop(self) -> None:
        """Stop every daemon (SIGTERM, SIGKILL after a grace) and remove the work directory."""
        with self._lock:
            self._stopped = True
            self._kill_all()
            if self._created_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self._created_dir = False
        atexit.unregister(self.stop)

    def node_down(self, host: str) -> None:
        """The node powers off: every daemon on it (OSD, mon, mgr) gets SIGTERM, and we wait for them.

        The OSD goes first: a SIGTERMed OSD asks a mon to mark it down and waits for the answer
        (osd_mon_shutdown_timeout, 5 s), which never comes when that mon is the one going down with it.
        """
        with self._lock:
            names = self._names_on(host)
            self._terminate([n for n in names if n.startswith("osd.")])
            self._terminate([n for n in names if not n.startswith("osd.")])

    def node_up(self, host: str) -> None:
        """The node is back: its daemons start again (those still running are left alone)."""
        with self._lock:
            for name in self._names_on(host):
                self.daemon_up(name)

    def daemon_down(self, name: str) -> None:
        """Stop one daemon (``mon.b``, ``mgr.a``, ``osd.2``) as its pod's deletion would: SIGTERM."""
        with self._lock:
            self._daemon(name)
            self._terminate([name])

    def daemon_up(self, name: str) -> None:
        """Start one daemon again (no-op when it runs)."""
        with self._lock:
            d = self._daemon(name)
            if self._stopped:
                raise CephStartError(
                    f"cannot start {name} of {d.host}: the cluster in {self.workdir} was stopped"
                )
            if d.proc is not None and d.proc.poll() is None:
                return
            self._spawn(d)

    def health(self) -> str:
        """HEALTH_OK | HEALTH_WARN | HEALTH_ERR; HEALTH_ERR too when the mon does not answer."""
        try:
            out = self.ceph("status", "-f", "json", timeout_s=10)
        except (CephStartError, subprocess.TimeoutExpired):
            return "HEALTH_ERR"
        try:
            return str(json.loads(out)["health"]["status"])
        except (ValueError, KeyError, TypeError):
            return "HEALTH_ERR"

    # ---- helpers the owner may use --------------------------------------------------------

    def osd_pid(self, host: str) -> int | None:
        d = self._daemons.get(f"osd.{self._osd_id(host)}")
        if d is None or d.proc is None or d.proc.poll() is not None:
            return None
        return d.proc.pid

    def pids(self) -> dict[str, int]:
        """The live daemons by name (mon.a, mgr.a, osd.N)."""
        return {
            n: d.proc.pid for n, d in self._daemons.items() if d.proc is not None and d.proc.poll() is None
        }

    def active_mgr(self) -> str | None:
        """The active mgr's name as the mgr map has it (``a``), None while there is none."""
        try:
            stat = json.loads(self.ceph("mgr", "stat", "-f", "json", timeout_s=10))
        except (CephStartError, subprocess.TimeoutExpired, ValueError):
            return None
        return str(stat["active_name"]) if stat.get("available") and stat.get("active_name") else None

    def ceph(self, *args: str, timeout_s: float = 30.0) -> str:
        """Run the real CLI against this cluster, bounded: without a mon it would hang forever."""
        connect = max(1, int(timeout_s) - 1)
        argv = [*self.command, "--connect-timeout", str(connect), *args]
        proc = subprocess.run(
            argv,
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise CephStartError(
                f"`{' '.join(['ceph', *args])}` exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
                f" (logs in {self.workdir / 'log'})"
            )
        return proc.stdout

    def wait_healthy(self, deadline: float) -> None:
        """Until HEALTH_OK, every OSD up and in, every PG active+clean and every mgr back; else CephStartError.

        A missing standby mgr raises no health check (ceph/ceph src/mon/MgrMonitor.cc raises MGR_DOWN only
        when no mgr is active), so the mgr map is read apart: after a node's reboot its mgr
        re-registers as standby a few seconds after HEALTH_OK.
        """
        last = "no answer from the mon yet"
        while True:
            self._check_alive()
            try:
                st = json.loads(self.ceph("status", "-f", "json", timeout_s=10))
                osdmap = st.get("osdmap", {})
                osdmap = osdmap.get("osdmap", osdmap)
                pgs = st.get("pgmap", {})
                clean = sum(
                    s["count"] for s in pgs.get("pgs_by_state", []) if s["state_name"] == "active+clean"
                )
                n = len(self.hosts)
                mgrmap = st.get("mgrmap", {})
                mgrs = int(bool(mgrmap.get("available"))) + int(mgrmap.get("num_standbys", 0))
                last = (
                    f"{st['health']['status']} {sorted(st['health'].get('checks', {}))}, "
                    f"osds up {osdmap.get('num_up_osds')}/{n} in {osdmap.get('num_in_osds')}/{n}, "
                    f"pgs active+clean {clean}/{pgs.get('num_pgs')}, mgrs {mgrs}/{len(self.mgr_of_host)}"
                )
                if (
                    st["health"]["status"] == "HEALTH_OK"
                    and osdmap.get("num_osds") == n
                    and osdmap.get("num_up_osds") == n
                    and osdmap.get("num_in_osds") == n
                    and pgs.get("num_pgs", 0) > 0
                    and clean == pgs.get("num_pgs")
                    and mgrs == len(self.mgr_of_host)
                    # A dead standby stays in the map until its successor's first beacon (ceph/ceph
                    # src/mon/MgrMonitor.cc prepare_beacon drops a standby of the same name, new gid) or
                    # the beacon grace: count it only with its process alive.
                    and {f"mgr.{m}" for m in self.mgr_of_host.values()} <= self.pids().keys()
                ):
                    return
            except (CephStartError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
                last = f"ceph status failed: {e}"
            if time.monotonic() >= deadline:
                raise CephStartError(
                    f"Ceph cluster in {self.workdir} not healthy in time; last seen: {last}; "
                    f"read {self.workdir / 'log'} for the daemons' logs"
                )
            time.sleep(0.25)

    # ---- internals ------------------------------------------------------------------------

    def _osd_id(self, host: str) -> int:
        try:
            return self.osd_of_host[host]
        except KeyError:
            raise ValueError(f"no OSD for host {host!r}; this cluster's hosts are {self.hosts}") from None

    def _names_on(self, host: str) -> list[str]:
        names = [f"osd.{self._osd_id(host)}"]
        if host in self.mon_of_host:
            names.append(f"mon.{self.mon_of_host[host]}")
        if host in self.mgr_of_host:
            names.append(f"mgr.{self.mgr_of_host[host]}")
        return names

    def _daemon(self, name: str) -> _Daemon:
        try:
            return self._daemons[name]
        except KeyError:
            raise ValueError(f"no daemon {name!r}; this cluster runs {sorted(self._daemons)}") from None

    def _bootstrap(self) -> None:
        w = self.workdir
        mons = list(self.mon_of_host.values())
        mgrs = list(self.mgr_of_host.values())
        for sub in ("run", "log", "crash", *(f"mon.{m}" for m in mons), *(f"mgr.{m}" for m in mgrs)):
            (w / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        ports = iter(free_ports(2 * len(mons)))
        addrs = {m: f"[v2:127.0.0.1:{next(ports)},v1:127.0.0.1:{next(ports)}]" for m in mons}
        self.conf.write_text(self._conf_text(fsid, addrs))

        mon_kr, admin_kr = w / "mon.keyring", w / "admin.keyring"
        self._new_keyring(mon_kr, "mon.", {"mon": "allow *"})
        admin_caps = {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"}
        self._new_keyring(admin_kr, "client.admin", admin_caps)
        self._run(["ceph-authtool", str(mon_kr), "--import-keyring", str(admin_kr)])
        for m in mgrs:
            mgr_kr = w / f"mgr.{m}" / "keyring"
            self._new_keyring(mgr_kr, f"mgr.{m}", {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"})
            self._run(["ceph-authtool", str(mon_kr), "--import-keyring", str(mgr_kr)])
        monmap = w / "monmap"
        argv = ["monmaptool", "--create", "--fsid", fsid]
        for m, addr in addrs.items():
            argv += ["--addv", m, addr]
        self._run([*argv, str(monmap)])
        self._parallel([["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", m, "--monmap", str(monmap),
                         "--keyring", str(mon_kr)] for m in mons], "mon mkfs")

        host_of_mon = {m: h for h, m in self.mon_of_host.items()}
        for m in mons:
            self._add(f"mon.{m}", ["ceph-mon", "-f", "-c", str(self.conf), "-i", m], host_of_mon[m])
        # mgr.a first: it becomes the active one, mgr.b the standby, as on a fresh Rook cluster.
        for h, m in self.mgr_of_host.items():
            self._add(f"mgr.{m}", ["ceph-mgr", "-f", "-c", str(self.conf), "-i", m], h)

        # The OSDs' stores are made while the mons elect (mkfs needs no mon without its config from
        # one: --no-mon-config): keys, keyrings, mkfs.
        mkfs: list[tuple[int, subprocess.Popen[bytes]]] = []
        osd_uuids: dict[int, str] = {}
        keys: dict[int, str] = {}
        for i in self.osd_of_host.values():
            data = w / f"osd.{i}"
            data.mkdir()
            osd_uuids[i] = str(uuid.uuid4())
            keys[i] = self._run(["ceph-authtool", "--gen-print-key"]).strip()
            # --key only feeds mkfs; the daemon reads osd_data/keyring, which must be written here.
            self._run(["ceph-authtool", "--create-keyring", str(data / "keyring"), "-n", f"osd.{i}",
                       "--add-key", keys[i]])
            log = open(w / "log" / f"osd.{i}.mkfs.log", "wb")
            with log:
                mkfs.append((i, subprocess.Popen(
                    ["ceph-osd", "-c", str(self.conf), "-i", str(i), "--mkfs", "--no-mon-config", "--osd-uuid",
                     osd_uuids[i]],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_node_env(self.hosts[i]),
                    preexec_fn=_die_with_parent)))
            self._daemons[f"osd.{i}"] = _Daemon(
                f"osd.{i}", ["ceph-osd", "-f", "-c", str(self.conf), "-i", str(i)], self.hosts[i])

        # The pool next, so its PGs peer while the OSDs boot; its size and min_size are the conf's
        # defaults (osd_pool_default_size, osd_pool_default_min_size).
        self.ceph("osd", "pool", "create", POOL, str(PG_NUM), str(PG_NUM), "replicated")
        self.ceph("osd", "pool", "application", "enable", POOL, "rbd")
        for i in self.osd_of_host.values():
            secret = w / f"osd.{i}" / "new.json"
            secret.write_text(json.dumps({"cephx_secret": keys[i]}))
            self.ceph("osd", "new", osd_uuids[i], str(i), "-i", str(secret))
            secret.unlink()
        for i, p in mkfs:
            try:
                rc = p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = -9
            if rc != 0:
                raise CephStartError(
                    f"mkfs of osd.{i} failed (exit {rc}); read {w / 'log' / f'osd.{i}.mkfs.log'}"
                )
        for i in self.osd_of_host.values():
            self._spawn(self._daemons[f"osd.{i}"])

    def _seed_objects(self) -> None:
        # Objects in every PG: only PGs holding data turn "degraded" (PG_DEGRADED) when an OSD
        # goes; empty ones only turn "undersized", which no health check reports.
        proc = subprocess.run(
            [
                "rados",
                "-p",
                POOL,
                "bench",
                "1",
                "write",
                "-b",
                "4096",
                "-t",
                "4",
                "--no-cleanup",
                "--run-name",
                "seed",
            ],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise CephStartError(
                f"writing seed objects into pool {POOL} failed: {proc.stderr.strip()[-400:]}"
            )

    def _conf_text(self, fsid: str, mon_addrs: dict[str, str]) -> str:
        w = self.workdir
        osd_sections = "".join(
            f"\n[osd.{i}]\n# The node this OSD lives on, named as Rook names CRUSH hosts: failure domain host.\n"
            f"crush_location = root=default host={crush_host(host)}\n"
            for host, i in self.osd_of_host.items()
        )
        mon_host = ",".join(mon_addrs.values())
        # "$name"/"$id" are Ceph metavariables, expanded by each daemon.
        return f"""[global]
fsid = {fsid}
mon_host = {mon_host}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
# Pacific raises AUTH_INSECURE_GLOBAL_ID_RECLAIM_ALLOWED unless this is off.
auth_allow_insecure_global_id_reclaim = false
run_dir = {w}/run
crash_dir = {w}/crash
log_file = {w}/log/$name.log
osd_pool_default_size = {self.pool_size}
osd_pool_default_min_size = {self.pool_min_size}
osd_pool_default_pg_num = {PG_NUM}
osd_pool_default_pgp_num = {PG_NUM}
# PG counts that change under a test only cost time.
osd_pool_default_pg_autoscale_mode = off
ms_bind_ipv4 = true
ms_bind_ipv6 = false
# Test speed-ups: PG stats and health digests every second.
mgr_stats_period = 1
mgr_tick_period = 1
mon_mgr_digest_period = 1
# A hung (not killed) OSD is reported by its peers after 6 s instead of 20 s.
osd_heartbeat_interval = 1
osd_heartbeat_grace = 6

[mon]
mon_data = {w}/mon.$id
pid_file = {w}/run/$name.pid
admin_socket = {w}/run/$name.asok
# The default warns at 30 % free; a shared dev disk is often below that (MON_DISK_LOW).
mon_data_avail_warn = 2
mon_data_avail_crit = 1
mon_allow_pool_delete = true
mon_allow_pool_size_one = false
# Failure reports are counted per host (the default subtree level), as on the real cluster:
# with one OSD per host, one reporting peer on another host is enough to mark an OSD down
# fast. A killed or SIGTERMed OSD is marked down at once anyway (it says so, or peers get
# "connection refused").
mon_osd_reporter_subtree_level = host
mon_osd_min_down_reporters = 1

[mgr]
mgr_data = {w}/mgr.$id
pid_file = {w}/run/$name.pid
admin_socket = {w}/run/$name.asok
public_addr = 127.0.0.1

[osd]
osd_data = {w}/osd.$id
pid_file = {w}/run/$name.pid
admin_socket = {w}/run/$name.asok
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
osd_objectstore = bluestore
# BlueStore on a sparse file. It makes osd_data/block a symlink to this path, so the path
# must not be osd_data/block itself (ELOOP).
bluestore_block_path = {w}/osd.$id.block
bluestore_block_create = true
bluestore_block_size = {self.osd_size}
bluestore_fsck_on_mount = false
bluestore_fsck_on_mkfs = false
osd_mon_report_interval = 1
osd_crush_update_on_start = true
{osd_sections}
[client]
keyring = {w}/admin.keyring
log_file = /dev/null
admin_socket =
"""

    def _new_keyring(self, path: Path, name: str, caps: dict[str, str]) -> None:
        argv = ["ceph-authtool", "--create-keyring", str(path), "--gen-key", "-n", name]
        for service, cap in caps.items():
            argv += ["--cap", service, cap]
        self._run(argv)

    def _parallel(self, argvs: list[list[str]], what: str) -> None:
        procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
        for argv, proc in zip(argvs, procs, strict=True):
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise CephStartError(f"{what}: `{' '.join(argv[:2])}` exited {proc.returncode}: {err.strip()[-400:]}")

    def _run(self, argv: list[str]) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise CephStartError(
                f"`{argv[0]} {argv[1]}` exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
            )
        return proc.stdout

    def _add(self, name: str, argv: list[str], host: str) -> None:
        d = _Daemon(name, argv, host)
        self._daemons[name] = d
        self._spawn(d)

    def _spawn(self, d: _Daemon) -> None:
        out = open(self.workdir / "log" / f"{d.name}.stderr", "ab")
        with out:
            # PDEATHSIG fires when the *thread* that forked exits; only the main thread lives as
            # long as the process, so elsewhere the atexit hook is the safety net.
            pre = _die_with_parent if threading.current_thread() is threading.main_thread() else None
            d.proc = subprocess.Popen(
                d.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=_node_env(d.host), preexec_fn=pre,
            )

    def _check_alive(self) -> None:
        for d in self._daemons.values():
            if d.proc is not None and d.proc.poll() is not None and d.name.startswith(("mon.", "mgr.")):
                raise CephStartError(
                    f"{d.name} exited with {d.proc.returncode}; read {self.workdir / 'log' / (d.name + '.log')}"
                )

    def _terminate(self, names: list[str]) -> None:
        procs = [self._daemons[n].proc for n in names if n in self._daemons]
        live = [p for p in procs if p is not None and p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=5)

    def _kill_all(self) -> None:
        # OSDs first (they tell the mon they are going), then mgr and mon; together under ~10 s.
        osds = [n for n in self._daemons if n.startswith("osd.")]
        self._terminate(osds)
        self._terminate([n for n in self._daemons if n not in osds])

    def __enter__(self) -> RealCeph:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
