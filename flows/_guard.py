"""What every disruptive flow does around its disruptive calls: hold `homelab-disruption`, and right
before each call prove that it still holds it and that nobody asked to stop the run.

Cancelling a run (the Prefect UI's Cancel, `prefect flow-run cancel ID`) is the emergency stop: a
deployment run is also stopped by its worker (SIGTERM, which the flows turn into the same ending);
a run started from the command line notices at its next checkpoint. Either way nothing disruptive
starts after the request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from homelab.lease import LeaseTiming
from homelab.upgrade import failure_message
from tasks.lock import LOCK_NAME, DisruptionLock, LockBusy, LockLost, LockMisconfigured


class StepFailed(Exception):
    """A gate or step refused: which node, which gate, what was seen last, what to do next."""

    status = "failed"

    def __init__(self, node: str, gate: str, last_seen: str, next_step: str):
        self.node, self.gate, self.last_seen, self.next_step = node, gate, last_seen, next_step
        super().__init__(failure_message(node, gate, last_seen, next_step))


class RunStopped(StepFailed):
    """The run was asked to stop (a cancel, SIGTERM, Ctrl-C): it ends "cancelled", not "failed"."""

    status = "cancelled"


_LAST_RESULT: dict[str, Any] = {}


def remember(result: dict[str, Any]) -> dict[str, Any]:
    """Keep the newest result a flow built in this process, for the command line to print when the
    run's final state cannot reach the server (it was cut off, or stopped by a signal)."""
    _LAST_RESULT.clear()
    _LAST_RESULT.update(result)
    return result


def last_result() -> dict[str, Any] | None:
    return dict(_LAST_RESULT) if _LAST_RESULT else None


def current_flow_run_id() -> UUID | None:
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return UUID(str(run_id)) if run_id else None


def cancel_requested(lock: DisruptionLock | None = None) -> bool:
    """The run's state on the server is Cancelling or Cancelled (somebody pressed Cancel)."""
    from prefect.client.orchestration import get_client

    run_id = current_flow_run_id()
    if run_id is None:
        return False
    try:
        if lock is not None:  # its client is open already: one request
            state = lock.server(lambda c: c.read_flow_run(run_id).state)
        else:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(run_id).state
    except Exception:  # the server is away: the lock's confirmation decides whether to go on
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def interrupted_status(error: BaseException) -> str:
    """ "cancelled" for a stop somebody asked for (a signal, a UI cancel); "failed" otherwise."""
    from prefect.exceptions import TerminationSignal

    if isinstance(error, StepFailed):
        return error.status
    if isinstance(error, TerminationSignal | KeyboardInterrupt) or cancel_requested():
        return "cancelled"
    return "failed"


def describe_interruption(error: BaseException, where: str) -> str:
    from prefect.exceptions import TerminationSignal

    if isinstance(error, TerminationSignal):
        what = "stopped by SIGTERM (a cancel from the Prefect UI, the worker, or the command line)"
    elif isinstance(error, KeyboardInterrupt):
        what = "stopped by an interrupt (Ctrl-C)"
    else:
        what = f"stopped by an unexpected error: {type(error).__name__}: {error}"
    return f"{where}: {what}"


@contextlib.contextmanager
def disruption_lock(timeout_s: float, log: Any, timing: LeaseTiming = LeaseTiming()) -> Iterator[DisruptionLock]:
    """Hold `homelab-disruption` for the block; its renewals run on a thread of their own."""
    lock = DisruptionLock(LOCK_NAME, timing, holder_flow_run=current_flow_run_id(),
                          on_lost=lambda why: log.error(f"the disruption lock is lost: {why}"))
    try:
        try:
            lock.acquire(timeout_s)
        except LockBusy as e:
            raise StepFailed("(all nodes)", "lock", str(e),
                             "wait for that run to finish (Prefect UI: Concurrency, or `prefect gcl inspect "
                             f"{LOCK_NAME}`) and run again; a dead holder's slot comes free within one lease "
                             f"({timing.lease_s:g} s) and one pass of the server's repossessor") from None
        except LockMisconfigured as e:
            raise StepFailed("(all nodes)", "lock", str(e), "fix the limit as said, then run again; nothing was "
                             "changed") from None
        yield lock
    finally:
        lock.release()


def checkpoint(lock: DisruptionLock, node: str, before: str) -> None:
    """Right before a disruptive call: still the lock's holder, and not asked to stop."""
    if cancel_requested(lock):
        raise RunStopped(node, "cancelled", f"the run was cancelled; stopped before {before}",
                         "nothing more is started; run again when you want the work finished: finished nodes "
                         "are not repeated")
    try:
        lock.confirm(before)
    except LockLost as e:
        raise StepFailed(node, "lock lost", str(e),
                         "make sure the worker reaches the Prefect server (and that the server keeps its leases: "
                         "docs/server.md), then run again: finished nodes are not repeated") from None
