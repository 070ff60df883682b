"""The webhook receiver's checks, their order, and the event it emits, against a recording event sink;
the replay store across restarts; the events relay; the repository allow-list."""

from __future__ import annotations

import asyncio
import json
import uuid
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

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
    SeenStore,
    check_relayed_event,
    create_app,
    create_relay_app,
    parse_push_json,
    sign,
)
from homelab.git_push import RepositoryRefused, allowed_repositories, repository_refusal

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


REPOS = ["Codertocat/Hello-World", "https://git.example.test/gogits/hello-world.git", "gitea/webhooks",
         "bradrydzewski/drone-test-go"]


def app(sink: RecordingSink, **kw: Any) -> Any:
    return create_app(SECRET, sink=sink, repositories=kw.pop("repositories", REPOS), **kw)


@pytest.fixture
def client(sink: RecordingSink) -> TestClient:
    return TestClient(app(sink))


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
    # No list of changed paths: the flow reads them from its own clone, never from the sender.
    assert event["payload"] == {
        "repository": "Codertocat/Hello-World",
        "ref": "refs/heads/master",
        "before": "a10867b14bb761a232cd80139fbd4c0d33264240",
        "after": "199eddf46df50de8d02e99bf1c5fdb4101338224",
        "changed_paths": None,
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
    ("name", "repo", "ref"),
    [
        ("github__drone-go-scm__push.json", "Codertocat/Hello-World", "refs/heads/master"),
        ("github__drone-go-scm__push-branch-delete.json", "bradrydzewski/drone-test-go", "refs/heads/feature-branch"),
        ("github__octokit-webhooks__push-with-new-branch.json", "Codertocat/Hello-World", "refs/heads/master"),
        ("github__octokit-webhooks__ghes-35-push-default.json", "Codertocat/Hello-World", "refs/tags/simple-tag"),
        ("github__octokit-webhooks__push-with-organization.json", "Codertocat/Hello-World", "refs/tags/simple-tag"),
        ("gitea__gitea-docs__push-example.json", "gitea/webhooks", "refs/heads/develop"),
        ("gitea__drone-go-scm__push.json", "gogits/hello-world", "refs/heads/master"),
    ],
)
def test_event_shape_from_real_payload(name: str, repo: str, ref: str, client: TestClient,
                                       sink: RecordingSink) -> None:
    body = sample(name)
    headers = gitea_headers(body) if name.startswith("gitea") else github_headers(body)
    r = client.post("/hooks/git", content=body, headers=headers)
    assert r.status_code == 200, r.text
    [event] = sink.events
    raw = json.loads(body)
    assert event["resource"]["prefect.resource.id"] == f"git.repo.{repo}"
    p = event["payload"]
    assert (p["repository"], p["ref"], p["before"], p["after"]) == (repo, ref, raw["before"], raw["after"])
    assert "secret" not in json.dumps(event)  # old Gitea puts the secret in the body


def test_large_bodies_read_as_a_stream_give_the_fields_json_gives() -> None:
    from deployments.webhook import PushFields

    for path in sorted(SAMPLES.glob("*push*.json")):
        body = path.read_bytes()
        streamed, parsed = PushFields.stream(body), PushFields.of(json.loads(body))
        assert (streamed.top, streamed.nested, streamed.is_object) == (parsed.top, parsed.nested, True), path
        push = parse_push_json(body)
        assert (push.repository, push.before) == (json.loads(body)["repository"]["full_name"],
                                                  json.loads(body)["before"])


def test_signed_body_over_a_mib_is_parsed_as_a_stream(client: TestClient, sink: RecordingSink) -> None:
    raw = json.loads(PUSH)
    raw["commits"] = [{"id": f"{i:040x}", "message": "x" * 1000, "added": [f"f{i}"]} for i in range(2000)]
    body = json.dumps(raw).encode()
    assert len(body) > webhook.STREAM_PARSE_BYTES
    r = client.post("/hooks/git", content=body, headers=github_headers(body))
    assert r.status_code == 200, r.text
    assert sink.events[0]["payload"]["after"] == raw["after"]


