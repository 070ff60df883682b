"""The webhook receiver's checks, their order, and the event it emits, against a recording event sink."""

from __future__ import annotations

import asyncio
import json
import uuid
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its test client; httpx is what is installed and works.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from deployments import webhook
from deployments.webhook import (
    GITEA,
    GITHUB,
    Deliveries,
    EventSinkRejected,
    EventSinkUnavailable,
    PrefectEvents,
    create_app,
    parse_push,
    sign,
)

SECRET = "It's a Secret to Everybody"
KEY = SECRET.encode()
SAMPLES = Path("/work/shared/realworld/webhooks")


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


class RecordingSink:
    """The edge where events leave for Prefect: records them, or fails as Prefect would."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.failure: Exception | None = None

    async def emit(self, event: dict[str, Any]) -> None:
        if self.failure is not None:
            raise self.failure
        self.events.append(event)

    async def aclose(self) -> None:
        pass


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def client(sink: RecordingSink) -> TestClient:
    return TestClient(create_app(SECRET, sink=sink))


def github_headers(body: bytes, event: str = "push", delivery: str | None = None, **extra: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(KEY, body, GITHUB),
        **extra,
    }


def gitea_headers(body: bytes, event: str = "push", delivery: str | None = None) -> dict[str, str]:
    delivery = delivery or str(uuid.uuid4())
    # Gitea sends its GitHub-compatible set beside its own; X-GitHub-Event alone must not make it GitHub.
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Gitea-Event": event,
        "X-Gitea-Delivery": delivery,
        "X-Gitea-Signature": sign(KEY, body, GITEA),
    }


PUSH = sample("github__drone-go-scm__push.json")


# --- the happy paths ---------------------------------------------------------------------------------


def test_signed_github_push_emits_one_event_and_answers_after_it(client: TestClient, sink: RecordingSink) -> None:
    r = client.post("/hooks/git", content=PUSH, headers=github_headers(PUSH, delivery="d-1"))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "accepted"
    [event] = sink.events
    assert event["event"] == "homelab.git.push"
    assert event["resource"]["prefect.resource.id"] == "git.repo.Codertocat/Hello-World"
    assert event["payload"] == {
        "repository": "Codertocat/Hello-World",
        "ref": "refs/heads/master",
        "before": "a10867b14bb761a232cd80139fbd4c0d33264240",
        "after": "199eddf46df50de8d02e99bf1c5fdb4101338224",
        "changed_paths": ["README.md"],
        "changed_paths_complete": True,
        "delivery": "d-1",
        "sender": "Codertocat",
        "forge": "github",
    }
    assert r.json()["event_id"] == event["id"]


def test_gitea_push_is_read_by_gitea_headers_even_with_x_github_event(client: TestClient, sink: RecordingSink) -> None:
    body = sample("gitea__drone-go-scm__push.json")
    r = client.post("/hooks/git", content=body, headers=gitea_headers(body, delivery="g-1"))
    assert r.status_code == 200, r.text
    [event] = sink.events
    assert event["resource"]["prefect.resource.id"] == "git.repo.gogits/hello-world"
    assert event["payload"]["forge"] == "gitea"
    assert event["payload"]["changed_paths"] == ["README.md"]
    assert event["payload"]["sender"] == "unknwon"


def test_gitea_delivery_signed_only_github_style_is_refused(client: TestClient, sink: RecordingSink) -> None:
    body = sample("gitea__gitea-docs__push-example.json")
    headers = gitea_headers(body)
    del headers["X-Gitea-Signature"]
    headers["X-Hub-Signature-256"] = sign(KEY, body, GITHUB)
    r = client.post("/hooks/git", content=body, headers=headers)
    assert r.status_code == 401
    assert "X-Gitea-Signature" in r.json()["error"]
    assert sink.events == []


def test_gitea_signature_with_github_prefix_is_refused(client: TestClient, sink: RecordingSink) -> None:
    headers = gitea_headers(PUSH)
    headers["X-Gitea-Signature"] = "sha256=" + headers["X-Gitea-Signature"]
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 401
    assert sink.events == []


def test_ping_answers_pong_and_emits_nothing(client: TestClient, sink: RecordingSink) -> None:
    body = sample("github__octokit-webhooks__ping-default.json")
    r = client.post("/hooks/git", content=body, headers=github_headers(body, event="ping"))
    assert r.status_code == 200
    assert r.json()["pong"] is True
    assert sink.events == []


def test_unhandled_event_is_ignored_with_202(client: TestClient, sink: RecordingSink) -> None:
    body = b'{"action": "opened"}'
    r = client.post("/hooks/git", content=body, headers=github_headers(body, event="issues"))
    assert r.status_code == 202
    assert r.json()["status"] == "ignored"
    assert sink.events == []


def test_healthz_answers_ok(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize(
    ("name", "repo", "ref", "paths", "complete"),
    [
        ("github__drone-go-scm__push.json", "Codertocat/Hello-World", "refs/heads/master", ["README.md"], True),
        ("github__drone-go-scm__push-branch-delete.json", "bradrydzewski/drone-test-go",
         "refs/heads/feature-branch", [], False),
        ("github__octokit-webhooks__push-with-new-branch.json", "Codertocat/Hello-World", "refs/heads/master",
         ["README.md"], False),
        ("github__octokit-webhooks__ghes-35-push-default.json", "Codertocat/Hello-World", "refs/tags/simple-tag",
         [], False),
        ("github__octokit-webhooks__push-with-organization.json", "Codertocat/Hello-World", "refs/tags/simple-tag",
         [], False),
        ("gitea__gitea-docs__push-example.json", "gitea/webhooks", "refs/heads/develop", [], False),
        ("gitea__drone-go-scm__push.json", "gogits/hello-world", "refs/heads/master", ["README.md"], True),
    ],
)
def test_event_shape_from_real_payload(name: str, repo: str, ref: str, paths: list[str], complete: bool,
                                       client: TestClient, sink: RecordingSink) -> None:
    body = sample(name)
    headers = gitea_headers(body) if name.startswith("gitea") else github_headers(body)
    r = client.post("/hooks/git", content=body, headers=headers)
    assert r.status_code == 200, r.text
    [event] = sink.events
    raw = json.loads(body)
    assert event["resource"]["prefect.resource.id"] == f"git.repo.{repo}"
    p = event["payload"]
    assert (p["repository"], p["ref"], p["before"], p["after"]) == (repo, ref, raw["before"], raw["after"])
    assert (p["changed_paths"], p["changed_paths_complete"]) == (paths, complete)
    assert "secret" not in json.dumps(event)  # old Gitea puts the secret in the body


def test_branch_deletion_keeps_the_all_zero_after() -> None:
    push = parse_push(json.loads(sample("github__drone-go-scm__push-branch-delete.json")))
    assert push.after == "0" * 40
    assert push.changed_paths == () and push.changed_paths_complete is False


def test_force_push_paths_are_marked_incomplete() -> None:
    raw = json.loads(PUSH)
    raw["forced"] = True
    assert parse_push(raw).changed_paths_complete is False


def test_event_id_is_stable_per_delivery_so_redeliveries_deduplicate_in_prefect() -> None:
    assert webhook.event_id(GITHUB, "abc") == webhook.event_id(GITHUB, "abc")
    assert webhook.event_id(GITHUB, "abc") != webhook.event_id(GITEA, "abc")


# --- the checks and their order ----------------------------------------------------------------------


def test_declared_oversized_unsigned_body_is_413(client: TestClient, sink: RecordingSink) -> None:
    body = b"x" * (webhook.MAX_BODY_BYTES + 1)
    r = client.post("/hooks/git", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 413
    assert sink.events == []


def test_streamed_oversized_body_without_content_length_is_413(client: TestClient, sink: RecordingSink) -> None:
    def chunks():
        for _ in range(20):
            yield b"{" * 65536

    r = client.post("/hooks/git", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_body_of_exactly_the_limit_passes_the_size_check(client: TestClient) -> None:
    body = b" " * webhook.MAX_BODY_BYTES
    r = client.post("/hooks/git", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 401


def test_form_encoded_delivery_is_415_and_says_to_choose_json(client: TestClient, sink: RecordingSink) -> None:
    body = b"payload=" + PUSH
    headers = github_headers(body, **{"Content-Type": "application/x-www-form-urlencoded"})
    headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
    r = client.post("/hooks/git", content=body, headers=headers)
    assert r.status_code == 415
    assert "application/json" in r.json()["error"]
    assert sink.events == []


def test_json_with_charset_is_accepted(client: TestClient) -> None:
    headers = github_headers(PUSH, **{"Content-Type": "Application/JSON; charset=utf-8"})
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 200


def test_missing_signature_is_401(client: TestClient, sink: RecordingSink) -> None:
    headers = github_headers(PUSH)
    del headers["X-Hub-Signature-256"]
    r = client.post("/hooks/git", content=PUSH, headers=headers)
    assert r.status_code == 401
    assert "missing X-Hub-Signature-256" in r.json()["error"]
    assert sink.events == []


def test_signature_of_another_secret_is_401_and_not_echoed(client: TestClient, sink: RecordingSink) -> None:
    headers = github_headers(PUSH)
    headers["X-Hub-Signature-256"] = sign(b"wrong", PUSH, GITHUB)
    r = client.post("/hooks/git", content=PUSH, headers=headers)
    assert r.status_code == 401
    assert headers["X-Hub-Signature-256"][7:] not in r.text
    assert sink.events == []


def test_signature_over_a_different_body_is_401(client: TestClient) -> None:
    headers = github_headers(PUSH)
    assert client.post("/hooks/git", content=PUSH + b" ", headers=headers).status_code == 401


def test_bad_signature_wins_over_duplicate_and_bad_json(client: TestClient) -> None:
    body = b"{not json"
    headers = github_headers(body, delivery="same")
    assert client.post("/hooks/git", content=body, headers=headers).status_code == 400
    headers["X-Hub-Signature-256"] = "sha256=" + "1" * 64
    assert client.post("/hooks/git", content=body, headers=headers).status_code == 401


def test_duplicate_delivery_is_409_and_emits_once(client: TestClient, sink: RecordingSink) -> None:
    headers = github_headers(PUSH, delivery="dup")
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 200
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 409
    assert len(sink.events) == 1


def test_ping_delivery_counts_as_seen(client: TestClient) -> None:
    body = sample("github__octokit-webhooks__ping-default.json")
    headers = github_headers(body, event="ping", delivery="ping-1")
    assert client.post("/hooks/git", content=body, headers=headers).status_code == 200
    assert client.post("/hooks/git", content=body, headers=headers).status_code == 409


def test_duplicate_check_comes_before_json_parsing(client: TestClient) -> None:
    body = b"{not json"
    headers = github_headers(body, delivery="bad-json")
    assert client.post("/hooks/git", content=body, headers=headers).status_code == 400
    assert client.post("/hooks/git", content=body, headers=headers).status_code == 409


def test_bad_json_is_400_before_the_event_kind(client: TestClient, sink: RecordingSink) -> None:
    body = b"\xff\xfe not json"
    r = client.post("/hooks/git", content=body, headers=github_headers(body, event="issues"))
    assert r.status_code == 400
    assert sink.events == []


def test_deeply_nested_json_is_400_not_a_crash(client: TestClient) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    assert client.post("/hooks/git", content=body, headers=github_headers(body)).status_code == 400


def test_push_without_repository_is_400(client: TestClient, sink: RecordingSink) -> None:
    raw = json.loads(PUSH)
    del raw["repository"]
    body = json.dumps(raw).encode()
    r = client.post("/hooks/git", content=body, headers=github_headers(body))
    assert r.status_code == 400
    assert "repository.full_name" in r.json()["error"]
    assert sink.events == []


def test_push_with_non_hex_after_is_400(client: TestClient, sink: RecordingSink) -> None:
    raw = json.loads(PUSH)
    raw["after"] = "$(reboot)"
    body = json.dumps(raw).encode()
    assert client.post("/hooks/git", content=body, headers=github_headers(body)).status_code == 400
    assert sink.events == []


def test_delivery_id_missing_is_400(client: TestClient) -> None:
    headers = github_headers(PUSH)
    del headers["X-GitHub-Delivery"]
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 400


def test_prefect_unreachable_is_503_and_the_retry_goes_through(client: TestClient, sink: RecordingSink) -> None:
    headers = github_headers(PUSH, delivery="retry-me")
    sink.failure = EventSinkUnavailable("Prefect API at http://127.0.0.1:9/api/events unreachable: ConnectError")
    r = client.post("/hooks/git", content=PUSH, headers=headers)
    assert r.status_code == 503
    assert "Retry-After" in r.headers
    sink.failure = None
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 200
    assert len(sink.events) == 1


def test_prefect_refusal_is_502_and_not_remembered(client: TestClient, sink: RecordingSink) -> None:
    headers = github_headers(PUSH, delivery="refused")
    sink.failure = EventSinkRejected("Prefect API at http://x/api/events refused the event: 401 ''")
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 502
    sink.failure = None
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 200


def test_seen_deliveries_are_bounded_and_oldest_forgotten(sink: RecordingSink) -> None:
    client = TestClient(create_app(SECRET, sink=sink, seen_capacity=3))
    for d in ("a", "b", "c", "d"):
        assert client.post("/hooks/git", content=PUSH, headers=github_headers(PUSH, delivery=d)).status_code == 200
    deliveries: Deliveries = client.app.state.deliveries  # type: ignore[attr-defined]
    assert len(deliveries) == 3
    assert client.post("/hooks/git", content=PUSH, headers=github_headers(PUSH, delivery="d")).status_code == 409
    assert client.post("/hooks/git", content=PUSH, headers=github_headers(PUSH, delivery="a")).status_code == 200


def test_concurrent_duplicate_waits_for_the_first_outcome() -> None:
    async def scenario() -> list[bool]:
        d = Deliveries()
        assert await d.claim("k")
        waiter = asyncio.create_task(d.claim("k"))
        await asyncio.sleep(0)
        assert not waiter.done()
        d.settle("k", remember=False)  # the first failed (503): the duplicate gets to handle it
        first = await waiter
        d.settle("k", remember=True)
        return [first, await d.claim("k")]

    assert asyncio.run(scenario()) == [True, False]


def test_empty_secret_refuses_to_build() -> None:
    with pytest.raises(webhook.WebhookConfigError):
        create_app("", sink=RecordingSink())


# --- the secret ------------------------------------------------------------------------------------


def test_secret_comes_from_the_environment_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMELAB_WEBHOOK_SECRET", "from-env")
    assert webhook.load_secret() == "from-env"


def test_without_env_or_block_it_refuses_with_a_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import blocks

    def missing(name: str) -> Any:
        raise ValueError(f"Unable to find block document named {name}")

    monkeypatch.delenv("HOMELAB_WEBHOOK_SECRET", raising=False)
    monkeypatch.setattr(blocks.Webhook, "load", missing)
    with pytest.raises(webhook.WebhookConfigError, match="HOMELAB_WEBHOOK_SECRET"):
        webhook.load_secret("lab")


def test_serve_exits_2_without_a_secret(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import blocks

    def missing(name: str) -> Any:
        raise ValueError("not found")

    monkeypatch.delenv("HOMELAB_WEBHOOK_SECRET", raising=False)
    monkeypatch.setattr(blocks.Webhook, "load", missing)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), pytest.raises(SystemExit) as exit_:
        webhook.serve(port=1)
    assert exit_.value.code == 2
    assert "no webhook secret" in capsys.readouterr().err


def test_secret_from_block_when_env_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    import blocks

    monkeypatch.delenv("HOMELAB_WEBHOOK_SECRET", raising=False)
    monkeypatch.setattr(blocks.Webhook, "load", lambda name: blocks.Webhook(secret="from-block"))
    assert webhook.load_secret() == "from-block"


# --- the Prefect edge (HTTP faked with httpx.MockTransport) ----------------------------------------


def run_emits(handler: Any, events: list[dict[str, Any]]) -> tuple[list[BaseException | None], PrefectEvents]:
    sink = PrefectEvents("http://prefect.test/api", transport=httpx.MockTransport(handler), senders=1)

    async def go() -> list[BaseException | None]:
        results = await asyncio.gather(*(sink.emit(e) for e in events), return_exceptions=True)
        await sink.aclose()
        return [r if isinstance(r, BaseException) else None for r in results]

    return asyncio.run(go()), sink


def test_concurrent_events_share_posts_as_a_json_array() -> None:
    bodies: list[list[Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/events"
        bodies.append(json.loads(request.content))
        return httpx.Response(204)

    results, sink = run_emits(handler, [{"id": str(i)} for i in range(50)])
    assert results == [None] * 50
    assert sorted(e["id"] for b in bodies for e in b) == sorted(str(i) for i in range(50))
    assert sink.posts < 50


def test_prefect_connect_error_and_5xx_are_unavailable() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    [error], _ = run_emits(refused, [{"id": "1"}])
    assert isinstance(error, EventSinkUnavailable)
    [error], _ = run_emits(lambda request: httpx.Response(503), [{"id": "1"}])
    assert isinstance(error, EventSinkUnavailable)


def test_one_refused_event_does_not_fail_the_batch() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)
        return httpx.Response(422) if any(e["id"] == "bad" for e in events) else httpx.Response(204)

    results, _ = run_emits(handler, [{"id": "1"}, {"id": "bad"}, {"id": "2"}])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], EventSinkRejected)
