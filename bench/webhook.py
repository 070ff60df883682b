"""Webhook receiver benchmark; prints one JSON line {"push_to_run_s_p50", "rps", "p99_ms", ...}.

rps / p99_ms: signed valid pushes (each a new commit) of a repository no trigger matches, sent by
`--concurrency` clients for `--seconds`, to `homelab webhook serve` (the real entry point, its own
process, configured by its environment only) posting to a real Prefect server (`prefect server start`,
SQLite in a temp PREFECT_HOME, its own process). Each answer counts only as a 200, which the receiver
sends after Prefect accepted the event.

direct_events_rps / receiver_ratio: the receiver's ceiling is the server's event intake, so the same
clients then post the same events straight to the server's `POST /api/events`, one per request, for the
same time; receiver_ratio = rps / direct_events_rps (target >= 0.8), measured in the same run.

rss_mb_under_slowloris / valid_p99_ms_under_slowloris: 1,000 clients that send half a request line and
headers and stop, plus 200 that send headers and 1 MiB of a body that never ends, hold connections while
valid pushes are sent one at a time for `--slowloris-seconds`; the receiver's resident memory (VmHWM,
its peak) against its pod's 256 MiB limit, and the p99 of those valid pushes.

push_to_run_s_p50: push received → flow run created, one push at a time, measured first: the git-push
deployment of prefect.yaml is registered with its `homelab.git.push` trigger (the automation whose
RunDeployment action creates the run; no worker is needed for the run to exist), each signed push is
POSTed to the receiver and the clock stops when the API lists a new run of that deployment (polled every
20 ms, bounded by a deadline). The deployment and its automation are then deleted, so the throughput
pushes that follow match no trigger.

    .venv/bin/python bench/webhook.py [--seconds 10] [--concurrency 8] [--pushes 15] [--slowloris-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployments.webhook import GITHUB, sign  # noqa: E402

SECRET = "bench-secret"
SAMPLE = Path("/work/shared/realworld/webhooks/github__drone-go-scm__push.json")
REPOSITORY = "bench/no-trigger-matches"
TRIGGERED_REPOSITORY = "bench/homelab"
POLL_S = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout}s")
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextmanager
def prefect_server(home: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_API_URL": ""}
    prefect = str(Path(sys.executable).parent / "prefect")
    log = (home / "server.log").open("wb")
    process = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_http(f"{api}/health", process, "prefect server", timeout=90)
        yield api, process.pid
    finally:
        stop(process)
        log.close()


@contextmanager
def receiver(api_url: str, home: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
           "HOMELAB_WEBHOOK_SECRET": SECRET, "HOMELAB_WEBHOOK_REPOS": f"{REPOSITORY},{TRIGGERED_REPOSITORY}",
           "HOMELAB_WEBHOOK_STATE": str(home / "deliveries.sqlite3"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = (home / "receiver.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", f"from deployments.webhook import serve; serve('127.0.0.1', {port})"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process, "webhook receiver", timeout=60)
        yield base, process.pid
    finally:
        stop(process)
        log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def push_body(repository: str = REPOSITORY, after: str | None = None) -> bytes:
    raw = json.loads(SAMPLE.read_text())
    raw["repository"]["full_name"] = repository
    # A new commit per push: the receiver refuses the same push (repository, ref, before, after) twice.
    raw["after"] = after or uuid.uuid4().hex + uuid.uuid4().hex[:8]
    return json.dumps(raw).encode()


def signed_push() -> tuple[bytes, dict[str, str]]:
    body = push_body()
    return body, {"Content-Type": "application/json", "X-GitHub-Event": "push",
                  "X-GitHub-Delivery": str(uuid.uuid4()), "X-Hub-Signature-256": sign(SECRET.encode(), body, GITHUB)}


def direct_event() -> tuple[bytes, dict[str, str]]:
    """What the receiver posts for one push, posted by the client itself (one event per request)."""
    from datetime import UTC, datetime

    from deployments.webhook import Push, push_event

    push = Push(REPOSITORY, "refs/heads/main", "a" * 40, uuid.uuid4().hex + uuid.uuid4().hex[:8], "bench")
    event = push_event(push, GITHUB, str(uuid.uuid4()), datetime.now(UTC))
    return json.dumps([event]).encode(), {"Content-Type": "application/json"}


async def load(base: str, seconds: float, concurrency: int, path: str = "/hooks/git",
               request: Any = signed_push) -> dict[str, Any]:
    """`concurrency` clients each sending one request after another for `seconds` (after a 1 s warm-up);
    a request counts when answered 2xx. `request()` makes each (body, headers)."""
    latencies: list[float] = []
    failures: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as client:

        async def one() -> None:
            body, headers = request()
            started = time.perf_counter()
            response = await client.post(path, content=body, headers=headers)
            if 200 <= response.status_code < 300:
                latencies.append(time.perf_counter() - started)
            else:
                failures[response.status_code] = failures.get(response.status_code, 0) + 1

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await one()

        warmup = time.perf_counter() + 1.0
        await asyncio.gather(*(worker(warmup) for _ in range(concurrency)))
        latencies.clear()
        failures.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None
    p50 = latencies[len(latencies) // 2] if latencies else None
    return {
        "rps": round(len(latencies) / elapsed, 1),
        "p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
        "p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
        "requests": len(latencies),
        "failures": failures,
        "concurrency": concurrency,
    }


REGISTER = """
import sys
from deployments.serve import load_definitions, to_deployments
[deployment] = to_deployments(load_definitions(), only=["git-push"])
print(deployment.apply())
"""

FORGET = """
import sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    client.delete_resource_owned_automations(f"prefect.deployment.{sys.argv[1]}")
    client.delete_deployment(sys.argv[1])