def test_branch_deletion_keeps_the_all_zero_after() -> None:
    assert parse_push_json(sample("github__drone-go-scm__push-branch-delete.json")).after == "0" * 40


def test_event_id_is_stable_per_delivery_so_redeliveries_deduplicate_in_prefect() -> None:
    assert webhook.event_id(GITHUB, "abc") == webhook.event_id(GITHUB, "abc")
    assert webhook.event_id(GITHUB, "abc") != webhook.event_id(GITEA, "abc")


# --- only the repositories it serves --------------------------------------------------------------


def with_repository(body: bytes, full_name: str) -> bytes:
    raw = json.loads(body)
    raw["repository"]["full_name"] = full_name
    return json.dumps(raw).encode()


def test_signed_push_of_a_foreign_repository_is_202_ignored_with_no_event(client: TestClient,
                                                                       sink: RecordingSink) -> None:
    body = with_repository(PUSH, "attacker/unrelated-repo")
    r = client.post("/hooks/git", content=body, headers=github_headers(body))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "ignored" and "attacker/unrelated-repo" in r.json()["reason"]
    assert sink.events == []


def test_repository_names_compare_case_insensitively_and_clone_urls_stand_for_theirs(
        client: TestClient, sink: RecordingSink) -> None:
    body = with_repository(PUSH, "codertocat/hello-world")
    assert client.post("/hooks/git", content=body, headers=github_headers(body)).status_code == 200
    body = with_repository(PUSH, "GoGits/Hello-World")  # allowed by its clone URL in REPOS
    assert client.post("/hooks/git", content=body, headers=github_headers(body)).status_code == 200
    assert len(sink.events) == 2


def test_repository_list_entries_are_full_names_or_clone_urls() -> None:
    assert allowed_repositories(["Me/HomeLab", "https://github.com/me/other.git", "git@git.lan:team/x.git",
                                 "ssh://git@github.com/me/third", " "]) == {"me/homelab", "me/other", "team/x",
                                                                           "me/third"}
    for bad in ("/srv/git/homelab", "file:///srv/homelab", "--upload-pack=touch", "justaname"):
        with pytest.raises(RepositoryRefused, match="neither owner/name nor a clone URL"):
            allowed_repositories([bad])
    assert repository_refusal("Me/HomeLab", frozenset({"me/homelab"})) is None
    assert "names none" in str(repository_refusal("me/homelab", frozenset()))


def test_git_block_allows_its_list_or_the_repository_its_url_names() -> None:
    from blocks import GitSource

    assert GitSource(url="/srv/homelab", repositories=["me/homelab"]).allowed_repositories() == {"me/homelab"}
    assert GitSource(url="https://github.com/Me/HomeLab.git").allowed_repositories() == {"me/homelab"}
    assert GitSource(url="/srv/homelab").allowed_repositories() == frozenset()
    with pytest.raises(ValueError, match="repositories"):
        GitSource(url="/srv/homelab", repositories=["$(reboot)"])


def test_receiver_without_repositories_refuses_to_build() -> None:
    with pytest.raises(webhook.WebhookConfigError, match="HOMELAB_WEBHOOK_REPOS"):
        create_app(SECRET, sink=RecordingSink(), repositories=[])


# --- replays -------------------------------------------------------------------------------------------


def test_same_signed_push_under_a_new_delivery_id_is_409(client: TestClient, sink: RecordingSink) -> None:
    assert client.post("/hooks/git", content=PUSH, headers=github_headers(PUSH, delivery="one")).status_code == 200
    r = client.post("/hooks/git", content=PUSH, headers=github_headers(PUSH, delivery="two"))
    assert r.status_code == 409 and "same push" in r.json()["error"]
    assert len(sink.events) == 1


