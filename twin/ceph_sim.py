"""Simulated Ceph behind the twin's Ceph seam, shaped like the homelab's CephCluster, and the `ceph`
command's outputs.

The shape is that of k8s/infrastructure/rook-ceph (``mon.count: 3``, ``mgr.count: 2``,
``allowMultiplePerNode: false``, one OSD per node, pool ``ceph-blockpool`` size 3 / min_size 2 with
failure domain host): mons ``a b c`` and mgrs ``a b`` on the first nodes, named as Rook names them
(rook/rook pkg/operator/k8sutil/name.go IndexToName), ``a`` the active mgr. A node's reboot stops every
daemon on it. What each command prints, and how each failure looks, follows the real daemons (Ceph
16.2.15, observed) and their source; docs/twin.md lists the behaviours with their sources:

- CRUSH host buckets are the node names with dots turned into dashes (rook/rook
  pkg/daemon/ceph/client/crush.go NormalizeCrushName); every daemon reports its node as its hostname
  (Rook sets NODE_NAME, ceph/ceph src/common/hostname.cc), so ``ceph node ls`` is keyed by node name.
- PGs are placed on ``size`` distinct hosts; a PG's state string is built in the order of ceph/ceph
  src/osd/osd_types.cc pg_state_string; ``osd ok-to-stop`` walks the PGs as ceph/ceph
  src/mgr/DaemonServer.cc _check_offlines_pgs does, grows the set for ``--max`` as
  _maximize_ok_to_stop_set does, and prints offline_pg_report::dump (src/mgr/DaemonServer.h): empty
  sections left out, EAGAIN while any PG is unknown, EBUSY when not ok.
- A stopped mgr does not tell the mon (ceph/ceph src/mgr/MgrStandby.cc handle_standby_mgr_signal
  exits at once): the mon keeps it active for mon_mgr_beacon_grace (30 s), while mgr commands wait; a
  restart of the active mgr, or ``ceph mgr fail``, fails over at once. A new active mgr knows no PG
  state until the OSDs report to it: ``osd ok-to-stop`` answers EAGAIN and ``pg stat`` shows unknown
  PGs meanwhile, while ``ceph status`` keeps the mon's last digest (src/mgr/DaemonServer.cc send_report
  waits for the OSDs before it reports to the mon).
- A stopped mon leaves the quorum only when the others notice (lease timeouts and an election: 10 to
  30 s on 16.2.15); ``mon ok-to-stop`` is ceph/ceph src/mon/MonmapMonitor.cc as in Pacific.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

NUM_OBJECTS = 2383
# The homelab's pools: Rook's .mgr pool (1 PG) and the CephBlockPool ceph-blockpool.
POOLS = ((1, ".mgr", 1), (2, "ceph-blockpool", 32))
NUM_PGS = sum(n for _, _, n in POOLS)
NUM_POOLS = len(POOLS)
POOL_SIZE = 3
POOL_MIN_SIZE = 2
MONS = 3
MGRS = 2
LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPERM = 1
ENOENT = 2
EAGAIN = 11
EBUSY = 16
EINVAL = 22
ENOTEMPTY = 39
ETIMEDOUT_EXIT = 1  # the CLI exits 1 with "[errno 110] RADOS timed out" when no mon quorum answers
CLEAN_STATES = ("active+clean",)
# Ceph's defaults: mon_mgr_beacon_grace, mon_mgr_inactive_grace.
MGR_BEACON_GRACE_S = 30.0
MGR_INACTIVE_GRACE_S = 60.0
# How long the other mons take to drop a stopped mon from the quorum (measured 10 to 30 s, 16.2.15).
MON_DOWN_DETECT_S = 10.0
# mon_pg_stuck_threshold: how long a PG is inactive before PG_AVAILABILITY names it.
PG_STUCK_THRESHOLD_S = 60.0
FLAGS = ("full", "pause", "noup", "nodown", "noout", "noin", "nobackfill", "norebalance", "norecover",
         "noscrub", "nodeep-scrub", "notieragent", "nosnaptrim", "pglog_hardlimit")

# Commands that change a map through Paxos (they wait while the mons cannot commit).
_MAP_CHANGES = frozenset({"osd set", "osd unset", "config-key set", "config-key put", "config-key rm",
                          "config-key del", "mon rm", "osd pool set", "osd purge", "osd crush rm",
                          "osd crush remove", "health mute", "health unmute", "mgr fail"})

# pg_state_string (ceph/ceph src/osd/osd_types.cc): the order the state words are printed in.
_STATE_ORDER = ("stale", "creating", "active", "activating", "clean", "recovery_wait", "recovering", "down",
                "undersized", "degraded", "remapped", "scrubbing", "peering", "backfill_wait", "backfilling",
                "incomplete", "peered")


def crush_host(node: str) -> str:
    """Rook's CRUSH host for a node: its hostname with dots turned into dashes (NormalizeCrushName)."""
    return node.replace(".", "-")


def pg_state_string(words: Iterable[str]) -> str:
    got = set(words)
    return "+".join(w for w in _STATE_ORDER if w in got) or "unknown"


def _no_faults(name: str, arg: str | None) -> bool:
    return False


@dataclass
class _Pg:
    pgid: str
    acting: list[int]  # OSD ids, primary first

    @property
    def pool(self) -> str:
        return self.pgid.split(".")[0]
    words: set[str] = field(default_factory=set)
    up: list[int] = field(default_factory=list)  # acting OSDs that run
    avail: list[int] = field(default_factory=list)  # up and missing nothing (avail_no_missing)

    @property
    def state(self) -> str:
        return pg_state_string(self.words)


