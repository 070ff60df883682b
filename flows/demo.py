"""`homelab demo`: the whole loop on a simulated homelab, in a few minutes, leaving nothing running.

drift-check (finds m720q one Talos patch behind) → talos-upgrade (its approval answered here, as an
operator would with `homelab approve`) → flux-reconcile, each against the simulated homelab and a
Prefect server (the configured one, else Prefect's own temporary server).
"""

from __future__ import annotations

import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from flows import _runtime

DEMO_BLOCK = "demo"


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        typer.echo(f"[{time.monotonic() - self.t0:6.1f}s] {text}")


def _paused_run_id(since: datetime, deadline: float) -> str:
    """The talos-upgrade run waiting for approval (started by this demo)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["talos-upgrade"])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
                    start_time=FlowRunFilterStartTime(after_=since)),  # type: ignore[arg-type]  # a datetime is what it takes
            )
            if runs:
                return str(runs[0].id)
            time.sleep(0.25)  # the run pauses within seconds; the server offers no wait for a state
    raise TimeoutError("the talos-upgrade run did not pause for approval within its deadline")


def run_demo() -> int:
    _runtime.quiet_prefect()
    say = Progress().say
    from flows.approval import approve
    from flows.drift_check import drift_check
    from flows.drift_check import failed_result as drift_failed
    from flows.drift_check import summary as drift_summary
    from flows.flux_reconcile import failed_result as flux_failed
    from flows.flux_reconcile import flux_reconcile
    from flows.flux_reconcile import summary as flux_summary
    from flows.talos_upgrade import failed_result as talos_failed
    from flows.talos_upgrade import talos_upgrade
    from homelab.cli_upgrade import summary as talos_summary
    from twin import Twin
    from twin.register import homelab_block
    from twin.state import Knobs

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="homelab-demo-") as tmp:
        say("starting the simulated homelab (m720q: 3 Talos nodes at v1.11.4, Rook Ceph simulated; homelab: Proxmox)")
        knobs = Knobs(reboot_seconds=3.0, recovery_seconds=1.5, flux_delay_seconds=0.5)
        with Twin(_runtime.bundled_tree(), Path(tmp) / "twin", state="pre-upgrade", knobs=knobs) as sim:
            say(f"simulated homelab up in {sim.started_seconds:.1f}s; connecting to Prefect (a temporary server "
                "starts when none is configured)")
            homelab_block(sim).save(DEMO_BLOCK, overwrite=True)

            say("1/3 drift-check: the tree at the git head against the live homelab")
            results["drift"] = _runtime.result_of(drift_check(homelab=DEMO_BLOCK, return_state=True), drift_failed)
            typer.echo(drift_summary(results["drift"]))

            say("2/3 talos-upgrade m720q: plan, approval, then one node at a time behind the gates")
            since = datetime.now(UTC)
            box: dict[str, Any] = {}
            runner = threading.Thread(target=lambda: box.update(state=talos_upgrade(
                homelab=DEMO_BLOCK, cluster="m720q", require_approval=True,
                snapshot_dir=str(Path(tmp) / "etcd-snapshots"), return_state=True)), daemon=True)
            runner.start()
            run_id = _paused_run_id(since, time.monotonic() + 120)
            say(f"   run {run_id} waits for approval; answering as `homelab approve {run_id}` would")
            approve(run_id, comment="approved by homelab demo")
            runner.join(timeout=600)
            if runner.is_alive() or "state" not in box:
                say("talos-upgrade did not finish within 10 minutes")
                return 1
            results["upgrade"] = _runtime.result_of(box["state"], talos_failed)
            typer.echo(talos_summary(results["upgrade"]))

            say("3/3 flux-reconcile m720q: every Kustomization in dependsOn order, with its GitRepository")
            results["reconcile"] = _runtime.result_of(
                flux_reconcile(homelab=DEMO_BLOCK, cluster="m720q", return_state=True), flux_failed)
            typer.echo(flux_summary(results["reconcile"]))
            say("stopping the simulated homelab")
        ok = (results["drift"].get("status") in ("clean", "drifted")
              and results["upgrade"].get("status") == "completed"
              and results["reconcile"].get("status") == "completed")
    say("done" if ok else "done, with failures (see above)")
    typer.echo(
        "\nThe runs, their logs and artifacts are in the Prefect server's database. To look at them:\n"
        "  prefect server start        # then open http://127.0.0.1:4200\n"
        "  Runs: drift-check, talos-upgrade, flux-reconcile.  Artifacts: drift-check (the drift report),\n"
        "  talos-upgrade-plan-m720q / talos-upgrade-outcome-m720q (tables) and the upgrade's progress bar,\n"
        "  flux-reconcile-m720q (the reconcile table)."
    )
    return 0 if ok else 1
