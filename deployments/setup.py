"""`homelab setup`: what a Prefect server needs before the deployments can run. Idempotent.

- the process work pool `homelab` (disruptive flows run outside the cluster they change);
- the kubernetes work pool `homelab-kubernetes` of m720q's worker, with the base job template of
  deploy/kubernetes/base-job-template.yaml (put back when the pool holds another: the worker, when it
  starts first, creates the pool with prefect-kubernetes' default template);
- the global concurrency limit `homelab-disruption` with exactly one slot, which every disruptive flow
  holds (strictly) while it touches a node: at most one node is disrupted at any instant, across flows;
- the block types of `blocks` (Homelab, Kubernetes, Talos, Ceph, Proxmox, Git, Webhook);
- with a notification block named, the automations of deployments.notifications.

A second run changes nothing: every step reads first and acts only on a difference.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.exceptions import ObjectNotFound

from deployments.notifications import (
    Change,
    NotificationSetupError,
    apply_automations,
    resolve_notification_block,
)

WORK_POOL = "homelab"
WORK_POOL_TYPE = "process"
DISRUPTION_LIMIT = "homelab-disruption"
KUBERNETES_POOL = "homelab-kubernetes"
KUBERNETES_POOL_TYPE = "kubernetes"
# In the checkout `homelab setup` runs from (the process worker runs the deployments from one too).
KUBERNETES_JOB_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy/kubernetes/base-job-template.yaml"


class SetupError(Exception):
    """Set-up found something it must not overwrite; the message says what and what to do."""


async def ensure_work_pool(client: PrefectClient, name: str = WORK_POOL) -> Change:
    try:
        pool = await client.read_work_pool(name)
    except ObjectNotFound:
        from prefect.workers.process import ProcessWorker

        # The template comes from the installed worker: the server would otherwise look it up online.
        template = ProcessWorker.get_default_base_job_template()
        await client.create_work_pool(WorkPoolCreate(
            name=name, type=WORK_POOL_TYPE, base_job_template=template,
            description="Runs the homelab flows as local processes, outside the clusters they change."))
        return Change("work pool", name, "created", WORK_POOL_TYPE)
    if pool.type != WORK_POOL_TYPE:
        raise SetupError(
            f"work pool {name}: expected type {WORK_POOL_TYPE!r}, found {pool.type!r}; the disruptive deployments "
            f"must run outside the cluster they change. Delete it (`prefect work-pool delete {name}`) "
            f"and run `homelab setup` again, or point the deployments at a process pool of another name")
    return Change("work pool", name, "unchanged", pool.type)


def kubernetes_job_template(path: Path = KUBERNETES_JOB_TEMPLATE) -> dict[str, Any]:
    try:
        template = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SetupError(f"{path}: cannot read the kubernetes pool's base job template ({e.strerror}); "
                         f"run `homelab setup` from a checkout of the repository") from None
    return {"job_configuration": template["job_configuration"], "variables": template["variables"]}


async def ensure_kubernetes_pool(client: PrefectClient, name: str = KUBERNETES_POOL) -> Change:
    """The in-cluster pool with this repository's job template. The template is compared as a whole: an
    edit made in the UI is put back, since the Job's talosctl checksum and mounts live there."""
    template = kubernetes_job_template()
    try:
        pool = await client.read_work_pool(name)
    except ObjectNotFound:
        await client.create_work_pool(WorkPoolCreate(
            name=name, type=KUBERNETES_POOL_TYPE, base_job_template=template,
            description="m720q's kubernetes worker: read-only and Flux flows only, as Jobs in namespace prefect."))
        return Change("work pool", name, "created", KUBERNETES_POOL_TYPE)
    if pool.type != KUBERNETES_POOL_TYPE:
        raise SetupError(
            f"work pool {name}: expected type {KUBERNETES_POOL_TYPE!r}, found {pool.type!r}; m720q's worker "
            f"serves it as a kubernetes pool. Delete it (`prefect work-pool delete {name}`) and run "
            f"`homelab setup` again")
    if pool.base_job_template == template:
        return Change("work pool", name, "unchanged", KUBERNETES_POOL_TYPE)
    await client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
    return Change("work pool", name, "updated", "base job template of deploy/kubernetes/base-job-template.yaml")


