"""What every `homelab <command>` shares: the target homelab (a saved block, or the twin for one
command), the result as one JSON line, and the exit codes (0 done, 1 failed or refused, 2 bad usage
or configuration)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from homelab.problems import ConfigError

TWIN_BLOCK = "twin"


class FlowFailed(RuntimeError):
    """A run that stopped; `result` is the flow's result dict (status failed) for the caller to report."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def bundled_tree() -> Path:
    """The GitOps tree the twin is seeded from: ./k8s when run inside a homelab repository,
    else the example tree shipped beside the package."""
    here = Path.cwd() / "k8s"
    if (here / "clusters").is_dir():
        return here
    return Path(__file__).resolve().parents[1] / "k8s"


def quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def prefect_server_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


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


def result_of(state: Any, failed: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The result dict of a flow's final state: the return value of a completed run, the dict a failed
    run carries (a FlowFailed's `result`, or a Failed state's data), else `failed(<what went wrong>)`.
    Bad configuration is re-raised: it is the operator's to fix (exit 2), not a failed run."""
    if state.is_completed():
        return dict(state.result())
    data = state.result(raise_on_failure=False)
    if isinstance(data, FlowFailed):
        return data.result
    if isinstance(data, dict):
        return data
    if isinstance(data, ConfigError):
        raise data
    return failed(f"{type(data).__name__}: {data}" if isinstance(data, BaseException) else str(state.message))


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM (a process-group kill, a container stop) raises Prefect's TerminationSignal, as it does
    inside a flow run, so the command ends through the same path, with its JSON line and no traceback."""
    import signal

    from prefect.exceptions import TerminationSignal

    def raise_termination(signum: int, frame: Any) -> None:
        raise TerminationSignal(signal=signum)

    try:
        previous = signal.signal(signal.SIGTERM, raise_termination)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_result(error: BaseException, last: dict[str, Any] | None,
                       failed: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The result to print when the flow call itself raised: the flow's own last word if it got that
    far, else a failed (or, for a signal, cancelled) result naming what stopped it."""
    from prefect.exceptions import TerminationSignal

    stopped = isinstance(error, TerminationSignal | KeyboardInterrupt)
    if last is not None and last.get("status") in ("failed", "cancelled", "completed"):
        return last
    res = failed(f"stopped by {'a signal' if stopped else type(error).__name__}: {error}"
                 + ("; nothing more was started" if stopped else ""))
    if stopped:
        res["status"] = "cancelled"
    if last is not None and last.get("noout"):
        res["noout"] = last["noout"]
    return res


def config_errors_exit_2(fn: Callable[[], None]) -> None:
    """Bad configuration exits 2 with its problem lines; everything else propagates."""
    try:
        fn()
    except ConfigError as e:
        for p in e.problems:
            typer.echo(str(p), err=True)
        raise typer.Exit(2) from None
