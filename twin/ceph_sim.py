"""Simulated Ceph behind the twin's Ceph seam, and the `ceph` command's outputs.

One OSD per host (m720q-1 -> osd.0 ...), one replicated pool set of size 3 / min_size 2 with failure
domain host: every PG has a copy on every host. One host down -> every PG active+undersized+degraded;
two down -> every PG inactive. After the OSD is back, PGs recover for recovery_seconds.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

NUM_PGS = 65
NUM_POOLS = 3
NUM_OBJECTS = 2383
EBUSY = 16
EINVAL = 22
ENOENT = 2
CLEAN_STATES = ("active+clean",)


def _no_faults(name: str, arg: str | None) -> bool:
    return False


class SimCeph:
    """CephBackend (docs/twin.md) simulated in memory; `run(argv)` is the `ceph` command."""

    def __init__(self, hosts: list[str], recovery_seconds: float = 0.5,
                 faults: Callable[[str, str | None], bool] | None = None) -> None:
        self.hosts = list(hosts)
        self.osd_of_host = {h: i for i, h in enumerate(self.hosts)}
        self.recovery_seconds = recovery_seconds
        self.command: list[str] = ["ceph"]
        self.fsid = str(uuid.uuid4())
        self._faults: Callable[[str, str | None], bool] = faults or _no_faults
        self._lock = threading.RLock()
        self._down: set[str] = set()
        self._recovering_until: float | None = None
        self._flags: set[str] = set()
        self._epoch = 40
        self._listeners: list[Callable[[], None]] = []
        self._timer: threading.Timer | None = None
        self._started = time.time()

    # --- the seam --------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def node_down(self, host: str) -> None:
        with self._lock:
            self._known(host)
            if host not in self._down:
                self._down.add(host)
                self._epoch += 1
                self._recovering_until = None
        self._notify()

    def node_up(self, host: str) -> None:
        with self._lock:
            self._known(host)
            if host in self._down:
                self._down.discard(host)
                self._epoch += 1
                if not self._down:
                    self._recovering_until = time.monotonic() + self.recovery_seconds
                    self._schedule_recovered()
        self._notify()

    def health(self) -> str:
        return self.status()["health"]["status"]

    def subscribe(self, fn: Callable[[], None]) -> None:
        """fn() after every change of health (node down/up, recovery done, flags)."""
        self._listeners.append(fn)

    # --- state -----------------------------------------------------------------------------

    def _known(self, host: str) -> None:
        if host not in self.osd_of_host:
            raise ValueError(f"Ceph has no host {host!r}; its hosts are {', '.join(self.hosts)}")

    def _schedule_recovered(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        t = threading.Timer(self.recovery_seconds + 0.001, self._notify)
        t.daemon = True
        self._timer = t
        t.start()

    def _notify(self) -> None:
        for fn in list(self._listeners):
            fn()

    def _recovering(self) -> bool:
        if self._down:
            return False
        if self._faults("ceph-stuck", None) and self._recovering_until is not None:
            return True
        return self._recovering_until is not None and time.monotonic() < self._recovering_until

    def pgs_by_state(self) -> list[dict[str, Any]]:
        with self._lock:
            down = len(self._down)
            if down == 0:
                state = "active+recovering+degraded" if self._recovering() else "active+clean"
            elif len(self.hosts) - down >= 2:
                state = "active+undersized+degraded"
            else:
                state = "undersized+degraded+peered"
            return [{"state_name": state, "count": NUM_PGS}]

    def clean(self) -> bool:
        return all(s["state_name"] in CLEAN_STATES for s in self.pgs_by_state())

    def checks(self) -> dict[str, Any]:
        with self._lock:
            checks: dict[str, Any] = {}
            if self._flags:
                flags = ",".join(sorted(self._flags))
                checks["OSDMAP_FLAGS"] = _check("HEALTH_WARN", f"{flags} flag(s) set", 1,
                                                [f"{flags} flag(s) set"])
            down = sorted(self._down)
            if down:
                ids = [f"osd.{self.osd_of_host[h]}" for h in down]
                checks["OSD_DOWN"] = _check("HEALTH_WARN", f"{len(down)} osds down", len(down),
                                            [f"{i} (root=default,host={h}) is down" for i, h in zip(ids, down, strict=True)])
                checks["OSD_HOST_DOWN"] = _check("HEALTH_WARN", f"{len(down)} host ({len(down)} osds) down", len(down),
                                                 [f"host {h} (root=default) ({1} osds) is down" for h in down])
            state = self.pgs_by_state()[0]["state_name"]
            if "degraded" in state:
                copies = len(self.hosts)
                degraded = NUM_OBJECTS * max(1, len(down))
                total = NUM_OBJECTS * copies
                msg = (f"Degraded data redundancy: {degraded}/{total} objects degraded "
                       f"({100 * degraded / total:.3f}%), {NUM_PGS} pgs degraded")
                if "undersized" in state:
                    msg += f", {NUM_PGS} pgs undersized"
                checks["PG_DEGRADED"] = _check("HEALTH_WARN", msg, NUM_PGS, [f"pg 1.{i:x} is {state}" for i in range(3)])
            if state.endswith("peered"):
                checks["PG_AVAILABILITY"] = _check("HEALTH_WARN", f"Reduced data availability: {NUM_PGS} pgs inactive",
                                                   NUM_PGS, [f"pg 1.{i:x} is {state}" for i in range(3)])
            return checks

    def status(self) -> dict[str, Any]:
        with self._lock:
            checks = self.checks()
            n = len(self.hosts)
            up = n - len(self._down)
            return {
                "fsid": self.fsid,
                "health": {"status": _overall(checks), "checks": _summaries(checks), "mutes": []},
                "election_epoch": 5, "quorum": [0], "quorum_names": ["a"], "quorum_age": int(time.time() - self._started),
                "monmap": {"epoch": 1, "min_mon_release_name": "reef", "num_mons": 1},
                "osdmap": {"epoch": self._epoch, "num_osds": n, "num_up_osds": up, "osd_up_since": int(self._started),
                           "num_in_osds": n, "osd_in_since": int(self._started), "num_remapped_pgs": 0},
                "pgmap": {"pgs_by_state": self.pgs_by_state(), "num_pgs": NUM_PGS, "num_pools": NUM_POOLS,
                          "num_objects": NUM_OBJECTS, "data_bytes": 2222656224, "bytes_used": 8793104384,
                          "bytes_avail": 18050441216, "bytes_total": 26843545600},
                "fsmap": {"epoch": 1, "by_rank": [], "up:standby": 0},
                "mgrmap": {"available": True, "num_standbys": 0, "modules": ["iostat", "nfs", "prometheus", "restful"],
                           "services": {}},
                "servicemap": {"epoch": 1, "modified": "0.000000", "services": {}},
                "progress_events": {},
            }

    def ok_to_stop(self, ids: list[int], host_fault: Callable[[str], bool]) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            hosts = {h for h, i in self.osd_of_host.items() if i in ids}
            others_down = self._down - hosts
            ok = not others_down and not self._recovering() and not any(host_fault(h) for h in hosts)
            # With every copy on every host, stopping any OSD degrades every PG.
            return ok, {
                "ok_to_stop": ok, "osds": sorted(ids),
                "num_ok_pgs": NUM_PGS if ok else 0, "num_not_ok_pgs": 0 if ok else NUM_PGS,
                "bad_become_inactive": [] if ok else [f"1.{i:x}" for i in range(NUM_PGS)],
                "ok_become_degraded": [f"1.{i:x}" for i in range(NUM_PGS)] if ok else [],
            }

    # --- the ceph command ------------------------------------------------------------------

    def _pg_stat(self, fmt: str | None) -> tuple[str, str, int]:
        states = self.pgs_by_state()
        summary: dict[str, Any] = {
            "num_pg_by_state": [{"name": s["state_name"], "num": s["count"]} for s in states],
            "num_pgs": NUM_PGS, "num_bytes": 2222656224, "total_bytes": 26843545600,
            "total_avail_bytes": 18050441216, "total_used_bytes": 8793104384, "total_used_raw_bytes": 8793104384}
        text = ", ".join(f"{s['count']} {s['state_name']}" for s in states)
        text = f"{NUM_PGS} pgs: {text}; 2.1 GiB data, 8.2 GiB used, 17 GiB / 25 GiB avail"
        degraded = [s for s in states if "degraded" in s["state_name"]]
        if degraded:
            with self._lock:
                down = max(1, len(self._down))
            objects, total = NUM_OBJECTS * down, NUM_OBJECTS * len(self.hosts)
            summary.update({"degraded_objects": objects, "degraded_total": total, "degraded_ratio": objects / total})
            text += f"; {objects}/{total} objects degraded ({100 * objects / total:.3f}%)"
        body = {"pg_ready": True, "pg_summary": summary}
        if fmt in ("json", "json-pretty"):
            return _pacific_json(body, fmt), "", 0
        return text + "\n", "", 0

    def run(self, argv: list[str]) -> tuple[str, str, int]:
        """`ceph <argv>`: (stdout, stderr, exit code) the way the real CLI answers."""
        args, fmt = _strip_global(argv)
        if fmt is None and args and args[0] == "--help":
            return "usage: ceph [-h] [-c CEPHCONF] ... <command>\n", "", 0
        js = fmt in ("json", "json-pretty")

        def out(obj: Any, text: str) -> tuple[str, str, int]:
            if js:
                return (json.dumps(obj, indent=4) if fmt == "json-pretty" else json.dumps(obj, separators=(",", ":"))) + "\n", "", 0
            return text, "", 0

        cmd = " ".join(args[:2])
        if args[:1] == ["status"] or args[:1] == ["-s"]:
            st = self.status()
            return out(st, _status_text(st))
        if args[:1] == ["health"]:
            checks = self.checks()
            status = _overall(checks)
            if args[1:2] == ["detail"]:
                return out({"status": status, "checks": checks, "mutes": []}, _health_text(status, checks, True))
            return out({"status": status, "checks": _summaries(checks), "mutes": []}, _health_text(status, checks, False))
        if cmd == "osd ok-to-stop":
            ids = []
            for a in args[2:]:
                if a in ("--max",):
                    continue
                try:
                    ids.append(int(a.removeprefix("osd.")))
                except ValueError:
                    return "", f"Error EINVAL: osd id {a!r} is not valid\n", EINVAL
            if not ids:
                return "", "Error EINVAL: no osd ids given\n", EINVAL
            unknown = [i for i in ids if i not in self.osd_of_host.values()]
            if unknown:
                return "", f"Error ENOENT: osd(s) {','.join(map(str, unknown))} do not exist\n", ENOENT
            ok, body = self.ok_to_stop(ids, lambda h: self._faults("not-ok-to-stop", h))
            text = (f"OSD(s) {','.join(map(str, ids))} are ok to stop without reducing availability or risking data, "
                    f"provided there are no other concurrent failures or interventions.\n"
                    f"{NUM_PGS} PGs are likely to be degraded (but remain available) as a result.\n")
            stdout = (json.dumps(body, separators=(",", ":")) + "\n") if js else (text if ok else "")
            if ok:
                return stdout, "", 0
            return stdout, f"Error EBUSY: unsafe to stop osd(s) at this time ({NUM_PGS} PGs are or would become offline)\n", EBUSY
        if cmd == "osd ls-tree":
            if len(args) < 3:
                return "", "Invalid command: missing required parameter name(<string>)\n", EINVAL
            host = args[2]
            if host not in self.osd_of_host:
                return "", f"Error ENOENT: node '{host}' does not exist\n", ENOENT
            ids = [self.osd_of_host[host]]
            return out(ids, "".join(f"{i}\n" for i in ids))
        if cmd in ("osd set", "osd unset"):
            if len(args) < 3:
                return "", "Invalid command: missing required parameter key\n", EINVAL
            flag = args[2]
            if flag not in ("noout", "noin", "nodown", "noup", "norebalance", "nobackfill", "norecover", "noscrub",
                            "nodeep-scrub", "pause"):
                return "", f"Invalid command: {flag} not in full|pause|noup|nodown|noout|noin|nobackfill|...\n", EINVAL
            with self._lock:
                if args[1] == "set":
                    self._flags.add(flag)
                else:
                    self._flags.discard(flag)
                self._epoch += 1
            self._notify()
            return "", f"{flag} is {'set' if args[1] == 'set' else 'unset'}\n", 0
        if cmd == "osd stat":
            with self._lock:
                n, up = len(self.hosts), len(self.hosts) - len(self._down)
                body = {"epoch": self._epoch, "num_osds": n, "num_up_osds": up, "osd_up_since": int(self._started),
                        "num_in_osds": n, "osd_in_since": int(self._started), "num_remapped_pgs": 0}
            return out(body, f"{n} osds: {up} up (since 1h), {n} in (since 1h); epoch: e{self._epoch}\n")
        if cmd == "pg stat":
            return self._pg_stat(fmt)
        if cmd == "osd dump":
            with self._lock:
                flags = ",".join(["sortbitwise", "recovery_deletes", "purged_snapdirs", "pglog_hardlimit",
                                  *sorted(self._flags)])
                osds = [{"osd": i, "uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, h)), "up": 0 if h in self._down else 1,
                         "in": 1, "weight": 1, "primary_affinity": 1}
                        for h, i in self.osd_of_host.items()]
                body = {"epoch": self._epoch, "fsid": self.fsid, "flags": flags,
                        "flags_set": sorted(flags.split(",")), "osds": osds}
            return out(body, f"epoch {self._epoch}\nfsid {self.fsid}\nflags {flags}\n")
        if cmd == "osd tree":
            with self._lock:
                nodes = [{"id": -1, "name": "default", "type": "root", "children": [-2 - i for i in range(len(self.hosts))]}]
                for h, i in self.osd_of_host.items():
                    nodes.append({"id": -2 - i, "name": h, "type": "host", "children": [i]})
                    nodes.append({"id": i, "name": f"osd.{i}", "type": "osd", "status": "down" if h in self._down else "up"})
            return out({"nodes": nodes, "stray": []}, "".join(f"{n['id']} {n['name']}\n" for n in nodes))
        if not args:
            return "", "ceph: no command given\n", EINVAL
        return "", f"no valid command found; 10 closest matches:\n{' '.join(args)}\nError EINVAL: invalid command\n", EINVAL


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
    return {k: {"severity": v["severity"], "summary": v["summary"], "muted": False} for k, v in checks.items()}


def _overall(checks: dict[str, Any]) -> str:
    sev = {c["severity"] for c in checks.values()}
    return "HEALTH_ERR" if "HEALTH_ERR" in sev else "HEALTH_WARN" if sev else "HEALTH_OK"


def _strip_global(argv: list[str]) -> tuple[list[str], str | None]:
    """Drop the global options (-c, --connect-timeout, --cluster, ...) and pull out -f/--format."""
    out: list[str] = []
    fmt: str | None = None
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
            i += 2
            continue
        elif a.startswith("--") and "=" in a and a.split("=", 1)[0] in with_value:
            pass
        else:
            out.append(a)
        i += 1
    return out, fmt


def _health_text(status: str, checks: dict[str, Any], detail: bool) -> str:
    if not checks:
        return f"{status}\n"
    lines = [f"{status} " + "; ".join(c["summary"]["message"] for c in checks.values())]
    if detail:
        lines = [f"{status} " + "; ".join(c["summary"]["message"] for c in checks.values())]
        for name, c in checks.items():
            lines.append(f"[{'WRN' if c['severity'] == 'HEALTH_WARN' else 'ERR'}] {name}: {c['summary']['message']}")
            lines.extend(f"    {d['message']}" for d in c["detail"])
    return "\n".join(lines) + "\n"


def _status_text(st: dict[str, Any]) -> str:
    h = st["health"]
    lines = ["  cluster:", f"    id:     {st['fsid']}", f"    health: {h['status']}"]
    lines += [f"            {c['summary']['message']}" for c in h["checks"].values()]
    o, p = st["osdmap"], st["pgmap"]
    lines += ["", "  services:", "    mon: 1 daemons, quorum a", "    mgr: x(active)",
              f"    osd: {o['num_osds']} osds: {o['num_up_osds']} up, {o['num_in_osds']} in", "",
              "  data:", f"    pools:   {p['num_pools']} pools, {p['num_pgs']} pgs",
              f"    objects: {p['num_objects']} objects, 2.1 GiB", "    usage:   8.2 GiB used, 17 GiB / 25 GiB avail",
              "    pgs:     " + "\n             ".join(f"{s['count']} {s['state_name']}" for s in p["pgs_by_state"]), ""]
    return "\n".join(lines) + "\n"
