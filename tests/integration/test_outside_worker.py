"""docs/outside-worker.md, walked through without a cluster: the simulated homelab stands in for the
clusters, a `homelab server` with an API auth string for the chart's server, and a temporary directory for
the machine's /var/lib/homelab-flows.

The module does the document's steps as written, from the repository root and with the variables of the
worker's environment file: `homelab setup`, the block snippet of step 4 (then a Homelab block saved from
the twin's endpoints under the same name), `prefect --no-prompt deploy --all`, and the process worker
started with the unit file's own ExecStart, WorkingDirectory and environment (what systemd would give it,
nothing of this process's). The tests then see the nightly drift check's scheduled run and a push's
git-push run go through that worker and complete.

Not reproduced: User=homelab and the sandboxing (ProtectSystem=strict …): the worker runs as the user
running the tests, and the twin's files are private to that user.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the checkout's .venv/bin in the document
UNIT = REPO / "deploy/systemd/homelab-worker.service"
ENV_EXAMPLE = REPO / "deploy/systemd/homelab-worker.env.example"
GUIDE = REPO / "docs/outside-worker.md"
CHECKOUT, STATE = "/opt/homelab-flows", "/var/lib/homelab-flows"
# What systemd puts in a service's environment besides the unit's own variables (systemd.exec(5),
# "Environment Variables in Spawned Processes"): its default PATH, and for User= the user's HOME, USER,
# LOGNAME and SHELL, as `useradd` in the guide's step 1 makes them.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Knobs only a test needs: the worker asks for runs every second instead of every 10 s.
WORKER_KNOBS = {"PREFECT_WORKER_QUERY_SECONDS": "1"}
# The server's scheduler makes a new deployment's runs within a second instead of a minute.
SERVER_KNOBS = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}
TOUCHED = "k8s/infrastructure/core/base/cilium/helmrelease.yaml"
KS = "kustomize.toolkit.fluxcd.io/v1"


def unit_service() -> dict[str, list[str]]:
    """The [Service] section of the unit: each key's values, in order."""
    section, keys = "", dict[str, list[str]]()
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def assignments(text: str) -> dict[str, str]:
    """KEY=VALUE lines, as systemd reads an EnvironmentFile (comments and blank lines skipped)."""
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def guide_snippet(opening: str) -> str:
    """The heredoc of the guide that follows the line `opening`."""
    match = re.search(re.escape(opening) + r"\n(.*?)\nPY\n", GUIDE.read_text(), re.S)
    assert match, f"docs/outside-worker.md has no heredoc after {opening!r}"
    return match.group(1)


def run(argv: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None) -> str:
    done = subprocess.run(argv, env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(argv[:4])} exited {done.returncode}:\n{output[-4000:]}"
    return output