class SimCeph:
    """CephBackend (docs/twin.md) simulated in memory; `run(argv)` is the `ceph` command.

    Beyond the seam, the twin's own handles on the cluster: `daemon_down("mon.c")` / `daemon_up(...)`
    stop and start one daemon (a pod deleted, a deployment scaled down); the timing attributes
    (`stats_seconds`, `mgr_beacon_grace_s`, `mon_down_detect_s`) may be changed by a test.
    """

    def __init__(self, hosts: list[str], recovery_seconds: float = 0.5,
                 faults: Callable[[str, str | None], bool] | None = None, *,
                 stats_seconds: float | None = None, mgr_beacon_grace_s: float = MGR_BEACON_GRACE_S,
                 mon_down_detect_s: float = MON_DOWN_DETECT_S) -> None:
        if not hosts:
            raise ValueError("SimCeph needs at least one host")
        self.hosts = list(hosts)
        self.recovery_seconds = recovery_seconds
        # How long a new active mgr has no PG stats (the OSDs report every mgr_stats_period); scaled
        # with the recovery time, as the twin's other Ceph times are.
        self.stats_seconds = recovery_seconds if stats_seconds is None else stats_seconds
        self.mgr_beacon_grace_s = mgr_beacon_grace_s
        self.mon_down_detect_s = mon_down_detect_s
        self.command: list[str] = ["ceph"]
        self.fsid = str(uuid.uuid4())
        self._faults: Callable[[str, str | None], bool] = faults or _no_faults
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stopping = False
        self._listeners: list[Callable[[], None]] = []
        self._timers: list[threading.Timer] = []
        self._started = time.time()
        # OSDs and CRUSH: one OSD per node, under the node's CRUSH host bucket.
        self.osd_host: dict[int, str] = dict(enumerate(self.hosts))
        self.buckets: dict[str, list[int]] = {crush_host(h): [i] for i, h in enumerate(self.hosts)}
        self._bucket_ids = {b: -3 - 2 * i for i, b in enumerate(self.buckets)}
        self._epoch = 40
        self._flags: set[str] = set()
        self.min_size = {str(pool): POOL_MIN_SIZE for pool, _, _ in POOLS}
        self._recovering: dict[int, float] = {}  # OSD -> when its recovery ends
        self._backfill: dict[str, tuple[int, float]] = {}  # pgid -> (OSD being filled, until)
        # Mons and mgrs, placed as Rook places them.
        self.mon_host = {LETTERS[i]: h for i, h in enumerate(self.hosts[:MONS])}
        self.monmap: list[str] = list(self.mon_host)  # rank order
        self._monmap_epoch = 1
        self._mon_down_at: dict[str, float] = {}
        self._election_epoch = 4
        self.mgr_host = {LETTERS[i]: h for i, h in enumerate(self.hosts[:MGRS])}
        self._gid = 4100
        self._mgr_gid = {m: self._next_gid() for m in self.mgr_host}
        self.active_mgr: str | None = next(iter(self.mgr_host))
        self._mgrmap_epoch = 4
        self._active_down_at: float | None = None
        self._no_active_since: float | None = None
        self._stats_until: float | None = None
        # The mon's last digest from a mgr (PG states, PG health checks), held while no mgr reports.
        self._digest: tuple[list[dict[str, Any]], dict[str, Any]] | None = None
        self._fail_mgr_on: tuple[str, ...] | None = None
        self._running: set[str] = ({f"osd.{i}" for i in self.osd_host} | {f"mon.{m}" for m in self.mon_host}
                                   | {f"mgr.{m}" for m in self.mgr_host})
        self._mutes: dict[str, dict[str, Any]] = {}
        self._inactive_since: dict[str, float] = {}
        self._config_keys: dict[str, str] = {}
        # Every command with its exit code, newest last: what a test reads to see what Ceph answered.
        self.log: collections.deque[tuple[tuple[str, ...], int]] = collections.deque(maxlen=2000)

    # --- the seam --------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for t in self._timers:
                t.cancel()
            self._timers.clear()
            self._cond.notify_all()

    def node_down(self, host: str) -> None:
        """The node powers off: its OSD, mon and mgr stop, together: a mgr that goes with it reports
        nothing more, and neither do the mons until they re-elect without a mon that goes with it."""
        with self._lock:
            names = self._daemons_on(host)
            if any(n.startswith("mon.") for n in names) or f"mgr.{self.active_mgr}" in names:
                self._freeze_digest(time.monotonic())
            for name in names:
                self._daemon_down(name)
        self._notify()

    def node_up(self, host: str) -> None:
        """The node is back: its daemons start again."""
        with self._lock:
            for name in self._daemons_on(host):
                self._daemon_up(name)
        self._notify()

    def daemon_down(self, name: str) -> None:
        with self._lock:
            self._daemon_down(name)
        self._notify()

    def daemon_up(self, name: str) -> None:
        with self._lock:
            self._daemon_up(name)
        self._notify()

    def health(self) -> str:
        return str(self.status()["health"]["status"])

    def subscribe(self, fn: Callable[[], None]) -> None:
        """fn() after every change of health (node down/up, recovery done, flags)."""
        self._listeners.append(fn)

    # --- daemons ---------------------------------------------------------------------------

    def _daemons_on(self, host: str) -> list[str]:
        if host not in self.hosts:
            raise ValueError(f"Ceph has no host {host!r}; its hosts are {', '.join(self.hosts)}")
        # The mgr first: going down with its node, it never reports the OSD's absence to the mon.
        names = [f"mgr.{m}" for m, h in self.mgr_host.items() if h == host]
        names += [f"mon.{m}" for m, h in self.mon_host.items() if h == host and m in self.monmap]
        names += [f"osd.{i}" for i, h in self.osd_host.items() if h == host]
        return names

    def _known_daemon(self, name: str) -> None:
        kind, _, ident = name.partition(".")
        known = ((kind == "osd" and ident.isdigit() and int(ident) in self.osd_host)
                 or (kind == "mon" and ident in self.monmap) or (kind == "mgr" and ident in self.mgr_host))
        if not known:
            raise ValueError(f"Ceph runs no daemon {name!r}")

    def _next_gid(self) -> int:
        self._gid += 1
        return self._gid

    def _daemon_down(self, name: str) -> None:
        self._known_daemon(name)
        if name not in self._running:
            return
        now = time.monotonic()
        self._running.discard(name)
        kind, _, ident = name.partition(".")
        if kind == "osd":
            self._epoch += 1
            self._recovering.pop(int(ident), None)
        elif kind == "mon":
            self._mon_down_at[ident] = now
            # The other mons notice later; health changes then.
            self._notify_at(self.mon_down_detect_s)
        elif kind == "mgr" and ident == self.active_mgr:
            # It exits without a word; the mon keeps it active until its beacons are overdue, and keeps
            # its last digest of the PGs meanwhile.
            self._active_down_at = now
            self._freeze_digest(now)
        self._cond.notify_all()

    def _daemon_up(self, name: str) -> None:
        self._known_daemon(name)
        if name in self._running:
            return
        now = time.monotonic()
        self._running.add(name)
        kind, _, ident = name.partition(".")
        if kind == "osd":
            self._epoch += 1
            self._recovering[int(ident)] = now + self.recovery_seconds
            self._notify_at(self.recovery_seconds)
        elif kind == "mon":
            self._mon_down_at.pop(ident, None)
            self._election_epoch += 2
        elif kind == "mgr":
            self._mgr_gid[ident] = self._next_gid()
            if ident == self.active_mgr:
                # ceph/ceph src/mon/MgrMonitor.cc prepare_beacon: "Active daemon restart" drops the old
                # instance, and with no active left the restarted daemon's beacon selects it.
                self._failover(now, successor=ident)
            else:
                self._mgr_tick(now)
        self._cond.notify_all()

    # --- mons ------------------------------------------------------------------------------

    def _quorum(self, now: float | None = None) -> list[str]:
        """The mons in quorum, in rank order: running ones, and stopped ones the others have not yet
        dropped; none at all without a majority running."""
        now = time.monotonic() if now is None else now
        running = [m for m in self.monmap if f"mon.{m}" in self._running]
        if len(running) < len(self.monmap) // 2 + 1:
            return []
        return [m for m in self.monmap if f"mon.{m}" in self._running
                or now - self._mon_down_at.get(m, now) < self.mon_down_detect_s]

    def _stalled(self, now: float) -> bool:
        """A stopped mon the others still count in the quorum: Ceph's Paxos waits for every quorum member
        to accept a proposal (ceph/ceph src/mon/Paxos.cc), so no map changes until the mon is back or
        the others re-elect without it (measured on 16.2.15: PG_DEGRADED 19 s after a node's OSD and
        mon stopped, 3 s after its OSD alone)."""
        return any(f"mon.{m}" not in self._running and now - self._mon_down_at.get(m, now) < self.mon_down_detect_s
                   for m in self.monmap) and bool(self._quorum(now))

    def _wait_commit(self) -> bool:
        """A command that changes a map waits while the mons cannot commit (no time limit of its own)."""
        with self._cond:
            while self._stalled(time.monotonic()):
                if self._stopping:
                    return False
                self._cond.wait(0.05)
            return True

    def _mon_addr(self, m: str) -> str:
        # Rook's mons listen on their Service's ClusterIP; the address is only ever printed here.
        ip = f"10.96.0.{10 + LETTERS.index(m)}"
        return f"[v2:{ip}:3300/0,v1:{ip}:6789/0]"

    def _wait_quorum(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._quorum():
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return False
                self._cond.wait(min(left, 0.25))
            return True

    # --- mgrs ------------------------------------------------------------------------------

    def _mgr_tick(self, now: float) -> None:
        """The mon's view of the mgrs: fail over once the active one's beacons are overdue; promote
        a standby when none is active (ceph/ceph src/mon/MgrMonitor.cc tick, promote_standby)."""
        if (self.active_mgr is not None and self._active_down_at is not None
                and now - self._active_down_at >= self.mgr_beacon_grace_s):
            self._failover(now)
        if self.active_mgr is None:
            self._promote(now)

    def _standbys(self) -> list[str]:
        return sorted((m for m in self.mgr_host if f"mgr.{m}" in self._running and m != self.active_mgr),
                      key=lambda m: self._mgr_gid[m])

    def _failover(self, now: float, successor: str | None = None) -> None:
        self._freeze_digest(now)
        self.active_mgr = None
        self._active_down_at = None
        self._mgrmap_epoch += 1
        if successor is not None:
            self._activate(successor, now)
        else:
            self._promote(now)

    def _promote(self, now: float) -> None:
        standbys = self._standbys()
        if not standbys:
            self._no_active_since = self._no_active_since or now
            return
        self._activate(standbys[0], now)  # promote_standby: the lowest gid

    def _activate(self, name: str, now: float) -> None:
        self.active_mgr = name
        self._no_active_since = None
        self._mgrmap_epoch += 1
        # The new mgr knows no PG until the OSDs report to it; the mon keeps its last digest meanwhile.
        self._freeze_digest(now)
        self._stats_until = now + self.stats_seconds
        self._notify_at(self.stats_seconds)

    def _freeze_digest(self, now: float) -> None:
        if self._digest is None:
            pgs = self._pgs(now)
            self._digest = (self._pg_summary(pgs), self._pg_checks(pgs))

    def _pg_view(self, now: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """What the mon knows of the PGs: live while a mgr reports and the mons can commit, its last
        digest otherwise."""
        if self._stalled(now):
            self._freeze_digest(now)
        if self._digest is not None and (self._stats_unknown(now) or not self._mgr_serving() or self._stalled(now)):
            return self._digest
        self._digest = None
        pgs = self._pgs(now)
        return self._pg_summary(pgs), self._pg_checks(pgs)

    def _mgr_serving(self) -> bool:
        return self.active_mgr is not None and f"mgr.{self.active_mgr}" in self._running

    def _await_mgr(self) -> bool:
        """A mgr command waits for an active mgr that runs, as the CLI does (no time limit of its own)."""
        with self._cond:
            while True:
                now = time.monotonic()
                self._mgr_tick(now)
                if self._mgr_serving() or self._stopping:
                    return not self._stopping
                wait = 0.25
                if self._active_down_at is not None:
                    wait = max(0.001, min(wait, self._active_down_at + self.mgr_beacon_grace_s - now))
                self._cond.wait(wait)

    def _stats_unknown(self, now: float) -> bool:
        if self._stats_until is not None and now >= self._stats_until:
            self._stats_until = None
        return self._stats_until is not None

    # --- PGs -------------------------------------------------------------------------------

    def _placement(self) -> dict[str, list[int]]:
        """Each PG on POOL_SIZE distinct hosts (failure domain host): the OSDs of the chosen hosts, the
        choice stable for a PG (rendezvous hashing stands in for CRUSH's straw2)."""
        osds = sorted(self.osd_host)
        out: dict[str, list[int]] = {}
        for pool, _, n in POOLS:
            for seed in range(n):
                pgid = f"{pool}.{seed:x}"
                ranked = sorted(osds, key=lambda o: hashlib.sha1(f"{pgid}/{self.osd_host[o]}".encode()).digest())
                out[pgid] = ranked[:POOL_SIZE]
        return out

    def _osd_recovering(self, osd: int, now: float) -> bool:
        until = self._recovering.get(osd)
        if until is None:
            return False
        if now < until or self._faults("ceph-stuck", None):
            return True
        del self._recovering[osd]
        return False

    def _pgs(self, now: float, mon_view: bool = False) -> list[_Pg]:
        pgs = []
        for pgid, acting in self._placement().items():
            pg = _Pg(pgid, acting)
            pg.up = [o for o in acting if f"osd.{o}" in self._running]
            filling = self._backfill.get(pgid)
            if filling is not None and (now >= filling[1] or filling[0] not in pg.up):
                del self._backfill[pgid]
                filling = None
            missing = {o for o in pg.up if self._osd_recovering(o, now)}
            if filling is not None:
                missing.add(filling[0])
            pg.avail = [o for o in pg.up if o not in missing]
            words = set()
            if not pg.up:
                words |= {"stale", "peered"}
            elif len(pg.up) >= self.min_size[pg.pool]:
                words.add("active")
            else:
                words.add("peered")
            if len(pg.up) < POOL_SIZE:
                words |= {"undersized", "degraded"}
            if missing & set(pg.up) - ({filling[0]} if filling else set()):
                words |= {"recovering", "degraded"}
            if filling is not None:
                words |= {"remapped", "backfilling", "degraded"}
            if words == {"active"}:
                words.add("clean")
            pg.words = words
            pgs.append(pg)
        return pgs

    @staticmethod
    def _pg_summary(pgs: list[_Pg]) -> list[dict[str, Any]]:
        counts = collections.Counter(pg.state for pg in pgs)
        return [{"state_name": s, "count": n} for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    def pgs_by_state(self) -> list[dict[str, Any]]:
        """The PG states as the mon reports them (``ceph status``): its last digest from the mgr."""
        with self._lock:
            now = time.monotonic()
            self._mgr_tick(now)
            return [dict(d) for d in self._pg_view(now)[0]]

    def clean(self) -> bool:
        return all(s["state_name"] in CLEAN_STATES for s in self.pgs_by_state())

    # --- health ----------------------------------------------------------------------------

    def _raw_checks(self, now: float) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        quorum = self._quorum(now)
        out = [m for m in self.monmap if m not in quorum]
        if out and quorum:
            checks["MON_DOWN"] = _check(
                "HEALTH_WARN", f"{len(out)}/{len(self.monmap)} mons down, quorum {','.join(quorum)}", len(out),
                [f"mon.{m} (rank {self.monmap.index(m)}) addr {self._mon_addr(m)} is down (out of quorum)"
                 for m in out])
        if (self._no_active_since is not None and self.active_mgr is None
                and now - self._no_active_since >= MGR_INACTIVE_GRACE_S):
            checks["MGR_DOWN"] = _check("HEALTH_WARN", "no active mgr", 1, [])
        if self._flags:
            flags = ",".join(sorted(self._flags))
            checks["OSDMAP_FLAGS"] = _check("HEALTH_WARN", f"{flags} flag(s) set", 1, [])
        down = sorted(o for o in self.osd_host if f"osd.{o}" not in self._running)
        if down:
            checks["OSD_DOWN"] = _check(
                "HEALTH_WARN", f"{len(down)} osds down", len(down),
                [f"osd.{o} (root=default,host={crush_host(self.osd_host[o])}) is down" for o in down])
            hosts = sorted({crush_host(self.osd_host[o]) for o in down
                            if all(f"osd.{x}" not in self._running for x in self.buckets[crush_host(self.osd_host[o])])})
            if hosts:
                n_osds = sum(len(self.buckets[h]) for h in hosts)
                word = "host" if len(hosts) == 1 else "hosts"
                checks["OSD_HOST_DOWN"] = _check(
                    "HEALTH_WARN", f"{len(hosts)} {word} ({n_osds} osds) down", len(hosts),
                    [f"host {h} (root=default) ({len(self.buckets[h])} osds) is down" for h in hosts])
        checks.update(self._pg_view(now)[1])
        return dict(sorted(checks.items()))

    def _pg_checks(self, pgs: list[_Pg]) -> dict[str, Any]:
        """The PG health checks, which the active mgr computes (ceph/ceph src/mon/PGMap.cc
        get_health_checks) and the mon repeats from its digest. PG_AVAILABILITY names PGs only once
        they have been inactive for mon_pg_stuck_threshold (60 s; measured on 16.2.15: 62 s)."""
        checks: dict[str, Any] = {}
        now = time.monotonic()
        for pg in pgs:
            if "active" in pg.words:
                self._inactive_since.pop(pg.pgid, None)
            else:
                self._inactive_since.setdefault(pg.pgid, now)
        inactive = [pg for pg in pgs if "active" not in pg.words
                    and now - self._inactive_since[pg.pgid] >= PG_STUCK_THRESHOLD_S]
        if inactive:
            stale = sum(1 for pg in inactive if "stale" in pg.words)
            msg = f"Reduced data availability: {len(inactive)} pgs inactive" + (f", {stale} pgs stale" if stale else "")
            checks["PG_AVAILABILITY"] = _check(
                "HEALTH_WARN", msg, len(inactive),
                [f"pg {pg.pgid} is {pg.state}, acting [{','.join(map(str, pg.up))}]" for pg in inactive[:3]])
        degraded = [pg for pg in pgs if "degraded" in pg.words]
        if degraded:
            per_pg = NUM_OBJECTS / NUM_PGS
            objects = round(sum((POOL_SIZE - len(pg.avail)) * per_pg for pg in degraded))
            total = NUM_OBJECTS * POOL_SIZE
            msg = (f"Degraded data redundancy: {objects}/{total} objects degraded ({100 * objects / total:.3f}%), "
                   f"{len(degraded)} pgs degraded")
            undersized = sum(1 for pg in degraded if "undersized" in pg.words)
            if undersized:
                msg += f", {undersized} pgs undersized"
            checks["PG_DEGRADED"] = _check(
                "HEALTH_WARN", msg, len(degraded),
                [f"pg {pg.pgid} is {pg.state}, acting [{','.join(map(str, pg.up))}]" for pg in degraded[:3]])
        return checks

    def checks(self) -> dict[str, Any]:
        """The health checks (``health detail``), muted ones marked ``muted``. A mute that is not
        sticky goes away with its alert, or when the alert grows (ceph/ceph src/mon/HealthMonitor.cc)."""
        with self._lock:
            now = time.monotonic()
            self._mgr_tick(now)
            checks = self._raw_checks(now)
            for code, mute in list(self._mutes.items()):
                raised = checks.get(code)
                if not mute["sticky"] and (raised is None or raised["summary"]["count"] > mute["count"]):
                    del self._mutes[code]
                elif raised is not None:
                    raised["muted"] = True
            return checks

    def _health(self) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        checks = self.checks()
        with self._lock:
            mutes = [{"code": c, "sticky": m["sticky"], "summary": m["summary"], "count": m["count"]}
                     for c, m in sorted(self._mutes.items())]
        return _overall(checks), checks, mutes

    def status(self) -> dict[str, Any]:
        status, checks, mutes = self._health()
        with self._lock:
            now = time.monotonic()
            n = len(self.osd_host)
            up = sum(1 for o in self.osd_host if f"osd.{o}" in self._running)
            quorum = self._quorum(now)
            return {
                "fsid": self.fsid,
                "health": {"status": status, "checks": _summaries(checks), "mutes": mutes},
                "election_epoch": self._election_epoch, "quorum": [self.monmap.index(m) for m in quorum],
                "quorum_names": quorum, "quorum_age": int(time.time() - self._started),
                "monmap": {"epoch": self._monmap_epoch, "min_mon_release_name": "squid", "num_mons": len(self.monmap)},
                "osdmap": {"epoch": self._epoch, "num_osds": n, "num_up_osds": up, "osd_up_since": int(self._started),
                           "num_in_osds": n, "osd_in_since": int(self._started), "num_remapped_pgs": len(self._backfill)},
                "pgmap": {"pgs_by_state": self.pgs_by_state(), "num_pgs": NUM_PGS, "num_pools": NUM_POOLS,
                          "num_objects": NUM_OBJECTS, "data_bytes": 2222656224, "bytes_used": 8793104384,
                          "bytes_avail": 18050441216, "bytes_total": 26843545600},
                "fsmap": {"epoch": 1, "by_rank": [], "up:standby": 0},
                "mgrmap": {"available": self._mgr_serving() or (self.active_mgr is not None),
                           "num_standbys": len(self._standbys()),
                           "modules": ["dashboard", "iostat", "nfs", "pg_autoscaler", "prometheus", "restful"],
                           "services": {}},
                "servicemap": {"epoch": 1, "modified": "0.000000", "services": {}},
                "progress_events": {},
            }

    # --- notifications ---------------------------------------------------------------------

    def _notify(self) -> None:
        for fn in list(self._listeners):
            fn()

    def _notify_at(self, delay_s: float) -> None:
        with self._lock:
            if self._stopping:
                return
            self._timers = [t for t in self._timers if t.is_alive()]
            t = threading.Timer(delay_s + 0.001, self._notify)
            t.daemon = True
            self._timers.append(t)
            t.start()

    # --- osd ok-to-stop --------------------------------------------------------------------

    def _offline_report(self, osds: set[int], pgs: list[_Pg], unknown: bool) -> dict[str, Any]:
        """ceph/ceph src/mgr/DaemonServer.cc _check_offlines_pgs, and offline_pg_report::dump."""
        r: dict[str, list[str]] = {k: [] for k in ("ok", "not_ok", "unknown", "ok_become_degraded",
                                                   "ok_become_more_degraded", "bad_no_pool",
                                                   "bad_already_inactive", "bad_become_inactive")}
        for pg in sorted(pgs, key=lambda p: (int(p.pgid.split(".")[0]), int(p.pgid.split(".")[1], 16))):
            if unknown:
                r["unknown"].append(pg.pgid)
                continue
            members = pg.avail if "degraded" in pg.words else pg.up
            if not osds & set(members):
                continue
            remaining = [o for o in members if o not in osds]
            dangerous = False
            if "active" not in pg.words:
                r["bad_already_inactive"].append(pg.pgid)
                dangerous = True
            if len(remaining) < self.min_size[pg.pool]:
                r["bad_become_inactive"].append(pg.pgid)
                dangerous = True
            if dangerous:
                r["not_ok"].append(pg.pgid)
            else:
                r["ok"].append(pg.pgid)
                r["ok_become_more_degraded" if "degraded" in pg.words else "ok_become_degraded"].append(pg.pgid)
        body: dict[str, Any] = {"ok_to_stop": not r["not_ok"] and not r["unknown"], "osds": sorted(osds),
                                "num_ok_pgs": len(r["ok"]), "num_not_ok_pgs": len(r["not_ok"])}
        for key, section in (("unknown", "unknown_pgs"), ("bad_no_pool", "bad_no_pool_pgs"),
                             ("bad_already_inactive", "bad_already_inactive"),
                             ("bad_become_inactive", "bad_become_inactive"),
                             ("ok_become_degraded", "ok_become_degraded"),
                             ("ok_become_more_degraded", "ok_become_more_degraded")):
            if r[key]:
                body[section] = r[key]
        body["_unknown"] = len(r["unknown"])
        body["_not_ok"] = len(r["not_ok"])
        return body

    def ok_to_stop(self, ids: list[int], max_osds: int = 1) -> tuple[int, dict[str, Any]]:
        """(exit code, report) of ``osd ok-to-stop <ids> [--max N]``, without waiting for a mgr."""
        with self._lock:
            now = time.monotonic()
            unknown = self._stats_unknown(now)
            pgs = self._pgs(now)
            osds = set(ids)
            report = self._offline_report(osds, pgs, unknown)
            # ceph/ceph src/mgr/DaemonServer.cc _maximize_ok_to_stop_set: while still ok, add the up
            # OSDs beneath the first OSD's host, then beneath the root, one at a time.
            if report["ok_to_stop"] and len(osds) < max_osds and min(osds) in self.osd_host:
                first_host = crush_host(self.osd_host[min(osds)])
                for level in (self.buckets[first_host], sorted(self.osd_host)):
                    failed = 0
                    for o in level:
                        if f"osd.{o}" not in self._running or o in osds:
                            continue
                        trial = self._offline_report(osds | {o}, pgs, unknown)
                        if not trial["ok_to_stop"]:
                            failed += 1
                            continue
                        osds.add(o)
                        report = trial
                        if len(osds) >= max_osds:
                            break
                    if failed or len(osds) >= max_osds:
                        break
            if report["ok_to_stop"] and any(self._faults("not-ok-to-stop", self.osd_host.get(o)) for o in ids):
                # The named fault: Ceph answers as if the host's PGs would go inactive.
                touched = report.get("ok_become_degraded", []) + report.get("ok_become_more_degraded", [])
                report = {"ok_to_stop": False, "osds": report["osds"], "num_ok_pgs": 0,
                          "num_not_ok_pgs": len(touched), "bad_become_inactive": touched,
                          "_unknown": 0, "_not_ok": len(touched)}
            code = EAGAIN if report["_unknown"] else 0 if report["ok_to_stop"] else EBUSY
            return code, report

    # --- the ceph command ------------------------------------------------------------------

    def run(self, argv: list[str]) -> tuple[str, str, int]:
        """`ceph <argv>`: (stdout, stderr, exit code) the way the real CLI answers."""
        args, fmt, connect_timeout = _strip_global(argv)
        if fmt is None and args and args[0] == "--help":
            return "usage: ceph [-h] [-c CEPHCONF] ... <command>\n", "", 0
        if not args:
            return "", "ceph: no command given\n", EINVAL
        if not self._wait_quorum(connect_timeout):
            result = ("", "[errno 110] RADOS timed out (error connecting to the cluster)\n", ETIMEDOUT_EXIT)
        else:
            result = self._command(args, fmt)
        self.log.append((tuple(args), result[2]))
        return result

    def _command(self, args: list[str], fmt: str | None) -> tuple[str, str, int]:
        js = fmt in ("json", "json-pretty")
        with self._lock:
            if self._fail_mgr_on is not None and tuple(args[:len(self._fail_mgr_on)]) == self._fail_mgr_on:
                self._fail_mgr_on = None
                self._fail_mgr(None)
        changes = (two_words := " ".join(args[:2])) in _MAP_CHANGES or " ".join(args[:3]) in _MAP_CHANGES
        if changes and two_words != "config-key get" and not self._wait_commit():
            return "", "Error ESHUTDOWN: the cluster is stopping\n", 108

        def out(obj: Any, text: str, trailing: str = "\n") -> tuple[str, str, int]:
            if js:
                return _json(obj, fmt, trailing), "", 0
            return text, "", 0

        two = " ".join(args[:2])
        if args[0] in ("status", "-s"):
            st = self.status()
            if js:
                # 16.2.15 prints a blank line before this reply too; the twin leaves it out, as it always
                # has, for callers that read the reply line by line (docs/twin.md).
                return _json(st, fmt, "\n").lstrip("\n"), "", 0
            return _status_text(st, self), "", 0
        if args[0] == "health":
            if args[1:2] in (["mute"], ["unmute"]):
                return self._mute(args[1], args[2:])
            status, checks, mutes = self._health()
            if args[1:2] == ["detail"]:
                return out({"status": status, "checks": checks, "mutes": mutes}, _health_text(status, checks, True), "")
            return out({"status": status, "checks": _summaries(checks), "mutes": mutes},
                       _health_text(status, checks, False), "")
        if args[0] == "quorum_status":
            return out(self._quorum_status(), json.dumps(self._quorum_status(), indent=4) + "\n")
        if two == "node ls":
            return self._node_ls(args[2:], fmt)
        if two == "mon ok-to-stop":
            return self._mon_ok_to_stop(args[2:])
        if two == "mon rm":
            return self._mon_rm(args[2:])
        if two == "mgr stat":
            with self._lock:
                self._mgr_tick(time.monotonic())
                body = {"epoch": self._mgrmap_epoch, "available": self.active_mgr is not None,
                        "active_name": self.active_mgr or "", "num_standby": len(self._standbys())}
            return _json(body, fmt or "json-pretty", ""), "", 0
        if two == "mgr fail":
            return self._mgr_fail(args[2:])
        if two == "osd ok-to-stop":
            return self._osd_ok_to_stop(args[2:], fmt)
        if two == "osd ls-tree":
            return self._ls_tree(args[2:], fmt)
        if two == "osd tree":
            return out(self._tree(), "".join(f"{n['id']} {n['name']}\n" for n in self._tree()["nodes"]))
        if two in ("osd set", "osd unset"):
            return self._flag(args[1], args[2:])
        if two == "osd stat":
            with self._lock:
                n = len(self.osd_host)
                up = sum(1 for o in self.osd_host if f"osd.{o}" in self._running)
                body = {"epoch": self._epoch, "num_osds": n, "num_up_osds": up, "osd_up_since": int(self._started),
                        "num_in_osds": n, "osd_in_since": int(self._started), "num_remapped_pgs": len(self._backfill)}
            return out(body, f"{n} osds: {up} up (since 1h), {n} in (since 1h); epoch: e{self._epoch}\n")
        if two == "osd dump":
            with self._lock:
                flags = ",".join([*sorted(self._flags), "sortbitwise", "recovery_deletes", "purged_snapdirs",
                                  "pglog_hardlimit"])
                osds = [{"osd": o, "uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{self.fsid}/{o}")),
                         "up": int(f"osd.{o}" in self._running), "in": 1, "weight": 1, "primary_affinity": 1}
                        for o in sorted(self.osd_host)]
                body = {"epoch": self._epoch, "fsid": self.fsid, "flags": flags,
                        "flags_set": sorted(flags.split(",")), "osds": osds}
            return out(body, f"epoch {self._epoch}\nfsid {self.fsid}\nflags {flags}\n")
        if args[:3] == ["osd", "pool", "set"]:
            return self._pool_set(args[3:])
        if two == "osd purge":
            return self._purge(args[2:])
        if args[:3] == ["osd", "crush", "rm"] or args[:3] == ["osd", "crush", "remove"]:
            return self._crush_rm(args[3:])
        if two == "pg stat":
            return self._pg_stat(fmt)
        if args[0] == "config-key":
            return self._config_key(args[1:])
        return "", f"no valid command found; 10 closest matches:\n{' '.join(args)}\nError EINVAL: invalid command\n", EINVAL

    # --- commands, one by one --------------------------------------------------------------

    def _quorum_status(self) -> dict[str, Any]:
        with self._lock:
            quorum = self._quorum()
            return {
                "election_epoch": self._election_epoch, "quorum": [self.monmap.index(m) for m in quorum],
                "quorum_names": quorum, "quorum_leader_name": quorum[0] if quorum else "",
                "quorum_age": int(time.time() - self._started),
                "features": {"quorum_con": "4540138314316775423", "quorum_mon": ["kraken", "luminous", "mimic",
                             "osdmap-prune", "nautilus", "octopus", "pacific", "elector-pinging"]},
                # The keys with a trailing ": " are printed so by the real mons (16.2.15).
                "monmap": {"epoch": self._monmap_epoch, "fsid": self.fsid, "modified": "2025-01-01T00:00:00.000000Z",
                           "created": "2025-01-01T00:00:00.000000Z", "min_mon_release": 19,
                           "min_mon_release_name": "squid", "election_strategy": 1, "disallowed_leaders: ": "",
                           "stretch_mode": False, "tiebreaker_mon": "", "removed_ranks: ": "",
                           "features": {"persistent": ["kraken", "luminous", "mimic", "osdmap-prune", "nautilus",
                                                       "octopus", "pacific", "elector-pinging"], "optional": []},
                           "mons": [{"rank": r, "name": m, "public_addrs": {"addrvec": []},
                                     "addr": self._mon_addr(m).split(",")[1].removeprefix("v1:").rstrip("]"),
                                     "public_addr": self._mon_addr(m).split(",")[1].removeprefix("v1:").rstrip("]"),
                                     "priority": 0, "weight": 0, "crush_location": "{}"}
                                    for r, m in enumerate(self.monmap)]},
            }

    def _node_ls(self, rest: list[str], fmt: str | None) -> tuple[str, str, int]:
        with self._lock:
            mons: dict[str, list[str]] = {}
            for m in self.monmap:
                mons.setdefault(self.mon_host[m], []).append(m)
            osds: dict[str, list[int]] = {}
            for o, h in sorted(self.osd_host.items()):
                osds.setdefault(h, []).append(o)
            mgrs: dict[str, list[str]] = {}
            for m, h in self.mgr_host.items():
                mgrs.setdefault(h, []).append(m)
        body: dict[str, Any] = {"mon": mons, "osd": osds, "mgr": mgrs}
        kind = rest[0] if rest else "all"
        if kind != "all":
            if kind not in ("osd", "mon", "mds", "mgr"):
                return "", f"Invalid command: {kind} not in all|osd|mon|mds|mgr\nError EINVAL: invalid command\n", EINVAL
            body = body.get(kind, {})
        return _json(body, fmt or "json-pretty", "\n"), "", 0

    def _mon_ok_to_stop(self, ids: list[str]) -> tuple[str, str, int]:
        """Pacific's MonmapMonitor "mon ok-to-stop": names not in the monmap are ignored."""
        if not ids:
            return "", ("Invalid command: missing required parameter ids(<string>)\n"
                        "mon ok-to-stop <ids>... :  check whether mon(s) can be safely stopped without reducing "
                        "immediate availability\nError EINVAL: invalid command\n"), EINVAL
        with self._lock:
            wouldbe = sorted(set(self._quorum()) - set(ids))
            need = len(self.monmap) // 2 + 1
        if len(wouldbe) < need:
            return "", (f"Error EBUSY: not enough monitors would be available ({','.join(wouldbe)}) "
                        f"after stopping mons [{','.join(ids)}]\n"), EBUSY
        return "", f"quorum should be preserved ({','.join(wouldbe)}) after stopping [{','.join(ids)}]\n", 0

    def _mon_rm(self, rest: list[str]) -> tuple[str, str, int]:
        if not rest:
            return "", "Invalid command: missing required parameter name(<string>)\nError EINVAL: invalid command\n", EINVAL
        name = rest[0]
        with self._lock:
            if name not in self.monmap:
                return "", f"mon.{name} does not exist or has already been removed\n", 0
            if len(self.monmap) == 1:
                return "", "Error EINVAL: error: refusing removal of last monitor\n", EINVAL
            self.monmap.remove(name)
            self._monmap_epoch += 1
            self._election_epoch += 2
            # A mon that finds itself out of the monmap shuts down.
            self._running.discard(f"mon.{name}")
            self._mon_down_at.pop(name, None)
            self._cond.notify_all()
        self._notify()
        return "", "", 0

    def _mgr_fail(self, rest: list[str]) -> tuple[str, str, int]:
        """ceph/ceph src/mon/MgrMonitor.cc "mgr fail": drop the active one, promote a standby; the failed
        daemon, told it is no longer active, respawns and comes back as a standby."""
        with self._lock:
            self._fail_mgr(rest[0] if rest else None)
        return "", "", 0

    def _fail_mgr(self, who: str | None) -> None:
        now = time.monotonic()
        who = who or self.active_mgr
        if who in self.mgr_host and f"mgr.{who}" in self._running:
            self._mgr_gid[who] = self._next_gid()  # respawned: the newest standby, last to be promoted
        if who is not None and who == self.active_mgr:
            self._failover(now)
        self._cond.notify_all()

    def fail_mgr_on(self, *prefix: str) -> None:
        """A mgr failover the moment the next command starting with ``prefix`` arrives (e.g. ``"osd",
        "ok-to-stop"``): as `ceph mgr fail` from an operator, or a mgr crash, at the worst time."""
        with self._lock:
            self._fail_mgr_on = tuple(prefix)

    def _mute(self, verb: str, rest: list[str]) -> tuple[str, str, int]:
        if not rest:
            return "", "Invalid command: missing required parameter code(<string>)\nError EINVAL: invalid command\n", EINVAL
        code = rest[0]
        sticky = "--sticky" in rest
        checks = self.checks()
        with self._lock:
            if verb == "unmute":
                self._mutes.pop(code, None)
                return "", "", 0
            raised = checks.get(code)
            if raised is None and not sticky:
                return "", f"Error ENOENT: health alert {code} is not currently raised\n", ENOENT
            summary = raised["summary"]["message"] if raised else ""
            self._mutes[code] = {"sticky": sticky, "summary": summary, "count": raised["summary"]["count"] if raised else 0}
        self._notify()
        return "", "", 0

    def _osd_ok_to_stop(self, rest: list[str], fmt: str | None) -> tuple[str, str, int]:
        ids: list[int] = []
        max_osds = 1
        i = 0
        while i < len(rest):
            a = rest[i]
            if a == "--max" and i + 1 < len(rest):
                a, i = f"--max={rest[i + 1]}", i + 1
            if a.startswith("--max="):
                try:
                    max_osds = int(a.split("=", 1)[1])
                except ValueError:
                    return "\n", f"Error EINVAL: Expected option value to be integer, got '{a.split('=', 1)[1]}'\n", EINVAL
            else:
                try:
                    ids.append(int(a.removeprefix("osd.")))
                except ValueError:
                    return "\n", f"Error EINVAL: Expected option value to be integer, got '{a}'invalid osd id '{a}'\n", EINVAL
            i += 1
        if not ids:
            return "\n", ("Invalid command: saw 0 of ids(<string>)..., expected at least 1\n"
                          "osd ok-to-stop <ids>... [<max:int>] :  check whether osd(s) can be safely stopped without "
                          "reducing immediate data availability\nError EINVAL: invalid command\n"), EINVAL
        if not self._await_mgr():
            return "", "Error ESHUTDOWN: the cluster is stopping\n", 108
        code, report = self.ok_to_stop(ids, max(max_osds, len(set(ids))))
        unknown, not_ok = report.pop("_unknown"), report.pop("_not_ok")
        # Without -f the command still prints JSON (DaemonServer makes a json Formatter).
        stdout = _json(report, fmt, "\n") if fmt in ("json", "json-pretty") else json.dumps(report, separators=(",", ":")) + "\n"
        if code == EAGAIN:
            return stdout, f"Error EAGAIN: {unknown} pgs have unknown state; cannot draw any conclusions\n", EAGAIN
        if code == EBUSY:
            return stdout, f"Error EBUSY: unsafe to stop osd(s) at this time ({not_ok} PGs are or would become offline)\n", EBUSY
        return stdout, "", 0

    def _ls_tree(self, rest: list[str], fmt: str | None) -> tuple[str, str, int]:
        if not rest:
            return "", "Invalid command: missing required parameter name(<string>)\nError EINVAL: invalid command\n", EINVAL
        name = rest[0]
        with self._lock:
            if name in self.buckets:
                ids = sorted(self.buckets[name])
            elif name == "default":
                ids = sorted(self.osd_host)
            elif name.startswith("osd.") and name[4:].isdigit() and int(name[4:]) in self.osd_host:
                ids = [int(name[4:])]
            else:
                # ceph/ceph src/mon/OSDMonitor.cc "osd ls-tree": the bucket name, quoted.
                return "", f'Error ENOENT: "{name}" does not exist\n', ENOENT
        if fmt in ("json", "json-pretty"):
            return _json(ids, fmt, "\n"), "", 0
        return "".join(f"{i}\n" for i in ids), "", 0

    def _tree(self) -> dict[str, Any]:
        with self._lock:
            nodes: list[dict[str, Any]] = [{"id": -1, "name": "default", "type": "root", "type_id": 11,
                                            "children": sorted((self._bucket_ids[b] for b in self.buckets), reverse=True)}]
            for b, ids in self.buckets.items():
                nodes.append({"id": self._bucket_ids[b], "name": b, "type": "host", "type_id": 1, "pool_weights": {},
                              "children": sorted(ids, reverse=True)})
                for o in sorted(ids):
                    nodes.append({"id": o, "device_class": "ssd", "name": f"osd.{o}", "type": "osd", "type_id": 0,
                                  "crush_weight": 0.9094696044921875, "depth": 2, "pool_weights": {}, "exists": 1,
                                  "status": "up" if f"osd.{o}" in self._running else "down", "reweight": 1,
                                  "primary_affinity": 1})
            return {"nodes": nodes, "stray": []}

    def _flag(self, verb: str, rest: list[str]) -> tuple[str, str, int]:
        if not rest:
            return "", "Invalid command: missing required parameter key\n", EINVAL
        flag = rest[0]
        if flag not in FLAGS:
            return "", f"Invalid command: {flag} not in {'|'.join(FLAGS)}\nError EINVAL: invalid command\n", EINVAL
        with self._lock:
            if verb == "set":
                self._flags.add(flag)
            else:
                self._flags.discard(flag)
            self._epoch += 1
        self._notify()
        return "", f"{flag} is {'set' if verb == 'set' else 'unset'}\n", 0

    def _pool_set(self, rest: list[str]) -> tuple[str, str, int]:
        """``osd pool set <pool> min_size <n>`` (the one pool setting the twin models)."""
        if len(rest) < 3:
            return "", "Invalid command: missing required parameter val(<string>)\nError EINVAL: invalid command\n", EINVAL
        name, var, val = rest[:3]
        ids = {pname: str(pid) for pid, pname, _ in POOLS}
        if name not in ids:
            return "", f"Error ENOENT: unrecognized pool '{name}'\n", ENOENT
        if var != "min_size":
            return "", f"Error EINVAL: the twin's Ceph models only min_size, not {var}\n", EINVAL
        try:
            n = int(val)
        except ValueError:
            return "", f"Error EINVAL: error parsing integer value '{val}'\n", EINVAL
        if not 1 <= n <= POOL_SIZE:
            return "", "Error EINVAL: pool min_size must be between 1 and size, which is set to 3\n", EINVAL
        with self._lock:
            self.min_size[ids[name]] = n
            self._epoch += 1
        self._notify()
        return "", f"set pool {ids[name]} min_size to {n}\n", 0

    def _purge(self, rest: list[str]) -> tuple[str, str, int]:
        if not rest:
            return "", "Invalid command: missing required parameter id(<osdname (id|osd.id)>)\nError EINVAL: invalid command\n", EINVAL
        try:
            osd = int(rest[0].removeprefix("osd."))
        except ValueError:
            return "", f"Error EINVAL: invalid osd id value '{rest[0]}'\n", EINVAL
        force = "--force" in rest or "--yes-i-really-mean-it" in rest
        with self._lock:
            if osd not in self.osd_host:
                return "", f"osd.{osd} does not exist\n", 0
            now = time.monotonic()
            before = self._placement()
            mapped = sum(1 for acting in before.values() if osd in acting)
            if mapped and not force:
                return "", (f"Error EBUSY: OSD(s) {osd} have {mapped} pgs currently mapped to them. \nYou can proceed "
                            "by passing --force, but be warned that this will likely mean real, permanent data loss.\n"), EBUSY
            if f"osd.{osd}" in self._running:
                return "", f"Error EBUSY: osd.{osd} is not `down`.\n", EBUSY
            host = self.osd_host.pop(osd)
            self.buckets[crush_host(host)].remove(osd)
            self._recovering.pop(osd, None)
            self._epoch += 1
            # The PGs that had a copy there get one elsewhere: backfilled for recovery_seconds.
            for pgid, acting in self._placement().items():
                added = [o for o in acting if o not in before[pgid]]
                if added:
                    self._backfill[pgid] = (added[0], now + self.recovery_seconds)
            self._notify_at(self.recovery_seconds)
        self._notify()
        return "", f"purged osd.{osd}\n", 0

    def _crush_rm(self, rest: list[str]) -> tuple[str, str, int]:
        if not rest:
            return "", "Invalid command: missing required parameter name(<objectname>)\nError EINVAL: invalid command\n", EINVAL
        name = rest[0]
        with self._lock:
            if name not in self.buckets:
                return "", f"device '{name}' does not appear in the crush map\n", 0
            if self.buckets[name]:
                return "", "Error ENOTEMPTY: (39) Directory not empty\n", ENOTEMPTY
            bid = self._bucket_ids.pop(name)
            del self.buckets[name]
            self._epoch += 1
        return "", f"removed item id {bid} name '{name}' from crush map\n", 0

    def _pg_stat(self, fmt: str | None) -> tuple[str, str, int]:
        if not self._await_mgr():
            return "", "Error ESHUTDOWN: the cluster is stopping\n", 108
        with self._lock:
            now = time.monotonic()
            unknown = self._stats_unknown(now)
            pgs = self._pgs(now)
        states = ([{"state_name": "unknown", "count": NUM_PGS}] if unknown else self._pg_summary(pgs))
        summary: dict[str, Any] = {
            "num_pg_by_state": [{"name": s["state_name"], "num": s["count"]} for s in states],
            "num_pgs": NUM_PGS, "num_bytes": 2222656224, "total_bytes": 26843545600,
            "total_avail_bytes": 18050441216, "total_used_bytes": 8793104384, "total_used_raw_bytes": 8793104384}
        text = ", ".join(f"{s['count']} {s['state_name']}" for s in states)
        text = f"{NUM_PGS} pgs: {text}; 2.1 GiB data, 8.2 GiB used, 17 GiB / 25 GiB avail"
        degraded = [pg for pg in pgs if "degraded" in pg.words] if not unknown else []
        if degraded:
            per_pg = NUM_OBJECTS / NUM_PGS
            objects = round(sum((POOL_SIZE - len(pg.avail)) * per_pg for pg in degraded))
            total = NUM_OBJECTS * POOL_SIZE
            summary.update({"degraded_objects": objects, "degraded_total": total, "degraded_ratio": objects / total})
            text += f"; {objects}/{total} objects degraded ({100 * objects / total:.3f}%)"
        body = {"pg_ready": not unknown, "pg_summary": summary}
        if fmt in ("json", "json-pretty"):
            return _pacific_json(body, fmt), "", 0
        return text + "\n", "", 0

    def _config_key(self, rest: list[str]) -> tuple[str, str, int]:
        """The mon's config-key store (ceph/ceph src/mon/ConfigKeyService.cc), as 16.2.15 prints it."""
        verb, key = (rest + ["", ""])[:2]
        with self._lock:
            if verb == "get":
                if key not in self._config_keys:
                    return "", "Error ENOENT: \n", ENOENT
                return self._config_keys[key], "", 0
            if verb in ("set", "put"):
                if not key:
                    return "", "Invalid command: missing required parameter key(<string>)\nError EINVAL: invalid command\n", EINVAL
                self._config_keys[key] = rest[2] if len(rest) > 2 else ""
                return "", f"set {key}\n", 0
            if verb in ("rm", "del"):
                self._config_keys.pop(key, None)
                return "", "key deleted\n", 0
            if verb == "exists":
                if key in self._config_keys:
                    return "", f"key '{key}' exists\n", 0
                return "", f"Error ENOENT: key '{key}' doesn't exist\n", ENOENT
            if verb in ("ls", "list"):
                return json.dumps(sorted(self._config_keys), indent=4) + "\n", "", 0
        return "", "no valid command found\nError EINVAL: invalid command\n", EINVAL


def _json(obj: Any, fmt: str | None, trailing: str) -> str:
    """16.2.15 prints a newline before a JSON reply; some commands end it with one, some not."""
    if fmt == "json-pretty":
        return "\n" + json.dumps(obj, indent=4) + trailing
    return "\n" + json.dumps(obj, separators=(",", ":")) + trailing


def _pacific_json(body: dict[str, Any], fmt: str | None) -> str:
    """Pacific's `pg stat` JSON framing: a newline before the object, and the outer brace closed on a
    line of its own with no newline after it (16.2.15, byte for byte)."""
    if fmt == "json-pretty":
        text = json.dumps(body, indent=4)
        return "\n" + text[: -len("\n}")] + "\n\n}\n"
    text = json.dumps(body, separators=(",", ":"))
    return "\n" + text[:-1] + "\n}"


def _check(severity: str, message: str, count: int, detail: list[str]) -> dict[str, Any]:
    return {"severity": severity, "summary": {"message": message, "count": count},
            "detail": [{"message": d} for d in detail], "muted": False}


def _summaries(checks: dict[str, Any]) -> dict[str, Any]:
    return {k: {"severity": v["severity"], "summary": v["summary"], "muted": v.get("muted", False)}
            for k, v in checks.items()}


def _overall(checks: dict[str, Any]) -> str:
    sev = {c["severity"] for c in checks.values() if not c.get("muted")}
    return "HEALTH_ERR" if "HEALTH_ERR" in sev else "HEALTH_WARN" if sev else "HEALTH_OK"


def _strip_global(argv: list[str]) -> tuple[list[str], str | None, float]:
    """Drop the global options (-c, --connect-timeout, --cluster, ...); pull out -f/--format and the
    connect timeout (the CLI's wait for a mon quorum)."""
    out: list[str] = []
    fmt: str | None = None
    connect = 5.0
    i = 0
    with_value = {"-c", "--conf", "--connect-timeout", "--cluster", "-n", "--name", "--id", "-i", "-k", "--keyring"}
    while i < len(argv):
        a = argv[i]
        if a in ("-f", "--format"):
            fmt = argv[i + 1] if i + 1 < len(argv) else None
            i += 2
            continue
        if a.startswith("--format="):
            fmt = a.split("=", 1)[1]
        elif a in with_value:
            if a == "--connect-timeout" and i + 1 < len(argv):
                try:
                    connect = float(argv[i + 1])
                except ValueError:
                    pass
            i += 2
            continue
        elif a.startswith("--") and "=" in a and a.split("=", 1)[0] in with_value:
            if a.startswith("--connect-timeout="):
                try:
                    connect = float(a.split("=", 1)[1])
                except ValueError:
                    pass
        else:
            out.append(a)
        i += 1
    return out, fmt, connect


def _health_text(status: str, checks: dict[str, Any], detail: bool) -> str:
    live = {k: c for k, c in checks.items() if not c.get("muted")}
    if not live:
        muted = f" (muted: {' '.join(checks)})" if checks else ""
        return f"{status}{muted}\n"
    lines = [f"{status} " + "; ".join(c["summary"]["message"] for c in live.values())]
    if detail:
        for name, c in live.items():
            lines.append(f"[{'WRN' if c['severity'] == 'HEALTH_WARN' else 'ERR'}] {name}: {c['summary']['message']}")
            lines.extend(f"    {d['message']}" for d in c["detail"])
    return "\n".join(lines) + "\n"


def _status_text(st: dict[str, Any], ceph: SimCeph) -> str:
    h = st["health"]
    lines = ["  cluster:", f"    id:     {st['fsid']}", f"    health: {h['status']}"]
    lines += [f"            {c['summary']['message']}" for c in h["checks"].values() if not c.get("muted")]
    o, p = st["osdmap"], st["pgmap"]
    standbys = ceph._standbys()
    mgr = f"{ceph.active_mgr}(active)" if ceph.active_mgr else "no daemons active"
    lines += ["", "  services:",
              f"    mon: {st['monmap']['num_mons']} daemons, quorum {','.join(st['quorum_names'])}",
              f"    mgr: {mgr}" + (f", standbys: {', '.join(standbys)}" if standbys else ""),
              f"    osd: {o['num_osds']} osds: {o['num_up_osds']} up, {o['num_in_osds']} in", "",
              "  data:", f"    pools:   {p['num_pools']} pools, {p['num_pgs']} pgs",
              f"    objects: {p['num_objects']} objects, 2.1 GiB", "    usage:   8.2 GiB used, 17 GiB / 25 GiB avail",
              "    pgs:     " + "\n             ".join(f"{s['count']} {s['state_name']}" for s in p["pgs_by_state"]), ""]
    return "\n".join(lines) + "\n"
