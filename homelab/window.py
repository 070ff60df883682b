"""Maintenance windows: a cron expression for each opening, a duration, and a time zone.

A window opens at every time the cron expression fires in its time zone and stays open for
``hours`` of elapsed time (not wall-clock time: a window across a DST change is as long as any
other). The end is exclusive. Cron semantics come from cronsim (already in Prefect's dependency
tree): a start that falls into a spring-forward gap fires at the first valid minute after it,
and a start in a repeated autumn hour fires once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError


class WindowError(ValueError):
    pass


@dataclass(frozen=True)
class Window:
    cron: str
    hours: float
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        problems = []
        try:
            self.zone()
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"time zone {self.timezone!r} is not an IANA time zone like Europe/Berlin")
        if not self.hours > 0:
            problems.append(f"duration must be more than 0 hours, got {self.hours}")
        try:
            CronSim(self.cron, datetime(2000, 1, 1, tzinfo=UTC))
        except (CronSimError, ValueError) as e:
            problems.append(f"cron expression {self.cron!r} is not valid: {e}")
        if problems:
            raise WindowError("; ".join(problems))

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def duration(self) -> timedelta:
        return timedelta(hours=self.hours)

    def describe(self) -> str:
        return f"'{self.cron}' ({self.timezone}) for {self.hours:g}h"


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise WindowError(f"{now.isoformat()} has no time zone; pass an aware datetime")
    return now


def _first_start_after(window: Window, instant: datetime) -> datetime:
    """The first opening strictly after ``instant``, in the window's time zone."""
    instant = _aware(instant).astimezone(UTC)
    local = instant.astimezone(window.zone())
    try:
        it = CronSim(window.cron, local)
        # Given a time in the second pass of a repeated autumn hour, cronsim can answer with the
        # same wall time of the first pass, which lies before it: skip such answers.
        for _ in range(4):
            start = next(it)
            if start.astimezone(UTC) > instant:
                return start
    except (StopIteration, CronSimError) as e:
        raise WindowError(f"the window {window.describe()} never opens after {local.isoformat()}") from e
    raise WindowError(f"the window {window.describe()} has no opening after {local.isoformat()}")


def current_opening(window: Window, now: datetime) -> tuple[datetime, datetime] | None:
    """(start, end) of the opening that contains ``now``, or None when the window is closed."""
    now = _aware(now).astimezone(UTC)
    # An opening contains now exactly when it started in (now - duration, now].
    # Compare in UTC: aware datetimes sharing a tzinfo compare by wall clock, which is wrong in
    # the repeated autumn hour.
    start = _first_start_after(window, now - window.duration)
    if start.astimezone(UTC) <= now:
        end = (start.astimezone(UTC) + window.duration).astimezone(window.zone())
        return start, end
    return None


def window_open(window: Window, now: datetime) -> bool:
    return current_opening(window, now) is not None


def next_open(window: Window, now: datetime) -> datetime:
    """``now`` when the window is open, else the start of its next opening."""
    if window_open(window, now):
        return now
    return _first_start_after(window, now)
