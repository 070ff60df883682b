"""The git webhook receiver: a signed push from GitHub or Gitea/Forgejo becomes one Prefect event.

It faces the internet (Tailscale Funnel), so it trusts nothing it is sent and holds no credential that
can do more than emit that event (docs/security.md). `POST /hooks/git` checks, in this order, and emits
nothing when one fails:

    413  Content-Length over the limit (before anything is read), or a body that grows past it
    415  content type not application/json
    401  signature header missing (before reading), or wrong (HMAC-SHA256 of the raw body, computed
         while the body streams in, compared in constant time)
    408  body not complete within the body deadline (the connection is closed)
    400  delivery id missing; body not JSON, nested too deeply or holding one value over 64 KiB; a push
         without repository/ref/before/after
    202  an event other than push or ping, or a push from a repository this receiver does not serve
    409  delivery id, or the same push (repository, ref, before, after), already handled: the last
         10,000 of each, kept in a SQLite file that survives restarts

A valid push becomes one `homelab.git.push` event (resource `git.repo.<owner>/<name>`) posted to
`{PREFECT_API_URL}/events`; the sender gets 200 only once it was accepted. When that cannot be reached
the answer is 503 and the delivery is not remembered, so a redelivery goes through. The event carries no
list of changed paths: the git-push flow reads them from its own clone of the repository.

Bounded resources (every limit a parameter of `create_app`/`server_config`): the body is never held
whole (HMAC and a streaming JSON parser read it chunk by chunk, keeping only the few fields the event
needs), at most `max_bodies` bodies are read at once, headers must arrive within `header_timeout` and a
body within `body_timeout`, and at most `max_connections` connections are open at once. uvicorn has no
header timeout and no connection cap of its own (its `limit_concurrency` answers 503 but keeps the
connection), so GuardedH11Protocol adds both to uvicorn's h11 protocol.

`homelab webhook relay` is the other half: beside the Prefect server, it holds the server's credential
and forwards only `homelab.git.push` events of the allowed repositories to it.
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
import sqlite3
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import h11
import httpx
import ijson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from homelab.git_push import RepositoryRefused, allowed_repositories

log = logging.getLogger("homelab.webhook")

EVENT_NAME = "homelab.git.push"
# GitHub caps webhook payloads at 25 MB (docs.github.com, "Webhook events and payloads": "Payloads are
# capped at 25 MB"); Gitea's are smaller. The body is streamed, so the limit costs no memory.
MAX_BODY_BYTES = 25 * 1024 * 1024
# Bytes a body may hold of its own while it is read, and the budget all bodies share beyond that: at
# most MAX_BODIES * BODY_ALLOWANCE + BODY_BUDGET bytes of bodies are held at once (96 MiB).
BODY_ALLOWANCE = 64 * 1024
BODY_BUDGET = 64 << 20
MAX_BODIES = 512
# A signed body larger than this is parsed as a stream (ijson), in a thread: json.loads would need
# several times its size.
STREAM_PARSE_BYTES = 1 << 20
# GitHub's push payloads nest five levels deep; Python's json module itself stops near 1,000.
MAX_JSON_DEPTH = 64
MAX_CONNECTIONS = 2048
# GitHub gives up on a delivery after 10 s ("Best practices for using webhooks": respond within 10
# seconds), Gitea after 5 s ([webhook] DELIVER_TIMEOUT, modules/setting/webhook.go): a sender that takes
# longer for its headers or its body is not one of them.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
# uvicorn's default for h11 (16 KiB): headers beyond it are refused with 400 by h11 itself.
MAX_HEADER_BYTES = 16 * 1024
SEEN_CAPACITY = 10_000
SECRET_ENV = "HOMELAB_WEBHOOK_SECRET"
REPOS_ENV = "HOMELAB_WEBHOOK_REPOS"
STATE_ENV = "HOMELAB_WEBHOOK_STATE"
DEFAULT_STATE = "~/.local/state/homelab-flows/webhook-deliveries.sqlite3"
# Delivery ids of GitHub and Gitea are UUIDs; anything much longer is not a delivery id.
MAX_DELIVERY_ID_LENGTH = 128
# Derives event ids from delivery ids (uuid5), so a redelivery carries the same event id.
EVENT_ID_NAMESPACE = uuid.UUID("6f1f1a3e-4f0c-5d55-9a57-2b0a3c1d7e21")

_SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
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


# GitHub: X-GitHub-Event, X-GitHub-Delivery, X-Hub-Signature-256 "sha256=<hex>" (docs.github.com,
# "Validating webhook deliveries"). Gitea: X-Gitea-Event, X-Gitea-Delivery, X-Gitea-Signature bare hex
# (services/webhook/deliver.go); Forgejo the same with X-Forgejo-*. Both also send X-GitHub-Event.
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


def signature_matches(digest: str, forge: Forge, header: str) -> bool:
    # Starlette decodes headers as latin-1, so this round-trips any byte a client sent.
    given = header.strip().encode("latin-1")
    return hmac.compare_digest((forge.signature_prefix + digest).encode("ascii"), given.lower())


def is_json_content_type(value: str | None) -> bool:
    if not value:
        return False
    return value.split(";", 1)[0].strip().lower() == "application/json"


class PayloadError(ValueError):
    """A body that is not the JSON a push event needs; the message names the field or the defect."""


class ByteBudget:
    """Bytes that the bodies being read may hold beyond their own allowance, shared by all of them."""

    def __init__(self, total: int) -> None:
        self.total = self.free = total

    def take(self, n: int) -> bool:
        if n > self.free:
            return False
        self.free -= n
        return True

    def give(self, n: int) -> None:
        self.free += n


class Body:
    """A body as it streams in: the HMAC over every byte as it arrives, and the bytes themselves, kept
    for parsing once the signature is known to match. Nothing is parsed before that: an unsigned body
    costs only the hashing, whatever its shape. A body may hold `allowance` bytes of its own (real pushes
    are a few KiB); beyond that it draws on the shared budget, and a body the budget cannot hold is
    refused (503) rather than letting unfinished bodies grow the process."""

    def __init__(self, key: bytes, budget: ByteBudget, allowance: int) -> None:
        self.mac = hmac.new(key, digestmod=hashlib.sha256)
        self.data = bytearray()
        self._budget, self._allowance = budget, allowance
        self._borrowed = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def add(self, chunk: bytes) -> bool:
        """Hash and keep `chunk`; False (nothing kept) when the shared budget cannot hold it."""
        need = len(self.data) + len(chunk) - self._allowance - self._borrowed
        if need > 0:
            if not self._budget.take(need):
                return False
            self._borrowed += need
        self.mac.update(chunk)
        self.data += chunk
        return True

    def release(self) -> None:
        self._budget.give(self._borrowed)
        self._borrowed = 0
        self.data = bytearray()

    def digest(self) -> str:
        return self.mac.hexdigest()


class PushFields:
    """The few fields of a push payload (top-level `ref`, `before`, `after`; `repository.full_name`;
    `sender`/`pusher` names), from a parsed payload or from the events of ijson's streaming parser.
    The streaming path reads a large signed body without building all of it in memory (json.loads of a
    25 MB payload takes several times that); only the fields named here are kept."""

    TOP = frozenset({"ref", "before", "after"})
    NESTED = {"repository": frozenset({"full_name"}), "sender": frozenset({"login", "username"}),
              "pusher": frozenset({"name", "username", "login"})}

    def __init__(self) -> None:
        self.top: dict[str, Any] = {}
        self.nested: dict[tuple[str, str], Any] = {}
        self.is_object = False
        self._containers: list[str] = []
        self._keys: list[Any] = [None] * 3

    @classmethod
    def of(cls, payload: Any) -> PushFields:
        fields = cls()
        if isinstance(payload, dict):
            fields.is_object = True
            fields.top = {k: payload[k] for k in cls.TOP if k in payload}
            for parent, keys in cls.NESTED.items():
                inner = payload.get(parent)
                if isinstance(inner, dict):
                    fields.nested.update({(parent, k): inner[k] for k in keys if k in inner})
        return fields

    @classmethod
    def stream(cls, body: bytes, max_depth: int = MAX_JSON_DEPTH) -> PushFields:
        """The fields of a large body, parsed as a stream. Raises PayloadError."""
        fields = cls()
        try:
            for event, value in ijson.basic_parse(body, use_float=True):
                fields._event(event, value)
                if len(fields._containers) > max_depth:
                    raise PayloadError(f"body is not JSON this receiver reads: nested deeper than {max_depth}")
        except ijson.JSONError as e:
            raise PayloadError(_ijson_reason(e)) from None
        return fields

    def _event(self, event: str, value: Any) -> None:
        depth = len(self._containers)
        if event == "map_key":
            if depth <= 2:
                self._keys[depth] = value
            return
        scalar = event not in ("start_map", "start_array", "end_map", "end_array")
        if depth == 0 and event == "start_map":
            self.is_object = True
        elif depth == 1 and self._containers[0] == "map" and self._keys[1] in self.TOP and event != "end_map":
            self.top[self._keys[1]] = value if scalar else {} if event == "start_map" else []
        elif depth == 2 and self._containers == ["map", "map"] and scalar:
            parent, key = self._keys[1], self._keys[2]
            if key in self.NESTED.get(parent, ()):
                self.nested[(parent, key)] = value
        if event in ("start_map", "start_array"):
            self._containers.append("map" if event == "start_map" else "array")
        elif event in ("end_map", "end_array"):
            self._containers.pop()


def read_fields(body: bytes) -> PushFields:
    """The push fields of a signed body. Raises PayloadError for a body that is not JSON."""
    if len(body) > STREAM_PARSE_BYTES:
        return PushFields.stream(body)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise PayloadError(f"body is not JSON: {type(error).__name__} at {getattr(error, 'pos', '?')}") from None
    return PushFields.of(payload)


def _ijson_reason(error: Exception) -> str:
    """yajl's message (bytes or text, several lines with a pointer) as one line."""
    first = error.args[0] if error.args else ""
    text = first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)
    line = next((x.strip() for x in text.splitlines() if x.strip()), type(error).__name__)
    return f"body is not JSON: {line}"


