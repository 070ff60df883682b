"""What a person sees in the Prefect UI after command-line runs: the INFO narrative of every step on the
server (the terminal alone is quieted) and run names that say what each run did and where."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def homelab(*args: str, api_url: str, marker: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_LOGGING_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "homelab", *args, "--json"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)


def test_cli_runs_leave_their_narrative_on_the_server_under_names_that_say_what_they_did(prefect_api_url):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        before = {r.id for r in client.read_flow_runs()}
    marker = uuid.uuid4().hex[:6]
    for args in (("upgrade", "talos", "--twin", "--yes"), ("drift", "--twin"), ("reconcile", "--all", "--twin")):
        out = homelab(*args, api_url=prefect_api_url, marker=marker)
        assert out.returncode in (0, 1), out.stderr[-2000:]
        assert " INFO " not in out.stderr, "the terminal shows INFO lines: only the server should get them"
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter()) if r.id not in before]
        names = sorted(r.name for r in runs)
        assert {"talos-upgrade m720q", "drift-check all", "flux-reconcile m720q"} <= set(names), names
        upgrade = next(r for r in runs if r.name == "talos-upgrade m720q")
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[upgrade.id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[upgrade.id])))
    info_by_task = {t.id: 0 for t in tasks}
    for entry in logs:
        if entry.level == 20 and entry.task_run_id in info_by_task:
            info_by_task[entry.task_run_id] += 1
    steps = {t.name for t in tasks}
    for node in ("m720q-1", "m720q-2", "m720q-3"):
        assert {f"upgrade {node}", f"verify-version {node}", f"wait-ready {node}"} <= steps, sorted(steps)
    silent = sorted(t.name for t in tasks if info_by_task[t.id] == 0)
    assert not silent, f"steps without an INFO line on the server: {silent}"