def test_same_push_resent_with_gitea_headers_is_409(client: TestClient, sink: RecordingSink) -> None:
    assert client.post("/hooks/git", content=PUSH, headers=github_headers(PUSH)).status_code == 200
    # An attacker who saw the GitHub delivery drops "sha256=" and sends it as Gitea: the HMAC is the same.
    assert client.post("/hooks/git", content=PUSH, headers=gitea_headers(PUSH)).status_code == 409
    assert len(sink.events) == 1


def test_replays_are_refused_after_a_restart(tmp_path: Path, sink: RecordingSink) -> None:
    state = tmp_path / "state" / "deliveries.sqlite3"
    first = TestClient(app(sink, state_path=state))
    assert first.post("/hooks/git", content=PUSH, headers=github_headers(PUSH, delivery="r-1")).status_code == 200
    first.app.state.deliveries.store.close()  # type: ignore[attr-defined]
    again = TestClient(app(sink, state_path=state))  # a new process would open the same file
    assert again.post("/hooks/git", content=PUSH, headers=github_headers(PUSH, delivery="r-1")).status_code == 409
    assert again.post("/hooks/git", content=PUSH, headers=github_headers(PUSH, delivery="r-2")).status_code == 409
    assert len(sink.events) == 1


def test_seen_store_is_bounded_and_forgets_the_oldest(tmp_path: Path) -> None:
    store = SeenStore(tmp_path / "s.sqlite3", capacity=3)
    for k in ("a", "b", "c", "d"):
        store.add(k)
    assert len(store) == 3 and not store.seen("a") and store.seen("b", "zzz")
    store.close()
    assert SeenStore(tmp_path / "s.sqlite3", capacity=3).seen("d")


def test_unusable_state_file_refuses_to_start_with_a_next_step(tmp_path: Path) -> None:
    (tmp_path / "broken.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(webhook.WebhookConfigError, match="HOMELAB_WEBHOOK_STATE"):
        SeenStore(tmp_path / "broken.sqlite3")


def test_seen_deliveries_are_bounded_and_oldest_forgotten(sink: RecordingSink) -> None:
    client = TestClient(app(sink, seen_capacity=3))
    bodies = [json.dumps({**json.loads(PUSH), "after": c * 40}).encode() for c in "abcd"]
    for i, body in enumerate(bodies):
        r = client.post("/hooks/git", content=body, headers=github_headers(body, delivery=f"d{i}"))
        assert r.status_code == 200
    deliveries: Deliveries = client.app.state.deliveries  # type: ignore[attr-defined]
    assert len(deliveries.store) == 6  # a delivery id and a push each
    assert client.post("/hooks/git", content=bodies[3], headers=github_headers(bodies[3], delivery="d3")).status_code == 409
    assert client.post("/hooks/git", content=bodies[0], headers=github_headers(bodies[0], delivery="d0")).status_code == 200


def test_concurrent_duplicate_waits_for_the_first_outcome() -> None:
    async def scenario() -> list[bool]:
        d = Deliveries(SeenStore(None))
        assert await d.claim("k", "p")
        waiter = asyncio.create_task(d.claim("other", "p"))  # the same push under another delivery id
        await asyncio.sleep(0)
        assert not waiter.done()
        d.settle(["k", "p"], remember=False)  # the first failed (503): the duplicate gets to handle it
        first = await waiter
        d.settle(["other", "p"], remember=True)
        return [first, await d.claim("k", "p")]

    assert asyncio.run(scenario()) == [True, False]


# --- the checks and their order ----------------------------------------------------------------------


def test_declared_oversized_body_is_413_before_anything_is_read(sink: RecordingSink) -> None:
    client = TestClient(app(sink, max_body_bytes=1000))
    r = client.post("/hooks/git", content=b"x" * 1001, headers={"Content-Type": "text/plain"})
    assert r.status_code == 413
    assert sink.events == []


def test_content_length_of_23_digits_is_413_not_400(client: TestClient) -> None:
    async def scenario() -> tuple[int, bool]:
        sent: list[dict[str, Any]] = []
        read = False

        async def receive() -> dict[str, Any]:
            nonlocal read
            read = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/hooks/git", "raw_path": b"/hooks/git",
                 "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 1),
                 "headers": [(b"content-length", b"9" * 23), (b"content-type", b"application/json")]}
        await client.app(scope, receive, send)  # type: ignore[arg-type]
        return sent[0]["status"], read

    assert asyncio.run(scenario()) == (413, False)