@dataclass(frozen=True)
class Push:
    repository: str
    ref: str
    before: str
    after: str
    sender: str | None

    @property
    def key(self) -> str:
        """The push itself, whoever delivers it and under whatever delivery id."""
        return f"push:{self.repository.lower()}|{self.ref}|{self.before}|{self.after}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sha(fields: Mapping[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not _SHA_RE.match(value.lower()):
        raise PayloadError(f"push payload: {name}: expected a 40- or 64-digit hex commit id, got {_shown(value)}")
    return value.lower()


def parse_push(fields: PushFields) -> Push:
    """The fields of a GitHub or Gitea push payload the event carries. Raises PayloadError."""
    if not fields.is_object:
        raise PayloadError("push payload: expected a JSON object")
    top, nested = fields.top, fields.nested
    full_name = nested.get(("repository", "full_name"))
    if not isinstance(full_name, str) or not _REPO_RE.match(full_name):
        raise PayloadError(f"push payload: repository.full_name: expected 'owner/name', got {_shown(full_name)}")
    ref = top.get("ref")
    if not isinstance(ref, str) or not ref.startswith("refs/") or len(ref) > 1024 or not ref.isprintable():
        raise PayloadError(f"push payload: ref: expected a ref such as 'refs/heads/main', got {_shown(ref)}")
    before, after = _sha(top, "before"), _sha(top, "after")
    sender = None
    for who, keys in (("sender", ("login", "username")), ("pusher", ("name", "username", "login"))):
        for key in keys:
            name = nested.get((who, key))
            if isinstance(name, str) and name:
                sender = name[:200]
                break
        if sender:
            break
    return Push(full_name, ref, before, after, sender)


