"""The operator's notifications, end to end: `homelab setup --notify` on a real Prefect server, the server's own
automation services rendering and sending, and a real HTTP endpoint on 127.0.0.1 standing in for the chat
service. Test flows carry the real flows' names, because the automations select runs by flow name."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prefect import State, flow
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events import emit_event
from prefect.states import Cancelled

from deployments import notifications
from deployments.setup import setup
from flows.approval import approve, request_approval

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0
BLOCK = "homelab-test-chat"
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


class Chat:
    """A chat service's incoming-webhook endpoint: records every JSON message POSTed to it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        chat = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 — http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with chat._changed:
                    chat.messages.append(json.loads(body))
                    chat._changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, name="chat", daemon=True)
        self._thread.start()

    def wait_for(self, match: Callable[[dict[str, Any]], bool], what: str,
                 timeout: float = DEADLINE_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in self.messages if match(m)]
                if found:
                    return found[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"the chat endpoint received no {what} within {timeout}s; "
                                         f"it received: {self.messages}")
                self._changed.wait(remaining)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def chat(prefect_api_url: str) -> Iterator[Chat]:
    endpoint = Chat()
    CustomWebhookNotificationBlock(
        name="homelab-chat", url=endpoint.url, json_data={"subject": "{{subject}}", "text": "{{body}}"},
    ).save(BLOCK, overwrite=True)
    setup(notify_block=f"custom-webhook/{BLOCK}")
    yield endpoint
    endpoint.close()


@flow(name="talos-upgrade")
def failing_talos_upgrade() -> None:
    raise RuntimeError("m720q-2: gate ceph-ok-to-stop: expected ok_to_stop true, saw 12 PGs would become "
                       "inactive; wait for recovery, then run again")


@flow(name="kubernetes-upgrade")
def kubernetes_upgrade_waiting_for_approval() -> bool:
    return request_approval("| node | from | to |\n|---|---|---|\n| m720q-1 | v1.32.0 | v1.33.0 |", timeout_s=60).approved


class ProcessKilled(BaseException):
    """What the engine sees when the run is torn away from outside (a failed lease renewal injects a
    CancelledError, a kill ends the process): any BaseException makes the run Crashed."""


CRASHED_RUN_IDS: list[str] = []


@flow(name="talos-upgrade")
def crashing_talos_upgrade() -> None:
    from prefect.runtime import flow_run

    CRASHED_RUN_IDS.append(flow_run.id)
    raise ProcessKilled("crash-of-the-test-run")


@flow(name="provision")
def cancelled_provision() -> State[None]:
    # How the disruptive flows end when a cancel or SIGTERM interrupts them: a Cancelled final state.
    return Cancelled(message="provision of homelab cancelled at homelab-cp-1; run again to go on")


@flow(name="kubernetes-upgrade", timeout_seconds=1)
def overrunning_kubernetes_upgrade() -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # short sleeps: the timeout is raised between them
        time.sleep(0.05)


@flow(name="flux-reconcile")
def failing_reconcile() -> None:
    raise RuntimeError("reconcile-failure-that-must-not-notify")


def test_drift_event_notifies_with_its_counts(chat: Chat) -> None:
    # The shape flows/drift_check.py emits.
    emit_event(event="homelab.drift.detected",
               resource={"prefect.resource.id": "homelab.cluster.m720q", "prefect.resource.name": "m720q"},
               payload={"counts": {"error": 1, "warning": 3, "info": 0}, "revision": "main@sha1:" + "a" * 40,
                        "findings": 4})
    message = chat.wait_for(lambda m: "drift" in m["subject"], "drift notification")
    assert "(m720q)" in message["text"]
    assert "main@sha1:" + "a" * 40 in message["text"]
    assert "error=1, warning=3, info=0" in message["text"]


def test_failed_disruptive_run_notifies_with_its_error_line(chat: Chat) -> None:
    failing_reconcile(return_state=True)  # not disruptive: must stay silent
    state = failing_talos_upgrade(return_state=True)
    assert state.is_failed()
    run_id = str(state.state_details.flow_run_id)
    message = chat.wait_for(lambda m: "failed" in m["subject"] and run_id in m["text"], "failure notification")
    assert message["subject"] == "homelab: talos-upgrade failed"
    assert f"http://prefect.homelab.test/runs/flow-run/{run_id}" in message["text"]
    assert "m720q-2: gate ceph-ok-to-stop: expected ok_to_stop true, saw 12 PGs would become inactive" in message["text"]
    assert not any("reconcile-failure-that-must-not-notify" in m["text"] for m in chat.messages)


def run_id_of(state: State[Any]) -> str:
    return str(state.state_details.flow_run_id)


def test_crashed_disruptive_run_notifies_as_crashed(chat: Chat) -> None:
    with pytest.raises(ProcessKilled):
        crashing_talos_upgrade()
    run_id = CRASHED_RUN_IDS[-1]
    message = chat.wait_for(lambda m: run_id in m["text"], "crash notification")
    assert message["subject"] == "homelab: talos-upgrade crashed"
    assert "ended crashed" in message["text"] and "crash-of-the-test-run" in message["text"]


def test_cancelled_disruptive_run_notifies_as_cancelled(chat: Chat) -> None:
    state = cancelled_provision(return_state=True)
    assert state.is_cancelled()
    message = chat.wait_for(lambda m: run_id_of(state) in m["text"], "cancel notification")
    assert message["subject"] == "homelab: provision cancelled"
    assert "cancelled at homelab-cp-1; run again to go on" in message["text"]


def test_timed_out_disruptive_run_notifies_as_failed(chat: Chat) -> None:
    state = overrunning_kubernetes_upgrade(return_state=True)
    assert state.is_failed() and state.name == "TimedOut"  # an event named prefect.flow-run.TimedOut
    message = chat.wait_for(lambda m: run_id_of(state) in m["text"], "timeout notification")
    assert message["subject"] == "homelab: kubernetes-upgrade failed"


def test_run_waiting_for_approval_notifies_with_link_and_command_that_approves_it(chat: Chat) -> None:
    result: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: result.update(state=kubernetes_upgrade_waiting_for_approval(return_state=True)), daemon=True)
    runner.start()
    message = chat.wait_for(lambda m: "approval" in m["subject"], "approval notification")
    assert message["subject"] == "homelab: kubernetes-upgrade waits for approval"
    command = re.search(rf"homelab approve ({UUID_RE})\n", message["text"])
    assert command, message["text"]
    run_id = command.group(1)
    assert re.search(rf"https?://\S+/runs/flow-run/{run_id}", message["text"]), message["text"]

    approve(run_id)  # what `homelab approve <id>` does
    runner.join(DEADLINE_S)
    assert not runner.is_alive(), "the approved run did not finish"
    assert result["state"].is_completed() and result["state"].result() is True


def test_setup_twice_leaves_the_automations_as_they_are(chat: Chat) -> None:
    again = setup(notify_block=f"custom-webhook/{BLOCK}")
    assert {str(c) for c in again if c.kind == "automation"} == {
        f"automation {name}: unchanged" for name in notifications.NAMES}
