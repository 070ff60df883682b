"""The `homelab` command line. Exit codes: 0 done, 1 the flow failed or refused, 2 bad usage or configuration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Day-2 operations of the homelab as Prefect flows.")


@app.callback()
def _root() -> None:
    """Day-2 operations of the homelab as Prefect flows."""


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="The GitOps tree (the k8s/ folder).")] = Path("k8s"),
) -> None:
    """Validate the GitOps tree: exit 0 when valid, else 1 with `file: field: message` lines."""
    from homelab.validate import validate as run

    if not path.is_dir():
        typer.echo(f"homelab validate: {path}: no such directory (give the path of the k8s/ tree)", err=True)
        raise typer.Exit(2)
    problems = run(path, str(path).rstrip("/") or ".")
    for p in problems:
        typer.echo(str(p))
    # Warnings never change the exit code: the example's values are valid, only not yours.
    from homelab.ownership import ownership_warnings

    for w in ownership_warnings(path, str(path).rstrip("/") or "."):
        typer.echo(w)
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {path}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}: valid")


@app.command()
def approve(
    run_id: Annotated[str, typer.Argument(help="The id of the flow run waiting for approval.")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject the plan instead; the run ends Failed.")] = False,
    comment: Annotated[str, typer.Option("--comment", help="Why, for the record.")] = "",
) -> None:
    """Approve (or reject) a run that waits for approval on the Prefect server."""
    from uuid import UUID

    try:
        UUID(run_id)
    except ValueError:
        typer.echo(f"homelab approve: {run_id!r} is not a flow run id", err=True)
        raise typer.Exit(2) from None
    from prefect.exceptions import ObjectNotFound

    from flows.approval import approve as resume

    try:
        resume(run_id, reject=reject, comment=comment)
    except ObjectNotFound:
        typer.echo(f"homelab approve: no flow run {run_id} on this Prefect server", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # NotPausedError, a rejected resume: the server's own words
        typer.echo(f"homelab approve: run {run_id} cannot be resumed: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"run {run_id} {'rejected' if reject else 'approved'}")

# --- flows ------------------------------------------------------------------------------------
# Options every flow command shares. Flow modules are imported inside the commands so that
# `homelab --help` and `homelab validate` stay fast and need no Prefect server.

HomelabOpt = Annotated[str, typer.Option("--homelab", help="The Homelab block to use (ignored with --twin).")]
TwinOpt = Annotated[bool, typer.Option("--twin", help="Run against a simulated homelab started for this command.")]
TwinStateOpt = Annotated[str, typer.Option("--twin-state", help="The simulated homelab's state: pre-upgrade | synced.")]
FaultOpt = Annotated[list[str] | None, typer.Option("--fault", help="Fault for the simulated homelab, NAME=ARG; repeatable.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on the last line.")]
MonitoringOpt = Annotated[str, typer.Option("--monitoring", help="With --twin: none, or real (a real Prometheus and "
                                                                 "Alertmanager beside the simulated homelab).")]
WindowOpt = Annotated[str | None, typer.Option("--window", help="Maintenance window start, a cron expression.")]
WindowHoursOpt = Annotated[float, typer.Option("--window-hours", help="Maintenance window length in hours.")]
TzOpt = Annotated[str, typer.Option("--tz", help="Time zone of the maintenance window (IANA name).")]
NowOpt = Annotated[bool, typer.Option("--now", help="Run now even outside the maintenance window.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan and the commands; change nothing.")]
YesOpt = Annotated[bool, typer.Option("--yes", help="Approve the plan without asking.")]

upgrade_app = typer.Typer(no_args_is_help=True, help="Rolling upgrades, one node at a time, behind the safety gates.")
app.add_typer(upgrade_app, name="upgrade")


@upgrade_app.command("talos")
def upgrade_talos(
    homelab: HomelabOpt = "default",
    cluster: Annotated[str | None, typer.Option("--cluster", help="Cluster to upgrade (default: the block's).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Target Talos version (default: talconfig's talosVersion).")] = None,
    node: Annotated[list[str] | None, typer.Option("--node", help="Only this node (repeatable; default all).")] = None,
    reboot_mode: Annotated[str, typer.Option("--reboot-mode", help="talosctl upgrade --reboot-mode: default (kexec) "
                                             "or powercycle.")] = "default",
    stage: Annotated[bool, typer.Option("--stage", help="talosctl upgrade --stage: reboot at once without a drain; "
                                        "the installer runs at the next boot.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="talosctl upgrade --debug: its report and the node's console "
                                        "go into the run's logs.")] = False,
    allow_extension_removal: Annotated[bool, typer.Option(
        "--allow-extension-removal", help="Allow an installer image without an extension a node runs now.")] = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    window: WindowOpt = None,
    window_hours: WindowHoursOpt = 4.0,
    tz: TzOpt = "UTC",
    now: NowOpt = False,
    twin: TwinOpt = False,
    twin_state: TwinStateOpt = "pre-upgrade",
    fault: FaultOpt = None,
    monitoring: MonitoringOpt = "none",
    json_output: JsonOpt = False,
) -> None:
    """Upgrade Talos node by node: gates, approval, one global lock, resumable."""
    from flows.talos_upgrade import talos_upgrade
    from homelab.cli_runtime import twin_monitoring
    from homelab.cli_upgrade import summary, upgrade_cli

    if reboot_mode not in ("default", "powercycle"):
        raise typer.BadParameter(f"takes default or powercycle, got {reboot_mode!r}", param_hint="--reboot-mode")
    with twin_monitoring(monitoring):
        upgrade_cli(talos_upgrade, dict(cluster=cluster, to=to, nodes=list(node) if node else None, run_now=now,
                                        reboot_mode=reboot_mode, stage=stage, debug=debug,
                                        allow_extension_removal=allow_extension_removal),
                    summary, question="Upgrade these nodes?", homelab=homelab, window=window,
                    window_hours=window_hours, tz=tz, dry_run=dry_run, yes=yes, twin=twin, twin_state=twin_state,
                    fault=fault, json_output=json_output)


@upgrade_app.command("kubernetes")
def upgrade_kubernetes(
    homelab: HomelabOpt = "default",
    cluster: Annotated[str | None, typer.Option("--cluster", help="Cluster to upgrade (default: the block's).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Target Kubernetes version (default: kubernetesVersion).")] = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    window: WindowOpt = None,
    window_hours: WindowHoursOpt = 4.0,
    tz: TzOpt = "UTC",
    now: NowOpt = False,
    twin: TwinOpt = False,
    twin_state: TwinStateOpt = "pre-upgrade",
    fault: FaultOpt = None,
    monitoring: MonitoringOpt = "none",
    json_output: JsonOpt = False,
) -> None:
    """Upgrade Kubernetes with talosctl upgrade-k8s: one minor at a time, behind the same gates."""
    from flows.kubernetes_upgrade import kubernetes_upgrade
    from homelab.cli_runtime import twin_monitoring
    from homelab.cli_upgrade import kubernetes_summary as summary
    from homelab.cli_upgrade import upgrade_cli

    with twin_monitoring(monitoring):
        upgrade_cli(kubernetes_upgrade, dict(cluster=cluster, to=to, run_now=now), summary,
                    question="Upgrade Kubernetes?", homelab=homelab, window=window, window_hours=window_hours, tz=tz,
                    dry_run=dry_run, yes=yes, twin=twin, twin_state=twin_state, fault=fault, json_output=json_output)


@app.command()
def reconcile(
    names: Annotated[list[str] | None, typer.Argument(help="Kustomizations to reconcile.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every Kustomization of the cluster.")] = False,
    no_source: Annotated[bool, typer.Option("--no-source", help="Do not reconcile the sources first.")] = False,
    helmrelease: Annotated[list[str] | None, typer.Option(
        "--helmrelease", help="A HelmRelease to reconcile, NAMESPACE/NAME (repeatable).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="HelmReleases: a one-off install or upgrade, even with retries exhausted.")] = False,
    reset: Annotated[bool, typer.Option("--reset", help="HelmReleases: reset the failure counts.")] = False,
    homelab: HomelabOpt = "default",
    cluster: Annotated[str, typer.Option("--cluster", help="Cluster whose Flux to reconcile.")] = "m720q",
    twin: TwinOpt = False,
    twin_state: TwinStateOpt = "pre-upgrade",
    fault: FaultOpt = None,
    monitoring: MonitoringOpt = "none",
    json_output: JsonOpt = False,
) -> None:
    """Reconcile Flux Kustomizations in dependsOn order, as `flux reconcile ks --with-source` does, and
    HelmReleases as `flux reconcile hr [--force|--reset]` does."""
    from flows.flux_reconcile import cli
    from homelab.cli_runtime import twin_monitoring

    with twin_monitoring(monitoring):
        cli(list(names or []), all_, no_source, homelab, cluster, twin, twin_state, list(fault or []), json_output,
            helmreleases=list(helmrelease or []), force=force, reset=reset)


@app.command()
def provision(
    homelab: HomelabOpt = "default",
    cluster: Annotated[str, typer.Option("--cluster", help="The Proxmox cluster of cluster.yaml.")] = "homelab",
    plan: Annotated[bool, typer.Option("--plan", help="Show the plan; change nothing.")] = False,
    yes: YesOpt = False,
    twin: TwinOpt = False,
    twin_state: TwinStateOpt = "pre-upgrade",
    fault: FaultOpt = None,
    monitoring: MonitoringOpt = "none",
    json_output: JsonOpt = False,
    destroy: Annotated[bool, typer.Option(
        "--destroy", help="Tear the cluster down: stop and delete every VM carrying its marker (plan, approval).")] = False,
    prune: Annotated[bool, typer.Option(
        "--prune", help="Also stop and delete this cluster's VMs that cluster.yaml no longer lists.")] = False,
) -> None:
    """Provision the Proxmox cluster from cluster.yaml: plan, approve, apply, bootstrap."""
    from flows.provision import cli
    from homelab.cli_runtime import twin_monitoring

    with twin_monitoring(monitoring):
        cli(homelab, cluster, plan, yes, twin, twin_state, list(fault or []), json_output, destroy=destroy, prune=prune)


@app.command()
def drift(
    homelab: HomelabOpt = "default",
    cluster: Annotated[str | None, typer.Option("--cluster", help="Only this cluster (default: all).")] = None,
    twin: TwinOpt = False,
    twin_state: TwinStateOpt = "pre-upgrade",
    fault: FaultOpt = None,
    monitoring: MonitoringOpt = "none",
    json_output: JsonOpt = False,
) -> None:
    """Compare the desired state in git with the live homelab (read-only)."""
    from flows.drift_check import cli
    from homelab.cli_runtime import twin_monitoring

    with twin_monitoring(monitoring):
        cli(homelab, cluster, twin, twin_state, list(fault or []), json_output)



@app.command()
def setup(
    notify: Annotated[str | None, typer.Option("--notify", help="Prefect notification block for approvals, "
                                                                "failures and drift (e.g. slack-webhook/ops).")] = None,
) -> None:
    """Idempotent set-up: work pool, the homelab-disruption lock, block types, notifications."""
    from deployments.setup import cli

    raise typer.Exit(cli(notify))


@app.command()
def demo() -> None:
    """Simulated homelab + drift check + Talos rolling upgrade + Flux reconcile, summarised."""
    from flows.demo import run_demo

    raise typer.Exit(run_demo())


def _twin_app() -> typer.Typer:
    from twin.cli import twin_app

    return twin_app


app.add_typer(_twin_app(), name="twin", help="The simulated homelab.")

webhook_app = typer.Typer(no_args_is_help=True, help="The git push webhook receiver.")
app.add_typer(webhook_app, name="webhook")


@webhook_app.command("serve")
def webhook_serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8780,
    block: Annotated[str, typer.Option("--block", help="Webhook and Homelab Git blocks holding the secret and the "
                                                         "repositories (HOMELAB_WEBHOOK_SECRET and "
                                                         "HOMELAB_WEBHOOK_REPOS win when set).")] = "default",
) -> None:
    """Receive git push webhooks (GitHub, Gitea, Forgejo) and turn them into Prefect events."""
    from deployments.webhook import serve

    serve(host=host, port=port, block=block)


@webhook_app.command("relay")
def webhook_relay(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8781,
) -> None:
    """Forward the receiver's push events to Prefect with Prefect's credential, and nothing else
    (PREFECT_API_URL, PREFECT_API_AUTH_STRING, HOMELAB_WEBHOOK_REPOS; docs/security.md)."""
    from deployments.webhook import serve_relay

    serve_relay(host=host, port=port)


@app.command()
def server(
    host: Annotated[str, typer.Option("--host", help="Address the Prefect API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port the Prefect API listens on.")] = 4200,
    home: Annotated[Path | None, typer.Option("--home", help="SQLite database, redis data and logs "
                                                             "(default ~/.local/share/homelab/server).")] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", envvar="HOMELAB_REDIS_URL",
                                                  help="Use this redis (checked) instead of starting one.")] = None,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", envvar="HOMELAB_DATABASE_URL", show_default=False,
        help="postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE instead of SQLite in the home; prefer "
             "the environment variable: a command line is readable by every local user.")] = None,
    repossessor_seconds: Annotated[float, typer.Option("--repossessor-seconds", min=1.0,
                                                       help="How often expired leases are freed.")] = 5.0,
) -> None:
    """A Prefect server configured as the lock needs: leases kept in redis across restarts (docs/server.md)."""
    from deployments.server import ServerError, serve

    try:
        code = serve(host=host, port=port, home=home, redis_url=redis_url, repossessor_seconds=repossessor_seconds,
                     database=database_url)
    except ServerError as e:
        typer.echo(f"homelab server: {e}", err=True)
        raise typer.Exit(e.code) from None
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