def parse_push_json(body: bytes) -> Push:
    """parse_push of a whole body (tests, tools): the same reading as the receiver's."""
    return parse_push(read_fields(body))


def event_id(forge: Forge, delivery: str) -> uuid.UUID:
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{forge.name}:{delivery}")


def push_event(push: Push, forge: Forge, delivery: str, occurred: datetime) -> dict[str, Any]:
    """The Prefect Event (as JSON data) for one push."""
    return {
        "id": str(event_id(forge, delivery)),
        "occurred": occurred.astimezone(UTC).isoformat(),
        "event": EVENT_NAME,
        "resource": {"prefect.resource.id": f"git.repo.{push.repository}", "prefect.resource.name": push.repository},
        "related": [],
        # changed_paths is always null: the flow reads the paths from its own clone at `after`, never from
        # a sender. It stays in the payload because the git-push trigger's template names it (prefect.yaml).
        "payload": {"repository": push.repository, "ref": push.ref, "before": push.before, "after": push.after,
                    "changed_paths": None, "delivery": delivery, "sender": push.sender, "forge": forge.name},
    }


# --- what was handled, across restarts ---------------------------------------------------------------


class SeenStore:
    """The keys already handled (delivery ids and pushes), the newest `capacity` kept, in SQLite.

    A file path survives restarts (WAL mode, synchronous=NORMAL: what a committed transaction wrote
    survives a crash of this process; only a crash of the machine can lose the last few); None keeps them
    in memory, for tests."""

    def __init__(self, path: str | Path | None, capacity: int = 2 * SEEN_CAPACITY) -> None:
        self.capacity = capacity
        self.path = None if path is None else Path(path).expanduser()
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", isolation_level=None,
                                       check_same_thread=False)
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS seen (n INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "key TEXT NOT NULL UNIQUE, at REAL NOT NULL)")
        except (OSError, sqlite3.Error) as e:
            raise WebhookConfigError(
                f"the delivery store {self.path} cannot be opened ({e}): give {STATE_ENV} a writable file path "
                "on a volume that survives restarts, or move a damaged file away") from None

    def seen(self, *keys: str) -> bool:
        marks = ",".join("?" * len(keys))
        return self._db.execute(f"SELECT 1 FROM seen WHERE key IN ({marks}) LIMIT 1", keys).fetchone() is not None

    def add(self, *keys: str) -> None:
        now = time.time()
        self._db.execute("BEGIN")
        try:
            self._db.executemany("INSERT OR IGNORE INTO seen (key, at) VALUES (?, ?)", [(k, now) for k in keys])
            self._db.execute("DELETE FROM seen WHERE n <= (SELECT max(n) FROM seen) - ?", (self.capacity,))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class Deliveries:
    """SeenStore plus the keys being handled now. A duplicate that arrives while its twin is handled
    waits for the outcome: 409 if that one was remembered, else it is handled itself."""

    def __init__(self, store: SeenStore) -> None:
        self.store = store
        self._inflight: dict[str, asyncio.Future[None]] = {}

    async def claim(self, *keys: str) -> bool:
        """True: the caller handles `keys` and must call settle(). False: one was already handled."""
        while True:
            if self.store.seen(*keys):
                return False
            pending = next((self._inflight[k] for k in keys if k in self._inflight), None)
            if pending is None:
                done = asyncio.get_running_loop().create_future()
                for k in keys:
                    self._inflight[k] = done
                return True
            await asyncio.shield(pending)

    def settle(self, keys: Iterable[str], remember: bool) -> None:
        keys = list(keys)
        try:
            if remember:
                self.store.add(*keys)
        finally:
            futures = {self._inflight.pop(k) for k in keys if k in self._inflight}
            for f in futures:
                if not f.done():
                    f.set_result(None)


