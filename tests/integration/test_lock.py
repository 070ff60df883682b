"""tasks/lock.py against the session's real `homelab server`: the slot, its renewal, a lease the server
no longer knows, and the kill of a disruptive call in flight."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from homelab.lease import LeaseTiming
from tasks.lock import DisruptionLock, LockBusy, LockLost

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api_url")]


def fresh_limit(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def test_one_holder_at_a_time_and_each_confirmation_renews_with_the_server() -> None:
    name = f"lock-test-{time.monotonic_ns()}"
    fresh_limit(name)
    first = DisruptionLock(name)
    first.acquire(5)
    try:
        with pytest.raises(LockBusy, match="stayed taken"):
            DisruptionLock(name, poll_s=0.2).acquire(1)
        for _ in range(5):
            first.confirm("a test step")
        assert len(first.confirm_ms) == 5
    finally:
        first.release()
    second = DisruptionLock(name)
    second.acquire(5)  # released: free at once, not after a lease
    second.release()


def test_a_lease_the_server_no_longer_knows_is_lost_at_the_next_confirmation() -> None:
    from prefect.client.orchestration import get_client

    name = f"lock-test-{time.monotonic_ns()}"
    fresh_limit(name)
    lock = DisruptionLock(name)
    lock.acquire(5)
    try:
        assert lock.lease_id is not None
        with get_client(sync_client=True) as client:  # what the repossessor does to an expired lease
            client.release_concurrency_slots_with_lease(lock.lease_id)
        with pytest.raises(LockLost, match="no longer knows"):
            lock.confirm("setting noout")
        assert lock.abort.is_set() and lock.record()["lost_at"]
        with pytest.raises(LockLost):  # lost stays lost
            lock.confirm("the next node")
    finally:
        lock.release()


def test_a_lost_lock_kills_the_talosctl_call_in_flight_and_what_it_started(tmp_path: Path) -> None:
    from tasks.talos import TalosAborted, Talosctl

    marker = tmp_path / "child-still-ran"
    fake = tmp_path / "talosctl"
    # A talosctl that blocks, with a child that would write a file later: both must die.
    fake.write_text(f"#!/bin/sh\n(sleep 3; touch {marker}) &\nsleep 60\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    abort = threading.Event()
    threading.Timer(0.5, abort.set).start()
    began = time.monotonic()
    with pytest.raises(TalosAborted, match="no longer holds the disruption lock"):
        Talosctl(str(fake)).run(["upgrade", "--nodes", "10.42.0.101", "--wait"], timeout_s=120, abort=abort)
    assert time.monotonic() - began < 0.5 + LeaseTiming().kill_grace_s
    time.sleep(3.5)
    assert not marker.exists(), "a process talosctl started outlived the kill"
    assert os.path.exists(fake)


def test_acquiring_waits_out_a_server_that_drops_connections_within_its_deadline(prefect_server, tcp_proxy) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = f"lock-test-{time.monotonic_ns()}"
    fresh_limit(name)
    proxy = tcp_proxy(prefect_server.port)
    proxy.cut()
    threading.Timer(2.0, proxy.restore).start()
    with temporary_settings({PREFECT_API_URL: proxy.url}):
        lock = DisruptionLock(name)
        began = time.monotonic()
        lock.acquire(30)
        try:
            assert time.monotonic() - began >= 1.5  # it waited for the server rather than failing
            lock.confirm("a step after the outage")
        finally:
            lock.release()
    with temporary_settings({PREFECT_API_URL: proxy.url}):
        proxy.cut()  # and a server that never comes back is a clear refusal at the deadline
        with pytest.raises(LockBusy, match="did not answer"):
            DisruptionLock(name).acquire(2)
