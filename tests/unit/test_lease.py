"""The lease arithmetic of the disruption lock (homelab/lease.py): a holder cut off from the Prefect
server stops acting before the server can hand the slot to anyone else."""

from __future__ import annotations

import pytest

from homelab.lease import SERVER_MIN_LEASE_S, LeaseTiming


def test_default_timings_stop_a_cut_off_holder_before_the_slot_can_move() -> None:
    t = LeaseTiming()
    assert t.problems() == []
    for last_ok in (0.0, 1234.5):
        assert t.stopped_acting_by(last_ok) + t.slack_s <= t.earliest_next_holder(last_ok)
    assert t.lease_s == SERVER_MIN_LEASE_S
    # A server away for a restart of a few seconds costs nothing: several renewals fit first.
    assert t.attempts_before_giving_up() >= 4


@pytest.mark.parametrize(("timing", "words"), [
    (LeaseTiming(lease_s=30), "below the server's minimum"),
    (LeaseTiming(margin_s=8), "must cover kill_grace_s"),
    (LeaseTiming(renew_every_s=40), "no room for one renewal"),
])
def test_timings_that_could_let_two_holders_act_are_refused(timing: LeaseTiming, words: str) -> None:
    assert any(words in p for p in timing.problems())


def test_the_lock_refuses_unsafe_timings_before_talking_to_the_server() -> None:
    from tasks.lock import DisruptionLock

    with pytest.raises(ValueError, match="margin_s"):
        DisruptionLock(timing=LeaseTiming(margin_s=1))