# --- the Prefect edge --------------------------------------------------------------------------------


class EventSinkUnavailable(Exception):
    """The events endpoint could not be reached or failed (connect error, timeout, 5xx): a retry may succeed."""


class EventSinkRejected(Exception):
    """The events endpoint answered 4xx: the event or the configuration is wrong; retrying will not help."""


class EventSink(Protocol):
    async def emit(self, event: dict[str, Any]) -> None: ...

    async def aclose(self) -> None: ...


class PrefectEvents:
    """Posts events to `{api_url}/events`. Events emitted while a post is in flight go together in the
    next one; `emit` returns once the post that carried its event was accepted. It sends no credential:
    the URL is a Prefect server without auth (one machine) or the events relay."""

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
                timeout=self._timeout, transport=self._transport, trust_env=False,
                limits=httpx.Limits(max_connections=self._senders, max_keepalive_connections=self._senders))
            self._tasks = [loop.create_task(self._send_loop()) for _ in range(self._senders)]
        return self._wakeup

    async def emit(self, event: dict[str, Any]) -> None:
        wakeup = self._start()
        if len(self._pending) >= self._max_waiting:
            raise EventSinkUnavailable(f"{len(self._pending)} events already wait for {self.url}")
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
            raise EventSinkUnavailable(f"events endpoint {self.url} unreachable: {type(error).__name__}") from None
        if response.status_code >= 500:
            raise EventSinkUnavailable(f"events endpoint {self.url} answered {response.status_code}")
        if response.status_code >= 300:
            raise EventSinkRejected(
                f"events endpoint {self.url} refused the event: {response.status_code} {response.text[:200]!r}")

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


