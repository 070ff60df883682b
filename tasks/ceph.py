"""Ceph, the external system: the ``ceph`` CLI spoken in the domain's words.

``CephCli(command, env, timeout_s)`` runs the real CLI (``["ceph"]`` with CEPH_CONF, or
``["kubectl", "-n", "rook-ceph", "exec", "deploy/rook-ceph-tools", "--", "ceph"]`` in
production, or the twin's ``ceph`` command) as an argv list, always bounded: the CLI blocks
forever when no mon answers. The reading of its output and the gate verdicts are the pure
functions of :mod:`homelab.ceph_gate`. Importable without Prefect; flows wrap these calls in
tasks.

Every call has the form ``[*command, "--connect-timeout", N, *args]``, with ``-f json`` at the
end of the JSON reads: ``ceph --connect-timeout 5 status -f json``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from homelab import ceph_gate
from homelab.ceph_gate import (
    CephParseError,
    CephStatus,
    CrushTree,
    Daemons,
    Health,
    MgrStat,
    NodeOsds,
    NooutOwner,
    OkToStop,
    PgStat,
    Quorum,
    Verdict,
)

POLL_INTERVAL_S = 0.25
# How long clean() reuses its last `ceph status` while `ceph pg stat` says the PGs are not clean yet.
STATUS_REUSE_S = 2.0
# Exit codes of the ceph CLI that mean "no cluster answered" (ETIMEDOUT, ECONNREFUSED, EINTR).
_UNREACHABLE_RC = {110, 111, 4}
_UNREACHABLE_TEXT = ("error connecting to the cluster", "timed out", "connection refused")


class CephError(Exception):
    """Base of the Ceph errors; ``retryable`` says whether running again can help."""

    retryable = False


class CephUnavailable(CephError):
    """No answer from the cluster (no mon, timeout, tools pod not ready): a retry can help."""

    retryable = True


class CephCommandError(CephError):
    """Ceph answered with an error, or with something we cannot read: a retry cannot help."""


class CephFlagError(CephCommandError):
    """A cluster flag did not change as asked; it is left as found and the operator must look."""


class CephWaitTimeout(CephError):
    """A wait ran out of time; the message names the last state seen and what to do next."""

    def __init__(self, message: str, history: list[Verdict]):
        super().__init__(message)
        self.history = history


def _only_pgs_left(status: CephStatus, tolerated: Iterable[str], noout_may_be_own: bool) -> bool:
    """Whether this mon view would pass the clean gate once every PG is active+clean (a guess that
    only decides how to poll, never what the gate says)."""
    settled = ceph_gate.PgStat(num_pgs=status.num_pgs, by_state=(("active+clean", status.num_pgs),))
    allowed = frozenset(tolerated) | ({"noout"} if noout_may_be_own else frozenset())
    return ceph_gate.cluster_clean(status, allowed, settled).ok


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class NodeGate:
    """Ceph's answer for one node before it goes down: every check in order, the OSDs it holds.

    ``ok`` only when every check is; ``waited`` counts the answers that said "not yet" (EAGAIN, no
    active mgr, no answer) and were asked again.
    """

    node: str
    checks: list[Verdict]
    osds: tuple[int, ...]
    mons: tuple[str, ...]
    waited: int = 0

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.checks)

    @property
    def reason(self) -> str:
        bad = [v.reason for v in self.checks if not v.ok]
        return "; ".join(bad or [v.reason for v in self.checks])


@dataclass(frozen=True)
class CleanWait:
    """How a wait for a clean cluster went: the verdicts seen in order, the time it took."""

    verdict: Verdict
    history: list[Verdict]
    seconds: float


class CephCli:
    """The ``ceph`` CLI of one cluster."""

    def __init__(self, command: list[str], env: Mapping[str, str] | None = None, timeout_s: float = 15.0):
        if not command:
            raise ValueError("CephCli needs the argv prefix of the ceph CLI, e.g. ['ceph']")
        self.command = list(command)
        self.env = dict(env or {})
        self.timeout_s = timeout_s
        # The last `ceph status` read by clean(), and when: reused while the PGs are still moving.
        self._status: tuple[float, CephStatus] | None = None

    # ---- the protocol ---------------------------------------------------------------------

    def run(self, *args: str, ok_codes: Iterable[int] = (0,)) -> Result:
        """Run ``ceph <args>`` bounded by ``timeout_s``; map failures onto the error vocabulary."""
        connect = max(1, int(self.timeout_s) - 1)
        argv = [*self.command, "--connect-timeout", str(connect), *args]
        shown = shlex.join(["ceph", *args])
        try:
            proc = subprocess.run(
                argv,
                env={**os.environ, **self.env},
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CephUnavailable(
                f"`{shown}` gave no answer within {self.timeout_s:g} s; check that the mons are up "
                "and reachable (`ceph -s`), then run again"
            ) from None
        except FileNotFoundError:
            raise CephCommandError(
                f"`{shown}`: the command {self.command[0]!r} is not installed or not on PATH; "
                "fix the Ceph command prefix of the Homelab block"
            ) from None
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if proc.returncode in set(ok_codes):
            return result
        err = proc.stderr.strip()[-400:]
        if proc.returncode in _UNREACHABLE_RC or any(t in err.lower() for t in _UNREACHABLE_TEXT):
            raise CephUnavailable(
                f"`{shown}` could not reach the cluster (exit {proc.returncode}: {err}); "
                "check the mons and the client config, then run again"
            )
        raise CephCommandError(f"`{shown}` failed (exit {proc.returncode}): {err}")

    def _json(self, *args: str) -> str:
        return self.run(*args, "-f", "json").stdout

    def _parsed(self, parse: Callable[[str], object], *args: str) -> object:
        out = self._json(*args)
        try:
            return parse(out)
        except (CephParseError, KeyError, TypeError, ValueError) as e:
            raise CephCommandError(f"`ceph {' '.join(args)}` printed something unreadable: {e}") from e

    # ---- the domain -----------------------------------------------------------------------

    def status(self) -> CephStatus:
        return self._parsed(ceph_gate.parse_status, "status")  # type: ignore[return-value]

    def health_detail(self) -> Health:
        return self._parsed(ceph_gate.parse_health, "health", "detail")  # type: ignore[return-value]

    def pg_stat(self) -> PgStat:
        return self._parsed(ceph_gate.parse_pg_stat, "pg", "stat")  # type: ignore[return-value]

    def flags(self) -> frozenset[str]:
        """The cluster-wide OSD flags (noout, noscrub, …, and the always-on ones like sortbitwise)."""
        return self._parsed(ceph_gate.parse_osd_flags, "osd", "dump")  # type: ignore[return-value]

    def osds_of(self, host: str) -> list[int]:
        """The OSD ids under ``host`` in the CRUSH map; an unknown host is an error, not []."""
        out = self.run("osd", "ls-tree", host).stdout
        try:
            ids = ceph_gate.parse_ls_tree(out)
        except CephParseError as e:
            raise CephCommandError(str(e)) from e
        return ids

    def ok_to_stop(self, osd_ids: Iterable[int]) -> OkToStop:
        """Ask Ceph whether these OSDs may stop now. Exit 16 (EBUSY) means no and exit 11 (EAGAIN)
        means "PG states unknown, ask again" (``OkToStop.undecided``): both are answers."""
        ids = [str(i) for i in osd_ids]
        if not ids:
            raise ValueError("ok_to_stop needs at least one OSD id")
        res = self.run("osd", "ok-to-stop", *ids, "-f", "json", ok_codes=(0, ceph_gate.EBUSY, ceph_gate.EAGAIN))
        try:
            return ceph_gate.parse_ok_to_stop(res.stdout, res.returncode, res.stderr)
        except CephParseError as e:
            raise CephCommandError(str(e)) from e

    def osd_tree(self) -> CrushTree:
        return self._parsed(ceph_gate.parse_osd_tree, "osd", "tree")  # type: ignore[return-value]

    def daemons(self) -> Daemons:
        """Which host each mon, OSD and mgr reports (``ceph node ls``)."""
        return self._parsed(ceph_gate.parse_node_ls, "node", "ls")  # type: ignore[return-value]

    def quorum(self) -> Quorum:
        return self._parsed(ceph_gate.parse_quorum_status, "quorum_status")  # type: ignore[return-value]

    def mgr_stat(self) -> MgrStat:
        return self._parsed(ceph_gate.parse_mgr_stat, "mgr", "stat")  # type: ignore[return-value]

    def mon_ok_to_stop(self, mons: Iterable[str]) -> Verdict:
        """``ceph mon ok-to-stop <ids>``: exit 16 (EBUSY) when the quorum would be lost."""
        ids = list(mons)
        if not ids:
            raise ValueError("mon_ok_to_stop needs at least one mon name")
        res = self.run("mon", "ok-to-stop", *ids, ok_codes=(0, ceph_gate.EBUSY))
        try:
            # The answer is text, on stderr (the ceph CLI prints a command's status string there).
            return ceph_gate.parse_mon_ok_to_stop(res.returncode, res.stderr or res.stdout, ids)
        except CephParseError as e:
            raise CephCommandError(str(e)) from e

    def node_osds(self, node: str, hostname_labels: Mapping[str, str]) -> NodeOsds:
        """The OSDs that stop with ``node`` (CRUSH host as Rook names it, and ``ceph node ls``)."""
        with ThreadPoolExecutor(1) as pool:
            daemons = pool.submit(self.daemons)
            tree = self.osd_tree()
            return ceph_gate.node_osds(node, hostname_labels, tree, daemons.result())

    def node_gate(
        self,
        node: str,
        hostname_labels: Mapping[str, str] | Callable[[], Mapping[str, str]],
        deadline: float,
        interval_s: float = POLL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_wait: Callable[[Verdict], None] | None = None,
    ) -> NodeGate:
        """Everything Ceph must say before ``node`` goes down: which OSDs, mons and mgrs it holds;
        every mon in quorum and `mon ok-to-stop` for its mons; an active mgr and a standby when the
        active one is here; `osd ok-to-stop` for its OSDs.

        ``hostname_labels``: every Node's name -> its kubernetes.io/hostname label (or a callable that
        returns them, called once Ceph's first answers are in).

        "Not yet" answers are asked again until ``deadline`` (on ``clock``): EAGAIN from `osd
        ok-to-stop` (PG states unknown after a mgr failover), no active mgr, no answer at all (a mgr
        command waits while the mon still counts a dead mgr as active). Any "no" returns at once.
        """
        waited = 0
        while True:
            verdicts, retry, osds, mons = self._node_checks(node, hostname_labels)
            gate = NodeGate(node, verdicts, osds, mons, waited)
            if retry is None:
                return gate
            left = deadline - clock()
            if left <= 0:
                raise CephWaitTimeout(
                    f"Ceph gave no answer for {node} within the deadline; last seen: {retry.reason}",
                    [retry],
                )
            waited += 1
            if on_wait is not None:
                on_wait(retry)
            sleep(min(interval_s, left))

    def _node_checks(
        self, node: str, hostname_labels: Mapping[str, str] | Callable[[], Mapping[str, str]]
    ) -> tuple[list[Verdict], Verdict | None, tuple[int, ...], tuple[str, ...]]:
        """One round of the node gate: (verdicts, the "not yet" verdict to retry on or None, OSDs, mons)."""
        try:
            with ThreadPoolExecutor(3) as pool:
                quorum = pool.submit(self.quorum)
                mgr = pool.submit(self.mgr_stat)
                tree = pool.submit(self.osd_tree)
                daemons = self.daemons()
                # The labels may still be on their way (read while Ceph answers): needed only now.
                labels = hostname_labels() if callable(hostname_labels) else hostname_labels
                placement = ceph_gate.node_osds(node, labels, tree.result(), daemons)
                mon_v, mons = ceph_gate.mon_gate(quorum.result(), node, daemons)
                mgr_v = ceph_gate.mgr_gate(mgr.result(), node, daemons)
        except CephUnavailable as e:
            v = Verdict(False, str(e))
            return [v], v, (), ()
        verdicts = [mon_v, mgr_v, placement.verdict]
        if not mgr_v.ok and not mgr.result().available:
            return verdicts, mgr_v, placement.osds, mons
        if not all(v.ok for v in verdicts):
            return verdicts, None, placement.osds, mons
        # Both questions at once: `mon ok-to-stop` goes to a mon, `osd ok-to-stop` to the active mgr.
        with ThreadPoolExecutor(1) as pool:
            mon_answer = pool.submit(self.mon_ok_to_stop, mons) if mons else None
            try:
                osd_answer: OkToStop | Verdict | None = self.ok_to_stop(placement.osds) if placement.osds else None
            except CephUnavailable as e:
                osd_answer = Verdict(False, f"`ceph osd ok-to-stop` gave no answer (a mgr failing over?): {e}")
            if mon_answer is not None:
                verdicts.append(mon_answer.result())
        retry: Verdict | None = None
        if isinstance(osd_answer, Verdict):
            retry = osd_answer
        elif osd_answer is not None:
            retry = osd_v = ceph_gate.ok_to_stop_verdict(osd_answer, placement.osds, node)
            if not osd_answer.undecided:
                retry = None
            verdicts.append(osd_v)
        if retry is not None and retry not in verdicts:
            verdicts.append(retry)
        # "Not yet" is worth asking again only when nothing else already said no.
        if retry is not None and any(not v.ok for v in verdicts if v is not retry):
            retry = None
        return verdicts, retry, placement.osds, mons

    # ---- flags ----------------------------------------------------------------------------

    def set_flag(self, flag: str) -> None:
        """``ceph osd set <flag>``, verified by reading the flags back."""
        self.run("osd", "set", flag)
        self._verify_flag(flag, expected=True)

    def unset_flag(self, flag: str) -> None:
        """``ceph osd unset <flag>``, verified by reading the flags back."""
        self.run("osd", "unset", flag)
        self._verify_flag(flag, expected=False)

    def noout_record(self) -> str | None:
        """The text under ceph_gate.NOOUT_OWNER_KEY, None when there is none."""
        res = self.run("config-key", "get", ceph_gate.NOOUT_OWNER_KEY, ok_codes=(0, ceph_gate.ENOENT))
        return res.stdout if res.returncode == 0 else None

    def _flags_and_record(self) -> tuple[frozenset[str], str | None]:
        """The OSD map flags and the noout owner record, read at once."""
        with ThreadPoolExecutor(1) as pool:
            record = pool.submit(self.noout_record)
            flags = self.flags()
            return flags, record.result()

    def noout(self, flow: str, cluster: str) -> tuple[Verdict, bool]:
        """Is noout set, and if so, is it ``flow``'s own on ``cluster``? (verdict, own)."""
        flags, record = self._flags_and_record()
        return ceph_gate.noout_verdict(flags, record if "noout" in flags else None, flow, cluster)

    def set_noout(self, owner: NooutOwner) -> None:
        """Set noout for ``owner`` and record it (config-key NOOUT_OWNER_KEY), both verified.

        A noout someone else set is not taken over (CephFlagError). The record is written after the
        flag: a crash in between leaves a noout without a record, which a rerun refuses (the safe
        side), never a record that claims someone else's noout.
        """
        verdict, own = self.noout(owner.flow, owner.cluster)
        if not verdict.ok:
            raise CephFlagError(verdict.reason)
        if not own:
            self.run("osd", "set", "noout")
        owner = owner if owner.set_at else NooutOwner(
            owner.flow, owner.flow_run_id, owner.cluster, owner.node, datetime.now(UTC).isoformat(timespec="seconds"))
        try:
            self.run("config-key", "set", ceph_gate.NOOUT_OWNER_KEY, owner.to_json())
        except CephError:
            pass  # seen below, as a missing record
        flags, recorded = self._flags_and_record()
        if "noout" not in flags:
            raise CephFlagError(
                f"cluster flag 'noout': expected it set after `ceph osd set noout`, but the OSD map flags are "
                f"{','.join(sorted(flags)) or '(none)'}; check `ceph osd dump | grep flags` and set it by hand"
            )
        if recorded is None or ceph_gate.parse_noout_owner(recorded) != owner:
            # Unrecorded, the next run could not tell this noout from an operator's: take it back.
            if not own:
                self.unset_flag("noout")
            raise CephFlagError(
                f"noout owner record {ceph_gate.NOOUT_OWNER_KEY}: expected {owner.to_json()} after "
                f"`ceph config-key set`, read back {recorded!r}; "
                + ("noout was unset again" if not own else "noout stays set, as an earlier run left it")
                + "; check `ceph config-key get " + ceph_gate.NOOUT_OWNER_KEY + "`"
            )

    def unset_noout(self) -> None:
        """Unset noout and remove its owner record, both verified: a record left behind would claim
        the next noout, whoever sets it."""
        self.run("osd", "unset", "noout")
        self.run("config-key", "rm", ceph_gate.NOOUT_OWNER_KEY)
        flags, left = self._flags_and_record()
        if "noout" in flags:
            raise CephFlagError(
                f"cluster flag 'noout': expected it unset after `ceph osd unset noout`, but the OSD map flags are "
                f"{','.join(sorted(flags))}; check `ceph osd dump | grep flags` and unset it by hand"
            )
        if left is not None:
            raise CephFlagError(
                f"noout is unset, but its owner record {ceph_gate.NOOUT_OWNER_KEY} is still there ({left[:120]!r}) "
                f"after `ceph config-key rm`; remove it by hand: `ceph config-key rm {ceph_gate.NOOUT_OWNER_KEY}`"
            )

    def _verify_flag(self, flag: str, expected: bool) -> None:
        seen = self.flags()
        if (flag in seen) != expected:
            verb = "set" if expected else "unset"
            raise CephFlagError(
                f"cluster flag {flag!r}: expected it {verb} after `ceph osd {verb} {flag}`, "
                f"but the OSD map flags are {','.join(sorted(seen)) or '(none)'}; "
                f"check `ceph osd dump | grep flags` and {verb} it by hand"
            )

    def clean(self, tolerated_flags: Iterable[str] = frozenset(), own_noout: tuple[str, str] | None = None) -> Verdict:
        """The clean-cluster gate, read now. With ``own_noout=(flow, cluster)`` a noout is tolerated
        when its owner record says ``flow`` set it on ``cluster`` (an interrupted run's), and refused
        with whoever else holds it named."""
        # The PG states from the active mgr first: while they still move, that is the answer, and the
        # mon's view (health, quorum, OSDs) is read only every STATUS_REUSE_S, for the message. Each
        # `ceph` call costs a CLI start, so a gate polled while Ceph recovers costs one a poll. Once
        # the mon's last view had nothing against the cluster but its PGs, both are read at once: the
        # gate opens one call after the PGs are clean, not two.
        cached = self._status
        fresh = cached is not None and time.monotonic() - cached[0] < STATUS_REUSE_S
        if cached is not None and fresh and _only_pgs_left(cached[1], tolerated_flags, own_noout is not None):
            with ThreadPoolExecutor(1) as pool:
                mon = pool.submit(self.status)
                pgs = self.pg_stat()
                status = mon.result()
            self._status = (time.monotonic(), status)
        else:
            pgs = self.pg_stat()
            if not pgs.all_clean and cached is not None and fresh:
                status = cached[1]
            else:
                status = self.status()
                self._status = (time.monotonic(), status)
        tolerated = frozenset(tolerated_flags)
        ownership: Verdict | None = None
        flags_check = status.health.checks.get("OSDMAP_FLAGS")
        if own_noout is not None and "noout" not in tolerated and flags_check is not None:
            flags = ceph_gate.flags_in_check(flags_check)
            if flags and "noout" in flags:
                ownership, own = self.noout(*own_noout)
                if own:
                    tolerated |= {"noout"}
        verdict = ceph_gate.cluster_clean(status, tolerated, pgs)
        if ownership is None:
            return verdict
        if not ownership.ok:
            return Verdict(False, f"{verdict.reason.removesuffix('.')}; {ownership.reason}")
        return Verdict(verdict.ok, f"{verdict.reason}; {ownership.reason}")

    def wait_clean(
        self,
        deadline: float,
        tolerated_flags: Iterable[str] = frozenset(),
        interval_s: float = POLL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> CleanWait:
        """Poll the clean gate until it opens or ``deadline`` (on ``clock``, monotonic) passes.

        Returns the verdicts seen (each change once); raises CephWaitTimeout naming the last
        state. An unreachable cluster counts as "not yet" until the deadline.
        """
        tolerated = frozenset(tolerated_flags)
        history: list[Verdict] = []
        start = clock()
        while True:
            asked = clock()
            try:
                verdict = self.clean(tolerated)
            except CephUnavailable as e:
                verdict = Verdict(False, str(e))
            if not history or history[-1] != verdict:
                history.append(verdict)
            if verdict.ok:
                return CleanWait(verdict, history, clock() - start)
            left = deadline - clock()
            if left <= 0:
                raise CephWaitTimeout(
                    f"Ceph did not become clean within {clock() - start:.1f} s; last seen: {verdict.reason}",
                    history,
                )
            # A poll every interval_s from the start of the last one: a slow answer (a loaded machine,
            # a mon that just rejoined) does not add a whole interval to the gate's lag.
            sleep(max(0.0, min(asked + interval_s - clock(), left)))
