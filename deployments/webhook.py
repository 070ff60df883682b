"""The git webhook receiver: a signed push from GitHub or Gitea/Forgejo becomes one Prefect event.

`POST /hooks/git` checks, in this order, and emits nothing when one fails:

    413  body over 1 MiB (Content-Length, then the stream itself)
    415  content type not application/json
    401  signature missing or wrong (HMAC-SHA256 of the raw body, constant-time compare)
    409  delivery id already handled (the last 10,000 signed deliveries, pings included)
    400  body not JSON, or a push without repository/ref/before/after
    202  an event other than push or ping: ignored

A valid push becomes one `homelab.git.push` event (resource `git.repo.<owner>/<name>`) posted to
Prefect's `POST /events`; the sender gets 200 only once Prefect has accepted it. When Prefect cannot be
reached the answer is 503 and the delivery is not remembered, so the sender's redelivery goes through.
The event id is derived from the delivery id, so a redelivery of an event Prefect did store after all
is dropped by Prefect's triggers instead of starting a second run.

Concurrent events share one `POST /events` (a request that arrives while a post is in flight waits for
the next one), which keeps Prefect's load flat under bursts without delaying a lone push.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import sys
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger("homelab.webhook")

EVENT_NAME = "homelab.git.push"
MAX_BODY_BYTES = 1 << 20
SEEN_CAPACITY = 10_000
SECRET_ENV = "HOMELAB_WEBHOOK_SECRET"
ZERO_SHA = "0" * 40
# GitHub lists at most 2048 commits in a push payload; a full list may be a truncated one.
GITHUB_COMMIT_LIMIT = 2048
# Prefect silently drops an event whose JSON exceeds PREFECT_EVENTS_MAXIMUM_SIZE_BYTES (1.5 MB by
# default) after answering 204, so an event that could come near it goes without its path list.
MAX_EVENT_BYTES = 1_000_000
# Delivery ids of GitHub and Gitea are UUIDs; anything much longer is not a delivery id.
MAX_DELIVERY_ID_LENGTH = 128
# Derives event ids from delivery ids (uuid5), so redeliveries carry the same event id.
EVENT_ID_NAMESPACE = uuid.UUID("6f1f1a3e-4f0c-5d55-9a57-2b0a3c1d7e21")

_SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_DIGITS_RE = re.compile(r"^[0-9]{1,20}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$")


class WebhookConfigError(Exception):
    """The receiver cannot start: the message says what is missing and how to provide it."""


# --- pure decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forge:
    """The header set one kind of git server signs and labels its deliveries with."""

    name: str
    event_header: str
    signature_header: str
    delivery_header: str
    signature_prefix: str


GITHUB = Forge("github", "X-GitHub-Event", "X-Hub-Signature-256", "X-GitHub-Delivery", "sha256=")
GITEA = Forge("gitea", "X-Gitea-Event", "X-Gitea-Signature", "X-Gitea-Delivery", "")
FORGEJO = Forge("forgejo", "X-Forgejo-Event", "X-Forgejo-Signature", "X-Forgejo-Delivery", "")


def identify_forge(headers: Mapping[str, str]) -> Forge:
    """Which server sent this. Gitea and Forgejo also send X-GitHub-Event (without GitHub's signature
    header format), so their own headers are read first."""
    for forge in (GITEA, FORGEJO):
        if forge.event_header in headers:
            return forge
    return GITHUB


def sign(secret: bytes, body: bytes, forge: Forge = GITHUB) -> str:
    """The signature header value `forge` would send for `body`."""
    return forge.signature_prefix + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_valid(secret: bytes, body: bytes, forge: Forge, header: str | None) -> bool:
    if not header:
        return False
    # Starlette decodes headers as latin-1, so this round-trips any byte a client sent.
    given = header.strip().encode("latin-1")
    expected = sign(secret, body, forge).encode("ascii")
    return hmac.compare_digest(expected, given.lower())


def is_json_content_type(value: str | None) -> bool:
    if not value:
        return False
    return value.split(";", 1)[0].strip().lower() == "application/json"


class PayloadError(ValueError):
    """A signed push whose JSON lacks what the event needs; the message names the field."""


@dataclass(frozen=True)
class Push:
    repository: str
    ref: str
    before: str
    after: str
    changed_paths: tuple[str, ...]
    # False when the payload cannot tell every changed path (no per-commit lists, a force push, a
    # created or deleted ref, a truncated commit list): the flow then diffs before..after in git.
    changed_paths_complete: bool
    sender: str | None


def _sha(payload: Mapping[str, Any], field: str) -> str:
    value = payload.get(field)
    if not isinstance(value, str) or not _SHA_RE.match(value.lower()):
        raise PayloadError(f"push payload: {field}: expected a 40- or 64-digit hex commit id, got {_shown(value)}")
    return value.lower()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _changed_paths(payload: Mapping[str, Any], before: str, after: str) -> tuple[tuple[str, ...], bool]:
    commits = payload.get("commits")
    if not isinstance(commits, list):
        return (), False
    paths: set[str] = set()
    complete = bool(commits) and len(commits) < GITHUB_COMMIT_LIMIT
    for commit in commits:
        if not isinstance(commit, Mapping):
            return (), False
        for key in ("added", "modified", "removed"):
            listed = commit.get(key)
            if not isinstance(listed, list):
                complete = False
                continue
            paths.update(p for p in listed if isinstance(p, str) and p)
    total = payload.get("total_commits")  # Gitea: more commits than it listed
    if isinstance(total, int) and total > len(commits):
        complete = False
    if payload.get("forced") is True or before.strip("0") == "" or after.strip("0") == "":
        complete = False
    return tuple(sorted(paths)), complete


def parse_push(payload: Any) -> Push:
    """The fields of a GitHub or Gitea push payload the event carries. Raises PayloadError."""
    if not isinstance(payload, Mapping):
        raise PayloadError(f"push payload: expected a JSON object, got {type(payload).__name__}")
    repo = payload.get("repository")
    full_name = repo.get("full_name") if isinstance(repo, Mapping) else None
    if not isinstance(full_name, str) or not _REPO_RE.match(full_name):
        raise PayloadError(f"push payload: repository.full_name: expected 'owner/name', got {_shown(full_name)}")
    ref = payload.get("ref")
    if not isinstance(ref, str) or not ref.startswith("refs/") or len(ref) > 1024 or not ref.isprintable():
        raise PayloadError(f"push payload: ref: expected a ref such as 'refs/heads/main', got {_shown(ref)}")
    before, after = _sha(payload, "before"), _sha(payload, "after")
    paths, complete = _changed_paths(payload, before, after)
    sender = None
    for who in ("sender", "pusher"):
        person = payload.get(who)
        if isinstance(person, Mapping):
            name = person.get("login") or person.get("username") or person.get("name")
            if isinstance(name, str) and name:
                sender = name[:200]
                break
    return Push(full_name, ref, before, after, paths, complete, sender)


def event_id(forge: Forge, delivery: str) -> uuid.UUID:
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{forge.name}:{delivery}")


def push_event(push: Push, forge: Forge, delivery: str, occurred: datetime) -> dict[str, Any]:
    """The Prefect Event (as JSON data) for one push."""
    payload: dict[str, Any] = {
        "repository": push.repository,
        "ref": push.ref,
        "before": push.before,
        "after": push.after,
        "changed_paths": list(push.changed_paths),
        "changed_paths_complete": push.changed_paths_complete,
        "delivery": delivery,
        "sender": push.sender,
        "forge": forge.name,
    }
    if len(json.dumps(payload["changed_paths"])) > MAX_EVENT_BYTES:
        payload["changed_paths"], payload["changed_paths_complete"] = [], False
    return {
        "id": str(event_id(forge, delivery)),
        "occurred": occurred.astimezone(UTC).isoformat(),
        "event": EVENT_NAME,
        "resource": {"prefect.resource.id": f"git.repo.{push.repository}", "prefect.resource.name": push.repository},
        "related": [],
        "payload": payload,
    }


class Deliveries:
    """The delivery ids already handled (the last `capacity`, least recently seen forgotten first) and
    those being handled now. A duplicate that arrives while its twin is still being handled waits for
    the outcome: 409 if that one was remembered, else it is handled itself."""

    def __init__(self, capacity: int = SEEN_CAPACITY) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[None]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    async def claim(self, key: str) -> bool:
        """True: the caller handles `key` and must call settle(). False: already handled."""
        while True:
            if key in self._seen:
                self._seen.move_to_end(key)
                return False
            pending = self._inflight.get(key)
            if pending is None:
                self._inflight[key] = asyncio.get_running_loop().create_future()
                return True
            await asyncio.shield(pending)

    def settle(self, key: str, remember: bool) -> None:
        if remember:
            self._seen[key] = None
            self._seen.move_to_end(key)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
        pending = self._inflight.pop(key, None)
        if pending is not None and not pending.done():
            pending.set_result(None)


# --- the Prefect edge --------------------------------------------------------------------------------


class EventSinkUnavailable(Exception):
    """Prefect could not be reached or failed (connect error, timeout, 5xx): a retry may succeed."""


class EventSinkRejected(Exception):
    """Prefect answered 4xx: the event or the credentials are wrong; retrying the same will not help."""


class EventSink(Protocol):
    async def emit(self, event: dict[str, Any]) -> None: ...

    async def aclose(self) -> None: ...


def prefect_auth_headers() -> dict[str, str]:
    """Authorization for the Prefect API, as Prefect's own client builds it."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    auth_string, api_key = PREFECT_API_AUTH_STRING.value(), PREFECT_API_KEY.value()
    if auth_string:
        return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}
    if api_key:
        return {"Authorization": f"Bearer {api_key}"}
    return {}