def _answer(code: int, /, *, close: bool = False, **body: Any) -> JSONResponse:
    # `Connection: close` makes uvicorn close the connection after the answer: used where the body was
    # not read to its end, so the rest of it is never read either.
    return JSONResponse(body, status_code=code, headers={"Connection": "close"} if close else None)


class _BodyTooLarge(Exception):
    pass


class _Busy(Exception):
    pass


def create_app(
    secret: str,
    prefect_api_url: str | None = None,
    *,
    repositories: Iterable[str],
    sink: EventSink | None = None,
    state_path: str | Path | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_bodies: int = MAX_BODIES,
    body_allowance: int = BODY_ALLOWANCE,
    body_budget: int = BODY_BUDGET,
    body_timeout: float = BODY_TIMEOUT_S,
    seen_capacity: int = SEEN_CAPACITY,
) -> Starlette:
    """The receiver. Events go to `sink` when given (tests), else to `{prefect_api_url}/events`
    (default: PREFECT_API_URL). `repositories`: full names (owner/name) or clone URLs whose pushes
    become events; any other repository's push is answered 202 and ignored. `state_path`: the SQLite
    file of handled deliveries (None: memory only)."""
    if not secret:
        raise WebhookConfigError(f"the webhook secret is empty: set {SECRET_ENV} or the Webhook block's secret")
    try:
        allowed = allowed_repositories(repositories)
    except RepositoryRefused as e:
        raise WebhookConfigError(f"{REPOS_ENV}: {e}") from None
    if not allowed:
        raise WebhookConfigError(f"no repository to serve: set {REPOS_ENV}=owner/name (comma-separated) or the "
                                 "repositories of the Homelab Git block")
    key = secret.encode()
    if sink is None:
        sink = PrefectEvents(prefect_api_url or resolve_api_url())
    events: EventSink = sink
    deliveries = Deliveries(SeenStore(state_path, 2 * seen_capacity))
    bodies = asyncio.Semaphore(max_bodies)
    budget = ByteBudget(body_budget)
    large_parses = asyncio.Semaphore(1)

    async def git_hook(request: Request) -> JSONResponse:
        headers = request.headers
        declared = headers.get("content-length")
        # h11 has already refused a Content-Length that is not a number; any length is compared here,
        # however many digits it has, before a byte of the body is read.
        if declared is not None and declared.strip().isdigit() and int(declared) > max_body_bytes:
            return _answer(413, close=True, error=f"body of {int(declared)} bytes exceeds the "
                                                  f"{max_body_bytes}-byte limit")
        # Refused before the body is read: a small unread body is left to uvicorn, which reads and drops
        # it so the sender sees the answer (closing on unread data makes the kernel reset the connection);
        # a large or unannounced one is cut off with the connection instead.
        small = declared is not None and declared.strip().isdigit() and int(declared) <= body_allowance
        content_type = headers.get("content-type")
        if not is_json_content_type(content_type):
            return _answer(415, close=not small, error=f"content type {_shown(content_type)} is not JSON: set "
                                                       "the webhook's content type to application/json")
        forge = identify_forge(headers)
        signature = headers.get(forge.signature_header)
        if not signature:
            log.warning("%s delivery from %s: missing signature", forge.name, _client(request))
            return _answer(401, close=not small, error=f"missing {forge.signature_header} header: sign the "
                                                       f"webhook with the secret this receiver holds ({SECRET_ENV})")
        body = Body(key, budget, body_allowance)
        try:
            async with asyncio.timeout(body_timeout):
                async with bodies:
                    async for chunk in request.stream():
                        if body.size + len(chunk) > max_body_bytes:
                            raise _BodyTooLarge
                        if not body.add(chunk):
                            raise _Busy
            if not signature_matches(body.digest(), forge, signature):
                log.warning("%s delivery from %s: bad signature", forge.name, _client(request))
                return _answer(401, error=f"{forge.signature_header} does not match: sign the webhook with the "
                                          f"secret this receiver holds ({SECRET_ENV})")
            delivery = headers.get(forge.delivery_header, "").strip()
            if not delivery or len(delivery) > MAX_DELIVERY_ID_LENGTH or not delivery.isprintable():
                return _answer(400, error=f"{forge.delivery_header}: expected a delivery id, got {_shown(delivery)}")
            # Signed: only now is the body parsed, a large one as a stream in a thread, one at a time.
            try:
                if body.size > STREAM_PARSE_BYTES:
                    async with large_parses:
                        fields = await asyncio.to_thread(read_fields, bytes(body.data))
                else:
                    fields = read_fields(bytes(body.data))
            except PayloadError as error:
                return _answer(400, error=str(error))
        except _BodyTooLarge:
            return _answer(413, close=True, error=f"body exceeds the {max_body_bytes}-byte limit")
        except _Busy:
            log.warning("%s delivery from %s: bodies being read hold the whole budget; answering 503",
                        forge.name, _client(request))
            return JSONResponse({"error": "the receiver holds as many unfinished bodies as it may; redeliver it"},
                                status_code=503, headers={"Retry-After": "10", "Connection": "close"})
        except TimeoutError:
            log.warning("%s delivery from %s: body incomplete after %gs (%d bytes)", forge.name, _client(request),
                        body_timeout, body.size)
            return _answer(408, close=True, error=f"the body did not arrive within {body_timeout:g}s")
        except ClientDisconnect:
            return _answer(400, close=True, error="the client went away before the body was complete")
        finally:
            body.release()
        return await _handle_signed(forge, delivery, headers.get(forge.event_header, ""), fields)

    async def _handle_signed(forge: Forge, delivery: str, kind: str, fields: PushFields) -> JSONResponse:
        delivery_key = f"delivery:{forge.name}:{delivery}"
        if kind == "ping":
            if not await deliveries.claim(delivery_key):
                return _answer(409, error=f"delivery {delivery} was already handled", delivery=delivery)
            deliveries.settle([delivery_key], remember=True)
            return _answer(200, pong=True, delivery=delivery)
        if kind != "push":
            return _answer(202, status="ignored", event=kind[:64] or None,
                           reason=f"only push and ping are handled; {forge.event_header} was {_shown(kind)}")
        try:
            push = parse_push(fields)
        except PayloadError as error:
            return _answer(400, error=str(error))
        if push.repository.lower() not in allowed:
            log.warning("delivery %s: push to %s ignored: not a repository this receiver serves", delivery,
                        push.repository)
            return _answer(202, status="ignored", repository=push.repository,
                           reason=f"{push.repository} is not a repository this receiver serves")
        keys = (delivery_key, push.key)
        if not await deliveries.claim(*keys):
            return _answer(409, error=f"delivery {delivery} (or the same push of {push.repository} {push.ref} "
                                      f"{push.before[:12]}..{push.after[:12]}) was already handled",
                           delivery=delivery)
        remember = False
        try:
            event = push_event(push, forge, delivery, datetime.now(UTC))
            await events.emit(event)
            remember = True
        except EventSinkUnavailable as error:
            log.warning("delivery %s: %s; answering 503 so the sender retries", delivery, error)
            return JSONResponse({"error": f"{error}: the event was not recorded; redeliver it"},
                                status_code=503, headers={"Retry-After": "10"})
        except EventSinkRejected as error:
            log.error("delivery %s: %s", delivery, error)
            return _answer(502, error=f"{error}: check the receiver's PREFECT_API_URL (the events relay)")
        finally:
            deliveries.settle(keys, remember)
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
    app.state.repositories = allowed
    return app


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


