"""Maintenance windows: open or not at an instant, and when they next open (boundaries and DST)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from homelab.window import Window, WindowError, current_opening, next_open, window_open

BERLIN = ZoneInfo("Europe/Berlin")
NIGHTLY = Window("0 3 * * *", 2, "Europe/Berlin")  # 03:00-05:00 Berlin time
SATURDAY = Window("0 22 * * 6", 4, "Europe/Berlin")  # Sat 22:00 to Sun 02:00


def b(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=BERLIN, fold=fold)


@pytest.mark.parametrize(("window", "now", "is_open"), [
    (NIGHTLY, b(2025, 6, 10, 2, 59, 59), False),   # one second before the start
    (NIGHTLY, b(2025, 6, 10, 3, 0, 0), True),      # exactly at the start is open
    (NIGHTLY, b(2025, 6, 10, 4, 59, 59), True),
    (NIGHTLY, b(2025, 6, 10, 5, 0, 0), False),     # exactly at the end is closed
    (NIGHTLY, b(2025, 6, 10, 12, 0, 0), False),
    (SATURDAY, b(2025, 6, 14, 23, 30), True),      # Saturday evening
    (SATURDAY, b(2025, 6, 15, 1, 59), True),       # across midnight into Sunday
    (SATURDAY, b(2025, 6, 15, 2, 0), False),
    (SATURDAY, b(2025, 6, 13, 23, 0), False),      # Friday
])
def test_window_open_boundaries(window, now, is_open):
    assert window_open(window, now) is is_open


def test_window_open_compares_instants_not_wall_clocks():
    # 01:30 UTC in June is 03:30 in Berlin: open
    assert window_open(NIGHTLY, datetime(2025, 6, 10, 1, 30, tzinfo=UTC))
    assert not window_open(NIGHTLY, datetime(2025, 6, 10, 3, 30, tzinfo=UTC))


def test_window_starting_in_spring_forward_gap_opens_at_first_valid_time():
    w = Window("30 2 * * *", 1, "Europe/Berlin")  # 02:30 does not exist on 2025-03-30
    assert not window_open(w, b(2025, 3, 30, 1, 59))
    assert window_open(w, b(2025, 3, 30, 3, 0))
    assert next_open(w, b(2025, 3, 30, 1, 0)) == b(2025, 3, 30, 3, 0)


def test_window_across_fall_back_lasts_elapsed_hours():
    # Opens 01:00 CEST on 2025-10-26; two elapsed hours end at the second 02:00 (CET), not the first.
    w = Window("0 1 * * *", 2, "Europe/Berlin")
    start, end = current_opening(w, b(2025, 10, 26, 2, 30, fold=0))
    assert start == b(2025, 10, 26, 1, 0)
    assert end.astimezone(UTC) == datetime(2025, 10, 26, 1, 0, tzinfo=UTC)
    assert window_open(w, b(2025, 10, 26, 2, 30, fold=0))       # first 02:30 (CEST): inside
    assert window_open(w, b(2025, 10, 26, 2, 59, fold=0))
    assert not window_open(w, b(2025, 10, 26, 2, 0, fold=1))    # 02:00 CET is exactly the end


def test_window_in_repeated_autumn_hour_opens_once():
    w = Window("30 2 * * *", 0.25, "Europe/Berlin")
    assert window_open(w, b(2025, 10, 26, 2, 40, fold=0))
    assert not window_open(w, b(2025, 10, 26, 2, 40, fold=1))


def test_next_open_is_now_when_open_else_next_start():
    now = b(2025, 6, 10, 4, 0)
    assert next_open(NIGHTLY, now) == now
    assert next_open(NIGHTLY, b(2025, 6, 10, 5, 0)) == b(2025, 6, 11, 3, 0)
    assert next_open(SATURDAY, b(2025, 6, 10, 12, 0)) == b(2025, 6, 14, 22, 0)


@pytest.mark.parametrize(("cron", "hours", "tz", "needle"), [
    ("0 3 * *", 2, "UTC", "cron expression"),
    ("0 3 * * *", 0, "UTC", "more than 0 hours"),
    ("0 3 * * *", 2, "Mars/Olympus", "IANA time zone"),
])
def test_window_rejects_invalid_definitions(cron, hours, tz, needle):
    with pytest.raises(WindowError, match=needle):
        Window(cron, hours, tz)


def test_window_refuses_naive_datetime():
    with pytest.raises(WindowError, match="no time zone"):
        window_open(NIGHTLY, datetime(2025, 6, 10, 4, 0))
