"""The webhook receiver over real HTTP: under uvicorn with its guards, as `homelab webhook serve` (its own
process, environment only) and behind the events relay; events stored by a real Prefect server; hostile
clients (slow headers, unfinished bodies, too many connections, absurd lengths); and a fuzz run of 10,000
random, malformed, replayed and foreign requests."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments import webhook
from deployments.webhook import GITEA, GITHUB, create_app, create_relay_app, server_config, sign

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRET = "integration-secret"
KEY = SECRET.encode()
SAMPLES = Path("/work/shared/realworld/webhooks")
ALLOWED = "homelab/allowed"


def push_body(repository: str, after: str | None = None) -> bytes:
    raw = json.loads((SAMPLES / "github__drone-go-scm__push.json").read_text())
    raw["repository"]["full_name"] = repository
    if after is not None:
        raw["after"] = after
    return json.dumps(raw).encode()


def github_headers(body: bytes, delivery: str, event: str = "push") -> dict[str, str]:
    return {"Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": sign(KEY, body, GITHUB)}


def stored_events(api_url: str, resource_id: str) -> list[dict[str, Any]]:
    response = httpx.post(f"{api_url}/events/filter", timeout=10, json={
        "filter": {"event": {"name": ["homelab.git.push"]}, "resource": {"id": [resource_id]}},
        "limit": 50,
    })
    response.raise_for_status()
    return list(response.json()["events"])


def wait_for_events(api_url: str, resource_id: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        events = stored_events(api_url, resource_id)
        if len(events) >= count:
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"Prefect stored {len(events)} {resource_id} events within {timeout}s, "
                                 f"expected {count}")
        time.sleep(0.2)


@pytest.fixture
def serve_guarded() -> Iterator[Callable[..., str]]:
    """An ASGI app under uvicorn with the receiver's own configuration (server_config: the header
    deadline, the connection cap), on a free 127.0.0.1 port; stopped at teardown."""
    import uvicorn
    from conftest import free_port

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Any, **limits: Any) -> str:
        port = free_port()
        server = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="warning", **limits))
        thread = threading.Thread(target=server.run, name=f"receiver-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.01)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=15)


# --- with Prefect ------------------------------------------------------------------------------------


def test_signed_github_push_is_stored_once_in_prefect(prefect_api_url: str, serve_guarded: Callable[..., str]) -> None:
    repository = f"homelab/it-{uuid.uuid4().hex[:8]}"
    base = serve_guarded(create_app(SECRET, prefect_api_url, repositories=[repository]))
    body = push_body(repository)
    delivery = str(uuid.uuid4())
    r = httpx.post(f"{base}/hooks/git", content=body, headers=github_headers(body, delivery), timeout=10)
    assert r.status_code == 200, r.text
    # A redelivery, and the same push under a new delivery id, are refused and add no second event.
    for again in (delivery, str(uuid.uuid4())):
        r2 = httpx.post(f"{base}/hooks/git", content=body, headers=github_headers(body, again), timeout=10)
        assert r2.status_code == 409

    resource_id = f"git.repo.{repository}"
    [event] = wait_for_events(prefect_api_url, resource_id, 1)
    time.sleep(1.5)  # two persister flushes: a second event would be visible by now
    assert len(stored_events(prefect_api_url, resource_id)) == 1
    assert event["id"] == r.json()["event_id"]
    payload = event["payload"]
    assert payload["repository"] == repository
    assert payload["ref"] == "refs/heads/master"
    assert payload["before"] == "a10867b14bb761a232cd80139fbd4c0d33264240"
    assert payload["after"] == "199eddf46df50de8d02e99bf1c5fdb4101338224"
    assert payload["delivery"] == delivery
    assert payload["changed_paths"] is None  # the flow reads them from its own clone


def test_foreign_repository_reaches_prefect_never(prefect_api_url: str, serve_guarded: Callable[..., str]) -> None:
    foreign = f"attacker/unrelated-{uuid.uuid4().hex[:8]}"
    base = serve_guarded(create_app(SECRET, prefect_api_url, repositories=[ALLOWED]))
    body = push_body(foreign)
    r = httpx.post(f"{base}/hooks/git", content=body, headers=github_headers(body, str(uuid.uuid4())), timeout=10)
    assert r.status_code == 202 and r.json()["status"] == "ignored"
    time.sleep(1.5)
    assert stored_events(prefect_api_url, f"git.repo.{foreign}") == []


def test_concurrent_pushes_are_each_stored(prefect_api_url: str, serve_guarded: Callable[..., str]) -> None:
    repository = f"homelab/burst-{uuid.uuid4().hex[:8]}"
    base = serve_guarded(create_app(SECRET, prefect_api_url, repositories=[repository]))
    bodies = [push_body(repository, after=f"{i:040x}") for i in range(40)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            responses = await asyncio.gather(*(
                client.post(f"{base}/hooks/git", content=b, headers=github_headers(b, str(uuid.uuid4())))
                for b in bodies))
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 40
    events = wait_for_events(prefect_api_url, f"git.repo.{repository}", 40)
    assert len({e["payload"]["after"] for e in events}) == 40


def test_prefect_unreachable_answers_503_and_keeps_the_delivery_retryable(serve_guarded: Callable[..., str]) -> None:
    from conftest import free_port

    base = serve_guarded(create_app(SECRET, f"http://127.0.0.1:{free_port()}/api", repositories=[ALLOWED]))
    body = push_body(ALLOWED)
    headers = github_headers(body, str(uuid.uuid4()))
    for _ in range(2):  # the second is not a 409: a 503 leaves the delivery unseen
        r = httpx.post(f"{base}/hooks/git", content=body, headers=headers, timeout=10)
        assert r.status_code == 503, r.text
        assert "redeliver" in r.json()["error"]
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200


def test_events_pass_through_the_relay_and_forged_ones_stop_there(prefect_api_url: str,
                                                                  serve_guarded: Callable[..., str]) -> None:
    repository = f"homelab/relay-{uuid.uuid4().hex[:8]}"
    relay = serve_guarded(create_relay_app(prefect_api_url, repositories=[repository]))
    base = serve_guarded(create_app(SECRET, f"{relay}/api", repositories=[repository]))
    body = push_body(repository)
    r = httpx.post(f"{base}/hooks/git", content=body, headers=github_headers(body, str(uuid.uuid4())), timeout=10)
    assert r.status_code == 200, r.text
    [event] = wait_for_events(prefect_api_url, f"git.repo.{repository}", 1)
    assert event["id"] == r.json()["event_id"]
    # What a compromised receiver could send: another event name, or one that names a deployment.
    forged = {**event, "id": str(uuid.uuid4()), "event": "prefect.deployment.triggered"}
    assert httpx.post(f"{relay}/api/events", json=[forged], timeout=10).status_code == 403


# --- `homelab webhook serve` itself, restarted ------------------------------------------------------------


def start_cli_receiver(tmp_path: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (tmp_path / f"receiver-{port}.log").open("ab")
    # Only what the deployment gives it: no block, no Prefect profile, no credential.
    proc = subprocess.Popen([sys.executable, "-m", "homelab", "webhook", "serve", "--port", str(port)], cwd=ROOT,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env}, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (tmp_path / f"receiver-{port}.log").read_text()
        assert time.monotonic() < deadline, "homelab webhook serve did not answer /healthz within 60 s"
        time.sleep(0.1)


def test_cli_receiver_starts_from_the_environment_and_refuses_replays_after_a_restart(
        prefect_api_url: str, tmp_path: Path) -> None:
    from conftest import free_port

    repository = f"homelab/restart-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {"HOMELAB_WEBHOOK_SECRET": SECRET, "HOMELAB_WEBHOOK_REPOS": repository, "PREFECT_API_URL": prefect_api_url,
           "HOMELAB_WEBHOOK_STATE": str(tmp_path / "state" / "deliveries.sqlite3")}
    body = push_body(repository)
    delivery = str(uuid.uuid4())
    proc = start_cli_receiver(tmp_path, port, env)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/hooks/git", content=body, headers=github_headers(body, delivery),
                       timeout=10)
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then dies of the signal it caught (Server.capture_signals)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    proc = start_cli_receiver(tmp_path, port, env)
    try:
        for again in (delivery, str(uuid.uuid4())):
            r = httpx.post(f"http://127.0.0.1:{port}/hooks/git", content=body,
                           headers=github_headers(body, again), timeout=10)
            assert r.status_code == 409, r.text
        gitea = {"Content-Type": "application/json", "X-Gitea-Event": "push", "X-Gitea-Delivery": "g-1",
                 "X-Gitea-Signature": sign(KEY, body, GITEA)}
        assert httpx.post(f"http://127.0.0.1:{port}/hooks/git", content=body, headers=gitea,
                          timeout=10).status_code == 409
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert len(wait_for_events(prefect_api_url, f"git.repo.{repository}", 1)) == 1


# --- the flow behind the trigger trusts the event no more than the receiver does ------------------------


def _push_flow(**params: Any) -> tuple[str, dict[str, Any]]:
    from flows.git_push import GitPushFailed, git_push

    state = git_push(return_state=True, **params)
    if state.is_completed():
        return "completed", state.result()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, GitPushFailed), exc
    return "failed", {**exc.result, "error": str(exc)}


def _twin_block(t: Any, name: str) -> str:
    from twin.register import homelab_block

    homelab_block(t).save(name, overwrite=True)
    return name


def _requested(t: Any, cluster: str) -> set[str]:
    return {o["metadata"]["name"] for o in t.stores[cluster].list("kustomize.toolkit.fluxcd.io/v1", "Kustomization")
            if "reconcile.fluxcd.io/requestedAt" in (o["metadata"].get("annotations") or {})}


def test_event_of_a_foreign_repository_fails_git_push_and_touches_nothing(twin: Any, prefect_api_url: str) -> None:
    t = twin(flux_delay_seconds=0.05)
    block = _twin_block(t, "twin-foreign")
    before = t.git.head()
    path = t.git.path / "k8s/apps/base/smokeping/configmap.yaml"
    path.write_text(path.read_text() + "# changed\n")
    after = t.git.commit_all("touch smokeping")
    # As if posted to Prefect directly, past the receiver: a commit that is even in the followed repository.
    outcome, result = _push_flow(repository="attacker/unrelated-repo", ref="refs/heads/main", before=before,
                                 after=after, homelab=block)
    assert outcome == "failed" and "attacker/unrelated-repo is not a repository this homelab follows" in result["error"]
    assert result["deployments"] == [] and not _requested(t, "m720q")


def test_git_push_reads_the_paths_from_its_clone_not_from_the_event(twin: Any, prefect_api_url: str) -> None:
    t = twin(flux_delay_seconds=0.05)
    block = _twin_block(t, "twin-paths")
    before = t.git.head()
    path = t.git.path / "k8s/justfile"  # in the tree, applied by no Kustomization
    path.write_text(path.read_text() + "# changed\n")
    after = t.git.commit_all("touch the justfile")
    # The event claims a talconfig change (an upgrade) that the commits do not contain.
    outcome, result = _push_flow(repository="example/homelab", ref="refs/heads/main", before=before, after=after,
                                 changed_paths=["k8s/clusters/m720q/talos/talconfig.yaml"], homelab=block)
    assert outcome == "completed", result
    assert result["changed_paths"] == ["k8s/justfile"]
    assert result["deployments"] == []  # no upgrade: git says talconfig.yaml did not change
    assert any("the event listed 1 changed path(s), git 1: git's list is used" in n for n in result["notes"])
    assert result["reconcile"] == {} and not _requested(t, "m720q")


def test_commit_that_is_not_on_the_followed_branch_is_ignored(twin: Any, prefect_api_url: str) -> None:
    t = twin(flux_delay_seconds=0.05)
    block = _twin_block(t, "twin-offbranch")
    head = t.git.head()
    # A commit of the repository that no branch Flux follows contains (a fork's, another branch's).
    stray = subprocess.run(["git", "-C", str(t.git.path), "commit-tree", f"{head}^{{tree}}", "-p", head, "-m", "x"],
                           capture_output=True, text=True, check=True).stdout.strip()
    outcome, result = _push_flow(repository="example/homelab", ref="refs/heads/main", before=head, after=stray,
                                 homelab=block)
    assert outcome == "completed" and result["status"] == "ignored"
    assert f"{stray[:12]} is not on main" in result["reason"]
    assert not _requested(t, "m720q")


# --- hostile clients ----------------------------------------------------------------------------------------


class AcceptingSink:
    """Always accepts, so the only 5xx a request could get would be a receiver bug."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    async def aclose(self) -> None:
        pass


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes `sock` (EOF or reset) within `seconds`; whatever it sent first is read."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def raw_connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def valid_push(base: str, i: int) -> int:
    body = push_body(ALLOWED, after=f"{random.getrandbits(160):040x}")
    return httpx.post(f"{base}/hooks/git", content=body, headers=github_headers(body, f"valid-{i}-{uuid.uuid4()}"),
                      timeout=10).status_code