# --- uvicorn with the limits it lacks -----------------------------------------------------------------


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for a request's headers and a cap on open connections.

    uvicorn arms no timer until a first response has been sent (its keep-alive timer), so a client that
    sends its headers a byte at a time, or nothing, keeps the connection forever; and `limit_concurrency`
    answers requests with 503 but keeps every connection open. Subclasses set the two limits
    (`guarded_protocol`)."""

    header_timeout: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                            b"Content-Length: 32\r\n\r\ntoo many connections: try again\n")
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.cycle is not None and not self.cycle.response_complete:
            self._cancel_header_timer()  # a request's headers are complete and it is being answered

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        # Between requests: waiting for the next headers, or dropping the rest of a body that was answered
        # without being read (uvicorn reads it to keep the connection). Neither may last forever.
        between = self.cycle is None or self.cycle.response_complete
        if between and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT_S,
                     max_connections: int = MAX_CONNECTIONS) -> type[GuardedH11Protocol]:
    return type("GuardedH11", (GuardedH11Protocol,), {"header_timeout": header_timeout,
                                                       "max_connections": max_connections})


def server_config(app: Any, host: str, port: int, *, header_timeout: float = HEADER_TIMEOUT_S,
                  max_connections: int = MAX_CONNECTIONS, log_level: str = "info") -> Any:
    """The uvicorn configuration the receiver runs with: the guarded protocol, h11's header size limit,
    and `limit_concurrency` a little above the connection cap so it never turns a request into 503
    before the cap does."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(header_timeout, max_connections),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=max_connections + 64,
                          backlog=max_connections, timeout_keep_alive=5, log_level=log_level, access_log=False,
                          server_header=False, proxy_headers=False, lifespan="on")


