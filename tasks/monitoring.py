"""Prometheus and Alertmanager: the alerts firing, PromQL health queries, and silences made and expired.

The HTTP APIs used, as the servers define them:
- Prometheus ``GET /api/v1/alerts`` and ``GET /api/v1/query`` (prometheus/prometheus web/api/v1/api.go;
  https://prometheus.io/docs/prometheus/latest/querying/api/): ``{"status": "success"|"error", "data": ...}``.
- Alertmanager v2 (prometheus/alertmanager api/v2/openapi.yaml): ``POST /api/v2/silences`` creates
  (``{"silenceID": ...}``), ``GET /api/v2/silence/{id}`` reads one, ``DELETE /api/v2/silence/{id}``
  *expires* it (api/v2/api.go ``deleteSilenceHandler`` calls ``silences.Expire``; the silence stays
  listed, state "expired"), ``GET /api/v2/silences`` lists them. Alertmanager moves a ``startsAt`` in the
  past to now (silence/silence.go ``Set``) and refuses an ``endsAt`` in the past (400).

Every change is verified by reading it back (the silence is active after it is made, expired after it
is undone). Credentials (a bearer token, basic auth) go into the request headers only: never into a
message, a log line or an exception, which name the server, the path and what it answered.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import requests

from homelab import monitoring as core
from homelab.monitoring import Alert, Matcher, Silence


class MonitoringError(RuntimeError):
    """Prometheus or Alertmanager did not answer, or refused; the message says which, where and what."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class MonitoringClient:
    """The Prometheus and Alertmanager of one cluster."""

    def __init__(self, prometheus_url: str, alertmanager_url: str, *, bearer_token: str | None = None,
                 basic_auth: tuple[str, str] | None = None, verify_tls: bool = True, timeout_s: float = 10.0):
        self.prometheus_url = prometheus_url.rstrip("/")
        self.alertmanager_url = alertmanager_url.rstrip("/")
        self.timeout_s = timeout_s
        self._verify = verify_tls
        self._session = requests.Session()
        if bearer_token:
            self._session.headers["Authorization"] = f"Bearer {bearer_token}"
        elif basic_auth is not None:
            self._session.auth = basic_auth

    @classmethod
    def from_block(cls, block: Any) -> MonitoringClient:
        """From a blocks.Monitoring (secrets read here, straight into the session)."""
        token = block.bearer_token.get_secret_value() if block.bearer_token is not None else None
        basic = None
        if block.basic_auth_user:
            password = block.basic_auth_password.get_secret_value() if block.basic_auth_password is not None else ""
            basic = (block.basic_auth_user, password)
        return cls(block.prometheus_url, block.alertmanager_url, bearer_token=token, basic_auth=basic,
                   verify_tls=block.verify_tls, timeout_s=block.timeout_seconds)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> MonitoringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- HTTP --------------------------------------------------------------------------------------

    def _request(self, method: str, base: str, path: str, what: str, *, params: dict[str, str] | None = None,
                 body: Any = None, ok: tuple[int, ...] = (200,), timeout_s: float | None = None) -> Any:
        url = base + path
        try:
            r = self._session.request(method, url, params=params, json=body, timeout=timeout_s or self.timeout_s,
                                      verify=self._verify, allow_redirects=False)
        except requests.RequestException as e:
            # The exception's text names the URL and the cause; no header (the credentials) is in it.
            raise MonitoringError(f"{what} at {base} did not answer {method} {path}: {type(e).__name__}: "
                                  f"{_short(str(e))}") from None
        if r.status_code in (401, 403):
            raise MonitoringError(f"{what} at {base} refused {method} {path} with {r.status_code}: check the "
                                  "Monitoring block's bearer token or basic auth", r.status_code)
        if r.status_code not in ok:
            raise MonitoringError(f"{what} at {base} answered {method} {path} with {r.status_code}: "
                                  f"{_short(r.text)}", r.status_code)
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            raise MonitoringError(f"{what} at {base} answered {method} {path} with something that is not JSON: "
                                  f"{_short(r.text)}", r.status_code) from None

    def _prometheus(self, path: str, params: dict[str, str] | None = None, timeout_s: float | None = None) -> Any:
        # Prometheus answers 400/422/503 with its own error JSON: keep it, the verdict names the error.
        return self._request("GET", self.prometheus_url, path, "Prometheus", params=params,
                             ok=(200, 400, 422, 503), timeout_s=timeout_s)

    def _alertmanager(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        return self._request(method, self.alertmanager_url, path, "Alertmanager", body=body, ok=ok)

    # --- Prometheus --------------------------------------------------------------------------------

    def alerts(self) -> list[Alert]:
        """Every alert Prometheus has pending or firing now (its rule evaluations, not Alertmanager's view)."""
        body = self._prometheus("/api/v1/alerts")
        try:
            return core.parse_alerts(body or {})
        except (ValueError, AttributeError, TypeError) as e:
            raise MonitoringError(f"Prometheus at {self.prometheus_url}: /api/v1/alerts: {e}") from None

    def firing(self) -> list[Alert]:
        return [a for a in self.alerts() if a.state == "firing"]

    def query(self, expr: str, timeout_s: float | None = None) -> dict[str, Any]:
        """An instant query's whole answer (status, data or error), for homelab.monitoring.health_verdict."""
        params = {"query": expr}
        if timeout_s:
            params["timeout"] = f"{max(100, int(timeout_s * 1000))}ms"  # a Prometheus duration takes no decimals
        body = self._prometheus("/api/v1/query", params, timeout_s=(timeout_s or self.timeout_s) + 1)
        if not isinstance(body, dict):
            raise MonitoringError(f"Prometheus at {self.prometheus_url}: /api/v1/query answered {_short(str(body))}")
        return body

    # --- Alertmanager ------------------------------------------------------------------------------

    def alertmanager_alerts(self) -> list[dict[str, Any]]:
        """Alertmanager's active alerts, silenced and inhibited ones included, each with its ``status``."""
        body = self._request("GET", self.alertmanager_url, "/api/v2/alerts", "Alertmanager",
                             params={"active": "true", "silenced": "true", "inhibited": "true"})
        if not isinstance(body, list):
            raise MonitoringError(f"Alertmanager at {self.alertmanager_url}: /api/v2/alerts answered "
                                  f"{_short(str(body))}")
        return [a for a in body if isinstance(a, dict)]

    def silences(self) -> list[Silence]:
        body = self._alertmanager("GET", "/api/v2/silences")
        if not isinstance(body, list):
            raise MonitoringError(f"Alertmanager at {self.alertmanager_url}: /api/v2/silences answered "
                                  f"{_short(str(body))}")
        return [core.parse_silence(s) for s in body]

    def silence(self, silence_id: str) -> Silence | None:
        """One silence, or None when Alertmanager does not know it."""
        try:
            body = self._alertmanager("GET", f"/api/v2/silence/{quote(silence_id, safe='')}")
        except MonitoringError as e:
            if e.status == 404:
                return None
            raise
        return core.parse_silence(body or {})

    def create_silence(self, matchers: Sequence[Matcher], ends_in_s: float, comment: str) -> Silence:
        """Create a silence from now for ``ends_in_s`` and read it back: it must be active with these matchers."""
        now = datetime.now(UTC)
        body = core.silence_body(matchers, now, now + timedelta(seconds=max(1.0, ends_in_s)), comment)
        answer = self._alertmanager("POST", "/api/v2/silences", body)
        sid = str((answer or {}).get("silenceID") or "")
        if not sid:
            raise MonitoringError(f"Alertmanager at {self.alertmanager_url} created no silence: it answered "
                                  f"{_short(str(answer))}")
        seen = self.silence(sid)
        if seen is None or seen.state != "active" or set(seen.matchers) != set(matchers):
            state = "not found" if seen is None else f"{seen.state} with {seen.describe()}"
            raise MonitoringError(f"Alertmanager at {self.alertmanager_url}: silence {sid} reads back {state}, "
                                  f"expected active with {{{', '.join(str(m) for m in matchers)}}}")
        return seen

    def expire_silence(self, silence_id: str, deadline_s: float = 10.0) -> Silence:
        """Expire a silence and read it back expired. Expiring one that is already expired is fine (0.25 and
        later answer 200); one Alertmanager does not know is an error (404 from 0.26, 500 "silence not found"
        before)."""
        deadline = time.monotonic() + deadline_s
        path = f"/api/v2/silence/{quote(silence_id, safe='')}"
        last = ""
        while True:
            try:
                self._alertmanager("DELETE", path)
                seen = self.silence(silence_id)
                if seen is not None and seen.state == "expired":
                    return seen
                last = "not found" if seen is None else f"still {seen.state}"
                if seen is None:
                    raise MonitoringError(f"Alertmanager at {self.alertmanager_url} does not know silence "
                                          f"{silence_id} (was its data lost?)", 404)
            except MonitoringError as e:
                if e.status == 404 or "silence not found" in str(e):
                    raise MonitoringError(f"Alertmanager at {self.alertmanager_url} does not know silence "
                                          f"{silence_id} (was its data lost?)", 404) from None
                if time.monotonic() >= deadline:
                    raise
                last = str(e)
            if time.monotonic() >= deadline:
                raise MonitoringError(f"Alertmanager at {self.alertmanager_url}: silence {silence_id} is {last} "
                                      f"after expiring it; expire it by hand: amtool silence expire {silence_id}")
            time.sleep(0.2)


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + " ..."
