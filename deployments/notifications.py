"""Automations that tell the operator, through a Prefect notification block they name, what needs them.

Three automations, one per thing an operator must react to:
- a disruptive run waits for approval (`prefect.flow-run.Paused`): the link to the run and the
  `homelab approve <id>` command;
- a disruptive run ended Failed, Crashed or Cancelled: the run's state message, i.e. its error line
  (a crash or a cancel can leave shared state behind exactly as a failure can);
- the nightly check found drift (`homelab.drift.detected`): the counts from the event's payload.

The Prefect server renders the messages (Jinja, with `flow_run`, `flow` and `event` in scope) and sends
them through the block, so the block can be any of Prefect's own: Slack, Discord, Microsoft Teams,
Apprise URLs such as ntfy, email, or a custom webhook. Applying them is idempotent by name: an
automation of the same name is updated to the declared form, duplicates are removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import BlockDocument
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound

# The flows that change a cluster; their pauses are approvals and their failures need a human.
DISRUPTIVE_FLOWS = ("talos-upgrade", "kubernetes-upgrade", "cluster-upgrade", "provision")
DRIFT_EVENT = "homelab.drift.detected"

APPROVAL = "homelab: run waits for approval"
FAILURE = "homelab: disruptive run failed"
# Matched on the state's type, not its name: the server names each state event after the state's name
# (prefect/server/models/events.py state_change_event: `prefect.flow-run.{state.name}`), and a
# run that overruns its timeout ends in a FAILED-type state named TimedOut (flow_engine.py
# handle_timeout), which an `expect` of `prefect.flow-run.Failed` never sees. CANCELLING is left out:
# a run that is only being cancelled is still running its clean-up.
ENDED_BADLY = ("FAILED", "CRASHED", "CANCELLED")
DRIFT = "homelab: drift detected"
NAMES = (APPROVAL, FAILURE, DRIFT)

# ui_url needs PREFECT_UI_URL (or PREFECT_API_URL) in the Prefect server's own settings.
_LINK = "{{ flow_run|ui_url or '(no link: set PREFECT_UI_URL on the Prefect server)' }}"
_APPROVAL_BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }} waits for approval of its plan.\n"
    f"Review the plan: {_LINK}\n"
    "Approve: homelab approve {{ flow_run.id }}\n"
    "Reject:  homelab approve {{ flow_run.id }} --reject --comment \"why\""
)
# The event's own state type: by the time the notification is rendered, the run may have moved on.
_ENDING = "{{ event.resource['prefect.state-type']|lower }}"
_FAILURE_BODY = (
    f"Flow run {{{{ flow_run.name }}}} of {{{{ flow.name }}}} ended {_ENDING}.\n"
    "Error: {{ flow_run.state.message }}\n"
    f"Run {{{{ flow_run.id }}}}: {_LINK}\n"
    "Shared state (noout, cordon) may have been left in place on purpose: read the run's report before rerunning."
)
# The payload's counts are a mapping severity → number; render whatever severities the flow sends.
_DRIFT_BODY = (
    "Drift between git and the live homelab"
    "{% if event.resource.name %} ({{ event.resource.name }}){% endif %}: "
    "{% for severity, count in (event.payload.counts or {}).items() %}"
    "{{ severity }}={{ count }}{% if not loop.last %}, {% endif %}{% endfor %}.\n"
    "{% if flow_run %}Report: " + _LINK + "\n{% endif %}"
    "{% if event.payload.revision %}Git revision: {{ event.payload.revision }}\n{% endif %}"
    "Details: the drift-check run's markdown artifact, or `homelab drift`."
)


class NotificationSetupError(Exception):
    """The notification block cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class Change:
    """What set-up did to one object: created, updated, removed or unchanged."""

    kind: str
    name: str
    action: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.action}{f' ({self.detail})' if self.detail else ''}"


def _disruptive_run_automation(block_document_id: UUID, name: str, description: str, event: str,
                               subject: str, body: str, state_types: tuple[str, ...] = ()) -> AutomationCore:
    """An automation that notifies when a run of a disruptive flow emits `event` (with one of `state_types`,
    the `prefect.state-type` label of flow-run state events, when given)."""
    match: dict[str, Any] = {"prefect.resource.id": "prefect.flow-run.*"}
    if state_types:
        match["prefect.state-type"] = list(state_types)
    return AutomationCore(
        name=name,
        description=description,
        trigger=EventTrigger(
            expect={event},
            match=match,
            match_related={  # type: ignore[arg-type]
                "prefect.resource.role": "flow", "prefect.resource.name": list(DISRUPTIVE_FLOWS)},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_document_id, subject=subject, body=body)],
    )