# --- the events relay ---------------------------------------------------------------------------------

# A relay request is one batch of the receiver (PrefectEvents.max_batch_bytes) with room to spare.
RELAY_MAX_BODY_BYTES = 8 << 20
_EVENT_KEYS = {"id", "occurred", "event", "resource", "related", "payload"}
_PAYLOAD_KEYS = {"repository", "ref", "before", "after", "changed_paths", "delivery", "sender", "forge"}


def check_relayed_event(event: Any, allowed: frozenset[str]) -> str | None:
    """Why the relay refuses to pass `event` on, or None: only a homelab.git.push event of an allowed
    repository, in the receiver's shape, may reach Prefect (whose credential the relay holds)."""
    if not isinstance(event, dict) or set(event) - _EVENT_KEYS or event.get("event") != EVENT_NAME:
        return f"only {EVENT_NAME} events are relayed"
    payload, resource = event.get("payload"), event.get("resource")
    if not isinstance(payload, dict) or set(payload) - _PAYLOAD_KEYS or not isinstance(resource, dict) \
            or payload.get("changed_paths") is not None:
        return "the event is not in the receiver's shape"
    repository = payload.get("repository")
    if not isinstance(repository, str) or repository.lower() not in allowed:
        return f"repository {_shown(repository)} is not one the relay serves"
    if resource != {"prefect.resource.id": f"git.repo.{repository}", "prefect.resource.name": repository} \
            or event.get("related") not in ([], None):
        return "the event's resource must be the pushed repository and nothing else"
    return None


def create_relay_app(api_url: str, *, repositories: Iterable[str], headers: Mapping[str, str] | None = None,
                     transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """POST /api/events → the Prefect API's /events with the credential in `headers`; nothing else."""
    allowed = allowed_repositories(repositories)
    if not allowed:
        raise WebhookConfigError(f"no repository to relay: set {REPOS_ENV}=owner/name (comma-separated)")
    target = api_url.rstrip("/") + "/events"
    state: dict[str, httpx.AsyncClient] = {}

    async def relay(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length", "")
        if not declared.strip().isdigit() or int(declared) > RELAY_MAX_BODY_BYTES:
            return _answer(413, close=True, error=f"a relayed batch needs a Content-Length of at most "
                                                  f"{RELAY_MAX_BODY_BYTES} bytes")
        body = await request.body()  # bounded by the Content-Length just checked; h11 enforces it
        try:
            batch = json.loads(body)
        except (ValueError, RecursionError):
            return _answer(400, error="body is not JSON")
        if not isinstance(batch, list) or not batch:
            return _answer(400, error="expected a JSON array of events")
        for event in batch:
            reason = check_relayed_event(event, allowed)
            if reason is not None:
                log.warning("relay refused an event: %s", reason)
                return _answer(403, error=reason)
        try:
            response = await state["client"].post(target, content=body, headers={
                "Content-Type": "application/json", **(headers or {})})
        except httpx.HTTPError as error:
            return _answer(503, error=f"Prefect API at {target} unreachable: {type(error).__name__}")
        if response.status_code >= 500:
            return _answer(503, error=f"Prefect API answered {response.status_code}")
        if response.status_code >= 300:
            log.error("Prefect refused relayed events: %s %s", response.status_code, response.text[:200])
            return _answer(502, error=f"Prefect API refused the events ({response.status_code}): check the "
                                      "relay's PREFECT_API_URL and PREFECT_API_AUTH_STRING")
        return _answer(204 if response.status_code == 204 else 200, relayed=len(batch))

    async def health(request: Request) -> JSONResponse:
        return _answer(200, status="ok")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["client"] = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0), transport=transport,
                                            trust_env=False)
        try:
            yield
        finally:
            await state["client"].aclose()

    return Starlette(routes=[Route("/api/events", relay, methods=["POST"]),
                             Route("/api/health", health, methods=["GET"])], lifespan=lifespan)


