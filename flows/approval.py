"""Approval of a disruptive run: the run pauses with a form that shows its plan.

`homelab approve RUN_ID [--reject] [--comment C]` resumes it (Prefect 3.9 has no command for that);
the Prefect UI's Resume button shows the same form. `approved` defaults to False, so resuming without
looking at the form never approves anything.
"""

from __future__ import annotations

from uuid import UUID

from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from pydantic import Field


class Approval(RunInput):
    approved: bool = Field(default=False, description="Tick to let the run go ahead with the plan shown above.")
    comment: str = Field(default="", description="Why, for the record.")


def request_approval(plan_markdown: str, timeout_s: int = 24 * 3600) -> Approval:
    """Pause the current flow run until someone approves or rejects the plan (or the timeout)."""
    form = Approval.with_initial_data(
        description=f"{plan_markdown}\n\nApprove with `homelab approve <run id>` or Resume here with **approved** ticked.",
        approved=False,
    )
    answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, key="approval")
    return Approval(approved=answer.approved, comment=answer.comment)


def approve(run_id: str, reject: bool = False, comment: str = "") -> None:
    """Resume a paused run with an approval (or a rejection)."""
    resume_flow_run(UUID(run_id), run_input={"approved": not reject, "comment": comment})