"""


def prefect_python(code: str, api_url: str, home: Path, *args: str) -> str:
    """Run ``code`` in a Python process of its own pointed at the bench's server; its stdout."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"registering/removing the git-push deployment failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip()


def count_runs(client: httpx.Client, deployment_id: str) -> int:
    response = client.post("/flow_runs/count", json={"deployments": {"id": {"any_": [deployment_id]}}})
    response.raise_for_status()
    return int(response.json())


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


async def slowloris(base: str, pid: int, seconds: float, slow_headers: int = 1000, unfinished: int = 200,
                    body_bytes: int = 1 << 20) -> dict[str, Any]:
    """Hold `slow_headers` connections that stop inside their headers and `unfinished` that stop inside
    a large body, then time valid pushes one at a time for `seconds`; the receiver's peak memory."""
    host, port = base.removeprefix("http://").split(":")
    writers: list[asyncio.StreamWriter] = []
    rss_before = rss_mb(pid)
    try:
        for i in range(slow_headers + unfinished):
            _, writer = await asyncio.open_connection(host, int(port))
            if i < slow_headers:
                writer.write(b"POST /hooks/git HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:
                writer.write(f"POST /hooks/git HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             f"X-Hub-Signature-256: sha256={'0' * 64}\r\nContent-Length: {body_bytes * 4}\r\n\r\n"
                             .encode() + b"[" + b"1," * (body_bytes // 2))
            writers.append(writer)
        await asyncio.gather(*(w.drain() for w in writers), return_exceptions=True)
        held = sum(not w.is_closing() for w in writers)
        latencies: list[float] = []
        failures: dict[int, int] = {}
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                body, headers = signed_push()
                started = time.perf_counter()
                response = await client.post("/hooks/git", content=body, headers=headers)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures[response.status_code] = failures.get(response.status_code, 0) + 1
        rss_peak = rss_mb(pid, "VmHWM")
    finally:
        for w in writers:
            w.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None
    return {"rss_mb_under_slowloris": rss_peak, "rss_mb_before_slowloris": rss_before,
            "valid_p99_ms_under_slowloris": round(p99 * 1000, 1) if p99 is not None else None,
            "valid_pushes_under_slowloris": len(latencies), "slowloris_failures": failures,
            "slowloris_connections": slow_headers + unfinished, "slowloris_connections_open": held}


def measure_push_to_run(base: str, api_url: str, home: Path, pushes: int,
                        deadline_s: float = 10.0) -> dict[str, Any]:
    """Seconds from each push's POST to the API listing the git-push run it caused, one push at a time.

    The clock stops at the first poll that sees the run, so each figure includes up to one poll interval
    (20 ms) and one count request on top of the receiver → event → trigger → run path.
    """
    deployment_id = prefect_python(REGISTER, api_url, home).splitlines()[-1]
    seconds: list[float] = []
    try:
        with httpx.Client(base_url=api_url, timeout=5) as api, httpx.Client(base_url=base, timeout=10) as hooks:
            runs = count_runs(api, deployment_id)
            # The first push is not timed: it waits for the server's trigger service to load the new
            # automation, which it does shortly after the deployment is registered.
            for i in range(pushes + 1):
                body = push_body(TRIGGERED_REPOSITORY)
                headers = {"Content-Type": "application/json", "X-GitHub-Event": "push",
                           "X-GitHub-Delivery": str(uuid.uuid4()),
                           "X-Hub-Signature-256": sign(SECRET.encode(), body, GITHUB)}
                started = time.perf_counter()
                response = hooks.post("/hooks/git", content=body, headers=headers)
                if response.status_code != 200:
                    raise RuntimeError(f"receiver answered {response.status_code} to a valid push: {response.text}")
                deadline = started + (deadline_s if i else max(deadline_s, 60.0))
                while (now := count_runs(api, deployment_id)) == runs:
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"push {i}: no git-push run within {deadline - started:g}s of the "
                                           f"POST; the trigger did not fire (server log: {home}/server.log)")
                    time.sleep(POLL_S)
                if i:
                    seconds.append(time.perf_counter() - started)
                if now != runs + 1:
                    raise RuntimeError(f"one push created {now - runs} git-push runs; expected exactly one")
                runs = now
    finally:
        prefect_python(FORGET, api_url, home, deployment_id)
    ordered = sorted(seconds)
    return {"push_to_run_s_p50": round(ordered[len(ordered) // 2], 3),
            "push_to_run_s": [round(v, 3) for v in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pushes", type=int, default=15, help="Pushes timed for push_to_run_s_p50.")
    parser.add_argument("--slowloris-seconds", type=float, default=10.0,
                        help="How long valid pushes are timed while 1,200 hostile connections are held.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="homelab-bench-webhook-") as tmp:
        home = Path(tmp)
        with prefect_server(home) as (api_url, server_pid), receiver(api_url, home) as (base, receiver_pid):
            push_to_run = measure_push_to_run(base, api_url, home, args.pushes)
            pids = {"receiver": receiver_pid, "prefect": server_pid}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            client_before = time.process_time()
            result = asyncio.run(load(base, args.seconds, args.concurrency))
            # Where the CPU went during the run (warm-up included): the machine's 2 cores are shared.
            result["cpu_s"] = {name: round(cpu_seconds(pid) - before[name], 2) for name, pid in pids.items()}
            result["cpu_s"]["client"] = round(time.process_time() - client_before, 2)
            health = httpx.get(f"{base}/healthz", timeout=5).json()
            result["events_per_post"] = round(health["events_posted"] / max(health["posts"], 1), 1)
            server_root = api_url.removesuffix("/api")
            direct = asyncio.run(load(server_root, args.seconds, args.concurrency, "/api/events", direct_event))
            result["direct_events_rps"] = direct["rps"]
            result["direct_events_p99_ms"] = direct["p99_ms"]
            result["receiver_ratio"] = round(result["rps"] / direct["rps"], 2) if direct["rps"] else None
            result.update(asyncio.run(slowloris(base, receiver_pid, args.slowloris_seconds)))
    print(json.dumps({"push_to_run_s_p50": push_to_run.pop("push_to_run_s_p50"), **result, **push_to_run}))


if __name__ == "__main__":
    main()