def prefect_auth_headers() -> dict[str, str]:
    """Authorization for the Prefect API as Prefect's own client builds it (PREFECT_API_AUTH_STRING as
    HTTP basic auth, checked by the server's middleware in prefect/server/api/server.py; else
    PREFECT_API_KEY as a bearer token). Only the relay sends it. From the environment, or Prefect's
    profile when the environment has neither."""
    auth_string, api_key = os.environ.get("PREFECT_API_AUTH_STRING"), os.environ.get("PREFECT_API_KEY")
    if not auth_string and not api_key:
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

        auth_string, api_key = PREFECT_API_AUTH_STRING.value(), PREFECT_API_KEY.value()
    if auth_string:
        return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}
    if api_key:
        return {"Authorization": f"Bearer {api_key}"}
    return {}


# --- configuration and the entry points ----------------------------------------------------------------


def resolve_api_url() -> str:
    """PREFECT_API_URL from the environment; Prefect's profile only when the environment has none (the
    receiver then imports Prefect, which it otherwise does not need)."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        from prefect.settings import PREFECT_API_URL

        url = str(PREFECT_API_URL.value() or "")
    if not url:
        raise WebhookConfigError(
            "PREFECT_API_URL is not set: the receiver posts events to {PREFECT_API_URL}/events (the events "
            "relay, or a Prefect server without auth); set it, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


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


def load_repositories(block: str = "default") -> list[str]:
    """The repositories served: HOMELAB_WEBHOOK_REPOS (comma-separated full names) when set, else those
    of the Homelab Git block named `block`."""
    value = os.environ.get(REPOS_ENV)
    if value is not None:
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names:
            raise WebhookConfigError(f"{REPOS_ENV} is set but names no repository: give owner/name[,owner/name]")
        return names
    from blocks import GitSource

    try:
        git = GitSource.load(block)
    except Exception as error:  # not found, unreachable API, a bad document
        raise WebhookConfigError(
            f"no repository to serve: {REPOS_ENV} is not set and the Homelab Git block {block!r} could not be "
            f"loaded ({type(error).__name__}); set {REPOS_ENV}=owner/name, or save the block with its "
            "repositories") from None
    return list(git.allowed_repositories())  # type: ignore[union-attr]


def serve(host: str = "127.0.0.1", port: int = 8780, block: str = "default") -> None:
    """Run the receiver until interrupted; exit 2 when it has no secret, repository or API URL."""
    import uvicorn

    for name in ("PREFECT_API_AUTH_STRING", "PREFECT_API_KEY"):
        if os.environ.get(name):
            print(f"homelab webhook serve: {name} is set and ignored: the receiver faces the internet and sends "
                  "no Prefect credential; point PREFECT_API_URL at `homelab webhook relay`, which holds it",
                  file=sys.stderr)
    try:
        api_url = resolve_api_url()
        state = os.environ.get(STATE_ENV) or DEFAULT_STATE
        app = create_app(load_secret(block), api_url, repositories=load_repositories(block), state_path=state)
    except WebhookConfigError as error:
        print(f"homelab webhook serve: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("POST http://%s:%s/hooks/git → %s/events (%s) for %s", host, port, api_url, EVENT_NAME,
             ", ".join(sorted(app.state.repositories)))
    uvicorn.Server(server_config(app, host, port)).run()


def serve_relay(host: str = "127.0.0.1", port: int = 8781) -> None:
    """Run the events relay until interrupted; exit 2 without PREFECT_API_URL or repositories."""
    import uvicorn

    try:
        api_url = resolve_api_url()
        repos = os.environ.get(REPOS_ENV, "")
        app = create_relay_app(api_url, repositories=[n.strip() for n in repos.split(",") if n.strip()],
                               headers=prefect_auth_headers())
    except (WebhookConfigError, RepositoryRefused) as error:
        print(f"homelab webhook relay: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("POST http://%s:%s/api/events → %s/events (%s only)", host, port, api_url, EVENT_NAME)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, server_header=False,
                proxy_headers=False, h11_max_incomplete_event_size=MAX_HEADER_BYTES)
