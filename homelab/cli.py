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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
