"""A disruptive run that starts while its maintenance window is closed schedules the same work into the
next opening instead of being dropped.

- A run of a deployment (a git push, the UI, `prefect deployment run`): one Scheduled run of the same
  deployment with the same parameters at the next opening. The server does not let a scheduled run
  start before its time, so that run starts inside the window and goes ahead. A second deferred run
  with the same parameters finds that run and schedules nothing more (an idempotency key makes two
  deferred at the same instant agree as well).
- A run without a deployment (the command line): nothing can be scheduled; the result names the time
  and the command to run then.

Whether the window is open is homelab.window's pure decision; this module adds the clock and the
Prefect API. `run_now` (`--now`) and dry runs are never deferred.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from homelab.window import Window, current_opening, next_open

# A run that starts this little before the opening waits for it instead of scheduling itself again:
# the server checks a scheduled time to the whole second, and a worker's clock may be a little ahead
# of the server's.
EARLY_START_S = 5.0

# What the command line calls each flow; a flow not listed here has no command of its own.
CLI: dict[str, tuple[str, ...]] = {
    "talos-upgrade": ("homelab", "upgrade", "talos"),
    "kubernetes-upgrade": ("homelab", "upgrade", "kubernetes"),
}


def now() -> datetime:
    """The clock every window decision reads (tests set it)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Deferral:
    """Why a run did not go ahead, and where its work went."""

    message: str
    until: datetime
    rescheduled_run: str | None = None  # the Scheduled flow run that will do the work
    already_scheduled: bool = False  # that run existed before this one was deferred
    command: str | None = None  # a run without a deployment: what to run at `until`

    def fields(self) -> dict[str, Any]:
        """The keys a deferred result adds to the flow's result dict."""
        return {"deferred_until": self.until.isoformat(), "rescheduled_run": self.rescheduled_run,
                "run_then": self.command}


def closed_message(window: Window, opens: datetime) -> str:
    return (f"deferred: the maintenance window {window.describe()} is closed now; it next opens at "
            f"{opens.isoformat()}; pass run_now (--now) to run anyway")


def cli_command(flow_name: str, parameters: Mapping[str, Any]) -> str | None:
    """The `homelab` command that does what a run of `flow_name` with `parameters` does, quoted for a
    shell (the values may come from anyone); None when the flow has no command of its own."""
    base = CLI.get(flow_name)
    if base is None:
        return None
    argv = list(base)
    if parameters.get("homelab") not in (None, "default"):
        argv += ["--homelab", str(parameters["homelab"])]
    for key, flag in (("cluster", "--cluster"), ("to", "--to")):
        if parameters.get(key):
            argv += [flag, str(parameters[key])]
    for node in parameters.get("nodes") or []:
        argv += ["--node", str(node)]
    w = _window_fields(parameters.get("window"))
    if w:
        argv += ["--window", str(w["cron"]), "--window-hours", f"{float(w.get('hours', 4)):g}",
                 "--tz", str(w.get("timezone", "UTC"))]
    return shlex.join(argv)


def _window_fields(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    dump = getattr(value, "model_dump", None)
    return dict(dump()) if callable(dump) else None


def idempotency_key(deployment_id: UUID | str, opens: datetime, parameters: Mapping[str, Any]) -> str:
    """The same work for the same opening gets the same key: the server then returns the run it has."""
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"maintenance-window:{deployment_id}:{opens.astimezone(UTC).isoformat()}:{digest}"


def defer(window: Window | None, run_now: bool = False, dry_run: bool = False) -> Deferral | None:
    """None when the current flow run may go ahead now; else the Deferral, with the same work scheduled
    into the next opening when the run belongs to a deployment.

    A run that starts at most EARLY_START_S before the opening waits for it here and goes ahead."""
    if window is None or run_now or dry_run:
        return None
    at = now()
    if current_opening(window, at) is not None:
        return None
    opens = next_open(window, at)
    early = (opens - at).total_seconds()
    if early <= EARLY_START_S:
        time.sleep(max(0.0, early))  # a wait for a time of day, not for a condition
        return None
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    if run is not None and run.deployment_id is not None:
        return _reschedule(run.id, run.deployment_id, window, opens)
    flow_name = ctx.flow.name if ctx is not None and ctx.flow is not None else ""
    command = cli_command(flow_name, (ctx.parameters if ctx is not None else None) or {})
    then = (f"run `{command}` then" if command else "run it again then with the same parameters")
    return Deferral(f"{closed_message(window, opens)}; this run has no deployment to schedule the work "
                    f"into that opening: {then}", opens, command=command)


def _reschedule(run_id: UUID, deployment_id: UUID, window: Window, opens: datetime) -> Deferral | None:
    """The Scheduled run of the deployment at `opens` with this run's parameters: the one already there,
    or a new one (None: this run is that one, and it has waited for the opening)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    base = closed_message(window, opens)
    with get_client(sync_client=True) as client:
        # As the server stored them: the deployment's defaults merged with this run's own values.
        current = client.read_flow_run(run_id)
        parameters = dict(current.parameters or {})
        existing = scheduled_run(client, deployment_id, opens, parameters)
        if existing is not None:
            return Deferral(f"{base}; flow run {existing} of this deployment is already scheduled then with "
                            f"the same parameters", opens, str(existing), already_scheduled=True)
        created = client.create_flow_run_from_deployment(
            deployment_id, parameters=parameters,
            state=Scheduled(scheduled_time=opens,
                            message=f"deferred from flow run {run_id}: the maintenance window opens then"),
            idempotency_key=idempotency_key(deployment_id, opens, parameters),
            job_variables=current.job_variables or None)
    if created.id == run_id:
        # The key names this very run: it is the work scheduled for that opening, started early by a
        # server whose clock is ahead of this machine's. It waits for the opening as this clock sees it.
        time.sleep(max(0.0, (opens - now()).total_seconds()))
        return None
    return Deferral(f"{base}; scheduled flow run {created.id} of this deployment with the same parameters for "
                    f"then", opens, str(created.id))


def scheduled_run(client: Any, deployment_id: UUID, opens: datetime, parameters: Mapping[str, Any]) -> UUID | None:
    """A Scheduled run of the deployment at exactly `opens` with exactly these parameters, if any."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=opens, after_=opens)))  # type: ignore[arg-type]  # a datetime is what it takes
    for r in runs:
        if dict(r.parameters or {}) == dict(parameters):
            return UUID(str(r.id))
    return None
