"""The disruption lock against a real `homelab server` (leases in redis): a holder cut off from the
server, a server killed mid-node, a cancel, SIGTERM to the command line, a misconfigured limit.

Each upgrade runs as its own `homelab upgrade talos` process against one twin in this process, so the
twin's record of every mutating command (who sent it, when) is the ground truth of who acted when.
Tests that wait out a lease cost about a lease each (60 s, the server's minimum).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from homelab.lease import LeaseTiming

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOCK = "homelab-disruption"


# --- the world around the runs ------------------------------------------------------------------


def save_block(t: Any) -> str:
    from twin.register import homelab_block

    name = f"lock-{uuid.uuid4().hex[:8]}"
    homelab_block(t).save(name, overwrite=True)
    return name


def start_upgrade(block: str, api_url: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # The run's own bookkeeping calls give up within seconds while the cable is pulled.
           "PREFECT_API_REQUEST_TIMEOUT": "10"}
    return subprocess.Popen([sys.executable, "-m", "homelab", "upgrade", "talos", "--homelab", block, "--yes",
                             "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True)


def last_json(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.05)


def wait_for_upgrade(t: Any, proc: subprocess.Popen[str], count: int = 1, timeout: float = 120) -> None:
    """Until the run `proc` has sent `count` `talosctl upgrade` commands; its output if it ended first."""
    deadline = time.monotonic() + timeout
    while len(upgrades_by(t, proc.pid)) < count:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before upgrade #{count}:\n{out[-2000:]}"
                                 f"\n{err[-4000:]}")
        assert time.monotonic() < deadline, f"no `talosctl upgrade` #{count} within {timeout:g} s"
        time.sleep(0.05)


def upgrades_by(t: Any, pid: int) -> list[Any]:
    return [c for c in t.control.acts() if c.caller == pid and "upgrade" in c.argv]


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def limit(api_url: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(LOCK)


def set_limit(**fields: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(LOCK)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=LOCK, limit=1))
        client.update_global_concurrency_limit(LOCK, GlobalConcurrencyLimitUpdate(**fields))


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout:g} s; stderr:\n{err[-3000:]}") from None
    return proc.returncode, out, err


# --- the tests ----------------------------------------------------------------------------------


def test_a_holder_cut_off_from_the_server_stops_acting_before_anyone_else_gets_the_lock(
        twin, prefect_server, prefect_api_url, tcp_proxy):
    timing = LeaseTiming()
    # m720q-1's reboot outlasts the holder's ownership (40 s after its last renewal, at most 40 s after
    # the cut), so `talosctl upgrade --wait` is still in flight then; and it ends before the server can
    # hand the slot on (60 s after that renewal, at least 50 s after the cut), so the second run finds
    # the node back at the target.
    t = twin(reboot_seconds=45, recovery_seconds=0.2)
    block = save_block(t)
    proxy = tcp_proxy(prefect_server.port)
    a = start_upgrade(block, proxy.url)
    try:
        wait_for_upgrade(t, a)
        proxy.cut()
        b = start_upgrade(block, prefect_api_url, "--node", "m720q-1")
        code_b, out_b, err_b = finish(b, 240)
        res_b = last_json(out_b)
        assert code_b == 0, err_b[-3000:]
        proxy.restore()
        code_a, out_a, err_a = finish(a, 240)
    finally:
        for p in (a,):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    res_a = last_json(out_a)
    assert code_a == 1 and res_a["status"] == "failed", err_a[-3000:]
    assert "lock lost" in res_a["error"]
    lost_at, acquired_b = ts(res_a["lock"]["lost_at"]), ts(res_b["lock"]["acquired_at"])
    # The cut-off holder declared the lock lost, killed its call and stopped, before the server could
    # hand the slot to the second run.
    assert lost_at + timing.kill_grace_s < acquired_b, (res_a["lock"], res_b["lock"])
    acts_a = [c for c in t.control.acts() if c.caller == a.pid]
    acts_b = [c for c in t.control.acts() if c.caller == b.pid]
    assert acts_a and all(c.start < lost_at for c in acts_a)
    assert all(c.start > acquired_b for c in acts_b)
    assert t.record.max_concurrent() == 1


def test_a_server_killed_mid_node_keeps_a_live_holder_and_frees_a_dead_ones_slot_within_a_lease(
        twin, prefect_server, prefect_api_url):
    t = twin(reboot_seconds=6, recovery_seconds=0.2)
    block = save_block(t)
    a = start_upgrade(block, prefect_api_url)
    try:
        wait_for_upgrade(t, a)
        prefect_server.kill()
        prefect_server.start()
        # The run renews its lease against the restarted server (redis kept it) and goes on.
        wait_for_upgrade(t, a, count=2, timeout=180)
        assert limit(prefect_api_url).active_slots == 1
        # Now the holder dies without a word: its slot must come free within one lease.
        os.killpg(a.pid, signal.SIGKILL)
        died = time.monotonic()
        a.communicate()
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    wait_until(lambda: limit(prefect_api_url).active_slots == 0, LeaseTiming().lease_s + 15,
               "the dead holder's slot freed")
    freed_after = time.monotonic() - died
    assert freed_after <= LeaseTiming().lease_s + 10, freed_after  # one lease and one repossessor pass
    assert t.record.max_concurrent() == 1


def test_cancel_mid_run_stops_before_the_next_disruptive_step(twin, prefect_api_url):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    t = twin(reboot_seconds=10, recovery_seconds=0.2)
    block = save_block(t)
    a = start_upgrade(block, prefect_api_url)
    try:
        wait_for_upgrade(t, a)
        with get_client(sync_client=True) as client:
            runs = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
                if r.parameters.get("homelab") == block]
        assert len(runs) == 1
        cancelled = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "cancel", str(runs[0].id)],
                                   capture_output=True, text=True, timeout=60,
                                   env={**os.environ, "PREFECT_API_URL": prefect_api_url})
        assert cancelled.returncode == 0, cancelled.stderr
        cancelled_at = time.time()
        code, out, err = finish(a, 180)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    res = last_json(out)
    assert code == 1 and res["status"] == "cancelled", err[-3000:]
    assert res["noout"] in ("unset", "untouched")
    # After the cancel only the finishing of the node in flight: noout unset, nothing disruptive.
    later = [c.argv for c in t.control.acts() if c.caller == a.pid and c.start >= cancelled_at]
    assert all("unset" in argv for argv in later), later
    assert len(upgrades_by(t, a.pid)) == 1
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(runs[0].id).state.is_cancelled()
    assert limit(prefect_api_url).active_slots == 0


def test_sigterm_to_the_command_line_ends_it_with_its_json_line_and_no_traceback(twin, prefect_api_url):
    t = twin(reboot_seconds=30, recovery_seconds=0.2)
    block = save_block(t)
    a = start_upgrade(block, prefect_api_url)
    try:
        wait_for_upgrade(t, a)
        os.killpg(a.pid, signal.SIGTERM)
        sent = time.monotonic()
        code, out, err = finish(a, 60)
        took = time.monotonic() - sent
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    assert took < 60
    res = last_json(out)
    assert code == 1 and res["status"] == "cancelled", err[-3000:]
    # m720q-1 is still rebooting: noout stays, and the result says so.
    assert res["noout"] == "left-set"
    assert "left set on purpose" in res["error"]
    assert "Traceback" not in out and "Traceback" not in err
    assert limit(prefect_api_url).active_slots == 0


@pytest.mark.parametrize(("fields", "words"), [({"active": False}, "inactive"), ({"limit": 2}, "limit 2, not 1")])
def test_a_limit_that_would_not_exclude_anyone_is_refused(twin, prefect_api_url, fields, words):
    t = twin(reboot_seconds=0.3, recovery_seconds=0.1)
    block = save_block(t)
    set_limit(**fields)
    try:
        code, out, err = finish(start_upgrade(block, prefect_api_url), 120)
    finally:
        set_limit(active=True, limit=1)
    res = last_json(out)
    assert code == 1 and res["status"] == "failed", err[-2000:]
    assert words in res["error"] and "homelab setup" in res["error"]
    assert not [c for c in t.control.acts()], "nothing may be touched under a lock that excludes no one"
