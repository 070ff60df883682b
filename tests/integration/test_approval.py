"""Approval across attempts of one run, on a real Prefect server: each attempt pauses under its own key,
`approve()` answers the attempt that waits now, and the answers of earlier attempts stay on record."""

from __future__ import annotations

import threading
import time
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_runs import pause_flow_run, resume_flow_run

from flows.approval import NotWaitingForApproval, approve, request_approval

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0
RUN_IDS: list[str] = []
ANSWERS: list[tuple[bool, str]] = []


# retries=2 for one retry: Prefect counts resuming a blocking pause as a run (the Paused -> Running
# transition passes IncrementFlowRunCount in server/orchestration/global_policy.py before
# HandleResumingPausedFlows marks the run as resuming), so an approved first attempt already has
# run_count 2, and RetryFailedFlows (core_policy.py) retries only while run_count <= retries.
@flow(name="approval-retry-test", retries=2, persist_result=False)
def upgrade_that_fails_once_after_approval() -> str:
    from prefect.runtime import flow_run

    RUN_IDS.append(str(flow_run.id))
    answer = request_approval("| node | from | to |\n|---|---|---|\n| m720q-1 | v1.33.0 | v1.34.0 |",
                              timeout_s=60, poll_s=1)
    ANSWERS.append((answer.approved, answer.comment))
    if len(ANSWERS) == 1:
        raise RuntimeError("m720q-1: upgrade-k8s failed after approval")
    return answer.comment


@flow(name="approval-other-pause-test", persist_result=False)
def run_paused_for_something_else() -> None:
    from prefect.runtime import flow_run

    RUN_IDS.append(str(flow_run.id))
    pause_flow_run(timeout=60, poll_interval=1, key="maintenance-window")


def wait_for_pause(run_id: str, not_key: str | None = None) -> Any:
    """The run's Paused state once it is paused under a key other than `not_key`."""
    deadline = time.monotonic() + DEADLINE_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(UUID(run_id)).state
            if state is not None and state.is_paused() and state.state_details.pause_key != not_key:
                return state
            time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not pause within {DEADLINE_S} s")


def wait_for_run_id(before: int) -> str:
    deadline = time.monotonic() + DEADLINE_S
    while len(RUN_IDS) <= before:
        assert time.monotonic() < deadline, "the flow did not start"
        time.sleep(0.05)
    return RUN_IDS[-1]


def test_retried_run_asks_again_and_passes_approval_on_its_second_attempt(prefect_api_url: str) -> None:
    RUN_IDS.clear()
    ANSWERS.clear()
    outcome: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(state=upgrade_that_fails_once_after_approval(return_state=True)), daemon=True)
    runner.start()
    run_id = wait_for_run_id(0)

    first = wait_for_pause(run_id)
    approve(run_id, comment="first look")
    second = wait_for_pause(run_id, not_key=first.state_details.pause_key)
    approve(run_id, comment="second look")
    runner.join(DEADLINE_S)

    assert not runner.is_alive(), "the retried run did not finish"
    state = outcome["state"]
    assert state.is_completed(), state
    assert state.result() == "second look"
    assert ANSWERS == [(True, "first look"), (True, "second look")]
    # Attempt 1 paused at run_count 1; attempt 2 starts at 3 (the resume of attempt 1 counted as a run).
    assert (first.state_details.pause_key, second.state_details.pause_key) == ("approval-1", "approval-3")
    with get_client(sync_client=True) as client:
        kept = client.filter_flow_run_input(UUID(run_id), key_prefix="paused-approval-", limit=20,
                                            exclude_keys=set())
    responses = {i.key: i.decoded_value for i in kept if i.key.endswith("-response")}
    assert responses == {"paused-approval-1-response": {"approved": True, "comment": "first look"},
                         "paused-approval-3-response": {"approved": True, "comment": "second look"}}


def test_approve_refuses_a_run_that_is_paused_for_something_else(prefect_api_url: str) -> None:
    before = len(RUN_IDS)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(state=run_paused_for_something_else(return_state=True)), daemon=True)
    runner.start()
    run_id = wait_for_run_id(before)
    wait_for_pause(run_id)

    with pytest.raises(NotWaitingForApproval, match="paused for something other than an approval"):
        approve(run_id)
    resume_flow_run(UUID(run_id))
    runner.join(DEADLINE_S)
    assert outcome["state"].is_completed()
    with pytest.raises(NotWaitingForApproval, match=r"is not paused \(it is Completed\)"):
        approve(run_id)
