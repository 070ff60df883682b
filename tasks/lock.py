"""The `homelab-disruption` lock: one slot of a Prefect global concurrency limit, held through a lease
that this module renews itself.

Why not `prefect.concurrency.sync.concurrency()`: it renews at 75 % of the lease through the client's
own retries (PREFECT_CLIENT_MAX_RETRIES with backoff: about a minute of trying), and with strict=True
a failed renewal cancels the flow's thread — a BaseException in the middle of a disruptive step,
noticed only after the server may have handed the slot to another run. Here every renewal is one
bounded request, ownership is a deadline the holder computes from its own last successful renewal
(homelab/lease.py has the arithmetic), a disruptive call in flight is killed when that deadline
comes, and losing the lock is an ordinary error raised before the next disruptive act.

The server side is Prefect's lease API: POST /v2/concurrency_limits/increment-with-lease (423 with
Retry-After while the slot is taken), POST /v2/concurrency_limits/leases/{id}/renew (410 once the
lease is gone: expired and repossessed, or lost with an in-memory lease storage across a restart),
POST /v2/concurrency_limits/decrement-with-lease (prefect/server/api/concurrency_limits_v2.py).
The server grants every request of an inactive limit and silently skips a missing one, so the limit
is read and checked (present, active, limit 1) before the slot is taken and at every confirmation.
"""

from __future__ import annotations

import contextvars
import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

import httpx

from homelab.lease import LeaseTiming

LOCK_NAME = "homelab-disruption"
T = TypeVar("T")


class LockError(Exception):
    """Base of the lock's errors; ``retryable`` says whether running again later can help."""

    retryable = False


class LockBusy(LockError):
    """Another run held the slot for the whole wait."""

    retryable = True


class LockMisconfigured(LockError):
    """The limit is missing, inactive or not a limit of 1: the lock would not exclude anyone."""


class LockLost(LockError):
    """This run no longer holds the lock (or cannot prove it in time): it must not act again."""


def _transient(error: BaseException) -> bool:
    """An answer a retry can change: no connection, a timeout, 429 or a 5xx (a busy database)."""
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(error, PrefectHTTPStatusError):
        return error.response.status_code == 429 or error.response.status_code >= 500
    return isinstance(error, httpx.HTTPError | OSError)


def fix_command(name: str = LOCK_NAME) -> str:
    return f"`homelab setup` (or `prefect gcl update {name} --enable --limit 1`)"


def check_limit(limit: Any, name: str = LOCK_NAME) -> None:
    """Refuse a limit that would not exclude a second holder."""
    if not limit.active:
        raise LockMisconfigured(f"the global concurrency limit {name} is inactive: Prefect grants every request "
                                f"of an inactive limit, so it would not keep two disruptive runs apart; "
                                f"enable it with {fix_command(name)}")
    if limit.limit != 1:
        raise LockMisconfigured(f"the global concurrency limit {name} has limit {limit.limit}, not 1: "
                                f"{limit.limit} runs could disrupt nodes at once; set it with {fix_command(name)}")


def _enter_no_client_retries() -> None:
    """One request is one attempt: the lease's deadline, not the client's backoff, decides. Entered in
    the lock's private context, which lives as long as the lock: nothing to exit."""
    import prefect.context
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

    current = prefect.context.get_settings_context()
    settings = current.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})
    prefect.context.SettingsContext(profile=current.profile, settings=settings).__enter__()


