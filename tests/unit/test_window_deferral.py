"""flows.window outside a flow run: when a closed window defers, what the deferral says, and the command
a run without a deployment is told to run at the opening."""

from __future__ import annotations

import shlex
import time
from datetime import UTC, datetime, timedelta

import pytest

from flows import window as maintenance
from homelab.window import Window

NIGHTLY = Window("0 3 * * *", 2, "UTC")
OPENS = datetime(2025, 6, 11, 3, 0, tzinfo=UTC)


def at(monkeypatch: pytest.MonkeyPatch, instant: datetime) -> None:
    monkeypatch.setattr(maintenance, "now", lambda: instant)


def test_closed_window_defers_to_the_next_opening_and_names_it(monkeypatch):
    at(monkeypatch, OPENS - timedelta(hours=6))
    deferral = maintenance.defer(NIGHTLY)
    assert deferral is not None and deferral.until == OPENS
    assert "it next opens at 2025-06-11T03:00:00+00:00" in deferral.message
    assert "no deployment" in deferral.message and deferral.rescheduled_run is None
    assert deferral.fields() == {"deferred_until": "2025-06-11T03:00:00+00:00", "rescheduled_run": None,
                                 "run_then": None}


@pytest.mark.parametrize(("window", "run_now", "dry_run"), [
    (None, False, False), (NIGHTLY, True, False), (NIGHTLY, False, True)])
def test_no_window_run_now_and_dry_runs_go_ahead(monkeypatch, window, run_now, dry_run):
    at(monkeypatch, OPENS - timedelta(hours=6))
    assert maintenance.defer(window, run_now, dry_run) is None


def test_open_window_goes_ahead_until_its_exclusive_end(monkeypatch):
    at(monkeypatch, OPENS + timedelta(hours=1, minutes=59))
    assert maintenance.defer(NIGHTLY) is None
    at(monkeypatch, OPENS + timedelta(hours=2))
    assert maintenance.defer(NIGHTLY) is not None


def test_a_run_started_just_before_the_opening_waits_for_it_instead_of_deferring(monkeypatch):
    at(monkeypatch, OPENS - timedelta(seconds=0.3))
    t0 = time.monotonic()
    assert maintenance.defer(NIGHTLY) is None
    assert time.monotonic() - t0 >= 0.25
    at(monkeypatch, OPENS - timedelta(seconds=maintenance.EARLY_START_S + 1))
    assert maintenance.defer(NIGHTLY) is not None


def test_cli_command_repeats_the_run_with_its_window_and_quotes_every_value():
    command = maintenance.cli_command("talos-upgrade", {
        "homelab": "lab", "cluster": "m720q; rm -rf /", "to": "v1.11.5", "nodes": ["m720q-1", "$(id)"],
        "window": {"cron": "0 2 * * 6", "hours": 4, "timezone": "Europe/Berlin"}, "run_now": False})
    assert command is not None
    assert shlex.split(command) == [
        "homelab", "upgrade", "talos", "--homelab", "lab", "--cluster", "m720q; rm -rf /", "--to", "v1.11.5",
        "--node", "m720q-1", "--node", "$(id)", "--window", "0 2 * * 6", "--window-hours", "4",
        "--tz", "Europe/Berlin"]


def test_cli_command_of_kubernetes_upgrade_and_of_a_flow_without_a_command():
    assert maintenance.cli_command("kubernetes-upgrade", {"homelab": "default", "cluster": "m720q"}) == (
        "homelab upgrade kubernetes --cluster m720q")
    assert maintenance.cli_command("cluster-upgrade", {"cluster": "m720q"}) is None


def test_idempotency_key_is_the_same_for_the_same_work_and_opening_only():
    params = {"cluster": "m720q", "require_approval": True}
    key = maintenance.idempotency_key("dep", OPENS, params)
    assert key == maintenance.idempotency_key("dep", OPENS.astimezone(), dict(reversed(params.items())))
    assert key != maintenance.idempotency_key("dep", OPENS + timedelta(days=1), params)
    assert key != maintenance.idempotency_key("dep", OPENS, {**params, "cluster": "homelab"})
    assert key != maintenance.idempotency_key("other", OPENS, params)
