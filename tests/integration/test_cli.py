"""The command line others script against: exit codes, the JSON result on the last line, `homelab demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def homelab(*args: str, api_url: str | None, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "homelab", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd, stdin=subprocess.DEVNULL)


def last_json(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def test_reconcile_without_names_or_all_is_a_usage_error() -> None:
    assert homelab("reconcile", api_url=None, timeout=60).returncode == 2


def test_unknown_fault_is_a_usage_error(prefect_api_url: str) -> None:
    out = homelab("reconcile", "--all", "--twin", "--fault", "meteor-strike=m720q-1", api_url=prefect_api_url)
    assert out.returncode == 2
    assert "meteor-strike" in out.stderr


def test_reconcile_all_on_twin_prints_json_result(prefect_api_url: str) -> None:
    out = homelab("reconcile", "--all", "--twin", "--json", api_url=prefect_api_url)
    assert out.returncode == 0, out.stderr[-2000:]
    result = last_json(out.stdout)
    assert result["status"] == "completed"
    assert {k["name"] for k in result["kustomizations"]} >= {"sources", "infrastructure-core", "smokeping"}
    assert all(k["ready"] for k in result["kustomizations"])


def test_failed_reconcile_exits_one_with_the_ready_message(prefect_api_url: str) -> None:
    out = homelab("reconcile", "sources", "--twin", "--fault", "flux-fails=sources", "--json", api_url=prefect_api_url)
    assert out.returncode == 1
    result = last_json(out.stdout)
    assert result["status"] == "failed"


def test_drift_on_synced_twin_is_clean(prefect_api_url: str) -> None:
    out = homelab("drift", "--twin", "--twin-state", "synced", "--json", api_url=prefect_api_url)
    assert out.returncode == 0, out.stderr[-2000:]
    assert last_json(out.stdout)["status"] == "clean"


def test_provision_plan_on_twin_touches_nothing(prefect_api_url: str) -> None:
    out = homelab("provision", "--twin", "--plan", "--json", api_url=prefect_api_url)
    assert out.returncode == 0, out.stderr[-2000:]
    result = last_json(out.stdout)
    assert result["status"] == "planned"
    assert {vm["action"] for vm in result["vms"]} == {"create"}
    assert result["bootstrapped"] is False


def test_validate_through_the_installed_command_line() -> None:
    out = homelab("validate", "k8s", api_url=None, timeout=60)
    assert out.returncode == 0 and "valid" in out.stdout


def test_upgrade_talos_dry_run_plans_every_node_and_touches_nothing(prefect_api_url: str) -> None:
    out = homelab("upgrade", "talos", "--twin", "--dry-run", "--json", api_url=prefect_api_url)
    assert out.returncode == 0, out.stderr[-2000:]
    result = last_json(out.stdout)
    assert result["status"] == "planned" and result["target_version"] == "v1.11.5"
    assert [(n["name"], n["from"], n["action"]) for n in result["nodes"]] == [
        ("m720q-1", "v1.11.4", "would-upgrade"), ("m720q-2", "v1.11.4", "would-upgrade"),
        ("m720q-3", "v1.11.4", "would-upgrade")]
    assert result["noout"] == "untouched" and result["etcd_snapshot"] is None


def test_upgrade_of_an_unknown_cluster_is_bad_configuration(prefect_api_url: str) -> None:
    out = homelab("upgrade", "talos", "--twin", "--cluster", "nope", "--dry-run", "--json", api_url=prefect_api_url)
    assert out.returncode == 2, out.stdout[-1000:] + out.stderr[-2000:]
    assert "no cluster named 'nope'" in out.stderr


def test_upgrade_refuses_a_downgrade_and_exits_one(prefect_api_url: str) -> None:
    out = homelab("upgrade", "talos", "--twin", "--to", "v1.10.9", "--yes", "--json", api_url=prefect_api_url)
    assert out.returncode == 1
    result = last_json(out.stdout)
    assert result["status"] == "failed" and "downgrade" in result["error"]
