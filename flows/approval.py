"""Approval of a disruptive run: the run pauses with a form that shows its plan.

`homelab approve RUN_ID [--reject] [--comment C]` resumes it (Prefect 3.9 has no command for that);
the Prefect UI's Resume button shows the same form. `approved` defaults to False, so resuming without
looking at the form never approves anything.

Each attempt of a run asks anew. Prefect keys a pause's input by its pause key: the form's schema,
description and the answer are stored under `paused-<key>-schema|-description|-response`
(prefect/input/run_input.py keyset_from_paused_state). With one fixed key every attempt of a retried
run shares one record. Prefect 3.9.1's server deletes it when the pause fires again
(server/orchestration/core_policy.py HandlePausingFlows.after_transition); earlier 3.x servers do
not (PrefectHQ/prefect 01dbc35c: after_transition only records the key), and the retried run's
`wait_for_input.save` then fails with 409 Conflict on the schema it stored the first time. So the key
carries the attempt (`approval-<run_count>`), which works on both, and every attempt's answer stays on
record beside the others.
"""

from __future__ import annotations

import re
import time
from typing import Any
from uuid import UUID

from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from pydantic import Field

APPROVAL_KEY = re.compile(r"approval-\d+")
# The run enters Paused first and stores its form just after (prefect/flow_runs.py pause_flow_run:
# propose_state, then wait_for_input.save); a resume in between is refused with "Run input schema not
# found". This bounds the wait for the form.
FORM_WAIT_S = 10.0


class Approval(RunInput):
    approved: bool = Field(default=False, description="Tick to let the run go ahead with the plan shown above.")
    comment: str = Field(default="", description="Why, for the record.")


class NotWaitingForApproval(RuntimeError):
    """The run is not paused for an approval (not paused at all, or paused for something else)."""


def approval_key(run_count: int) -> str:
    """The pause key of the approval asked in attempt `run_count` of a run."""
    return f"approval-{run_count}"


def request_approval(plan_markdown: str, timeout_s: int = 24 * 3600, poll_s: int = 10) -> Approval:
    """Pause the current flow run until someone approves or rejects the plan (or the timeout).

    `poll_s` is how often the paused run asks the server whether it was resumed."""
    from prefect.runtime import flow_run

    form = Approval.with_initial_data(
        description=f"{plan_markdown}\n\nApprove with `homelab approve <run id>` or Resume here with **approved** ticked.",
        approved=False,
    )
    # run_count is this attempt's: the engine reads the run back as each attempt starts Running.
    answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=poll_s,
                            key=approval_key(flow_run.run_count))
    return Approval(approved=answer.approved, comment=answer.comment)


def approve(run_id: str, reject: bool = False, comment: str = "") -> None:
    """Resume a run paused for approval with an approval (or a rejection).

    The answer goes to the attempt that waits now: the server stores the run input under the keyset of
    the run's current Paused state (prefect/server/api/flow_runs.py resume_flow_run), and that state is
    the pause of the current attempt, `approval-<run_count>`.

    Raises:
        prefect.exceptions.ObjectNotFound: no such run.
        NotWaitingForApproval: the run is not paused, or paused for something other than an approval.
        RuntimeError: the server refused the resume (its reason is in the message).
    """
    from prefect.client.orchestration import get_client

    flow_run_id = UUID(run_id)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        details = run.state.state_details if run.state is not None and run.state.is_paused() else None
        if details is None:
            state = run.state.name if run.state is not None else "no state"
            raise NotWaitingForApproval(f"run {run_id} is not paused (it is {state}); only a run waiting for "
                                        f"approval can be approved")
        key = details.pause_key or ""
        if not APPROVAL_KEY.fullmatch(key) or not details.run_input_keyset:
            raise NotWaitingForApproval(f"run {run_id} is paused for something other than an approval "
                                        f"(pause key {key!r}); resume it in the Prefect UI")
        _wait_for_form(client, flow_run_id, details.run_input_keyset["schema"], run_id)
    resume_flow_run(flow_run_id, run_input={"approved": not reject, "comment": comment})


def _wait_for_form(client: Any, flow_run_id: UUID, schema_key: str, run_id: str) -> None:
    deadline = time.monotonic() + FORM_WAIT_S
    while not client.filter_flow_run_input(flow_run_id, key_prefix=schema_key, limit=1, exclude_keys=set()):
        if time.monotonic() >= deadline:
            raise NotWaitingForApproval(f"run {run_id} is paused but its approval form ({schema_key}) did not "
                                        f"appear within {FORM_WAIT_S:g} s; check the run's logs")
        time.sleep(0.1)
