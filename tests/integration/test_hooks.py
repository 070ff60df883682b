"""Node hooks: a deadline that stops everything the hook started, an environment with nothing of the
worker's in it, and failures that say which hook, which node, which deadline. Real bash processes; the
last two tests run the hooks through talos-upgrade on the twin against a real Prefect server."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tasks import hooks

WORKER_SECRETS = {"PREFECT_API_AUTH_STRING": "admin:auth-string-of-the-worker",
                  "HOMELAB_WEBHOOK_SECRET": "webhook-secret-of-the-worker"}
# What bash itself adds to any environment it runs in.
BASH_OWN = {"PWD", "SHLVL", "_"}


def pids_in(tail: list[str], name: str) -> list[int]:
    return [int(m.group(1)) for line in tail for m in [re.fullmatch(rf"{name}=(\d+)", line)] if m]


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has ended; only its parent's wait is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def run(command: str, **kw: Any) -> hooks.HookResult:
    kw.setdefault("deadline_s", 10)
    return hooks.run_hook(command, kind="pre", node="m720q-2", ip="10.42.0.102", **kw)


def test_overrunning_hook_and_the_child_it_forked_are_dead_at_the_deadline(tmp_path: Path) -> None:
    late = tmp_path / "written-late"
    # The child ignores SIGTERM, so only the SIGKILL that follows the grace can stop it.
    command = (f"echo leader=$$; ( trap '' TERM; echo child=$BASHPID; sleep 2; echo late > {late} ) & "
               f"sleep 60")
    t0 = time.monotonic()
    with pytest.raises(hooks.HookTimedOut) as caught:
        run(command, deadline_s=0.5, grace_s=0.3)
    took = time.monotonic() - t0
    assert 0.5 <= took < 1.8, took
    e = caught.value
    assert "pre_node_hook of the Homelab block for m720q-2 (10.42.0.102)" in e.reason
    assert "did not finish within its 0.5 s deadline" in e.reason
    assert "whole process group was stopped (SIGTERM, then SIGKILL after 0.3 s)" in e.reason
    [leader], [child] = pids_in(e.tail, "leader"), pids_in(e.tail, "child")
    assert not running(leader) and not running(child)
    assert not hooks.group_running(leader)
    time.sleep(max(0.0, t0 + 2.6 - time.monotonic()))  # past the moment the child would have written
    assert not late.exists()


def test_background_process_left_by_a_finished_hook_is_stopped_with_it(tmp_path: Path) -> None:
    late = tmp_path / "written-late"
    t0 = time.monotonic()
    result = run(f"echo leader=$$; ( sleep 1.5; echo late > {late} ) & echo started", grace_s=0.3)
    assert result.exit_code == 0 and result.stopped_leftovers and "started" in result.tail
    assert not hooks.group_running(pids_in(result.tail, "leader")[0])
    time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))
    assert not late.exists()


def test_hook_never_sees_the_workers_secrets(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    for name, value in WORKER_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBECONFIG", "/home/worker/.kube/config")
    with caplog.at_level(logging.INFO):
        result = run("env", log=logging.getLogger("hook-test"))
    names = {line.split("=", 1)[0] for line in result.tail}
    assert names - BASH_OWN == {"PATH", "HOME", "HOMELAB_NODE", "HOMELAB_NODE_IP"}
    for value in WORKER_SECRETS.values():
        assert not any(value in line for line in result.tail)
        assert value not in caplog.text


def test_hook_sees_its_node_and_the_blocks_hook_env_and_masks_it_in_the_logs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seen = tmp_path / "seen"
    token = "lb-token-" + uuid.uuid4().hex
    command = f'printf "%s %s %s %s" "$HOMELAB_NODE" "$HOMELAB_NODE_IP" "$LB_TOKEN" "$SHORT" > {seen}; echo "$LB_TOKEN"'
    with caplog.at_level(logging.INFO):
        result = run(command, extra_env={"LB_TOKEN": token, "SHORT": "1"}, log=logging.getLogger("hook-test"))
    assert seen.read_text() == f"m720q-2 10.42.0.102 {token} 1"
    assert result.tail == [hooks.MASK]
    assert token not in caplog.text and hooks.MASK in caplog.text


def test_failing_hook_reports_its_exit_status_and_last_output() -> None:
    with pytest.raises(hooks.HookError) as caught:
        run("echo 'draining m720q-2'; echo 'drain refused: 2 pods unevictable' >&2; exit 3", deadline_s=30)
    e = caught.value
    assert type(e) is hooks.HookError and e.exit_code == 3
    assert e.reason.startswith("pre_node_hook of the Homelab block for m720q-2 (10.42.0.102) exited with status 3")
    assert "(deadline 30 s)" in e.reason and "drain refused: 2 pods unevictable" in e.reason
    assert e.node == "m720q-2" and "fix the hook" in e.next_step


def test_hook_killed_by_a_signal_names_it() -> None:
    with pytest.raises(hooks.HookError, match=r"was killed by SIGKILL after") as caught:
        run("kill -KILL $$")
    assert caught.value.exit_code == -9


def test_abort_stops_the_hook_group_at_once() -> None:
    abort = threading.Event()
    threading.Timer(0.3, abort.set).start()
    t0 = time.monotonic()
    with pytest.raises(hooks.HookAborted) as caught:
        run("echo leader=$$; sleep 60 & sleep 60", abort=abort, grace_s=0.3)
    assert time.monotonic() - t0 < 2
    assert not hooks.group_running(pids_in(caught.value.tail, "leader")[0])


@pytest.mark.parametrize(("extra", "message"), [
    ({"1X": "v"}, "'1X' is not an environment variable name"),
    ({"HOMELAB_NODE": "other"}, "HOMELAB_NODE is set per node by the flow"),
])
def test_unusable_hook_env_is_refused_before_anything_runs(extra: dict[str, str], message: str) -> None:
    with pytest.raises(hooks.HookConfigError, match=message):
        run("true", extra_env=extra)


def test_block_refuses_a_bad_hook_env_without_echoing_its_values() -> None:
    import pydantic

    import blocks

    with pytest.raises(pydantic.ValidationError) as caught:
        blocks.Homelab(kubernetes=blocks.Kubernetes(), talos=blocks.Talos(), git=blocks.GitSource(url="/srv/h"),
                       hook_env={"bad-name": "value-that-is-a-secret"})
    assert "'bad-name' is not an environment variable name" in str(caught.value)
    assert "value-that-is-a-secret" not in str(caught.value)


# --- through talos-upgrade, on the twin, against a real Prefect server ------------------------


def save_block(t: Any, **fields: Any) -> str:
    from prefect.types import SecretDict

    from twin.register import homelab_block

    block = homelab_block(t)
    for k, v in fields.items():
        setattr(block, k, SecretDict(v) if k == "hook_env" else v)
    name = f"twin-hooks-{uuid.uuid4().hex[:8]}"
    block.save(name, overwrite=True)
    return name


def upgrade_one_node(block: str, tmp_path: Path, node: str, hook_s: float) -> tuple[Any, dict[str, Any]]:
    from flows.talos_upgrade import Deadlines, state_result, talos_upgrade

    deadlines = Deadlines(node_ready=3, etcd=3, osds_up=3, ceph_clean=2, lock=60, hook=hook_s, upgrade=30)
    state = talos_upgrade(homelab=block, nodes=[node], require_approval=False, deadlines=deadlines,
                          snapshot_dir=str(tmp_path / "snapshots"), return_state=True)
    return state, state_result(state)


def test_flow_hook_gets_the_blocks_hook_env_and_not_the_workers_secrets(
        prefect_api_url: str, twin: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMELAB_WEBHOOK_SECRET", WORKER_SECRETS["HOMELAB_WEBHOOK_SECRET"])
    t = twin(reboot_seconds=0.4, recovery_seconds=0.2)
    seen = tmp_path / "env"
    token = "lb-token-" + uuid.uuid4().hex
    block = save_block(t, pre_node_hook=f"env > {seen}", hook_env={"LB_TOKEN": token})

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # as the UI and the API show it
        shown = client.read_block_document_by_name(block, "homelab", include_secrets=False).data["hook_env"]
    assert token not in str(shown)

    state, res = upgrade_one_node(block, tmp_path, "m720q-3", hook_s=10)
    assert state.is_completed(), res["error"]
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines())
    assert set(env) - BASH_OWN == {"PATH", "HOME", "HOMELAB_NODE", "HOMELAB_NODE_IP", "LB_TOKEN"}
    assert (env["HOMELAB_NODE"], env["HOMELAB_NODE_IP"], env["LB_TOKEN"]) == ("m720q-3", "10.42.0.103", token)


def test_flow_stops_an_overrunning_hook_and_fails_the_node_naming_the_deadline(
        prefect_api_url: str, twin: Any, tmp_path: Path) -> None:
    t = twin(reboot_seconds=0.4, recovery_seconds=0.2)
    late = tmp_path / "written-late"
    block = save_block(t, pre_node_hook=f"( sleep 3; echo late > {late} ) & sleep 60")
    t0 = time.monotonic()
    state, res = upgrade_one_node(block, tmp_path, "m720q-3", hook_s=1)
    assert state.is_failed()
    assert res["error"].startswith("m720q-3: pre-hook failed. Last seen: pre_node_hook of the Homelab block for "
                                   "m720q-3 (10.42.0.103) did not finish within its 1 s deadline")
    assert t.record.intervals("m720q") == []  # the node was never disrupted
    time.sleep(max(0.0, t0 + 3.5 - time.monotonic()))
    assert not late.exists()