def declared_automations(block_document_id: UUID) -> list[AutomationCore]:
    """The three automations, all sending through the notification block with that id."""
    return [
        _disruptive_run_automation(
            block_document_id, APPROVAL,
            "Tells the operator that a disruptive run waits for approval, with the link and the command.",
            "prefect.flow-run.Paused", "homelab: {{ flow.name }} waits for approval", _APPROVAL_BODY),
        _disruptive_run_automation(
            block_document_id, FAILURE,
            "Tells the operator that a disruptive run ended Failed, Crashed or Cancelled, with its error line.",
            "prefect.flow-run.*", f"homelab: {{{{ flow.name }}}} {_ENDING}", _FAILURE_BODY, ENDED_BADLY),
        AutomationCore(
            name=DRIFT,
            description="Tells the operator that the drift check found differences, with the counts.",
            trigger=EventTrigger(expect={DRIFT_EVENT}, posture=Posture.Reactive, threshold=1),
            actions=[SendNotification(block_document_id=block_document_id,
                                      subject="homelab: drift detected", body=_DRIFT_BODY)],
        ),
    ]


def _comparable(a: AutomationCore) -> dict[str, Any]:
    """The fields that define an automation, without server-assigned ids."""
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "id"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    dumped = a.model_dump(mode="json", include={"name", "description", "enabled", "trigger", "actions"})
    return dict(strip(dumped))


def _block_ref(doc: BlockDocument) -> str:
    return f"{doc.block_type.slug if doc.block_type else '?'}/{doc.name}"


async def resolve_notification_block(client: PrefectClient, ref: str) -> UUID:
    """The id of the notification block named `ref`: `<block-type-slug>/<name>`, or a bare name when only one
    notification block has it."""
    if "/" in ref:
        slug, _, name = ref.partition("/")
        try:
            doc = await client.read_block_document_by_name(name=name, block_type_slug=slug, include_secrets=False)
        except ObjectNotFound:
            raise NotificationSetupError(
                f"notification block {ref!r}: expected a block of type {slug!r} named {name!r}, found none; "
                f"create it in the Prefect UI (Blocks) or with `prefect block create {slug}`") from None
        candidates = [doc]
    else:
        docs = await client.read_block_documents(include_secrets=False)
        candidates = [d for d in docs if d.name == ref]
    notifying = [d for d in candidates
                 if d.block_schema is not None and "notify" in (d.block_schema.capabilities or [])]
    if not notifying:
        seen = ", ".join(_block_ref(d) for d in candidates) or "none"
        raise NotificationSetupError(
            f"notification block {ref!r}: expected a block that can notify (Slack, Discord, Apprise/ntfy, email, "
            f"custom webhook), found {seen}; create one, then run `homelab setup --notify <type-slug>/<name>`")
    if len(notifying) > 1:
        names = ", ".join(_block_ref(d) for d in notifying)
        raise NotificationSetupError(
            f"notification block {ref!r}: several notification blocks have that name ({names}); "
            f"name one as <type-slug>/<name>")
    return notifying[0].id


async def apply_automations(client: PrefectClient, block_document_id: UUID) -> list[Change]:
    """Create or update the declared automations by name; remove extra automations of the same name."""
    changes = []
    for desired in declared_automations(block_document_id):
        existing = await client.read_automations_by_name(desired.name)
        if not existing:
            await client.create_automation(desired)
            changes.append(Change("automation", desired.name, "created"))
            continue
        keep, *extra = existing
        for dup in extra:
            await client.delete_automation(dup.id)
            changes.append(Change("automation", desired.name, "removed", f"duplicate {dup.id}"))
        if _comparable(keep) != _comparable(desired):
            await client.update_automation(keep.id, desired)
            changes.append(Change("automation", desired.name, "updated"))
        else:
            changes.append(Change("automation", desired.name, "unchanged"))
    return changes