class PrefectEvents:
    """Posts events to `{api_url}/events`. Events emitted while a post is in flight go together in the
    next one; `emit` returns once the post that carried its event was accepted."""

    def __init__(
        self,
        api_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        max_batch: int = 256,
        max_batch_bytes: int = 4 << 20,
        senders: int = 1,
        max_waiting: int = 10_000,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = api_url.rstrip("/") + "/events"
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 2.0))
        self._max_batch, self._max_batch_bytes = max_batch, max_batch_bytes
        self._senders, self._max_waiting = senders, max_waiting
        self._transport = transport
        self._pending: deque[tuple[bytes, asyncio.Future[None]]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.posts = 0  # POSTs sent and events they carried: the batching at work, shown by /healthz
        self.events_posted = 0

    def _start(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._wakeup is None:
            # A new event loop (a test client's portal, a restarted server): the old tasks are gone with it.
            self._loop, self._wakeup = loop, asyncio.Event()
            self._client = httpx.AsyncClient(
                timeout=self._timeout, transport=self._transport,
                limits=httpx.Limits(max_connections=self._senders, max_keepalive_connections=self._senders))
            self._tasks = [loop.create_task(self._send_loop()) for _ in range(self._senders)]
        return self._wakeup

    async def emit(self, event: dict[str, Any]) -> None:
        wakeup = self._start()
        if len(self._pending) >= self._max_waiting:
            raise EventSinkUnavailable(f"{len(self._pending)} events already wait for Prefect at {self.url}")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((json.dumps(event, separators=(",", ":")).encode(), done))
        wakeup.set()
        await done

    async def _send_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch: list[tuple[bytes, asyncio.Future[None]]] = []
            size = 0
            while self._pending and len(batch) < self._max_batch:
                encoded, done = self._pending[0]
                if batch and size + len(encoded) > self._max_batch_bytes:
                    break
                self._pending.popleft()
                if done.done():  # the request went away (client disconnected)
                    continue
                batch.append((encoded, done))
                size += len(encoded)
            if batch:
                await self._deliver(batch)

    async def _deliver(self, batch: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        try:
            await self._post([encoded for encoded, _ in batch])
        except EventSinkRejected as error:
            if len(batch) == 1:
                _resolve(batch[0][1], error)
                return
            # One bad event must not sink the others posted with it: try each on its own.
            for item in batch:
                await self._deliver([item])
            return
        except Exception as error:
            for _, done in batch:
                _resolve(done, error)
            return
        for _, done in batch:
            _resolve(done, None)

    async def _post(self, events: list[bytes]) -> None:
        assert self._client is not None
        self.posts += 1
        self.events_posted += len(events)
        try:
            response = await self._client.post(self.url, content=b"[" + b",".join(events) + b"]",
                                               headers=self._headers)
        except httpx.HTTPError as error:
            raise EventSinkUnavailable(f"Prefect API at {self.url} unreachable: {type(error).__name__}") from None
        if response.status_code >= 500:
            raise EventSinkUnavailable(f"Prefect API at {self.url} answered {response.status_code}")
        if response.status_code >= 300:
            raise EventSinkRejected(
                f"Prefect API at {self.url} refused the event: {response.status_code} {response.text[:200]!r}")

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, RuntimeError):
                pass
        self._tasks = []
        while self._pending:
            _resolve(self._pending.popleft()[1], EventSinkUnavailable("the receiver is shutting down"))
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._wakeup, self._loop = None, None


def _resolve(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


# --- the ASGI app ------------------------------------------------------------------------------------


def _answer(code: int, /, **body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=code)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it grows past `limit` (never holds more than limit + one chunk)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    secret: str,
    prefect_api_url: str | None = None,
    *,
    sink: EventSink | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    seen_capacity: int = SEEN_CAPACITY,
    prefect_headers: Mapping[str, str] | None = None,
) -> Starlette:
    """The receiver. Events go to `sink` when given (tests), else to the Prefect API at
    `prefect_api_url` (default: PREFECT_API_URL)."""
    if not secret:
        raise WebhookConfigError("the webhook secret is empty: set HOMELAB_WEBHOOK_SECRET or the Webhook block's secret")
    key = secret.encode()
    if sink is None:
        url = prefect_api_url or resolve_api_url()
        sink = PrefectEvents(url, headers=prefect_auth_headers() if prefect_headers is None else prefect_headers)
    events: EventSink = sink
    deliveries = Deliveries(seen_capacity)

    async def git_hook(request: Request) -> JSONResponse:
        headers = request.headers
        declared = headers.get("content-length")
        if declared is not None:
            if not _DIGITS_RE.match(declared.strip()):
                return _answer(400, error=f"Content-Length {_shown(declared)} is not a byte count")
            if int(declared) > max_body_bytes:
                return _answer(413, error=f"body of {int(declared)} bytes exceeds the {max_body_bytes}-byte limit")
        try:
            body = await _read_body(request, max_body_bytes)
        except ClientDisconnect:
            return _answer(400, error="the client went away before the body was complete")
        if body is None:
            return _answer(413, error=f"body exceeds the {max_body_bytes}-byte limit")

        content_type = headers.get("content-type")
        if not is_json_content_type(content_type):
            return _answer(415, error=f"content type {_shown(content_type)} is not JSON: set the webhook's "
                                      "content type to application/json")

        forge = identify_forge(headers)
        if not signature_valid(key, body, forge, headers.get(forge.signature_header)):
            missing = forge.signature_header not in headers
            log.warning("%s delivery from %s: %s signature", forge.name,
                        request.client.host if request.client else "?", "missing" if missing else "bad")
            what = f"missing {forge.signature_header} header" if missing else f"{forge.signature_header} does not match"
            return _answer(401, error=f"{what}: sign the webhook with the secret this receiver holds "
                                      f"({SECRET_ENV} or the Webhook block)")

        delivery = headers.get(forge.delivery_header, "").strip()
        if not delivery or len(delivery) > MAX_DELIVERY_ID_LENGTH or not delivery.isprintable():
            return _answer(400, error=f"{forge.delivery_header}: expected a delivery id, got {_shown(delivery)}")
        seen_key = f"{forge.name}:{delivery}"
        if not await deliveries.claim(seen_key):
            return _answer(409, error=f"delivery {delivery} was already handled", delivery=delivery)
        remember = False
        try:
            answer = await _handle_signed(forge, delivery, headers.get(forge.event_header, ""), body)
            remember = True
            return answer
        except EventSinkUnavailable as error:
            log.warning("delivery %s: %s; answering 503 so the sender retries", delivery, error)
            return JSONResponse({"error": f"{error}: the event was not recorded; redeliver it"},
                                status_code=503, headers={"Retry-After": "10"})
        except EventSinkRejected as error:
            log.error("delivery %s: %s", delivery, error)
            return _answer(502, error=f"{error}: check the receiver's Prefect API URL and credentials")
        finally:
            deliveries.settle(seen_key, remember)

    async def _handle_signed(forge: Forge, delivery: str, kind: str, body: bytes) -> JSONResponse:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            return _answer(400, error=f"body is not JSON: {type(error).__name__} at {getattr(error, 'pos', '?')}")
        if kind == "ping":
            return _answer(200, pong=True, delivery=delivery)
        if kind != "push":
            return _answer(202, status="ignored", event=kind[:64] or None,
                           reason=f"only push and ping are handled; {forge.event_header} was {_shown(kind)}")
        try:
            push = parse_push(payload)
        except PayloadError as error:
            return _answer(400, error=str(error))
        event = push_event(push, forge, delivery, datetime.now(UTC))
        await events.emit(event)
        log.info("delivery %s: %s %s %s..%s → event %s", delivery, push.repository, push.ref,
                 push.before[:12], push.after[:12], event["id"])
        return _answer(200, status="accepted", event=EVENT_NAME, event_id=event["id"],
                       repository=push.repository, ref=push.ref)

    async def healthz(request: Request) -> JSONResponse:
        counters = {k: getattr(events, k) for k in ("posts", "events_posted") if hasattr(events, k)}
        return _answer(200, status="ok", **counters)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await events.aclose()

    app = Starlette(
        routes=[Route("/hooks/git", git_hook, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        lifespan=lifespan,
    )
    app.state.deliveries = deliveries
    app.state.sink = events
    return app


# --- configuration and the entry point ---------------------------------------------------------------


def resolve_api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise WebhookConfigError(
            "PREFECT_API_URL is not set: the receiver posts events to a running Prefect server; "
            "set it, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api")
    return str(url)


def load_secret(block: str = "default") -> str:
    """The webhook secret: HOMELAB_WEBHOOK_SECRET when set, else the Webhook block named `block`."""
    value = os.environ.get(SECRET_ENV)
    if value is not None:
        if not value.strip():
            raise WebhookConfigError(f"{SECRET_ENV} is set but empty: give it the webhook's secret")
        return value
    from blocks import Webhook

    try:
        stored = Webhook.load(block)
    except Exception as error:  # not found, unreachable API, a bad document: each means "no secret"
        raise WebhookConfigError(
            f"no webhook secret: {SECRET_ENV} is not set and the Webhook block {block!r} could not be loaded "
            f"({type(error).__name__}); set {SECRET_ENV}, or create the block "
            f"(blocks.Webhook(secret=...).save({block!r}))") from None
    secret = stored.secret.get_secret_value()  # type: ignore[union-attr]
    if not secret:
        raise WebhookConfigError(f"the Webhook block {block!r} holds an empty secret: save a non-empty one")
    return secret


def serve(host: str = "127.0.0.1", port: int = 8780, block: str = "default") -> None:
    """Run the receiver under uvicorn until interrupted; exit 2 when it has no secret or no API URL."""
    import uvicorn

    try:
        api_url = resolve_api_url()
        app = create_app(load_secret(block), api_url)
    except WebhookConfigError as error:
        print(f"homelab webhook serve: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("POST http://%s:%s/hooks/git → %s/events (%s)", host, port, api_url, EVENT_NAME)
    # The receiver's own line per delivery (id, repository, ref, event id) replaces uvicorn's access log.
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, server_header=False,
                proxy_headers=False)
