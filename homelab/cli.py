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
    block: Annotated[str, typer.Option("--block", help="Webhook block holding the secret "
                                                         "(HOMELAB_WEBHOOK_SECRET wins when set).")] = "default",
) -> None:
    """Receive git push webhooks (GitHub, Gitea, Forgejo) and turn them into Prefect events."""
    from deployments.webhook import serve

    serve(host=host, port=port, block=block)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