@dataclass
class Walkthrough:
    server: Any
    twin: Any
    worker: Any  # conftest.Service
    api_headers: dict[str, str]

    def wait_final(self, flow_run_id: Any, seconds: float = 120) -> Any:
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + seconds
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and run.state.is_final():
                    return run
                assert self.worker.proc.poll() is None, f"the worker exited:\n{self.worker.tail()}"
                assert time.monotonic() < deadline, (
                    f"flow run {run.name} still {run.state and run.state.name} after {seconds:g} s; worker log:\n"
                    f"{self.worker.tail()}")
                time.sleep(0.5)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory, start_module_homelab_server: Callable[..., Any],
                prefect_pointed_at: Callable[..., Any], start_service: Callable[..., Any]) -> Iterator[Walkthrough]:
    from tests.conftest import FAST
    from twin import Knobs, Twin
    from twin.register import homelab_block

    base = tmp_path_factory.mktemp("outside-worker")
    began, seconds = time.monotonic(), {}
    auth = f"admin:{uuid.uuid4().hex}"
    server = start_module_homelab_server(env={"PREFECT_SERVER_API_AUTH_STRING": auth, **SERVER_KNOBS})
    seconds["server"] = server.start_seconds

    # 2. /etc/homelab-flows/worker.env from the example: its two variables, filled in.
    example = assignments(ENV_EXAMPLE.read_text())
    assert set(example) == {"PREFECT_API_URL", "PREFECT_API_AUTH_STRING"}, "the guide says nothing else goes there"
    env_file = base / "worker.env"
    env_file.write_text(f"PREFECT_API_URL={server.url}\nPREFECT_API_AUTH_STRING={auth}\n")
    env_file.chmod(0o600)
    worker_env = assignments(env_file.read_text())
    # The root shell of steps 3-5: `set -a; . worker.env; set +a; cd /opt/homelab-flows`. Prefect's own
    # profile lives in a directory of the test, not in the home of the user running it.
    shell = {**os.environ, **worker_env, "PREFECT_HOME": str(base / "root-prefect")}

    twin = Twin(REPO / "k8s", base / "twin", state="synced", knobs=Knobs(**FAST)).start()
    worker = None
    try:
        # 3. The server's objects.
        t0 = time.monotonic()
        run([str(BIN / "homelab"), "setup"], shell, REPO)
        seconds["setup"] = time.monotonic() - t0

        # 4. The guide's block snippet as written, its talosconfig where it reads it; then the block of
        # the twin's endpoints under the same name, which every deployment uses by default.
        home = base / "root-home"
        (home / ".talos").mkdir(parents=True)
        (home / ".talos" / "config").write_text(twin.talosconfig_text())
        run([str(BIN / "python"), "-"], {**shell, "HOME": str(home)}, REPO,
            stdin=guide_snippet(".venv/bin/python - <<'PY'"))
        with prefect_pointed_at(server.url, auth_string=auth):
            from blocks import Homelab

            assert Homelab.load("default").proxmox.host == "pve.lan", "the guide's snippet saved no block"
            homelab_block(twin).save("default", overwrite=True)

            # 5. The deployments, from the repository root.
            t0 = time.monotonic()
            run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], shell, REPO)
            seconds["deploy"] = time.monotonic() - t0

            # 6. The worker as the unit starts it.
            unit = unit_service()
            assert unit["EnvironmentFile"] == ["/etc/homelab-flows/worker.env"]
            assert unit["StateDirectory"] == ["homelab-flows"] and unit["User"] == ["homelab"]
            state = base / "state"  # StateDirectory=, and the home of the user `homelab`
            state.mkdir()

            def here(value: str) -> str:
                return (value.replace(f"{CHECKOUT}/.venv/bin/", f"{BIN}/").replace(CHECKOUT, str(REPO))
                        .replace(STATE, str(state)))

            env = {"PATH": SYSTEMD_PATH, "HOME": str(state), "USER": "homelab", "LOGNAME": "homelab",
                   "SHELL": "/usr/sbin/nologin"}
            for assignment in unit.get("Environment", []):
                env.update(assignments("\n".join(here(a) for a in shlex.split(assignment))))
            env.update(worker_env)
            env.update(WORKER_KNOBS)
            [exec_start] = unit["ExecStart"]
            [workdir] = unit["WorkingDirectory"]
            worker = start_service([here(a) for a in shlex.split(exec_start)], env, Path(here(workdir)),
                                   base / "worker.log")
            t0 = time.monotonic()
            wait_for_worker(worker)
            seconds["worker"] = time.monotonic() - t0
            print(f"\noutside-worker walkthrough ready after {time.monotonic() - began:.0f} s: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
            from deployments.webhook import prefect_auth_headers

            yield Walkthrough(server, twin, worker, prefect_auth_headers())
    finally:
        if worker is not None:
            worker.stop()
        twin.stop()
    assert not twin.stop_leftovers, f"twin parts still running after stop(): {twin.stop_leftovers}"


def wait_for_worker(worker: Any, seconds: float = 90) -> None:
    """Until the worker has reported to pool `homelab` (through the auth string of its environment file)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while not client.read_workers_for_work_pool("homelab"):
            assert worker.proc.poll() is None, f"the worker exited {worker.proc.returncode}:\n{worker.tail()}"
            assert time.monotonic() < deadline, f"no worker of pool homelab after {seconds:g} s:\n{worker.tail()}"
            time.sleep(0.5)


def deployment(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(f"{name}/{name}")


def flow_runs(deployment_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def test_the_nightly_drift_check_runs_on_the_worker_and_completes(walkthrough: Walkthrough) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.states import Scheduled

    drift = deployment("drift-check")
    deadline = time.monotonic() + 60
    while not (scheduled := [r for r in flow_runs(drift.id) if r.auto_scheduled]):
        assert time.monotonic() < deadline, "the server's scheduler made no run of drift-check's schedule in 60 s"
        time.sleep(0.5)
    nightly = scheduled[0]
    assert nightly.expected_start_time is not None
    start = nightly.expected_start_time.astimezone(UTC)
    assert (start.hour, start.minute) == (3, 0), f"the nightly run is due at {start}, not 03:00 UTC"
    # Its night brought forward: the same run, due now.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(nightly.id, Scheduled(scheduled_time=datetime.now(UTC)), force=True)
    done = walkthrough.wait_final(nightly.id)
    assert done.state.is_completed(), f"{done.state.name}: {done.state.message}\n{walkthrough.worker.tail()}"
    assert done.work_pool_name == "homelab" and done.parameters == {"cluster": "m720q"}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[nightly.id])))
        # The run's last log lines are sent as its process exits and stored shortly after.
        deadline = time.monotonic() + 20
        while not any((line := m.message).startswith("drift-check: ") for m in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[nightly.id])))):
            assert time.monotonic() < deadline, "the run's summary line never reached the server's logs"
            time.sleep(0.5)
    assert [a.key for a in artifacts] == ["drift-check"]
    assert walkthrough.twin.git.head() in (artifacts[0].description or "")
    assert line.startswith("drift-check: clean"), line


def test_a_push_event_starts_git_push_on_the_worker_and_reconciles_what_it_touched(
        walkthrough: Walkthrough) -> None:
    from deployments.webhook import GITHUB, Push, push_event

    t = walkthrough.twin
    before = t.git.head()
    path = t.git.path / TOUCHED
    path.write_text(path.read_text() + "# retuned\n")
    after = t.git.commit_all(f"touch {TOUCHED}")
    git_push = deployment("git-push")
    # The event the receiver posts for this push (deployments/webhook.py), with the credential the relay
    # adds. A trigger sees only events that arrive once its automation is loaded, which on SQLite is at
    # `prefect deploy`'s commit: one delivery is enough.
    event = push_event(Push("example/homelab", "refs/heads/main", before, after, "octo"), GITHUB,
                       str(uuid.uuid4()), datetime.now(UTC))
    response = httpx.post(f"{walkthrough.server.url}/events", json=[event], headers=walkthrough.api_headers,
                          timeout=10)
    assert response.status_code in (200, 204), response.text
    deadline = time.monotonic() + 60
    while not (runs := flow_runs(git_push.id)):
        assert time.monotonic() < deadline, "the push event started no git-push run within 60 s"
        time.sleep(0.5)
    [started] = runs
    done = walkthrough.wait_final(started.id)
    assert done.state.is_completed(), f"{done.state.name}: {done.state.message}\n{walkthrough.worker.tail()}"
    assert (done.parameters["after"], done.parameters["before"]) == (after, before)
    store = t.stores["m720q"]
    source = store.get("source.toolkit.fluxcd.io/v1", "GitRepository", "flux-system", "flux-system")
    assert source["status"]["artifact"]["revision"] == f"main@sha1:{after}"
    requested = {o["metadata"]["name"] for o in store.list(KS, "Kustomization")
                 if "reconcile.fluxcd.io/requestedAt" in (o["metadata"].get("annotations") or {})}
    assert "infrastructure-core" in requested
    assert requested <= {r.name for r in t.record.reconciles_of("Kustomization") if r.ok}


def test_the_guides_talosctl_is_the_clusters_release_checked_against_the_job_templates_checksum() -> None:
    import yaml

    from homelab.config import load_talconfig

    guide = GUIDE.read_text()
    url = re.search(r"https://github.com/siderolabs/talos/releases/download/(v[0-9.]+)/talosctl-linux-amd64", guide)
    checksum = re.search(r'echo "([0-9a-f]{64})  /usr/local/bin/talosctl" \| sha256sum -c -', guide)
    assert url and checksum, "docs/outside-worker.md no longer downloads and checks talosctl"
    assert url.group(1) == load_talconfig(REPO / "k8s/clusters/m720q/talos/talconfig.yaml").talos_version
    template = yaml.safe_load((REPO / "deploy/kubernetes/base-job-template.yaml").read_text())
    assert checksum.group(1) == template["variables"]["properties"]["talosctl_sha256"]["default"]
