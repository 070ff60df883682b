"""`homelab server` survives kill -9: started again on the same port and home, it serves the same database
and the same concurrency leases, and frees a lease nobody renews within one lease and one repossessor pass.

One scenario for the module, because a lease lasts at least 60 s: flows, a secret block, two limits and
a lease on each are made; the server is killed alone (its children must die with it) and started again,
interrupted (SIGINT) and started again, then killed with everything it started at once and started
again. Then a watcher thread renews one lease and waits for the other one's slot to be freed, while the
other tests of this module run; the last test reads what it saw.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import redis
from prefect.blocks.system import Secret
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.server import (
    REPOSSESSOR_LOOP_SECONDS,
    ServerError,
    check_redis,
    free_port,
    kill_leftovers,
    serve,
    start_time,
)

pytestmark = pytest.mark.integration

LEASE_SECONDS = 60.0  # the server refuses shorter leases (prefect/server/api/concurrency_limits_v2.py)


def acquire(client: SyncPrefectClient, name: str) -> UUID:
    response = client.increment_concurrency_slots_with_lease(
        names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS)
    return UUID(response.json()["lease_id"])


def refused(client: SyncPrefectClient, name: str) -> bool:
    """Whether a second holder is turned away (423 Locked); a slot granted by mistake is given back."""
    try:
        lease = acquire(client, name)
    except PrefectHTTPStatusError as e:
        assert e.response.status_code == 423, f"acquiring {name}: expected 423 Locked, got {e.response.status_code}"
        return True
    client.release_concurrency_slots_with_lease(lease)
    return False


class LeaseWatch(threading.Thread):
    """Renews the held lease every quarter lease and polls the lapsing one's limit until its slot is free
    or the deadline passes; records when, and whether the held one was ever lost meanwhile."""

    def __init__(self, held: str, held_lease: UUID, lapsing: str, deadline: float) -> None:
        super().__init__(name="lease-watch", daemon=True)
        self.held, self.held_lease, self.lapsing, self.deadline = held, held_lease, lapsing, deadline
        self.freed_at: float | None = None
        self.lost_held: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            next_renewal = 0.0
            with get_client(sync_client=True) as client:
                while time.monotonic() < self.deadline:
                    now = time.monotonic()
                    if now >= next_renewal:
                        client.renew_concurrency_lease(self.held_lease, lease_duration=LEASE_SECONDS)
                        next_renewal = now + LEASE_SECONDS / 4
                    if client.read_global_concurrency_limit_by_name(self.held).active_slots != 1:
                        self.lost_held.append(f"{now:.1f}")
                    if client.read_global_concurrency_limit_by_name(self.lapsing).active_slots == 0:
                        self.freed_at = time.monotonic()
                        return
                    time.sleep(0.5)
        except BaseException as e:  # handed to the test that joins this thread
            self.error = e


@dataclass
class Scenario:
    tag: str
    flow_id: UUID
    secret_value: str
    held: str  # limit whose lease is renewed all along
    lapsing: str  # limit whose lease nobody renews
    held_lease: UUID
    acquired_before: float  # monotonic, just before the lapsing lease was asked for
    acquired_after: float  # monotonic, once it was granted
    watch: LeaseWatch | None = None
    orphans: list[int] = field(default_factory=list)  # children alive after their server was killed alone
    interrupted_code: int | None = None
    left_after_interrupt: list[int] = field(default_factory=list)
    restart_seconds: list[float] = field(default_factory=list)
    restarted_at: float = 0.0  # monotonic, once the last restart answered


@pytest.fixture(scope="module")
def scenario(prefect_server: Any, prefect_api_url: str) -> Iterator[Scenario]:
    tag = uuid.uuid4().hex[:8]
    held, lapsing = f"server-test-held-{tag}", f"server-test-lapsing-{tag}"
    secret_value = f"value-{uuid.uuid4().hex}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(f"server-test-flow-{tag}")
        Secret(value=secret_value).save(f"server-test-{tag}")
        for name in (held, lapsing):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        held_lease = acquire(client, held)
        acquired_before = time.monotonic()
        acquire(client, lapsing)
        acquired_after = time.monotonic()
    s = Scenario(tag, flow_id, secret_value, held, lapsing, held_lease, acquired_before, acquired_after)

    # The server alone, right after the last lease was granted: its children must follow it.
    children = [p for p in prefect_server.processes() if p != prefect_server.proc.pid]
    assert len(children) >= 2, f"expected redis-server and the Prefect server below homelab server: {children}"
    os.kill(prefect_server.proc.pid, signal.SIGKILL)
    prefect_server.proc.wait(10)
    deadline = time.monotonic() + 5
    while (alive := [p for p in children if start_time(p) is not None]) and time.monotonic() < deadline:
        time.sleep(0.02)
    s.orphans = alive
    prefect_server.start()
    s.restart_seconds.append(prefect_server.start_seconds)

    # Ctrl-C: everything stops, in order.
    started = prefect_server.processes()
    os.kill(prefect_server.proc.pid, signal.SIGINT)
    s.interrupted_code = prefect_server.proc.wait(30)
    s.left_after_interrupt = [p for p in started if start_time(p) is not None]
    prefect_server.start()
    s.restart_seconds.append(prefect_server.start_seconds)

    # Everything at once.
    prefect_server.kill()
    prefect_server.start()
    s.restarted_at = time.monotonic()
    s.restart_seconds.append(prefect_server.start_seconds)
    print(f"\nhomelab server restarts took {s.restart_seconds} s")

    # The bound: one lease and one repossessor pass after the restart. The lease began before the
    # restarts, so the margin left is the time they took.
    s.watch = LeaseWatch(held, held_lease, lapsing, s.restarted_at + LEASE_SECONDS + REPOSSESSOR_LOOP_SECONDS)
    s.watch.start()
    yield s

    s.watch.join()
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(held_lease)
        for name in (held, lapsing):
            client.delete_global_concurrency_limit_by_name(name)
        client.delete_flow(flow_id)
    Secret.delete(f"server-test-{tag}")


def test_children_of_a_killed_server_die_with_it(scenario: Scenario) -> None:
    assert scenario.orphans == [], f"still running 5 s after homelab server got SIGKILL: {scenario.orphans}"


def test_sigint_stops_the_server_and_everything_it_started_with_exit_code_0(scenario: Scenario) -> None:
    assert scenario.interrupted_code == 0
    assert scenario.left_after_interrupt == [], f"still running after SIGINT: {scenario.left_after_interrupt}"


def test_flows_blocks_and_limits_survive_kill_and_restart(scenario: Scenario) -> None:
    with get_client(sync_client=True) as client:
        assert client.read_flow_by_name(f"server-test-flow-{scenario.tag}").id == scenario.flow_id
        for name in (scenario.held, scenario.lapsing):
            assert client.read_global_concurrency_limit_by_name(name).limit == 1
    # Block secrets are encrypted with a key kept in the database: reading one back needs both.
    assert Secret.load(f"server-test-{scenario.tag}").get() == scenario.secret_value


def test_lease_from_before_the_kill_is_renewed_and_keeps_its_slot(scenario: Scenario) -> None:
    with get_client(sync_client=True) as client:
        # A lost lease answers 410 Gone here.
        client.renew_concurrency_lease(scenario.held_lease, lease_duration=LEASE_SECONDS)
        assert refused(client, scenario.held), f"{scenario.held}: a second holder got the slot after the restart"


def test_a_second_server_on_the_same_home_is_refused_as_bad_configuration(prefect_server: Any) -> None:
    with pytest.raises(ServerError, match="another homelab server runs on") as refusal:
        serve(port=free_port(), home=prefect_server.home, out=io.StringIO(), err=io.StringIO())
    assert refusal.value.code == 2


def test_leftovers_of_an_earlier_server_are_killed_but_not_a_process_that_reuses_a_pid(tmp_path: Path) -> None:
    left, other = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    try:
        # `other` stands for a process that got a recorded pid after the recorded one ended.
        recorded = {"redis": [left.pid, start_time(left.pid)], "prefect": [other.pid, start_time(other.pid) - 1]}
        (tmp_path / "server.pids").write_text(json.dumps(recorded))
        assert kill_leftovers(tmp_path / "server.pids") == [left.pid]
        assert left.wait(5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for p in (left, other):
            p.kill()
            p.wait()


def test_missing_redis_server_is_bad_configuration_with_the_install_hint(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no redis-server on it
    done = subprocess.run([sys.executable, "-m", "homelab", "server", "--port", str(free_port()), "--home",
                           str(tmp_path / "home")], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "redis-server not found" in done.stderr and "install-system-packages.sh" in done.stderr
    assert done.stdout == ""


def start_redis(directory: Path, password: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server of the test's own, as one run apart from `homelab server`; returns once it answers."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
                             "--save", "", "--requirepass", password, *args],
                            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, port
        except redis.exceptions.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.05)


def test_redis_url_is_checked_for_persistence_and_reachability_without_showing_its_password(
        tmp_path: Path, redis_installed: None) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    proc, port = start_redis(tmp_path, password, "--appendonly", "no")
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    try:
        err = io.StringIO()
        check_redis(url, err)
        assert "appendonly no" in err.getvalue()
        assert password not in err.getvalue() and "127.0.0.1" in err.getvalue()
    finally:
        proc.terminate()
        proc.wait(10)
    with pytest.raises(ServerError) as refusal:
        check_redis(url, io.StringIO())
    assert refusal.value.code == 2
    assert password not in str(refusal.value) and f"127.0.0.1:{port}" in str(refusal.value)


def test_server_given_a_redis_url_keeps_its_leases_there_and_starts_no_redis(
        tmp_path: Path, start_homelab_server: Callable[..., Any]) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    proc, port = start_redis(tmp_path, password, "--appendonly", "yes", "--appendfsync", "always")
    try:
        # In the environment, not the command line: argv is readable by every local user.
        server = start_homelab_server(env={"HOMELAB_REDIS_URL": f"redis://:{password}@127.0.0.1:{port}/0"})
        commands = [Path(f"/proc/{p}/comm").read_text().strip() for p in server.processes()]
        assert "redis-server" not in commands, f"it started a redis of its own: {commands}"
        with temporary_settings({PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="external", limit=1))
            lease = acquire(client, "external")
        keys = redis.Redis(host="127.0.0.1", port=port, password=password, decode_responses=True).keys(
            "prefect:concurrency:lease:*")
        assert keys == [f"prefect:concurrency:lease:{lease}"]
        log = server.log.read_text()
        assert "appendonly" not in log, f"a persistent redis was warned about:\n{log}"
        assert password not in log
    finally:
        proc.terminate()
        proc.wait(10)


def test_unrenewed_lease_frees_its_slot_within_a_lease_and_a_pass_while_the_renewed_one_stays(
        scenario: Scenario) -> None:
    watch = scenario.watch
    assert watch is not None
    watch.join()
    if watch.error is not None:
        raise watch.error
    expires = scenario.acquired_before + LEASE_SECONDS
    assert watch.freed_at is not None, (
        f"{scenario.lapsing}: its lease was not renewed, yet its slot is still taken "
        f"{LEASE_SECONDS + REPOSSESSOR_LOOP_SECONDS:g} s after the restart")
    assert watch.freed_at >= expires - 1, (
        f"{scenario.lapsing}: slot freed {expires - watch.freed_at:.1f} s before its lease expired")
    print(f"\nthe unrenewed lease's slot was freed {watch.freed_at - scenario.acquired_before:.1f} s after it "
          f"was granted, {watch.freed_at - scenario.restarted_at:.1f} s after the last restart")
    assert watch.lost_held == [], f"{scenario.held}: slot not held at {watch.lost_held} although renewed"
    with get_client(sync_client=True) as client:
        # The held lease's first term ended before the lapsing one's, so the pass that revoked the lapsing
        # lease would have revoked it too: only the renewals since the restarts keep its slot.
        client.renew_concurrency_lease(scenario.held_lease, lease_duration=LEASE_SECONDS)
        assert refused(client, scenario.held), f"{scenario.held}: slot lost although its lease was renewed"
        assert not refused(client, scenario.lapsing), f"{scenario.lapsing}: freed slot cannot be acquired"
