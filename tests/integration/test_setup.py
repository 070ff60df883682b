"""`homelab setup` against a real Prefect server: it creates what is missing, repairs what would break the
one-node-at-a-time lock, refuses what it must not overwrite, and a second run changes nothing."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate, WorkPoolCreate
from prefect.events.schemas.automations import AutomationCore

import blocks
from deployments import notifications
from deployments.setup import SetupError, cli, setup

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def read_limit(name: str) -> Any:
    async with get_client() as client:
        return await client.read_global_concurrency_limit_by_name(name)


async def read_pool(name: str) -> Any:
    async with get_client() as client:
        return await client.read_work_pool(name)


def test_setup_creates_pool_limit_and_block_types_then_a_second_run_changes_nothing(prefect_api_url: str) -> None:
    pool, limit = unique("homelab"), unique("homelab-disruption")
    first = setup(work_pool=pool, limit_name=limit)
    assert str(first[0]) == f"work pool {pool}: created (process)"
    assert str(first[1]) == f"concurrency limit {limit}: created (limit 1)"
    assert run(read_pool(pool)).type == "process"
    created = run(read_limit(limit))
    assert (created.limit, created.active) == (1, True)
    assert {c.name for c in first if c.kind == "block type"} == {b.get_block_type_slug() for b in blocks.ALL_BLOCKS}

    second = setup(work_pool=pool, limit_name=limit)
    assert [c for c in second if c.action != "unchanged"] == []
    assert run(read_limit(limit)).id == created.id


def test_setup_sets_a_widened_disruption_limit_back_to_one(prefect_api_url: str) -> None:
    pool, limit = unique("homelab"), unique("homelab-disruption")
    setup(work_pool=pool, limit_name=limit)

    async def widen() -> None:
        async with get_client() as client:
            await client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(limit=3, active=False))
    run(widen())

    changes = setup(work_pool=pool, limit_name=limit)
    assert str(changes[1]) == f"concurrency limit {limit}: updated (limit 3, inactive → limit 1, active)"
    repaired = run(read_limit(limit))
    assert (repaired.limit, repaired.active) == (1, True)


def test_setup_refuses_a_pool_of_another_type_and_cli_exits_2(prefect_api_url: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pool = unique("homelab")

    async def make_foreign_pool() -> None:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="prefect-agent"))
    run(make_foreign_pool())

    with pytest.raises(SetupError, match=rf"work pool {pool}: expected type 'process', found 'prefect-agent'"):
        setup(work_pool=pool, limit_name=unique("homelab-disruption"))
    assert cli(None, work_pool=pool) == 2
    assert f"work pool {pool}: expected type 'process'" in capsys.readouterr().err
    assert run(read_pool(pool)).type == "prefect-agent"


def test_cli_reports_nothing_changed_on_the_second_run(prefect_api_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    pool = unique("homelab")
    assert cli(None, work_pool=pool) == 0
    capsys.readouterr()
    assert cli(None, work_pool=pool) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("already set up, nothing changed")
    assert f"work pool {pool}: unchanged (process)" in out


def test_setup_with_an_unknown_notification_block_exits_2_naming_it(prefect_api_url: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("slack-webhook/no-such-block") == 2
    err = capsys.readouterr().err
    assert "notification block 'slack-webhook/no-such-block'" in err and "found none" in err


def test_setup_refuses_a_block_that_cannot_notify(prefect_api_url: str) -> None:
    name = unique("not-a-notifier")
    blocks.Webhook(secret="s3cret-value").save(name)
    with pytest.raises(notifications.NotificationSetupError, match="expected a block that can notify") as e:
        setup(notify_block=name, work_pool=unique("homelab"))
    assert "s3cret-value" not in str(e.value)


def test_setup_repairs_hand_edited_and_duplicated_automations(prefect_api_url: str) -> None:
    block = unique("chat")
    block_id = CustomWebhookNotificationBlock(name="chat", url="http://127.0.0.1:9/hook").save(block)
    setup(notify_block=f"custom-webhook/{block}", work_pool=unique("homelab"))

    async def tamper() -> None:
        async with get_client() as client:
            [failure] = await client.read_automations_by_name(notifications.FAILURE)
            edited = AutomationCore(**{**failure.model_dump(exclude={"id", "owner_resource"}),
                                       "description": "edited by hand"})
            await client.update_automation(failure.id, edited)
            [drift] = await client.read_automations_by_name(notifications.DRIFT)
            await client.create_automation(AutomationCore(**drift.model_dump(exclude={"id", "owner_resource"})))
    run(tamper())

    changes = {(c.name, c.action) for c in setup(notify_block=block, work_pool=unique("homelab"))
               if c.kind == "automation"}
    assert (notifications.FAILURE, "updated") in changes
    assert (notifications.DRIFT, "removed") in changes
    assert (notifications.APPROVAL, "unchanged") in changes

    async def read_all() -> dict[str, list[Any]]:
        async with get_client() as client:
            return {n: await client.read_automations_by_name(n) for n in notifications.NAMES}
    stored = run(read_all())
    assert all(len(v) == 1 for v in stored.values())
    assert stored[notifications.FAILURE][0].description != "edited by hand"
    assert all(a.actions[0].block_document_id == block_id for v in stored.values() for a in v)
