"""The webhook receiver under uvicorn, over real HTTP: events stored by a real Prefect server, the 503 path
when Prefect is down, and a fuzz run of 10,000 random or malformed requests."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.webhook import GITEA, GITHUB, MAX_BODY_BYTES, create_app, sign

pytestmark = pytest.mark.integration

SECRET = "integration-secret"
KEY = SECRET.encode()
SAMPLES = Path("/work/shared/realworld/webhooks")


def push_body(repository: str) -> bytes:
    raw = json.loads((SAMPLES / "github__drone-go-scm__push.json").read_text())
    raw["repository"]["full_name"] = repository
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


def test_signed_github_push_is_stored_once_in_prefect(prefect_api_url: str, serve_asgi: Callable[..., str]) -> None:
    base = serve_asgi(create_app(SECRET, prefect_api_url))
    repository = f"homelab/it-{uuid.uuid4().hex[:8]}"
    body = push_body(repository)
    delivery = str(uuid.uuid4())
    r = httpx.post(f"{base}/hooks/git", content=body, headers=github_headers(body, delivery), timeout=10)
    assert r.status_code == 200, r.text
    # A redelivery is refused and must not add a second event.
    r2 = httpx.post(f"{base}/hooks/git", content=body, headers=github_headers(body, delivery), timeout=10)
    assert r2.status_code == 409

    resource_id = f"git.repo.{repository}"
    [event] = wait_for_events(prefect_api_url, resource_id, 1)
    time.sleep(1.5)  # two persister flushes: a second event would be visible by now
    assert len(stored_events(prefect_api_url, resource_id)) == 1
    assert event["id"] == r.json()["event_id"]
    assert event["resource"]["prefect.resource.id"] == resource_id
    payload = event["payload"]
    assert payload["repository"] == repository
    assert payload["ref"] == "refs/heads/master"
    assert payload["before"] == "a10867b14bb761a232cd80139fbd4c0d33264240"
    assert payload["after"] == "199eddf46df50de8d02e99bf1c5fdb4101338224"
    assert payload["changed_paths"] == ["README.md"]
    assert payload["delivery"] == delivery


def test_concurrent_pushes_are_each_stored(prefect_api_url: str, serve_asgi: Callable[..., str]) -> None:
    base = serve_asgi(create_app(SECRET, prefect_api_url))
    repository = f"homelab/burst-{uuid.uuid4().hex[:8]}"
    body = push_body(repository)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            responses = await asyncio.gather(*(
                client.post(f"{base}/hooks/git", content=body, headers=github_headers(body, str(uuid.uuid4())))
                for _ in range(40)))
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 40
    events = wait_for_events(prefect_api_url, f"git.repo.{repository}", 40)
    assert len({e["payload"]["delivery"] for e in events}) == 40


def test_prefect_unreachable_answers_503_and_keeps_the_delivery_retryable(serve_asgi: Callable[..., str]) -> None:
    from conftest import free_port

    base = serve_asgi(create_app(SECRET, f"http://127.0.0.1:{free_port()}/api", prefect_headers={}))
    body = push_body("homelab/down")
    headers = github_headers(body, str(uuid.uuid4()))
    for _ in range(2):  # the second is not a 409: a 503 leaves the delivery unseen
        r = httpx.post(f"{base}/hooks/git", content=body, headers=headers, timeout=10)
        assert r.status_code == 503, r.text
        assert "redeliver" in r.json()["error"]
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200


# --- fuzz --------------------------------------------------------------------------------------------


class AcceptingSink:
    """Always accepts, so the only 5xx a request could get would be a receiver bug."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    async def aclose(self) -> None:
        pass


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
    if roll < 45:
        return rng.choice(REAL_BODIES)
    if roll < 70:
        return json.dumps(mutate(rng, json.loads(rng.choice(REAL_BODIES)))).encode()
    if roll < 80:
        return json.dumps(random_json(rng)).encode()
    if roll < 88:
        body = rng.choice(REAL_BODIES)
        return body[: rng.randrange(len(body))]
    if roll < 95:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if roll < 98:
        depth = rng.randrange(1000, 100_000)
        return b"[" * depth + b"]" * rng.choice([depth, depth - 1])
    return b" " * (MAX_BODY_BYTES + rng.randrange(-2, 3))


def fuzz_request(rng: random.Random, used: list[str]) -> tuple[str, str, bytes, dict[str, Any], bool]:
    """(method, path, body, headers, may_emit): may_emit is True only for a correctly signed push."""
    body = fuzz_body(rng)
    method, path = "POST", "/hooks/git"
    if rng.random() < 0.03:
        method, path = rng.choice([("GET", "/hooks/git"), ("PUT", "/hooks/git"), ("POST", "/hooks/gitx"),
                                   ("GET", "/healthz"), ("POST", "/healthz"), ("DELETE", "/")])
    forge = rng.choice([GITHUB, GITHUB, GITEA])
    headers: dict[str, Any] = {}
    content_type = rng.choice(CONTENT_TYPES) if rng.random() < 0.3 else "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    event = rng.choice(EVENTS)
    if rng.random() > 0.05:
        headers[forge.event_header] = event
    if forge is GITEA and rng.random() < 0.8:
        headers["X-GitHub-Event"] = event
    roll = rng.random()
    if roll < 0.1 and used:
        delivery: str | None = rng.choice(used)
    elif roll < 0.13:
        delivery = rng.choice(["", "-", "x" * 200, None])
    else:
        delivery = str(uuid.UUID(int=rng.getrandbits(128)))
    if delivery is not None:
        headers[forge.delivery_header] = delivery
    roll = rng.random()
    correct = sign(KEY, body, forge)
    if roll < 0.6:
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
        and content_type.lower() != "application/jsonx" and len(body) <= MAX_BODY_BYTES
    if delivery:
        used.append(delivery)
    return method, path, body, headers, bool(may_emit and delivery)


def test_fuzz_ten_thousand_requests_no_5xx_and_no_unsigned_event(serve_asgi: Callable[..., str]) -> None:
    sink = AcceptingSink()
    base = serve_asgi(create_app(SECRET, sink=sink))
    rng = random.Random(20240611)
    used: list[str] = []
    requests = [fuzz_request(rng, used) for _ in range(10_000)]
    # Delivery ids are per forge: the same id from GitHub and from Gitea are two deliveries.
    may_emit = {("gitea", r[3]["X-Gitea-Delivery"]) if "X-Gitea-Event" in r[3] else ("github", r[3]["X-GitHub-Delivery"])
                for r in requests if r[4]}

    async def run() -> list[tuple[int, dict[str, Any] | None]]:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
            gate = asyncio.Semaphore(8)

            async def one(method: str, path: str, body: bytes, headers: dict[str, Any]) -> tuple[int, Any]:
                async with gate:
                    r = await client.request(method, path, content=body, headers=headers)
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
    accepted = [body for status, body in answers if status == 200 and body and body.get("status") == "accepted"]
    assert len(accepted) == len(emitted)
    statuses = {status for status, _ in answers}
    assert {200, 202, 400, 401, 409, 413, 415} <= statuses  # the fuzz reaches every check
    assert elapsed < 90
