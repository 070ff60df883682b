"""`homelab upgrade talos|kubernetes`: the upgrade flows run from the command line, their results rendered.

Command-line code: the flows never import it. typer is imported only here and in homelab.cli_runtime.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from flows._upgrade import MaintenanceWindow, failed_result, state_result
from homelab import cli_runtime
from homelab.window import Window, WindowError


def summary(res: dict[str, Any]) -> str:
    """A Talos upgrade's result for a terminal."""
    lines = [f"Talos upgrade to {res.get('target_version')}: {res['status']}"]
    for n in res.get("nodes") or []:
        lines.append(f"  {n['name']:<20} {n['from']} -> {n['to']}  {n['action']}  {n['seconds']:.1f}s")
    if res.get("plan"):
        for s in res["plan"]["steps"]:
            if s["argv"]:
                lines.append("  $ " + shlex.join(s["argv"]) + (f"   # {s['reason']}" if s.get("reason") else ""))
    lines.append(f"  max disrupted at once: {res.get('max_disrupted')}; noout: {res.get('noout')}; "
                 f"etcd snapshot: {res.get('etcd_snapshot') or '-'}")
    if res.get("silences"):
        states = sorted({x["state"] for x in res["silences"]})
        lines.append(f"  Alertmanager silences: {len(res['silences'])} made, {', '.join(states)}")
    if res.get("error"):
        lines.append(f"  {res['error']}")
    return "\n".join(lines)


def kubernetes_summary(res: dict[str, Any]) -> str:
    """A Kubernetes upgrade's result for a terminal."""
    lines = [f"Kubernetes upgrade to {res.get('target_version')}: {res['status']}"]
    for n in res.get("nodes") or []:
        lines.append(f"  {n['name']:<20} kubelet {n['from']} -> {n['to']}  {n['action']}")
    if res.get("plan"):
        lines.append("  $ " + shlex.join(res["plan"]["dry_run_argv"]) + "   (passed)")
        lines.append("  $ " + shlex.join(res["plan"]["argv"]))
    lines.append(f"  etcd snapshot: {res.get('etcd_snapshot') or '-'}")
    if res.get("error"):
        lines.append(f"  {res['error']}")
    return "\n".join(lines)


def build_window(window: str | None, window_hours: float, tz: str) -> MaintenanceWindow | None:
    if not window:
        return None
    try:
        Window(window, window_hours, tz)
    except WindowError as e:
        import typer

        raise typer.BadParameter(str(e), param_hint="--window") from None
    return MaintenanceWindow(cron=window, hours=window_hours, timezone=tz)


def upgrade_cli(run: Callable[..., Any], params: dict[str, Any], render: Callable[[dict[str, Any]], str], *,
                question: str, homelab: str, window: str | None, window_hours: float, tz: str, dry_run: bool,
                yes: bool, twin: bool, twin_state: str, fault: list[str] | None, json_output: bool) -> None:
    """`homelab upgrade talos|kubernetes`: `run` (the upgrade flow) with `params` on the target homelab,
    its result printed by `render` (or as JSON).
    Without --yes and without a Prefect server to hold the approval form, the plan (a dry run) is shown
    and the question asked on the terminal first. Exit 0 completed/planned/deferred, 1 failed or not
    approved, 2 bad usage or configuration."""
    import typer
    from prefect.exceptions import TerminationSignal

    from flows import _runtime
    from flows._guard import last_result
    from homelab.problems import ConfigError

    _runtime.quiet_prefect()
    mw = build_window(window, window_hours, tz)

    def go() -> None:
        with cli_runtime.target(homelab, twin, twin_state, list(fault or [])) as block_name:
            common = dict(params, homelab=block_name, window=mw)
            approval = not yes
            if not dry_run and not yes and not _runtime.prefect_server_configured():
                planned = state_result(run(**common, dry_run=True, return_state=True))
                if planned["status"] != "planned":
                    cli_runtime.finish(planned, json_output, render, ok=("completed", "deferred"))
                typer.echo(render(planned), err=True)
                if not typer.confirm(question, err=True):
                    typer.echo("not approved; nothing was changed", err=True)
                    raise typer.Exit(1)
                approval = False
            try:
                state = run(**common, dry_run=dry_run, require_approval=approval, return_state=True)
                res = state_result(state)
            except (Exception, TerminationSignal, KeyboardInterrupt) as e:
                if isinstance(e, ConfigError):
                    raise
                # The run could not report its end to the server (or was stopped outside its own body):
                # what the flow last concluded is still the truth about noout.
                res = _runtime.interrupted_result(e, last_result(), failed_result)
            cli_runtime.finish(res, json_output, render, ok=("completed", "planned", "deferred"))

    with _runtime.sigterm_raises():
        cli_runtime.config_errors_exit_2(go)
