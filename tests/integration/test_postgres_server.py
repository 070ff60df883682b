"""`homelab server` on PostgreSQL, as the chart's server runs: Debian's postgresql started on loopback for
the module, a database owned by a role that is not a superuser, its URL given through HOMELAB_DATABASE_URL.
Against it: what the server keeps lands in PostgreSQL, a deployment's trigger starts a run from an event,
the disruption lock is taken and released, and a rolling Talos upgrade of the twin completes; each of
these also reads PostgreSQL itself, so a server that fell back to SQLite cannot pass. A database it cannot
log in to, or a URL without an async driver, stops it without showing the password.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

# Fast deadlines and twin knobs, as tests/integration/test_talos_upgrade.py runs the flow.
DEADLINES = {"node_ready": 3, "etcd": 3, "osds_up": 3, "ceph_clean": 2, "lock": 60, "hook": 10, "upgrade": 30}
KNOBS = {"reboot_seconds": 0.4, "recovery_seconds": 0.2}
M720Q = ["m720q-1", "m720q-2", "m720q-3"]


@dataclass
class PgServer:
    postgres: Any  # conftest.Postgres
    server: Any  # conftest.PrefectServer
    password: str

    def rows(self, query: str) -> list[str]:
        """query run on the Prefect server's database, read by PostgreSQL's own client."""
        return self.postgres.sql(query, database="prefect").splitlines()


@pytest.fixture(scope="module")
def pg(postgres: Any, start_module_homelab_server: Callable[..., Any],
       prefect_pointed_at: Callable[..., Any]) -> Iterator[PgServer]:
    """The module's `homelab server` on PostgreSQL, set up as `homelab setup` does; this process's
    Prefect clients point at it."""
    from deployments.setup import setup

    password = secrets.token_hex(16)
    url = postgres.create_database("prefect", "prefect", password)
    # In the environment, not on the command line, where every local user could read the password.
    server = start_module_homelab_server(env={"HOMELAB_DATABASE_URL": url})
    print(f"\nhomelab server on PostgreSQL ready after {server.start_seconds} s")
    with prefect_pointed_at(server.url):
        setup()
        yield PgServer(postgres, server, password)


def test_the_server_keeps_its_data_in_postgresql_and_its_password_shows_nowhere(pg: PgServer) -> None:
    from prefect.client.orchestration import get_client

    name = f"pg-flow-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(name)
    assert pg.rows(f"SELECT id FROM flow WHERE name = '{name}'") == [str(flow_id)]
    assert not (pg.server.home / "prefect.db").exists(), "a SQLite database was made in the home"
    log = pg.server.log.read_text(errors="replace")
    assert f"database postgresql+asyncpg://prefect:***@127.0.0.1:{pg.postgres.port}/prefect" in log
    assert pg.password not in log
    for pid in pg.server.processes():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert pg.password not in argv, f"the database password is in the command line of process {pid}"


def test_a_push_event_starts_the_git_push_deployment_registered_on_postgresql(pg: PgServer) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from deployments.serve import load_definitions, to_deployments
    from deployments.webhook import GITHUB, Push, prefect_auth_headers, push_event

    [deployment] = to_deployments(load_definitions(), only=["git-push"], homelab="pg-twin")
    deployment_id = deployment.apply()
    assert pg.rows("SELECT count(*) FROM automation WHERE name LIKE 'git-push%'") == ["1"]
    # No runner serves it: the run the trigger creates stays Scheduled, with the event's values.
    push = Push("example/homelab", "refs/heads/main", "a" * 40, "b" * 40, "octo")
    # A reactive trigger only sees events that arrive once its automation is loaded. On PostgreSQL the
    # server loads a new one when NOTIFY reaches its listener (prefect/server/events/triggers.py,
    # listen_for_automation_changes), which may still be connecting just after the server started, and at
    # the latest on the periodic pass every 5 s: a delivery that finds no run after that is sent again,
    # under a new id as a redelivery of the forge would not be (the server skips an id it has seen).
    deadline, resend_at = time.monotonic() + 60, 0.0
    sent: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            if time.monotonic() >= resend_at:
                event = push_event(push, GITHUB, str(uuid.uuid4()), datetime.now(UTC))
                response = httpx.post(f"{pg.server.url}/events", json=[event], headers=prefect_auth_headers(),
                                      timeout=10)
                assert response.status_code in (200, 204), response.text
                sent.append(event["id"])
                resend_at = time.monotonic() + 6
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            if runs:
                break
            assert time.monotonic() < deadline, f"{len(sent)} push events started no git-push run within 60 s"
            time.sleep(0.25)
    assert len(runs) <= len(sent)
    for run in runs:
        assert (run.parameters["after"], run.parameters["ref"], run.parameters["homelab"]) == (
            "b" * 40, "refs/heads/main", "pg-twin")
    assert pg.rows(f"SELECT count(*) FROM flow_run WHERE deployment_id = '{deployment_id}'") == [str(len(runs))]
    # The event persister writes in batches (every 0.5 s here, tests/integration/conftest.py).
    stored = f"SELECT event FROM events WHERE id = '{sent[0]}'"
    while pg.rows(stored) != ["homelab.git.push"]:
        assert time.monotonic() < deadline + 10, f"event {sent[0]} is not in PostgreSQL's events table"
        time.sleep(0.25)


def test_the_disruption_lock_is_taken_and_released_in_postgresql(pg: PgServer) -> None:
    from tasks.lock import LOCK_NAME, DisruptionLock, LockBusy

    slots = f"SELECT active_slots FROM concurrency_limit_v2 WHERE name = '{LOCK_NAME}'"
    lock = DisruptionLock(LOCK_NAME)
    lock.acquire(10)
    try:
        assert pg.rows(slots) == ["1"]
        with pytest.raises(LockBusy):
            DisruptionLock(LOCK_NAME, poll_s=0.2).acquire(1)
        lock.confirm("a step on PostgreSQL")
    finally:
        lock.release()
    assert pg.rows(slots) == ["0"]
    again = DisruptionLock(LOCK_NAME)
    again.acquire(5)  # free at once, not after a lease
    again.release()


def test_a_rolling_talos_upgrade_of_the_twin_completes_against_postgresql(
        pg: PgServer, twin: Callable[..., Any], tmp_path: Path) -> None:
    from flows.talos_upgrade import Deadlines, state_result, talos_upgrade
    from tasks.lock import LOCK_NAME
    from twin.register import homelab_block

    t = twin(**KNOBS)
    homelab_block(t).save("pg-twin", overwrite=True)
    state = talos_upgrade(homelab="pg-twin", snapshot_dir=str(tmp_path / "snapshots"), require_approval=False,
                          deadlines=Deadlines(**DEADLINES), return_state=True)
    result = state_result(state)
    assert state.is_completed(), result["error"]
    assert [(n["name"], n["action"]) for n in result["nodes"]] == [(h, "upgraded") for h in M720Q]
    assert result["max_disrupted"] == 1 and t.record.max_concurrent("m720q") == 1
    run_id = state.state_details.flow_run_id
    assert pg.rows(f"SELECT state_type FROM flow_run WHERE id = '{run_id}'") == ["COMPLETED"]
    tasks = pg.rows(f"SELECT count(*) FROM task_run WHERE flow_run_id = '{run_id}' AND state_type = 'COMPLETED'")
    assert int(tasks[0]) > 0
    assert pg.rows(f"SELECT active_slots FROM concurrency_limit_v2 WHERE name = '{LOCK_NAME}'") == ["0"]



def test_a_database_it_cannot_log_in_to_stops_the_server_with_the_reason_and_without_the_password(
        pg: PgServer, tmp_path: Path) -> None:
    from deployments.server import free_port

    wrong = secrets.token_hex(16)
    url = f"postgresql+asyncpg://prefect:{wrong}@127.0.0.1:{pg.postgres.port}/prefect"
    done = subprocess.run([sys.executable, "-m", "homelab", "server", "--port", str(free_port()),
                           "--home", str(tmp_path / "home")],
                          env={**os.environ, "HOMELAB_DATABASE_URL": url, "PREFECT_SERVER_UI_ENABLED": "false"},
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and done.stdout == "", done.stderr[-3000:]
    assert 'password authentication failed for user "prefect"' in done.stderr
    assert wrong not in done.stderr


def test_a_database_url_without_an_async_driver_is_refused_as_bad_configuration(tmp_path: Path) -> None:
    from deployments.server import ServerError, serve

    with pytest.raises(ServerError) as refusal:
        serve(home=tmp_path / "home", database="postgresql://prefect:hunter2@db.lan:5432/prefect")
    assert refusal.value.code == 2
    assert "postgresql+asyncpg://" in str(refusal.value) and "hunter2" not in str(refusal.value)
    assert "prefect:***@db.lan:5432" in str(refusal.value)
    assert not (tmp_path / "home").exists(), "it made the home before refusing"
