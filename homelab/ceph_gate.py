"""Reading Ceph's answers and deciding whether a node may go down: pure functions, no I/O.

The parsers take what the ``ceph`` CLI printed (the JSON text or the decoded object) and
accept the shapes real clusters produce across releases: ``osdmap`` nested in Nautilus and
flat later, ``overall_status`` in Luminous, keys with a trailing ``": "``, ``muted`` checks,
and the ``{"data": …}`` wrapper of the Proxmox API. The verdicts say what is wrong and what to
do next, because a refused gate is read by an operator.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

HEALTH_OK = "HEALTH_OK"
ENOENT = 2
EAGAIN = 11
EBUSY = 16
# Where a flow records that it set noout, for whom, and for which run: readable by an operator with
# `ceph config-key get homelab/noout-owner` (the mon's config-key store, kept with the cluster).
NOOUT_OWNER_KEY = "homelab/noout-owner"

# Rook's definition of a clean PG (pkg/operator/ceph/cluster/... cleanPGRegex).
CLEAN_PG = re.compile(r"^(active\+clean|active\+clean\+scrubbing|active\+clean\+scrubbing\+deep)$")
_FLAGS_MESSAGE = re.compile(r"^\s*(?P<flags>[\w,-]+)\s+flag\(s\) set\s*$")


class CephParseError(ValueError):
    """Ceph printed something that is not the expected shape; the message says what and where."""


@dataclass(frozen=True)
class Verdict:
    """A gate's answer: ``ok``, and in ``reason`` what is wrong and what to do next."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class HealthCheck:
    name: str
    severity: str
    message: str
    count: int | None = None
    muted: bool = False
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class Health:
    status: str  # HEALTH_OK | HEALTH_WARN | HEALTH_ERR
    checks: Mapping[str, HealthCheck] = field(default_factory=dict)


@dataclass(frozen=True)
class CephStatus:
    health: Health
    num_osds: int
    num_up_osds: int
    num_in_osds: int
    num_pgs: int
    pgs_by_state: tuple[tuple[str, int], ...]
    # None where the release does not print them (the checks that use them are then skipped).
    quorum_names: tuple[str, ...] | None = None
    num_mons: int | None = None
    mgr_available: bool | None = None

    @property
    def unclean_pgs(self) -> dict[str, int]:
        """PG states that are not clean, with their counts (PGs not reported count as ``unknown``)."""
        out: dict[str, int] = {}
        for state, count in self.pgs_by_state:
            if not CLEAN_PG.match(state):
                out[state] = out.get(state, 0) + count
        missing = self.num_pgs - sum(c for _, c in self.pgs_by_state)
        if missing > 0:
            out["unknown"] = out.get("unknown", 0) + missing
        return out