async def ensure_disruption_limit(client: PrefectClient, name: str = DISRUPTION_LIMIT) -> Change:
    try:
        limit = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
        return Change("concurrency limit", name, "created", "limit 1")
    if limit.limit == 1 and limit.active:
        return Change("concurrency limit", name, "unchanged", "limit 1")
    # An inactive limit lets every run through: no lock at all.
    await client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))
    was = f"limit {limit.limit}{'' if limit.active else ', inactive'}"
    return Change("concurrency limit", name, "updated", f"{was} → limit 1, active")


async def ensure_block_types(client: PrefectClient) -> list[Change]:
    import blocks

    changes = []
    for block in blocks.ALL_BLOCKS:
        slug = block.get_block_type_slug()
        checksum = block._calculate_schema_checksum()
        try:
            await client.read_block_schema_by_checksum(checksum, version=block.get_block_schema_version())
            known = True
        except ObjectNotFound:
            known = False
        if known:
            try:
                block_type = await client.read_block_type_by_slug(slug)
                # A new description or documentation link of the same schema still needs registering.
                known = (block_type.description, block_type.documentation_url) == (
                    block.get_description(), block._documentation_url)
            except ObjectNotFound:
                known = False
        if known:
            changes.append(Change("block type", slug, "unchanged"))
            continue
        await block.aregister_type_and_schema(client=client)
        changes.append(Change("block type", slug, "registered"))
    return changes


async def asetup(notify_block: str | None = None, *, work_pool: str = WORK_POOL,
                 limit_name: str = DISRUPTION_LIMIT, kubernetes_pool: str = KUBERNETES_POOL) -> list[Change]:
    """Bring the Prefect server at PREFECT_API_URL to the state the deployments need; returns what it did."""
    async with get_client() as client:
        changes = [await ensure_work_pool(client, work_pool), await ensure_disruption_limit(client, limit_name)]
        changes += await ensure_block_types(client)
        changes.append(await ensure_kubernetes_pool(client, kubernetes_pool))
        if notify_block:
            block_id = await resolve_notification_block(client, notify_block)
            changes += await apply_automations(client, block_id)
    return changes


def setup(notify_block: str | None = None, *, work_pool: str = WORK_POOL,
          limit_name: str = DISRUPTION_LIMIT, kubernetes_pool: str = KUBERNETES_POOL) -> list[Change]:
    """Synchronous `asetup`, for the command line and scripts."""
    return asyncio.run(asetup(notify_block, work_pool=work_pool, limit_name=limit_name,
                              kubernetes_pool=kubernetes_pool))


def cli(notify_block: str | None, work_pool: str = WORK_POOL) -> int:
    """`homelab setup [--notify BLOCK]`: print one line per object; exit 0 done, 1 the server refused or is
    unreachable, 2 a configuration the operator must fix (a wrong pool type, an unusable block)."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value() or "(ephemeral server: set PREFECT_API_URL to configure a real one)"
    try:
        changes = setup(notify_block, work_pool=work_pool)
    except (SetupError, NotificationSetupError) as e:
        print(f"homelab setup: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the server's own words: unreachable, refused
        print(f"homelab setup: the Prefect API at {api} failed: {type(e).__name__}: {e}; "
              f"check PREFECT_API_URL and that the server is running", file=sys.stderr)
        return 1
    for c in changes:
        print(c)
    changed = sum(c.action != "unchanged" for c in changes)
    print(f"{api}: {changed} change(s)" if changed else f"{api}: already set up, nothing changed")
    return 0