def test_streamed_oversized_body_without_content_length_is_413(sink: RecordingSink) -> None:
    client = TestClient(app(sink, max_body_bytes=100_000))

    def chunks() -> Any:
        for _ in range(20):
            yield b" " * 65536

    headers = github_headers(b"")
    r = client.post("/hooks/git", content=chunks(), headers=headers)
    assert r.status_code == 413


def test_body_of_exactly_the_limit_passes_the_size_check(sink: RecordingSink) -> None:
    client = TestClient(app(sink, max_body_bytes=100_000))
    body = PUSH + b" " * (100_000 - len(PUSH))
    assert client.post("/hooks/git", content=body, headers=github_headers(body)).status_code == 200


def test_form_encoded_delivery_is_415_and_says_to_choose_json(client: TestClient, sink: RecordingSink) -> None:
    body = b"payload=" + PUSH
    headers = github_headers(body, **{"Content-Type": "application/x-www-form-urlencoded"})
    r = client.post("/hooks/git", content=body, headers=headers)
    assert r.status_code == 415
    assert "application/json" in r.json()["error"]
    assert sink.events == []


def test_json_with_charset_is_accepted(client: TestClient) -> None:
    headers = github_headers(PUSH, **{"Content-Type": "Application/JSON; charset=utf-8"})
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 200


