"""`homelab twin up`: run the simulated homelab until SIGINT/SIGTERM."""

from __future__ import annotations

from pathlib import Path

import typer

twin_app = typer.Typer(help="The simulated homelab.", no_args_is_help=True)


@twin_app.callback()
def _group() -> None:
    """The simulated homelab: the m720q and homelab clusters on 127.0.0.1."""


@twin_app.command("up")
def up(
    dir: Path | None = typer.Option(None, "--dir", help="Directory for kubeconfig, talosconfig, env, bin/ (default: a new temp dir)."),  # noqa: A002
    twin_state: str = typer.Option("pre-upgrade", "--twin-state", help="pre-upgrade | synced"),
    fault: list[str] = typer.Option([], "--fault", help="NAME=ARG, repeatable (e.g. upgrade-fails=m720q-2)."),
    reboot_seconds: float = typer.Option(3.0, "--reboot-seconds", help="Seconds a node takes to reboot."),
    recovery_seconds: float = typer.Option(2.0, "--recovery-seconds", help="Seconds Ceph PGs take to recover."),
    flux_delay_seconds: float = typer.Option(0.5, "--flux-delay-seconds", help="Seconds a Flux reconcile takes."),
    ceph: str = typer.Option("sim", "--ceph", help="sim | real (a throw-away cluster of the Debian Ceph daemons)."),
    monitoring: str = typer.Option("none", "--monitoring", help="none | real (Debian's Prometheus and Alertmanager "
                                                                "scraping the simulated homelab)."),
    tree: Path = typer.Option(Path("k8s"), "--tree", help="The GitOps tree to simulate."),
) -> None:
    """Run the simulated homelab until interrupted; print how to use it."""
    import signal
    import tempfile
    import threading

    from twin import Knobs, Twin

    workdir = dir or Path(tempfile.mkdtemp(prefix="homelab-twin-"))
    try:
        if monitoring not in ("none", "real"):
            raise ValueError(f"--monitoring takes none or real, got {monitoring!r}")
        twin = Twin(tree, workdir, state=twin_state, faults=fault, ceph=ceph, monitoring=monitoring,
                    knobs=Knobs(reboot_seconds=reboot_seconds, recovery_seconds=recovery_seconds,
                                flux_delay_seconds=flux_delay_seconds))
    except ValueError as e:
        typer.echo(f"homelab twin up: {e}", err=True)
        raise typer.Exit(2) from None
    done = threading.Event()
    starting = [True]

    def on_signal(signum: int, frame: object) -> None:
        done.set()
        if starting[0]:
            # Real Ceph takes many seconds to come up: a signal then aborts the start, and
            # Twin.start() stops whatever it had started before re-raising.
            starting[0] = False
            raise KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if ceph == "real":
        typer.echo(f"starting a real Ceph cluster in {workdir / 'ceph'} (about 15 s) ...", err=True)
    try:
        twin.start()
        starting[0] = False
    except KeyboardInterrupt:
        twin.stop()  # again: the signal may have come just after start() returned
        typer.echo("homelab twin up: interrupted while starting; everything it started is stopped", err=True)
        raise typer.Exit(130) from None
    except Exception as e:
        typer.echo(f"homelab twin up: the simulated homelab did not start: {e}", err=True)
        raise typer.Exit(1) from None
    try:
        typer.echo(f"simulated homelab running in {workdir} (started in {twin.started_seconds:.2f} s)")
        if ceph == "real":
            typer.echo(f"  real Ceph: HEALTH_OK, every PG active+clean after {twin.ceph_start_seconds:.2f} s "
                       f"(CEPH_CONF={twin.ceph.conf})")
        typer.echo(f"  kube API: {', '.join(f'{n} {s.url}' for n, s in twin.kube.items())}")
        if twin.monitoring is not None:
            typer.echo(f"  Prometheus: {twin.monitoring.prometheus_url}  Alertmanager: "
                       f"{twin.monitoring.alertmanager_url} (watching {twin.monitoring_cluster}; "
                       f"--fault alert-firing=<name> adds a firing alert)")
        if twin.proxmox is not None:
            typer.echo(f"  Proxmox API: {twin.proxmox.url}")
        typer.echo("use it from another shell:")
        typer.echo(f"  . {workdir}/env && kubectl get nodes && talosctl -n 10.42.0.101 version --json && ceph status -f json")
        typer.echo("stop with Ctrl-C")
        while not done.wait(3600):
            pass
    finally:
        typer.echo("stopping the simulated homelab ...")
        twin.stop()
    typer.echo("stopped")
