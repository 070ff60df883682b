"""Flow run names that say what a run does and where (`drift-check all`, `flux-reconcile m720q`,
`talos-upgrade m720q dry-run`), instead of Prefect's random two words: the UI's run list reads as a log."""

from __future__ import annotations

from collections.abc import Callable


def run_name(flow: str, where: str = "cluster", everywhere: str = "default-cluster",
             flags: tuple[str, ...] = ("dry_run", "plan_only")) -> Callable[[], str]:
    """A flow_run_name callable: the flow, the parameter `where` (or `everywhere` when it is empty) and
    the name of each true boolean parameter among `flags` (dry_run → dry-run)."""

    def name() -> str:
        from prefect.runtime import flow_run

        p = flow_run.parameters
        words = [flow, str(p.get(where) or everywhere)]
        words += [f.replace("_", "-") for f in flags if p.get(f) is True]
        return " ".join(words)

    return name


def name_after_target(cluster: str) -> None:
    """Put the cluster a run resolved (its block's default when no `cluster` was given) into its name:
    `talos-upgrade default-cluster` becomes `talos-upgrade m720q`. A name is cosmetic: failures are ignored."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    name, run_id = flow_run.name, flow_run.id
    if not name or not run_id or "default-cluster" not in name:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name.replace("default-cluster", cluster, 1))
    except Exception:
        pass