def test_slow_headers_are_cut_at_the_header_deadline(serve_guarded: Callable[..., str]) -> None:
    base = serve_guarded(create_app(SECRET, sink=AcceptingSink(), repositories=[ALLOWED]), header_timeout=1.0)
    silent, dribbling = raw_connect(base), raw_connect(base)
    dribbling.sendall(b"POST /hooks/git HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    assert closed_within(silent, 5) and closed_within(dribbling, 5)
    assert time.monotonic() - started < 4
    # A keep-alive connection gets a fresh deadline for its next request's headers.
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        time.sleep(1.5)
        assert client.get("/healthz").status_code == 200  # httpx reconnects: the old one was closed


def test_slow_body_is_408_and_closed_at_the_body_deadline(serve_guarded: Callable[..., str]) -> None:
    sink = AcceptingSink()
    base = serve_guarded(create_app(SECRET, sink=sink, repositories=[ALLOWED], body_timeout=1.0))
    body = push_body(ALLOWED)
    sock = raw_connect(base)
    head = "".join(f"{k}: {v}\r\n" for k, v in github_headers(body, "slow").items())
    sock.sendall(f"POST /hooks/git HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode())
    sock.sendall(body[:10])
    sock.settimeout(5)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert closed_within(sock, 5)
    assert sink.events == []


def test_connections_over_the_cap_are_refused_and_the_receiver_recovers(serve_guarded: Callable[..., str]) -> None:
    base = serve_guarded(create_app(SECRET, sink=AcceptingSink(), repositories=[ALLOWED]),
                         max_connections=20, header_timeout=2.0)
    held = [raw_connect(base) for _ in range(20)]
    extra = raw_connect(base)
    extra.settimeout(5)
    assert extra.recv(4096).startswith(b"HTTP/1.1 503 ")
    for sock in held:
        assert closed_within(sock, 6)  # the header deadline frees them
    assert valid_push(base, 0) == 200


def test_content_length_too_long_for_any_body_is_refused_unread(serve_guarded: Callable[..., str]) -> None:
    base = serve_guarded(create_app(SECRET, sink=AcceptingSink(), repositories=[ALLOWED]))
    for length in ("9" * 23, str(webhook.MAX_BODY_BYTES + 1), "9" * 400):
        sock = raw_connect(base)
        sock.sendall(f"POST /hooks/git HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"X-Hub-Signature-256: sha256={'0' * 64}\r\nContent-Length: {length}\r\n\r\n".encode())
        sock.settimeout(5)
        status = sock.recv(4096).split(b" ", 2)[1]
        assert status in (b"413", b"400"), (length, status)  # h11 may refuse a length it cannot parse
        assert closed_within(sock, 5)


async def _hold_slow_clients(base: str, slow_headers: int, unfinished_bodies: int, body_bytes: int
                             ) -> list[asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    writers = []
    for i in range(slow_headers + unfinished_bodies):
        _, writer = await asyncio.open_connection(host, int(port))
        if i < slow_headers:
            writer.write(b"POST /hooks/git HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        else:
            writer.write(f"POST /hooks/git HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"X-Hub-Signature-256: sha256={'0' * 64}\r\nContent-Length: {body_bytes * 2}\r\n\r\n"
                         .encode() + b"[" + b"1," * (body_bytes // 2 - 1))
        writers.append(writer)
    # The receiver may already have refused (503, closed) bodies the shared budget cannot hold.
    await asyncio.gather(*(w.drain() for w in writers), return_exceptions=True)
    return writers


def test_slowloris_and_unfinished_bodies_leave_valid_pushes_answered(serve_guarded: Callable[..., str]) -> None:
    sink = AcceptingSink()
    base = serve_guarded(create_app(SECRET, sink=sink, repositories=[ALLOWED]))

    async def scenario() -> tuple[list[int], float, list[asyncio.StreamWriter]]:
        writers = await _hold_slow_clients(base, slow_headers=1000, unfinished_bodies=200, body_bytes=1 << 20)
        await asyncio.sleep(0.5)  # let the receiver take in what the unfinished bodies sent
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            statuses = []
            for i in range(20):
                body = push_body(ALLOWED, after=f"{i + 1:040x}")
                r = await client.post("/hooks/git", content=body, headers=github_headers(body, f"v-{i}"))
                statuses.append(r.status_code)
        elapsed = time.monotonic() - started
        for w in writers:
            w.close()
        return statuses, elapsed, writers

    statuses, elapsed, writers = asyncio.run(scenario())
    assert statuses == [200] * 20
    assert elapsed < 10, f"20 valid pushes took {elapsed:.1f}s beside 1,200 hostile connections"
    assert len(sink.events) == 20


# --- fuzz --------------------------------------------------------------------------------------------

FUZZ_MAX_BODY = 1 << 20  # the fuzz's own limit, so its oversized bodies stay cheap to send
FUZZ_ALLOWED = ["Codertocat/Hello-World", "gogits/hello-world"]
REAL_BODIES = [p.read_bytes() for p in sorted(SAMPLES.glob("*.json"))]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
                 "application/x-www-form-urlencoded", "", "application/jsonx", "multipart/form-data; boundary=x"]
HEADER_BYTES = [*range(33, 127), *range(128, 256)]
EVENTS: list[str | bytes] = ["push", "push", "push", "ping", "issues", "", "PUSH", b"push\xe9", "create", "delete"]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 4 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False, 0, -1, 2**70, 1.5, float("1e308")])
    if choice == 2:
        return "".join(rng.choice("ab/0\u00e9\u2603\x00\"\\ ") for _ in range(rng.randrange(12)))
    if choice == 3:
        return rng.choice(["0" * 40, "f" * 64, "refs/heads/main", "a/b", "../../etc", "$(reboot)"])
    if choice == 4:
        return rng.randrange(-5, 5)
    if choice in (5, 6):
        return {rng.choice(["ref", "before", "after", "repository", "full_name", "commits", "added", "x"]):
                random_json(rng, depth + 1) for _ in range(rng.randrange(5))}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def mutate(rng: random.Random, payload: Any) -> Any:
    if isinstance(payload, dict) and payload:
        key = rng.choice(list(payload))
        roll = rng.randrange(3)
        if roll == 0:
            del payload[key]
        elif roll == 1:
            payload[key] = random_json(rng)
        else:
            payload[key] = mutate(rng, payload[key])
    elif isinstance(payload, list) and payload:
        payload[rng.randrange(len(payload))] = mutate(rng, payload[rng.randrange(len(payload))])
    else:
        return random_json(rng)
    return payload


def fuzz_body(rng: random.Random) -> bytes:
    roll = rng.randrange(100)
    if roll < 35:
        return rng.choice(REAL_BODIES)
    if roll < 45:  # a real push of a repository the receiver does not serve, or of a new commit
        raw = json.loads(rng.choice(REAL_BODIES))
        if isinstance(raw.get("repository"), dict):
            raw["repository"]["full_name"] = rng.choice(["attacker/unrelated-repo", "codertocat/hello-world",
                                                         "--upload-pack=x/y"])
        raw["after"] = f"{rng.getrandbits(160):040x}"
        return json.dumps(raw).encode()
    if roll < 65:
        return json.dumps(mutate(rng, json.loads(rng.choice(REAL_BODIES)))).encode()
    if roll < 75:
        return json.dumps(random_json(rng)).encode()
    if roll < 83:
        body = rng.choice(REAL_BODIES)
        return body[: rng.randrange(len(body))]
    if roll < 90:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if roll < 94:
        depth = rng.randrange(1000, 100_000)
        return b"[" * depth + b"]" * rng.choice([depth, depth - 1])
    if roll < 97:  # one value too long for the streaming parser to hold
        return b'{"ref": "' + rng.choice([b"x", b"\\\"", b","]) * rng.randrange(60_000, 200_000) + b'"}'
    return b" " * (FUZZ_MAX_BODY + rng.randrange(-2, 3))


def fuzz_request(rng: random.Random, used: list[str], signed: list[tuple[bytes, str]]
                 ) -> tuple[str, str, bytes, dict[str, Any], bool]:
    """(method, path, body, headers, may_emit): may_emit is True only for a correctly signed push."""
    body = fuzz_body(rng)
    method, path = "POST", "/hooks/git"
    if rng.random() < 0.03:
        method, path = rng.choice([("GET", "/hooks/git"), ("PUT", "/hooks/git"), ("POST", "/hooks/gitx"),
                                   ("GET", "/healthz"), ("POST", "/healthz"), ("DELETE", "/")])
    forge = rng.choice([GITHUB, GITHUB, GITEA])
    replay = signed and rng.random() < 0.08  # a signed body seen before, under a new id or other headers
    if replay:
        body = rng.choice(signed)[0]
    headers: dict[str, Any] = {}
    content_type = rng.choice(CONTENT_TYPES) if rng.random() < 0.3 else "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    event = "push" if replay else rng.choice(EVENTS)
    if rng.random() > 0.05:
        headers[forge.event_header] = event
    if forge is GITEA and rng.random() < 0.8:
        headers["X-GitHub-Event"] = event
    roll = rng.random()
    if roll < 0.1 and used and not replay:
        delivery: str | None = rng.choice(used)
    elif roll < 0.13 and not replay:
        delivery = rng.choice(["", "-", "x" * 200, None])
    else:
        delivery = str(uuid.UUID(int=rng.getrandbits(128)))
    if delivery is not None:
        headers[forge.delivery_header] = delivery
    roll = rng.random()
    correct = sign(KEY, body, forge)
    if roll < 0.6 or replay:
        signature: Any = correct
    elif roll < 0.68:
        signature = sign(b"other secret", body, forge)
    elif roll < 0.74:
        signature = correct[:-1]
    elif roll < 0.8:
        signature = sign(KEY, body, GITEA if forge is GITHUB else GITHUB)
    elif roll < 0.86:
        # Any byte HTTP allows in a header value (visible ASCII and obs-text).
        signature = bytes(rng.choice(HEADER_BYTES) for _ in range(rng.randrange(80)))
    else:
        signature = None
    if signature is not None:
        headers[forge.signature_header] = signature
    may_emit = (method, path) == ("POST", "/hooks/git") and signature == correct and event == "push" \
        and forge.event_header in headers and content_type.lower().startswith("application/json") \
        and content_type.lower() != "application/jsonx" and len(body) <= FUZZ_MAX_BODY
    if delivery:
        used.append(delivery)
    if signature == correct and event == "push":
        signed.append((body, forge.name))
    return method, path, body, headers, bool(may_emit and delivery)


def test_fuzz_ten_thousand_requests_no_5xx_no_unsigned_foreign_or_replayed_event(
        serve_guarded: Callable[..., str]) -> None:
    sink = AcceptingSink()
    base = serve_guarded(create_app(SECRET, sink=sink, repositories=FUZZ_ALLOWED, max_body_bytes=FUZZ_MAX_BODY))
    rng = random.Random(20240611)
    used: list[str] = []
    signed: list[tuple[bytes, str]] = []
    requests = [fuzz_request(rng, used, signed) for _ in range(10_000)]
    # Delivery ids are per forge: the same id from GitHub and from Gitea are two deliveries.
    may_emit = {("gitea", r[3]["X-Gitea-Delivery"]) if "X-Gitea-Event" in r[3] else ("github", r[3]["X-GitHub-Delivery"])
                for r in requests if r[4]}

    async def run() -> list[tuple[int, dict[str, Any] | None]]:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
            gate = asyncio.Semaphore(8)

            async def one(method: str, path: str, body: bytes, headers: dict[str, Any]) -> tuple[int, Any]:
                async with gate:
                    try:
                        r = await client.request(method, path, content=body, headers=headers)
                    except httpx.TransportError:
                        # Refused early, the connection closed on a body too large to read: the kernel may
                        # reset it before the 413 is read. Only such bodies may end this way.
                        assert len(body) > FUZZ_MAX_BODY // 2, (method, path, len(body), headers)
                        return 413, None
                    try:
                        return r.status_code, r.json()
                    except ValueError:
                        return r.status_code, None

            return await asyncio.gather(*(one(*req[:4]) for req in requests))

    started = time.monotonic()
    answers = asyncio.run(run())
    elapsed = time.monotonic() - started

    server_errors = [(status, body) for status, body in answers if status >= 500]
    assert server_errors == [], server_errors[:5]
    emitted = [(e["payload"]["forge"], e["payload"]["delivery"]) for e in sink.events]
    assert set(emitted) <= may_emit, "an event came from a request that was not a correctly signed push"
    assert len(emitted) == len(set(emitted)), "one delivery emitted twice"
    pushes = [(e["payload"]["repository"].lower(), e["payload"]["ref"], e["payload"]["before"],
               e["payload"]["after"]) for e in sink.events]
    assert len(pushes) == len(set(pushes)), "one push emitted twice (a replay under a new id or other headers)"
    assert {p[0] for p in pushes} <= {r.lower() for r in FUZZ_ALLOWED}, "a foreign repository's push was emitted"
    accepted = [body for status, body in answers if status == 200 and body and body.get("status") == "accepted"]
    assert len(accepted) == len(emitted)
    statuses = {status for status, _ in answers}
    assert {200, 202, 400, 401, 409, 413, 415} <= statuses  # the fuzz reaches every check
    ignored = [body for status, body in answers if status == 202 and body and "repository" in body]
    assert ignored, "no foreign repository reached the allow-list"
    assert elapsed < 120
