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
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from homelab import ceph_gate
from homelab.ceph_gate import CephParseError, CephStatus, Health, OkToStop, PgStat, Verdict

POLL_INTERVAL_S = 0.25
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


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


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

    # ---- the protocol ---------------------------------------------------------------------

    def run(self, *args: str, ok_codes: Iterable[int] = (0,)) -> Result:
        """Run ``ceph <args>`` bounded by ``timeout_s``; map failures onto the error vocabulary."""
        connect = max(1, int(self.timeout_s) - 1)
        argv = [*self.command, "--connect-timeout", str(connect), *args]
        shown = " ".join(["ceph", *args])
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
        """Ask Ceph whether these OSDs may stop now (exit 16/EBUSY means no, and is an answer)."""
        ids = [str(i) for i in osd_ids]
        if not ids:
            raise ValueError("ok_to_stop needs at least one OSD id")
        res = self.run("osd", "ok-to-stop", *ids, "-f", "json", ok_codes=(0, ceph_gate.EBUSY))
        try:
            return ceph_gate.parse_ok_to_stop(res.stdout, res.returncode, res.stderr)
        except CephParseError as e:
            raise CephCommandError(str(e)) from e

    def set_flag(self, flag: str) -> None:
        """``ceph osd set <flag>``, verified by reading the flags back."""
        self.run("osd", "set", flag)
        self._verify_flag(flag, expected=True)

    def unset_flag(self, flag: str) -> None:
        """``ceph osd unset <flag>``, verified by reading the flags back."""
        self.run("osd", "unset", flag)
        self._verify_flag(flag, expected=False)

    def _verify_flag(self, flag: str, expected: bool) -> None:
        seen = self.flags()
        if (flag in seen) != expected:
            verb = "set" if expected else "unset"
            raise CephFlagError(
                f"cluster flag {flag!r}: expected it {verb} after `ceph osd {verb} {flag}`, "
                f"but the OSD map flags are {','.join(sorted(seen)) or '(none)'}; "
                f"check `ceph osd dump | grep flags` and {verb} it by hand"
            )

    def clean(self, tolerated_flags: Iterable[str] = frozenset()) -> Verdict:
        """The clean-cluster gate, read now."""
        return ceph_gate.cluster_clean(self.status(), tolerated_flags)

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
            sleep(min(interval_s, left))