class DisruptionLock:
    """Hold the slot of `name` for this run; `confirm()` before every disruptive call; `abort` is set the
    moment ownership runs out, for the call in flight to be killed."""

    def __init__(self, name: str = LOCK_NAME, timing: LeaseTiming = LeaseTiming(),
                 holder_flow_run: UUID | None = None, clock: Callable[[], float] = time.monotonic,
                 poll_s: float = 1.0, on_lost: Callable[[str], None] | None = None):
        problems = timing.problems()
        if problems:
            raise ValueError("lease timings: " + "; ".join(problems))
        self.name, self.timing, self.holder_flow_run, self.clock = name, timing, holder_flow_run, clock
        self.poll_s = poll_s
        self.on_lost = on_lost
        self.abort = threading.Event()
        self.lease_id: UUID | None = None
        self.acquired_at: datetime | None = None
        self.released_at: datetime | None = None
        self.lost_reason: str | None = None
        self.lost_at: datetime | None = None
        self.confirm_ms: list[float] = []
        self._last_ok_sent: float | None = None
        self._calls = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        # Every request runs in this one context: the caller's Prefect settings (API URL, auth) with the
        # client's retries off, set up once (entering temporary_settings per request costs ~25 ms).
        self._context = contextvars.copy_context()
        self._context.run(_enter_no_client_retries)

    # -- the server --

    def server(self, call: Callable[[Any], T]) -> T:
        """call(client) with this lock's Prefect client: one attempt, bounded by request_timeout_s."""
        with self._calls:
            return self._context.run(self._with_client, call)

    def _with_client(self, call: Callable[[Any], T]) -> T:
        if self._client is None:
            from prefect.client.orchestration import get_client

            self._client = get_client(httpx_settings={"timeout": httpx.Timeout(self.timing.request_timeout_s)},
                                      sync_client=True)
            self._client.__enter__()
        return call(self._client)

    def _read_limit(self, create: bool = False) -> Any:
        """The limit as the server has it; with `create`, a missing one is made (limit 1, active), as
        `homelab setup` would: a lock whose limit is missing would exclude no one."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

        def read(client: Any) -> Any:
            try:
                return client.read_global_concurrency_limit_by_name(self.name)
            except ObjectNotFound:
                if not create:
                    raise LockMisconfigured(f"the global concurrency limit {self.name} was deleted; run "
                                            f"`homelab setup` to create it again") from None
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=self.name, limit=1))
            except ObjectAlreadyExists:
                pass  # another run created it meanwhile
            return client.read_global_concurrency_limit_by_name(self.name)

        return self.server(read)

    def _try_acquire(self) -> float | None:
        """Take the slot (True) or return the seconds the server asks to wait."""
        from prefect.client.schemas.objects import ConcurrencyLeaseHolder
        from prefect.exceptions import PrefectHTTPStatusError

        holder = (ConcurrencyLeaseHolder(type="flow_run", id=self.holder_flow_run)
                  if self.holder_flow_run is not None else None)
        sent = self.clock()
        try:
            response = self.server(lambda c: c.increment_concurrency_slots_with_lease(
                names=[self.name], slots=1, mode="concurrency", lease_duration=self.timing.lease_s, holder=holder))
        except PrefectHTTPStatusError as e:
            if e.response.status_code == 423:
                retry_after = e.response.headers.get("Retry-After")
                try:
                    return max(0.05, float(retry_after)) if retry_after else self.poll_s
                except ValueError:
                    return self.poll_s
            raise
        body = response.json()
        if not any(lim.get("name") == self.name for lim in body.get("limits") or []):
            # The server skipped the limit (deleted meanwhile): the lease guards nothing.
            self.lease_id = UUID(body["lease_id"])
            self._release_quietly()
            raise LockMisconfigured(f"the server granted no slot of {self.name} (the limit is gone); run "
                                    f"`homelab setup` and try again")
        self.lease_id = UUID(body["lease_id"])
        self._last_ok_sent = sent
        return None

    def _renew(self) -> bool:
        """One renewal; True when the server renewed it. Raises LockLost on 410 (the lease is gone)."""
        from prefect.exceptions import PrefectHTTPStatusError

        assert self.lease_id is not None
        sent = self.clock()
        try:
            lease_id = self.lease_id
            self.server(lambda c: c.renew_concurrency_lease(lease_id, lease_duration=self.timing.lease_s))
        except PrefectHTTPStatusError as e:
            if e.response.status_code == 410:
                self._lose("the server no longer knows this run's lease (it expired and was repossessed, or "
                           "the server restarted with an in-memory lease storage)")
                raise LockLost(self.lost_reason) from None
            return False
        except (httpx.HTTPError, OSError):
            return False
        if self.lost_reason is None and sent <= self._owned_until():
            self._last_ok_sent = sent
        return self.lost_reason is None

    def _owned_until(self) -> float:
        return self.timing.owned_until(self._last_ok_sent) if self._last_ok_sent is not None else float("-inf")

    def _lose(self, why: str) -> None:
        if self.lost_reason is None:
            self.lost_reason = why
            self.lost_at = datetime.now(UTC)
            self.abort.set()
            if self.on_lost is not None:
                self.on_lost(why)

    def _release_quietly(self) -> None:
        if self.lease_id is None:
            return
        try:
            lease_id = self.lease_id
            self.server(lambda c: c.release_concurrency_slots_with_lease(lease_id))
        except Exception:  # the lease then expires by itself within one lease
            pass

    # -- the holder's side --

    def acquire(self, timeout_s: float) -> None:
        """Take the slot, waiting up to timeout_s while another run holds it or the server cannot answer
        (a 5xx while its database is busy, a restart, a dropped connection)."""
        deadline = self.clock() + timeout_s
        checked = False
        last_error = ""
        while True:
            try:
                if not checked:
                    check_limit(self._read_limit(create=True), self.name)
                    checked = True
                wait = self._try_acquire()
            except Exception as e:
                if not _transient(e):
                    raise
                last_error, wait = f"{type(e).__name__}: {e}", 1.0
            if wait is None:
                break
            left = deadline - self.clock()
            if left <= 0:
                if last_error and not checked:
                    raise LockBusy(f"the Prefect server did not answer for {timeout_s:g} s ({last_error})")
                raise LockBusy(f"the global concurrency limit {self.name} stayed taken for {timeout_s:g} s "
                               f"(another disruptive run holds it)")
            self._stop.wait(min(wait, left, 5.0))
        self.acquired_at = datetime.now(UTC)
        self._thread = threading.Thread(target=self._renew_loop, name="homelab-lock-renewer", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        next_renewal = self.clock() + self.timing.renew_every_s
        while not self._stop.is_set() and self.lost_reason is None:
            now = self.clock()
            if now >= self._owned_until():
                self._lose(f"no renewal succeeded for {self.timing.owned_s:g} s (the Prefect server is unreachable); "
                           f"stopped before the server could give the lock to another run")
                return
            if now < next_renewal:
                self._stop.wait(min(next_renewal, self._owned_until()) - now)
                continue
            try:
                ok = self._renew()
            except LockLost:
                return
            # After a failure, try again soon: several attempts fit before ownership runs out.
            next_renewal = self.clock() + (self.timing.renew_every_s if ok else min(2.0, self.timing.renew_every_s))

    def confirm(self, before: str) -> None:
        """Prove with the server, now, that this run still holds the lock; LockLost otherwise."""
        t0 = time.perf_counter()
        if self.lease_id is None:
            raise LockLost(f"the lock is not held (before {before})")
        while True:
            if self.lost_reason is not None:
                raise LockLost(f"{self.lost_reason}; stopped before {before}")
            if self.clock() >= self._owned_until():
                self._lose(f"no renewal succeeded for {self.timing.owned_s:g} s")
                continue
            if self._renew():
                try:
                    limit = self._read_limit()
                    check_limit(limit, self.name)
                except LockMisconfigured as e:
                    self._lose(f"{e}")
                    continue
                except Exception as e:
                    if not _transient(e):
                        raise
                    # The renewal just succeeded; the limit's settings are read again next time.
                break
            self._stop.wait(min(0.5, max(0.0, self._owned_until() - self.clock())))
        self.confirm_ms.append((time.perf_counter() - t0) * 1000)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timing.request_timeout_s + 1)
        if self.lease_id is not None and self.released_at is None:
            self._release_quietly()
            self.released_at = datetime.now(UTC)
        with self._calls:
            if self._client is not None:
                try:
                    self._context.run(self._client.__exit__, None, None, None)
                except Exception:
                    pass
                self._client = None

    def record(self) -> dict[str, Any]:
        """What the run's result says of the lock."""
        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {"name": self.name, "acquired_at": iso(self.acquired_at), "released_at": iso(self.released_at),
                "lost_at": iso(self.lost_at), "lost": self.lost_reason, "confirmations": len(self.confirm_ms),
                "confirm_ms_p50": round(statistics.median(self.confirm_ms), 2) if self.confirm_ms else None}
