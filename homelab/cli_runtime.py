"""What every `homelab <command>` shares: the target homelab (a saved block, or the twin for one
command), the result as one JSON line, and the exit codes (0 done, 1 failed or refused, 2 bad usage
or configuration). Command-line code only: the flows never import it."""

from __future__ import annotations

import contextlib
import contextvars
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from flows._runtime import bundled_tree
from homelab.problems import ConfigError

TWIN_BLOCK = "twin"


# `--monitoring` of the command running now: every --twin command takes it, and sets it around its body.
TWIN_MONITORING: contextvars.ContextVar[str] = contextvars.ContextVar("twin_monitoring", default="none")


@contextlib.contextmanager
def twin_monitoring(kind: str) -> Iterator[None]:
    """`--monitoring none|real` for the twin the command starts (checked: a bad value is bad usage)."""
    if kind not in ("none", "real"):
        raise typer.BadParameter(f"--monitoring takes none or real, got {kind!r}")
    token = TWIN_MONITORING.set(kind)
    try:
        yield
    finally:
        TWIN_MONITORING.reset(token)


@contextlib.contextmanager
def target(homelab: str, twin: bool, twin_state: str = "pre-upgrade", faults: list[str] | None = None,
           ceph: str = "sim", reboot_seconds: float | None = None) -> Iterator[str]:
    """The name of the Homelab block a flow should use; with `twin`, a simulated homelab started for
    this one command, registered as the block `twin`, and torn down afterwards."""
    if not twin:
        yield homelab
        return
    from twin import Twin
    from twin.register import homelab_block
    from twin.state import Knobs

    knobs = Knobs() if reboot_seconds is None else Knobs(reboot_seconds=reboot_seconds)
    with tempfile.TemporaryDirectory(prefix="homelab-twin-") as tmp:
        try:
            sim = Twin(bundled_tree(), Path(tmp), state=twin_state, faults=list(faults or []), knobs=knobs, ceph=ceph,
                       monitoring=TWIN_MONITORING.get())
        except ValueError as e:  # a bad --fault or --twin-state
            raise typer.BadParameter(str(e)) from None
        with sim:
            homelab_block(sim).save(TWIN_BLOCK, overwrite=True)
            yield TWIN_BLOCK


def finish(result: dict[str, Any], as_json: bool, summary: Callable[[dict[str, Any]], str],
           ok: tuple[str, ...]) -> None:
    """Print the result (a summary, or one JSON object on the last line) and exit 0 or 1."""
    if as_json:
        typer.echo(json.dumps(result, default=str))
    else:
        typer.echo(summary(result))
    raise typer.Exit(0 if result.get("status") in ok else 1)


def config_errors_exit_2(fn: Callable[[], None]) -> None:
    """Bad configuration exits 2 with its problem lines; everything else propagates."""
    try:
        fn()
    except ConfigError as e:
        for p in e.problems:
            typer.echo(str(p), err=True)
        raise typer.Exit(2) from None
