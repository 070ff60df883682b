"""What the flows share with the command line that runs them, without the command line: the result
dict of a finished run, the tree the twin is seeded from, Prefect's quiet settings, SIGTERM as a
TerminationSignal. The command-line parts (typer, the twin started for one command, printing and exit
codes) live in homelab.cli_runtime; the few names the older flow modules' CLI functions reach through
this module are forwarded there when they are used, so importing a flow imports neither typer nor the twin."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from homelab.problems import ConfigError

_CLI_NAMES = ("TWIN_BLOCK", "TWIN_MONITORING", "twin_monitoring", "target", "finish", "config_errors_exit_2")


def __getattr__(name: str) -> Any:
    if name in _CLI_NAMES:
        from homelab import cli_runtime

        return getattr(cli_runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    # Quiet the terminal only: the run's INFO narrative (every task's start and end, each gate's
    # verdict) still goes to the server, where the UI shows it.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # Prefect configured its logging when it was imported, before this ran: apply the change.
    from prefect.logging.configuration import setup_logging

    setup_logging(incremental=True)


def prefect_server_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


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