@dataclass(frozen=True)
class PgStat:
    """``ceph pg stat``: the PG states the active mgr knows now (``ceph status`` shows the mon's last
    digest instead, which a new mgr does not update until the OSDs have reported to it)."""

    num_pgs: int
    by_state: tuple[tuple[str, int], ...]
    ready: bool = True  # pg_ready: false while the mgr waits for its first reports

    @property
    def all_clean(self) -> bool:
        return self.ready and sum(c for s, c in self.by_state if CLEAN_PG.match(s)) == self.num_pgs

    @property
    def unclean(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for state, count in self.by_state:
            if not CLEAN_PG.match(state):
                out[state] = out.get(state, 0) + count
        missing = self.num_pgs - sum(c for _, c in self.by_state)
        if missing > 0:
            out["unknown"] = out.get("unknown", 0) + missing
        return out


@dataclass(frozen=True)
class OkToStop:
    """What ``ceph osd ok-to-stop <ids>`` answered.

    The sections are those of ceph/ceph src/mgr/DaemonServer.h ``offline_pg_report::dump``, each
    printed only when not empty; ``unknown_pgs`` makes the answer EAGAIN (no conclusion yet).
    """

    ok: bool
    osds: tuple[int, ...]
    num_ok_pgs: int | None = None
    num_not_ok_pgs: int | None = None
    bad_become_inactive: tuple[str, ...] = ()
    ok_become_degraded: tuple[str, ...] = ()
    message: str = ""  # stderr or text output, e.g. "Error EBUSY: unsafe to stop osd(s) …"
    unknown_pgs: tuple[str, ...] = ()
    bad_no_pool_pgs: tuple[str, ...] = ()
    bad_already_inactive: tuple[str, ...] = ()
    ok_become_more_degraded: tuple[str, ...] = ()
    undecided: bool = False  # exit 11 (EAGAIN): PG states unknown, e.g. right after a mgr failover

    @property
    def returncode(self) -> int:
        return EAGAIN if self.undecided else 0 if self.ok else EBUSY


@dataclass(frozen=True)
class CrushTree:
    """``ceph osd tree -f json``: each CRUSH host bucket with the OSDs beneath it."""

    hosts: Mapping[str, tuple[int, ...]]
    osds: frozenset[int]  # every OSD the tree shows, in a bucket or not

    @property
    def placed(self) -> frozenset[int]:
        return frozenset(o for ids in self.hosts.values() for o in ids)


@dataclass(frozen=True)
class Daemons:
    """``ceph node ls -f json``: the daemons of each host, by the hostname each daemon reports.

    Under Rook that hostname is the Kubernetes node name: Rook sets NODE_NAME=spec.nodeName in every
    Ceph daemon's pod (rook/rook pkg/operator/k8sutil/pod.go ClusterDaemonEnvVars) and Ceph reports
    NODE_NAME as its hostname (ceph/ceph src/common/hostname.cc ceph_get_hostname).
    """

    mons: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    osds: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    mgrs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Quorum:
    """``ceph quorum_status -f json``: the mons in quorum and every mon of the monmap."""

    quorum: tuple[str, ...]
    mons: tuple[str, ...]
    leader: str | None = None

    @property
    def out(self) -> tuple[str, ...]:
        return tuple(m for m in self.mons if m not in self.quorum)


@dataclass(frozen=True)
class MgrStat:
    """``ceph mgr stat -f json``."""

    available: bool
    active: str | None
    num_standby: int


@dataclass(frozen=True)
class NodeOsds:
    """The OSDs that stop with a node, or why they cannot be told."""

    verdict: Verdict
    osds: tuple[int, ...] = ()
    bucket: str = ""


@dataclass(frozen=True)
class NooutOwner:
    """Who set noout, recorded under NOOUT_OWNER_KEY so that a rerun knows the flag is its own."""

    flow: str
    flow_run_id: str
    cluster: str
    node: str = ""
    set_at: str = ""

    def to_json(self) -> str:
        return json.dumps({"flow": self.flow, "flow_run_id": self.flow_run_id, "cluster": self.cluster,
                           "node": self.node, "set_at": self.set_at}, sort_keys=True)

    def describe(self) -> str:
        at = f" at {self.set_at}" if self.set_at else ""
        node = f" before {self.node}" if self.node else ""
        return f"{self.flow} run {self.flow_run_id} on cluster {self.cluster}{node}{at}"


# ---- parsing -----------------------------------------------------------------------------


def load(raw: str | bytes | Mapping[str, Any], what: str = "ceph output") -> dict[str, Any]:
    """Decode ``raw`` (JSON text or an object), unwrap Proxmox's ``{"data": …}``, fix odd keys."""
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    if isinstance(raw, str):
        text = raw
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise CephParseError(f"{what}: expected JSON, got {text[:120]!r} ({e})") from None
    if not isinstance(raw, Mapping):
        raise CephParseError(f"{what}: expected a JSON object, got {type(raw).__name__}")
    data: Any = _clean_keys(raw)
    if set(data) == {"data"} and isinstance(data["data"], Mapping):
        data = data["data"]
    return dict(data)


def _clean_keys(obj: Any) -> Any:
    # Some Ceph releases print keys such as "disallowed_leaders: " (a trailing ": ").
    if isinstance(obj, Mapping):
        return {str(k).removesuffix(": ").strip(): _clean_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean_keys(v) for v in obj]
    return obj


def parse_health(raw: str | bytes | Mapping[str, Any]) -> Health:
    """``ceph health detail -f json`` ({status, checks, mutes}), or the ``health`` of a status."""
    data = load(raw, "ceph health")
    status = data.get("status") or data.get("overall_status")
    if not isinstance(status, str):
        raise CephParseError(
            f"ceph health: no 'status' (nor Luminous 'overall_status') in keys {sorted(data)}"
        )
    checks: dict[str, HealthCheck] = {}
    for name, c in (data.get("checks") or {}).items():
        c = c if isinstance(c, Mapping) else {}
        summary = c.get("summary") or {}
        message = summary.get("message", "") if isinstance(summary, Mapping) else str(summary)
        count = summary.get("count") if isinstance(summary, Mapping) else None
        details = tuple(
            str(d.get("message", "")) if isinstance(d, Mapping) else str(d) for d in (c.get("detail") or [])
        )
        checks[name] = HealthCheck(
            name=name,
            severity=str(c.get("severity", "HEALTH_WARN")),
            message=str(message),
            count=int(count) if isinstance(count, int) else None,
            muted=bool(c.get("muted", False)),
            details=details,
        )
    return Health(status=status, checks=checks)


def parse_status(raw: str | bytes | Mapping[str, Any]) -> CephStatus:
    """``ceph status -f json`` of any release from Luminous on (and Proxmox's wrapped form)."""
    data = load(raw, "ceph status")
    if "health" not in data:
        raise CephParseError(f"ceph status: no 'health' in keys {sorted(data)[:12]}")
    osdmap = data.get("osdmap") or {}
    if isinstance(osdmap.get("osdmap"), Mapping):  # Nautilus nests it once more
        osdmap = osdmap["osdmap"]
    pgmap = data.get("pgmap") or {}
    by_state = tuple((str(s["state_name"]), int(s["count"])) for s in pgmap.get("pgs_by_state") or [])
    quorum = data.get("quorum_names")
    monmap = data.get("monmap") or {}
    # Nautilus on print the mon count; Luminous prints the whole monmap.
    num_mons = monmap.get("num_mons", len(monmap["mons"]) if isinstance(monmap.get("mons"), list) else None)
    mgrmap = data.get("mgrmap") or {}
    return CephStatus(
        health=parse_health(data["health"]),
        num_osds=int(osdmap.get("num_osds", 0)),
        num_up_osds=int(osdmap.get("num_up_osds", 0)),
        num_in_osds=int(osdmap.get("num_in_osds", 0)),
        num_pgs=int(pgmap.get("num_pgs", sum(c for _, c in by_state))),
        pgs_by_state=by_state,
        quorum_names=tuple(str(q) for q in quorum) if isinstance(quorum, list) else None,
        num_mons=int(num_mons) if isinstance(num_mons, int) else None,
        mgr_available=bool(mgrmap["available"]) if "available" in mgrmap else None,
    )


def parse_pg_stat(raw: str | bytes | Mapping[str, Any]) -> PgStat:
    """``ceph pg stat -f json``: ``{"pg_summary": {...}}`` from Octopus on, flat before."""
    data = load(raw, "ceph pg stat")
    summary = data.get("pg_summary", data)
    if "num_pgs" not in summary:
        raise CephParseError(f"ceph pg stat: no 'num_pgs' in keys {sorted(summary)}")
    by_state = tuple((str(s["name"]), int(s["num"])) for s in summary.get("num_pg_by_state") or [])
    return PgStat(num_pgs=int(summary["num_pgs"]), by_state=by_state, ready=bool(data.get("pg_ready", True)))


def parse_osd_flags(raw: str | bytes | Mapping[str, Any]) -> frozenset[str]:
    """The cluster-wide OSD map flags from ``ceph osd dump -f json`` (``flags_set``, else ``flags``)."""
    data = load(raw, "ceph osd dump")
    if isinstance(data.get("flags_set"), list):
        return frozenset(str(f) for f in data["flags_set"])
    flags = data.get("flags")
    if not isinstance(flags, str):
        raise CephParseError(f"ceph osd dump: no 'flags' or 'flags_set' in keys {sorted(data)[:12]}")
    return frozenset(f for f in flags.split(",") if f)


def parse_ls_tree(text: str) -> list[int]:
    """``ceph osd ls-tree <host>``: one OSD id a line (``-f json`` gives a list; both accepted)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return [int(x) for x in json.loads(stripped)]
        except (ValueError, TypeError) as e:
            raise CephParseError(f"ceph osd ls-tree: expected a list of ids, got {stripped[:80]!r}") from e
    ids = []
    for line in stripped.splitlines():
        line = line.strip()
        if not line:
            continue
        if not line.isdigit():
            raise CephParseError(f"ceph osd ls-tree: expected one OSD id a line, got {line!r}")
        ids.append(int(line))
    return ids


def parse_ok_to_stop(stdout: str, returncode: int, stderr: str = "") -> OkToStop:
    """``ceph osd ok-to-stop <ids> -f json``: exit 0 = OK, 16 (EBUSY) = not OK, 11 (EAGAIN) = PG
    states unknown, no conclusion yet (ceph/ceph src/mgr/DaemonServer.cc, "osd ok-to-stop").

    All three print the JSON on stdout (Ceph before 14.2.22 printed text, kept in ``message``).
    Any other exit code is not an answer and raises.
    """
    if returncode not in (0, EBUSY, EAGAIN):
        raise CephParseError(
            f"ceph osd ok-to-stop: exit {returncode} is not an answer: {stderr.strip()[:200]}"
        )
    ok = returncode == 0
    undecided = returncode == EAGAIN
    message = stderr.strip()
    text = stdout.strip()
    if not text.startswith("{"):
        return OkToStop(ok=ok, osds=(), message="\n".join(m for m in (text, message) if m), undecided=undecided)
    data = load(text, "ceph osd ok-to-stop")
    if "ok_to_stop" in data and bool(data["ok_to_stop"]) != ok:
        raise CephParseError(
            f"ceph osd ok-to-stop: exit {returncode} contradicts ok_to_stop={data['ok_to_stop']}"
        )

    def pgs(key: str) -> tuple[str, ...]:
        return tuple(str(p) for p in data.get(key) or [])

    return OkToStop(
        ok=ok,
        osds=tuple(int(o) for o in data.get("osds") or []),
        num_ok_pgs=data.get("num_ok_pgs"),
        num_not_ok_pgs=data.get("num_not_ok_pgs"),
        bad_become_inactive=pgs("bad_become_inactive"),
        ok_become_degraded=pgs("ok_become_degraded"),
        message=message,
        unknown_pgs=pgs("unknown_pgs"),
        bad_no_pool_pgs=pgs("bad_no_pool_pgs"),
        bad_already_inactive=pgs("bad_already_inactive"),
        ok_become_more_degraded=pgs("ok_become_more_degraded"),
        undecided=undecided,
    )


def crush_host_name(hostname: str) -> str:
    """The CRUSH host bucket Rook puts a node's OSDs under: the node's ``kubernetes.io/hostname``
    label with every dot turned into a dash (rook/rook pkg/daemon/ceph/client/crush.go
    NormalizeCrushName, applied in pkg/operator/ceph/cluster/osd/topology/topology.go)."""
    return hostname.replace(".", "-")


def parse_osd_tree(raw: str | bytes | Mapping[str, Any]) -> CrushTree:
    """``ceph osd tree -f json``: ``nodes`` (buckets with ``children``, OSDs) and ``stray`` OSDs."""
    data = load(raw, "ceph osd tree")
    nodes = data.get("nodes")
    if not isinstance(nodes, list):
        raise CephParseError(f"ceph osd tree: no 'nodes' list in keys {sorted(data)}")
    by_id = {int(n["id"]): n for n in nodes if isinstance(n, Mapping) and "id" in n}

    def osds_under(bucket_id: int, seen: frozenset[int] = frozenset()) -> list[int]:
        out: list[int] = []
        for child in by_id.get(bucket_id, {}).get("children") or []:
            child = int(child)
            if child >= 0:
                out.append(child)
            elif child not in seen:
                out.extend(osds_under(child, seen | {bucket_id}))
        return out

    hosts = {str(n["name"]): tuple(sorted(osds_under(i))) for i, n in by_id.items() if n.get("type") == "host"}
    osds = {i for i, n in by_id.items() if i >= 0}
    osds |= {int(n["id"]) for n in data.get("stray") or [] if isinstance(n, Mapping) and "id" in n}
    return CrushTree(hosts=hosts, osds=frozenset(osds))


def parse_node_ls(raw: str | bytes | Mapping[str, Any]) -> Daemons:
    """``ceph node ls -f json``: ``{"mon": {host: [names]}, "osd": {host: [ids]}, "mgr": {...}}``."""
    data = load(raw, "ceph node ls")

    def section(key: str) -> dict[str, list[Any]]:
        sec = data.get(key) or {}
        if not isinstance(sec, Mapping):
            raise CephParseError(f"ceph node ls: {key!r} is not a host map: {str(sec)[:80]}")
        return {str(h): list(v or []) for h, v in sec.items()}

    return Daemons(
        mons={h: tuple(str(x) for x in v) for h, v in section("mon").items()},
        osds={h: tuple(int(x) for x in v) for h, v in section("osd").items()},
        mgrs={h: tuple(str(x) for x in v) for h, v in section("mgr").items()},
    )


def parse_quorum_status(raw: str | bytes | Mapping[str, Any]) -> Quorum:
    """``ceph quorum_status -f json``: ``quorum_names`` and ``monmap.mons[].name``."""
    data = load(raw, "ceph quorum_status")
    names = data.get("quorum_names")
    mons = (data.get("monmap") or {}).get("mons")
    if not isinstance(names, list) or not isinstance(mons, list):
        raise CephParseError(f"ceph quorum_status: no 'quorum_names' and 'monmap.mons' in keys {sorted(data)}")
    leader = data.get("quorum_leader_name")
    return Quorum(quorum=tuple(str(n) for n in names), mons=tuple(str(m["name"]) for m in mons),
                  leader=str(leader) if leader else None)


def parse_mgr_stat(raw: str | bytes | Mapping[str, Any]) -> MgrStat:
    """``ceph mgr stat -f json``: ``{"epoch", "available", "active_name", "num_standby"}``."""
    data = load(raw, "ceph mgr stat")
    if "available" not in data:
        raise CephParseError(f"ceph mgr stat: no 'available' in keys {sorted(data)}")
    return MgrStat(available=bool(data["available"]), active=str(data.get("active_name") or "") or None,
                   num_standby=int(data.get("num_standby", 0)))


def parse_mon_ok_to_stop(returncode: int, stderr: str, mons: Iterable[str]) -> Verdict:
    """``ceph mon ok-to-stop <ids>``: exit 0 with "quorum should be preserved (…) after stopping […]",
    exit 16 (EBUSY) with "not enough monitors would be available (…)" (ceph/ceph src/mon/
    MonmapMonitor.cc "mon ok-to-stop"). The text is all there is: the command prints no JSON."""
    text = stderr.strip().removeprefix("Error EBUSY: ")
    named = ",".join(sorted(mons))
    if returncode == 0:
        return Verdict(True, f"Ceph says mon(s) {named} may stop: {text}")
    if returncode == EBUSY:
        return Verdict(False, f"Ceph says stopping mon(s) {named} would lose the mon quorum: {text}")
    raise CephParseError(f"ceph mon ok-to-stop: exit {returncode} is not an answer: {stderr.strip()[:200]}")


def parse_noout_owner(text: str) -> NooutOwner | None:
    """The record under NOOUT_OWNER_KEY; None when it is not one of ours (then the flag is foreign)."""
    try:
        data = json.loads(text)
        return NooutOwner(flow=str(data["flow"]), flow_run_id=str(data["flow_run_id"]),
                          cluster=str(data["cluster"]), node=str(data.get("node") or ""),
                          set_at=str(data.get("set_at") or ""))
    except (ValueError, KeyError, TypeError):
        return None


def flags_in_check(check: HealthCheck) -> frozenset[str] | None:
    """The flags an OSDMAP_FLAGS check names ("noout,noscrub flag(s) set"), None if unreadable."""
    m = _FLAGS_MESSAGE.match(check.message)
    if not m:
        return None
    return frozenset(f for f in m.group("flags").split(",") if f)


# ---- verdicts ----------------------------------------------------------------------------


def _describe_pgs(states: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(states.items(), key=lambda kv: (-kv[1], kv[0])))


def _untolerated(health: Health, tolerated_flags: Iterable[str]) -> list[HealthCheck]:
    tolerated = frozenset(tolerated_flags)
    bad = []
    for c in health.checks.values():
        if c.muted:
            continue
        if c.name == "OSDMAP_FLAGS" and tolerated:
            flags = flags_in_check(c)
            if flags is not None and flags <= tolerated:
                continue
        bad.append(c)
    return bad


def health_verdict(health: Health, tolerated_flags: Iterable[str] = frozenset()) -> Verdict:
    """Healthy but for exactly the cluster flags the caller set itself (e.g. its own noout)."""
    tolerated = frozenset(tolerated_flags)
    bad = _untolerated(health, tolerated)
    if bad:
        named = "; ".join(f"{c.name} ({c.message})" for c in sorted(bad, key=lambda c: c.name))
        hint = " (only these flags are tolerated: " + ",".join(sorted(tolerated)) + ")" if tolerated else ""
        return Verdict(False, f"Ceph is {health.status}: {named}{hint}; {_next_step(bad)}")
    if health.status != HEALTH_OK and not health.checks:
        return Verdict(
            False, f"Ceph reports {health.status} without naming a check; run `ceph health detail`"
        )
    if health.status == HEALTH_OK:
        return Verdict(True, "Ceph is HEALTH_OK")
    tolerated_named = sorted(c.name for c in health.checks.values() if not c.muted)
    return Verdict(
        True, f"Ceph is {health.status} only for {', '.join(tolerated_named) or 'muted checks'}, tolerated"
    )


def _next_step(bad: list[HealthCheck]) -> str:
    names = {c.name for c in bad}
    if names & {"OSD_DOWN", "OSD_HOST_DOWN", "PG_DEGRADED", "PG_AVAILABILITY", "PG_RECOVERY_FULL"}:
        return "wait for the OSDs to come back up and the PGs to recover, then run again"
    if "OSDMAP_FLAGS" in names:
        return "unset the flags nobody is meant to hold (`ceph osd unset <flag>`), then run again"
    return "fix what `ceph health detail` reports, then run again"


def cluster_clean(status: CephStatus, tolerated_flags: Iterable[str] = frozenset(),
                  pgs: PgStat | None = None) -> Verdict:
    """Clean as Rook counts it (every PG active+clean, optionally scrubbing) and healthy,
    tolerating the OSDMAP_FLAGS warning only when it names nothing but ``tolerated_flags``; every
    mon in quorum and a mgr active. With ``pgs`` (``ceph pg stat``) the PG states are the active
    mgr's, not the mon's digest, which stays "active+clean" through a mgr failover."""
    problems = []
    unclean = pgs.unclean if pgs is not None else status.unclean_pgs
    num_pgs = pgs.num_pgs if pgs is not None else status.num_pgs
    if pgs is not None and not pgs.ready:
        problems.append(f"the active mgr knows no PG state yet ({num_pgs} PGs unknown, as after a mgr failover)")
    elif unclean:
        problems.append(
            f"{sum(unclean.values())} of {num_pgs} PGs not active+clean ({_describe_pgs(unclean)})"
        )
    if status.num_up_osds < status.num_osds or status.num_in_osds < status.num_osds:
        problems.append(
            f"OSDs up {status.num_up_osds}/{status.num_osds}, in {status.num_in_osds}/{status.num_osds}"
        )
    # Read from the maps, not from health: a muted MON_DOWN leaves health OK with a mon gone.
    mons_out = (status.quorum_names is not None and status.num_mons is not None
                and len(status.quorum_names) < status.num_mons)
    if mons_out:
        problems.append(
            f"only {len(status.quorum_names or ())} of {status.num_mons} mons in quorum "
            f"({','.join(status.quorum_names or ()) or 'none'})"
        )
    if status.mgr_available is False:
        problems.append("no active mgr (PG states and ok-to-stop need one)")
    health_now = status.health
    if pgs is not None and pgs.all_clean:
        # These two checks restate PG states, and the active mgr's are newer than a mon's: a mon that
        # just rejoined the quorum repeats the old ones for seconds (seen on 16.2.15).
        health_now = _without(health_now, {"PG_DEGRADED", "PG_AVAILABILITY"})
    health = health_verdict(health_now, tolerated_flags)
    if not health.ok:
        problems.append(health.reason.rsplit("; ", 1)[0])
    if not problems:
        return Verdict(True, f"all {num_pgs} PGs active+clean; {health.reason}")
    bad = _untolerated(health_now, tolerated_flags)
    if bad:
        step = _next_step(bad)
    elif mons_out:
        step = ("start the mons that are out of quorum (`ceph quorum_status`; `kubectl -n rook-ceph get pods "
                "-l app=rook-ceph-mon`), then run again")
    elif status.mgr_available is False:
        step = "wait for a mgr to become active (`ceph mgr stat`), then run again"
    else:
        step = "wait for the PGs to become active+clean, then run again"
    return Verdict(False, "Ceph not clean: " + "; ".join(problems) + f"; {step}")


def _without(health: Health, names: set[str]) -> Health:
    checks = {n: c for n, c in health.checks.items() if n not in names}
    if checks == dict(health.checks):
        return health
    live = [c for c in checks.values() if not c.muted]
    worst = "HEALTH_ERR" if any(c.severity == "HEALTH_ERR" for c in live) else "HEALTH_WARN" if live else HEALTH_OK
    return Health(status=worst, checks=checks)


def ok_to_stop_verdict(answer: OkToStop, osd_ids: Iterable[int], host: str | None = None) -> Verdict:
    """Whether Ceph agrees that ``osd_ids`` (``host``'s OSDs) may stop now."""
    ids = sorted(set(osd_ids))
    what = f"{host}'s OSDs {ids}" if host else f"OSDs {ids}"
    if not ids:
        return Verdict(False, f"{what}: no OSD ids to ask about; check `ceph osd ls-tree {host or '<host>'}`")
    if answer.undecided:
        n = len(answer.unknown_pgs) or "some"
        return Verdict(
            False,
            f"Ceph cannot tell yet whether {what} may stop: {n} PGs have unknown state (as right after a "
            "mgr failover, until the OSDs report to the new mgr); ask again shortly",
        )
    if answer.ok:
        asked = set(answer.osds)
        if asked and not set(ids) <= asked:
            return Verdict(
                False, f"{what}: Ceph answered for OSDs {sorted(asked)} only; ask again for all of them"
            )
        degraded = len(answer.ok_become_degraded) + len(answer.ok_become_more_degraded)
        note = f"; {degraded} PGs will be degraded meanwhile" if degraded else ""
        if answer.ok_become_more_degraded:
            note += f" ({len(answer.ok_become_more_degraded)} of them already are)"
        return Verdict(True, f"Ceph says {what} are ok to stop{note}")
    details = []
    for pgs, words in ((answer.bad_already_inactive, "are already inactive"),
                       (answer.bad_become_inactive, "would become inactive"),
                       (answer.bad_no_pool_pgs, "belong to a pool being created or deleted")):
        if pgs:
            shown = ", ".join(pgs[:8]) + (f" and {len(pgs) - 8} more" if len(pgs) > 8 else "")
            details.append(f"{len(pgs)} PGs {words} ({shown})")
    if not details and answer.num_not_ok_pgs:
        details.append(f"{answer.num_not_ok_pgs} PGs would become inactive")
    detail = "; ".join(details) or answer.message or "Ceph said no"
    return Verdict(
        False,
        f"Ceph says stopping {what} is unsafe now: {detail}; "
        "wait until the other OSDs are up and every PG is active+clean, then run again",
    )


def node_osds(node: str, hostname_labels: Mapping[str, str], tree: CrushTree,
              daemons: Daemons | None = None) -> NodeOsds:
    """The OSDs that go down with ``node``: those of its CRUSH host bucket, named as Rook names it
    (``crush_host_name`` of the node's ``kubernetes.io/hostname``), together with those whose daemon
    reports ``node`` as its host (``ceph node ls``). A node with neither holds no OSDs and needs no
    OSD gate, but only when every OSD is accounted for by another node: an OSD under a bucket or a
    host that matches no node could be this node's under a name we cannot see, and then we refuse.

    ``hostname_labels``: every Node's name -> its ``kubernetes.io/hostname`` label.
    """
    label = hostname_labels.get(node) or node
    bucket = crush_host_name(label)
    in_bucket = tree.hosts.get(bucket, ())
    by_daemon = (daemons.osds.get(node, ()) if daemons else ()) + (
        daemons.osds.get(label, ()) if daemons and label != node else ())
    osds = tuple(sorted(set(in_bucket) | set(by_daemon)))
    named = f"{node} (kubernetes.io/hostname {label}, CRUSH host {bucket})"
    if osds:
        return NodeOsds(Verdict(True, f"{named} holds OSDs {list(osds)}"), osds, bucket)
    known_buckets = {crush_host_name(lbl or n) for n, lbl in hostname_labels.items()}
    known_hosts = set(hostname_labels) | {lbl for lbl in hostname_labels.values() if lbl}
    strangers = sorted(h for h, ids in tree.hosts.items() if ids and h not in known_buckets)
    loose = sorted(tree.osds - tree.placed)
    foreign_daemons = sorted(h for h, ids in (daemons.osds.items() if daemons else ()) if ids and h not in known_hosts)
    if strangers or loose or foreign_daemons:
        seen = "; ".join(x for x in (
            f"CRUSH hosts {', '.join(strangers)} match no node" if strangers else "",
            f"OSDs {loose} sit under no CRUSH host" if loose else "",
            f"OSDs report hosts {', '.join(foreign_daemons)} that match no node" if foreign_daemons else "",
        ) if x)
        return NodeOsds(Verdict(False, (
            f"cannot tell which OSDs stop with {named}: no OSD is found for it, but {seen}; compare "
            "`ceph osd tree` and `ceph node ls osd` with the nodes' kubernetes.io/hostname labels")), (), bucket)
    where = "its CRUSH host bucket is empty" if bucket in tree.hosts else "CRUSH has no such host"
    return NodeOsds(Verdict(True, (
        f"{named} holds no OSDs ({where}, and every OSD belongs to another node): no OSD gate needed")),
        (), bucket)


def mon_gate(quorum: Quorum, node: str, daemons: Daemons) -> tuple[Verdict, tuple[str, ...]]:
    """Every mon of the monmap in quorum, and which mons run on ``node`` (to ask `mon ok-to-stop`).

    Read from the quorum itself, not from health: a muted MON_DOWN makes health OK with a mon gone.
    """
    here = tuple(m for m in quorum.mons if m in daemons.mons.get(node, ()))
    if quorum.out:
        return Verdict(False, (
            f"mon(s) {','.join(quorum.out)} out of quorum (quorum {','.join(quorum.quorum) or 'none'} of "
            f"{','.join(quorum.mons)}), whatever `ceph health` says (a muted MON_DOWN hides it); start "
            "the missing mon (`kubectl -n rook-ceph get pods -l app=rook-ceph-mon`) and run again")), here
    located = {m for ms in daemons.mons.values() for m in ms}
    unplaced = [m for m in quorum.mons if m not in located]
    if unplaced:
        return Verdict(False, (
            f"cannot tell where mon(s) {','.join(unplaced)} run (`ceph node ls mon` does not list them); "
            f"{node} may hold one; check `ceph mon metadata` and run again")), here
    if here:
        return Verdict(True, f"all {len(quorum.mons)} mons in quorum; {node} runs mon(s) {','.join(here)}"), here
    return Verdict(True, f"all {len(quorum.mons)} mons in quorum; {node} runs none"), here


def mgr_gate(stat: MgrStat, node: str, daemons: Daemons) -> Verdict:
    """An active mgr, and a standby to take over when the active one runs on ``node``."""
    if not stat.available or not stat.active:
        return Verdict(False, (
            "no active mgr (`ceph mgr stat`: available false): PG states and `osd ok-to-stop` need one; "
            "wait for the mgr failover (`ceph mgr stat`) and run again"))
    if stat.active in daemons.mgrs.get(node, ()) and stat.num_standby < 1:
        return Verdict(False, (
            f"the active mgr {stat.active} runs on {node} and there is no standby: the node's reboot would "
            "leave Ceph without a mgr; start the second mgr (`kubectl -n rook-ceph get pods -l app=rook-ceph-mgr`) "
            "and run again"))
    where = f"on {node}, with {stat.num_standby} standby" if stat.active in daemons.mgrs.get(node, ()) else "elsewhere"
    return Verdict(True, f"mgr {stat.active} active {where}")


def noout_verdict(flags: frozenset[str], record: str | None, flow: str, cluster: str) -> tuple[Verdict, bool]:
    """Whether a set noout is ``flow``'s own (set by an earlier, interrupted run on ``cluster``): then a
    rerun carries on and tolerates it. (verdict, own). Without noout: ok, not own."""
    if "noout" not in flags:
        return Verdict(True, "noout is not set"), False
    owner = parse_noout_owner(record) if record is not None else None
    if owner is not None and owner.flow == flow and owner.cluster == cluster:
        return Verdict(True, f"noout is this flow's own: set by {owner.describe()}; carrying on"), True
    if record is None:
        who = f"nobody recorded setting it (no `ceph config-key get {NOOUT_OWNER_KEY}`)"
    elif owner is None:
        who = f"{NOOUT_OWNER_KEY} holds something else: {record[:120]!r}"
    else:
        who = f"it was set by {owner.describe()}"
    return Verdict(False, (
        f"noout is set, but not by {flow} on {cluster}: {who}; whoever set it may still need it. Once they "
        "are done, `ceph osd unset noout`, then run again")), False
