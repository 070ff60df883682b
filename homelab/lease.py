"""The arithmetic of the homelab-disruption lease: how long a holder may act after its last
successful renewal, so that a holder cut off from the Prefect server always stops acting before
the server can hand the slot to another run. Pure; tasks/lock.py does the I/O.

The rule, with L the lease, M the margin and s the moment the holder *sent* its last renewal that
succeeded (a monotonic clock of the holder):

- the server sets the lease's expiry to "now + L" when it handles the renewal
  (prefect/server/api/concurrency_limits_v2.py renew_concurrency_lease -> lease_storage.renew_lease),
  and it handles it after s, so the expiry is at or after s + L;
- the server frees the slot only once the lease has expired, on a pass of its repossessor
  (prefect/server/services/repossessor.py: read_expired_lease_ids, then decrement and revoke), so no
  other run can acquire before s + L;
- the holder owns the lock until s + L - M. At that instant it kills the disruptive call in flight
  (SIGTERM, then SIGKILL after `kill_grace_s`) and makes no further disruptive call.

So the holder has stopped acting by s + L - M + kill_grace_s, which must be before s + L:
M > kill_grace_s, with room for one request that was in flight (`request_timeout_s`) and for the
two clocks' rates (`slack_s`). Between two successful renewals the holder tries
(L - M) / renew_every_s times before it gives up: a server that is away for a restart of a few
seconds costs nothing.

With the defaults: L = 60 s (the server refuses shorter leases: `ge=60` in the same endpoint),
renewal every 10 s, each request at most 5 s, M = 20 s, kill grace 5 s. Ownership ends 40 s after
the last good renewal, the act is dead by 45 s, the server frees the slot at 60 s at the earliest
(plus up to one repossessor pass).
"""

from __future__ import annotations

from dataclasses import dataclass

SERVER_MIN_LEASE_S = 60.0


@dataclass(frozen=True)
class LeaseTiming:
    lease_s: float = 60.0
    renew_every_s: float = 10.0
    request_timeout_s: float = 5.0
    margin_s: float = 20.0
    kill_grace_s: float = 5.0
    slack_s: float = 5.0

    def problems(self) -> list[str]:
        """Why these timings cannot guarantee that a cut-off holder stops first (empty: they can)."""
        out = []
        if self.lease_s < SERVER_MIN_LEASE_S:
            out.append(f"lease_s {self.lease_s:g} is below the server's minimum of {SERVER_MIN_LEASE_S:g} s")
        if self.margin_s < self.kill_grace_s + self.request_timeout_s + self.slack_s:
            out.append(f"margin_s {self.margin_s:g} must cover kill_grace_s + request_timeout_s + slack_s "
                       f"({self.kill_grace_s + self.request_timeout_s + self.slack_s:g})")
        if self.owned_s < self.renew_every_s + self.request_timeout_s:
            out.append(f"lease_s - margin_s ({self.owned_s:g}) leaves no room for one renewal every "
                       f"{self.renew_every_s:g} s taking up to {self.request_timeout_s:g} s")
        return out

    @property
    def owned_s(self) -> float:
        """How long after sending its last successful renewal the holder may still act."""
        return self.lease_s - self.margin_s

    def owned_until(self, last_ok_sent: float) -> float:
        return last_ok_sent + self.owned_s

    def stopped_acting_by(self, last_ok_sent: float) -> float:
        """The latest instant the holder can still be acting after a renewal sent at last_ok_sent."""
        return self.owned_until(last_ok_sent) + self.kill_grace_s

    def earliest_next_holder(self, last_ok_sent: float) -> float:
        """The earliest instant the server can hand the slot to another run."""
        return last_ok_sent + self.lease_s

    def attempts_before_giving_up(self) -> int:
        return int(self.owned_s // self.renew_every_s)
