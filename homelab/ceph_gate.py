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
EBUSY = 16

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
    num_pgs: int
    by_state: tuple[tuple[str, int], ...]

    @property
    def all_clean(self) -> bool:
        return sum(c for s, c in self.by_state if CLEAN_PG.match(s)) == self.num_pgs


@dataclass(frozen=True)
class OkToStop:
    """What ``ceph osd ok-to-stop <ids>`` answered."""

    ok: bool
    osds: tuple[int, ...]
    num_ok_pgs: int | None = None
    num_not_ok_pgs: int | None = None
    bad_become_inactive: tuple[str, ...] = ()
    ok_become_degraded: tuple[str, ...] = ()
    message: str = ""  # stderr or text output, e.g. "Error EBUSY: unsafe to stop osd(s) …"


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
    return CephStatus(
        health=parse_health(data["health"]),
        num_osds=int(osdmap.get("num_osds", 0)),
        num_up_osds=int(osdmap.get("num_up_osds", 0)),
        num_in_osds=int(osdmap.get("num_in_osds", 0)),
        num_pgs=int(pgmap.get("num_pgs", sum(c for _, c in by_state))),
        pgs_by_state=by_state,
    )


def parse_pg_stat(raw: str | bytes | Mapping[str, Any]) -> PgStat:
    """``ceph pg stat -f json``: ``{"pg_summary": {...}}`` from Octopus on, flat before."""
    data = load(raw, "ceph pg stat")
    summary = data.get("pg_summary", data)
    if "num_pgs" not in summary:
        raise CephParseError(f"ceph pg stat: no 'num_pgs' in keys {sorted(summary)}")
    by_state = tuple((str(s["name"]), int(s["num"])) for s in summary.get("num_pg_by_state") or [])
    return PgStat(num_pgs=int(summary["num_pgs"]), by_state=by_state)


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
    """``ceph osd ok-to-stop <ids> -f json``: exit 0 = OK, exit 16 (EBUSY) = not OK.

    Both print the JSON on stdout (Ceph before 14.2.22 printed text, kept in ``message``).
    Any other exit code is not an answer and raises.
    """
    if returncode not in (0, EBUSY):
        raise CephParseError(
            f"ceph osd ok-to-stop: exit {returncode} is not an answer: {stderr.strip()[:200]}"
        )
    ok = returncode == 0
    message = stderr.strip()
    text = stdout.strip()
    if not text.startswith("{"):
        return OkToStop(ok=ok, osds=(), message="\n".join(m for m in (text, message) if m))
    data = load(text, "ceph osd ok-to-stop")
    if "ok_to_stop" in data and bool(data["ok_to_stop"]) != ok:
        raise CephParseError(
            f"ceph osd ok-to-stop: exit {returncode} contradicts ok_to_stop={data['ok_to_stop']}"
        )
    return OkToStop(
        ok=ok,
        osds=tuple(int(o) for o in data.get("osds") or []),
        num_ok_pgs=data.get("num_ok_pgs"),
        num_not_ok_pgs=data.get("num_not_ok_pgs"),
        bad_become_inactive=tuple(str(p) for p in data.get("bad_become_inactive") or []),
        ok_become_degraded=tuple(str(p) for p in data.get("ok_become_degraded") or []),
        message=message,
    )


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


def cluster_clean(status: CephStatus, tolerated_flags: Iterable[str] = frozenset()) -> Verdict:
    """Clean as Rook counts it (every PG active+clean, optionally scrubbing) and healthy,
    tolerating the OSDMAP_FLAGS warning only when it names nothing but ``tolerated_flags``."""
    problems = []
    unclean = status.unclean_pgs
    if unclean:
        problems.append(
            f"{sum(unclean.values())} of {status.num_pgs} PGs not active+clean ({_describe_pgs(unclean)})"
        )
    if status.num_up_osds < status.num_osds or status.num_in_osds < status.num_osds:
        problems.append(
            f"OSDs up {status.num_up_osds}/{status.num_osds}, in {status.num_in_osds}/{status.num_osds}"
        )
    health = health_verdict(status.health, tolerated_flags)
    if not health.ok:
        problems.append(health.reason.rsplit("; ", 1)[0])
    if not problems:
        return Verdict(True, f"all {status.num_pgs} PGs active+clean; {health.reason}")
    bad = _untolerated(status.health, tolerated_flags)
    step = _next_step(bad) if bad else "wait for the PGs to become active+clean, then run again"
    return Verdict(False, "Ceph not clean: " + "; ".join(problems) + f"; {step}")


def ok_to_stop_verdict(answer: OkToStop, osd_ids: Iterable[int], host: str | None = None) -> Verdict:
    """Whether Ceph agrees that ``osd_ids`` (``host``'s OSDs) may stop now."""
    ids = sorted(set(osd_ids))
    what = f"{host}'s OSDs {ids}" if host else f"OSDs {ids}"
    if not ids:
        return Verdict(False, f"{what}: no OSD ids to ask about; check `ceph osd ls-tree {host or '<host>'}`")
    if answer.ok:
        asked = set(answer.osds)
        if asked and not set(ids) <= asked:
            return Verdict(
                False, f"{what}: Ceph answered for OSDs {sorted(asked)} only; ask again for all of them"
            )
        degraded = (
            f"; {len(answer.ok_become_degraded)} PGs will be degraded meanwhile"
            if answer.ok_become_degraded
            else ""
        )
        return Verdict(True, f"Ceph says {what} are ok to stop{degraded}")
    pgs = list(answer.bad_become_inactive)
    if pgs:
        shown = ", ".join(pgs[:8]) + (f" and {len(pgs) - 8} more" if len(pgs) > 8 else "")
        detail = f"{len(pgs)} PGs would become inactive ({shown})"
    elif answer.num_not_ok_pgs:
        detail = f"{answer.num_not_ok_pgs} PGs would become inactive"
    else:
        detail = answer.message or "Ceph said no"
    return Verdict(
        False,
        f"Ceph says stopping {what} is unsafe now: {detail}; "
        "wait until the other OSDs are up and every PG is active+clean, then run again",
    )