def test_missing_signature_is_401_before_the_body_is_read(client: TestClient, sink: RecordingSink) -> None:
    headers = github_headers(PUSH)
    del headers["X-Hub-Signature-256"]
    r = client.post("/hooks/git", content=PUSH, headers=headers)
    assert r.status_code == 401
    assert "missing X-Hub-Signature-256" in r.json()["error"]
    assert "connection" not in r.headers  # a small unread body is dropped by uvicorn, the connection kept
    big = b" " * (webhook.BODY_ALLOWANCE + 1)
    r = client.post("/hooks/git", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and r.headers["connection"] == "close"  # a large one is cut off unread
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


def test_bad_signature_wins_over_bad_json(client: TestClient) -> None:
    for body in (b"{not json", b"[" * 1000, b"[" + b"1," * 600_000 + b"1]"):
        headers = github_headers(body)
        assert client.post("/hooks/git", content=body, headers=headers).status_code == 400
        headers["X-Hub-Signature-256"] = "sha256=" + "1" * 64
        assert client.post("/hooks/git", content=body, headers=headers).status_code == 401


def test_unfinished_bodies_beyond_the_shared_budget_are_503_and_small_ones_still_pass(sink: RecordingSink) -> None:
    from deployments.webhook import Body, ByteBudget

    budget = ByteBudget(100)
    big, other = Body(KEY, budget, allowance=10), Body(KEY, budget, allowance=10)
    assert big.add(b"x" * 110)  # 10 of its own, 100 borrowed
    assert not other.add(b"y" * 11) and other.size == 0  # nothing left to borrow
    assert other.add(b"y" * 10)  # its own allowance is always there
    big.release()
    assert budget.free == 100 and other.add(b"y" * 50)
    client = TestClient(app(sink, body_allowance=1000, body_budget=0))
    r = client.post("/hooks/git", content=PUSH, headers=github_headers(PUSH))
    assert r.status_code == 503 and "redeliver" in r.json()["error"]
    small = b'{"zen": "ok"}'
    assert client.post("/hooks/git", content=small, headers=github_headers(small, event="issues")).status_code == 202


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


def test_bad_json_is_400_before_the_event_kind(client: TestClient, sink: RecordingSink) -> None:
    body = b"\xff\xfe not json"
    r = client.post("/hooks/git", content=body, headers=github_headers(body, event="issues"))
    assert r.status_code == 400
    assert sink.events == []


def test_deeply_nested_json_is_400_not_a_crash(client: TestClient) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    r = client.post("/hooks/git", content=body, headers=github_headers(body))
    assert r.status_code == 400 and "not JSON" in r.json()["error"]


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
    sink.failure = EventSinkUnavailable("events endpoint http://127.0.0.1:9/api/events unreachable: ConnectError")
    r = client.post("/hooks/git", content=PUSH, headers=headers)
    assert r.status_code == 503
    assert "Retry-After" in r.headers
    sink.failure = None
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 200
    assert len(sink.events) == 1


def test_prefect_refusal_is_502_and_not_remembered(client: TestClient, sink: RecordingSink) -> None:
    headers = github_headers(PUSH, delivery="refused")
    sink.failure = EventSinkRejected("events endpoint http://x/api/events refused the event: 403 ''")
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 502
    sink.failure = None
    assert client.post("/hooks/git", content=PUSH, headers=headers).status_code == 200


def test_empty_secret_refuses_to_build() -> None:
    with pytest.raises(webhook.WebhookConfigError):
        create_app("", sink=RecordingSink(), repositories=REPOS)


# --- configuration ---------------------------------------------------------------------------------


def test_secret_comes_from_the_environment_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMELAB_WEBHOOK_SECRET", "from-env")
    assert webhook.load_secret() == "from-env"


def test_repositories_come_from_the_environment_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMELAB_WEBHOOK_REPOS", " me/homelab, ,you/other ")
    assert webhook.load_repositories() == ["me/homelab", "you/other"]
    monkeypatch.setenv("HOMELAB_WEBHOOK_REPOS", " , ")
    with pytest.raises(webhook.WebhookConfigError, match="names no repository"):
        webhook.load_repositories()


def test_without_env_or_block_it_refuses_with_a_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import blocks

    def missing(name: str) -> Any:
        raise ValueError(f"Unable to find block document named {name}")

    monkeypatch.delenv("HOMELAB_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("HOMELAB_WEBHOOK_REPOS", raising=False)
    monkeypatch.setattr(blocks.Webhook, "load", missing)
    monkeypatch.setattr(blocks.GitSource, "load", missing)
    with pytest.raises(webhook.WebhookConfigError, match="HOMELAB_WEBHOOK_SECRET"):
        webhook.load_secret("lab")
    with pytest.raises(webhook.WebhookConfigError, match="HOMELAB_WEBHOOK_REPOS"):
        webhook.load_repositories("lab")


@pytest.mark.parametrize(("env", "message"), [
    ({"HOMELAB_WEBHOOK_REPOS": "me/homelab"}, "no webhook secret"),
    ({"HOMELAB_WEBHOOK_SECRET": "s"}, "no repository to serve"),
    ({"HOMELAB_WEBHOOK_SECRET": "s", "HOMELAB_WEBHOOK_REPOS": "not a repo"}, "neither owner/name nor a clone URL"),
])
def test_serve_exits_2_with_what_is_missing(env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import blocks

    def missing(name: str) -> Any:
        raise ValueError("not found")

    for name in ("HOMELAB_WEBHOOK_SECRET", "HOMELAB_WEBHOOK_REPOS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOMELAB_WEBHOOK_STATE", str(tmp_path / "s.sqlite3"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(blocks.Webhook, "load", missing)
    monkeypatch.setattr(blocks.GitSource, "load", missing)
    with pytest.raises(SystemExit) as exit_:
        webhook.serve(port=1)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_secret_from_block_when_env_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    import blocks

    monkeypatch.delenv("HOMELAB_WEBHOOK_SECRET", raising=False)
    monkeypatch.setattr(blocks.Webhook, "load", lambda name: blocks.Webhook(secret="from-block"))
    assert webhook.load_secret() == "from-block"


def test_receiver_module_needs_no_prefect_and_no_prefect_credential() -> None:
    import subprocess
    import sys

    # The internet-facing process neither imports Prefect (memory, and Prefect's settings would read its
    # credentials) nor sends a credential: the relay holds it.
    code = ("import sys, deployments.webhook as w; "
            "assert not [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')], 'prefect imported'; "
            "assert 'Authorization' not in w.PrefectEvents('http://x/api')._headers")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=60, check=False)
    assert done.returncode == 0, done.stderr


# --- the events relay ------------------------------------------------------------------------------------


def relayed(event_name: str = "homelab.git.push", repository: str = "me/homelab", **extra: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "occurred": "2026-01-01T00:00:00+00:00", "event": event_name,
            "resource": {"prefect.resource.id": f"git.repo.{repository}", "prefect.resource.name": repository},
            "related": [], "payload": {"repository": repository, "ref": "refs/heads/main", "before": "a" * 40,
                                       "after": "b" * 40, "delivery": "d", "sender": "me", "forge": "github"},
            **extra}


def test_relay_passes_only_push_events_of_its_repositories() -> None:
    allowed = frozenset({"me/homelab"})
    assert check_relayed_event(relayed(), allowed) is None
    assert "only homelab.git.push" in str(check_relayed_event(relayed("prefect.flow-run.Completed"), allowed))
    assert "not one the relay serves" in str(check_relayed_event(relayed(repository="other/repo"), allowed))
    forged = relayed(related=[{"prefect.resource.id": "prefect.deployment.x", "prefect.resource.role": "target"}])
    assert check_relayed_event(forged, allowed) is not None
    wrong_resource = relayed()
    wrong_resource["resource"] = {"prefect.resource.id": "prefect.flow-run.1"}
    assert check_relayed_event(wrong_resource, allowed) is not None
    for key, value in (("changed_paths", ["x"]), ("extra", 1)):
        extra_payload = relayed()
        extra_payload["payload"][key] = value
        assert check_relayed_event(extra_payload, allowed) is not None


def test_relay_forwards_with_the_credential_and_refuses_the_rest() -> None:
    seen: list[httpx.Request] = []

    def prefect(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    relay = create_relay_app("http://prefect.test/api", repositories=["me/homelab"],
                             headers={"Authorization": "Basic c2VjcmV0"}, transport=httpx.MockTransport(prefect))
    with TestClient(relay) as client:
        ok = client.post("/api/events", json=[relayed()])
        refused = client.post("/api/events", json=[relayed(), relayed("prefect.deployment.triggered")])
        too_big = client.post("/api/events", content=b"[" + b" " * (webhook.RELAY_MAX_BODY_BYTES + 1) + b"]",
                              headers={"Content-Type": "application/json"})
    assert ok.status_code == 204
    assert refused.status_code == 403 and too_big.status_code == 413
    [request] = seen  # the refused batch was not passed on, not even its allowed half
    assert request.url == "http://prefect.test/api/events"
    assert request.headers["Authorization"] == "Basic c2VjcmV0"


def test_relay_maps_prefect_failures_to_what_the_receiver_retries() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    for transport, status in ((httpx.MockTransport(down), 503),
                              (httpx.MockTransport(lambda r: httpx.Response(401)), 502)):
        relay = create_relay_app("http://prefect.test/api", repositories=["me/homelab"], transport=transport)
        with TestClient(relay) as client:
            assert client.post("/api/events", json=[relayed()]).status_code == status


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
