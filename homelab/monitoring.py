"""What the homelab's monitoring knows, judged: alert gates, node silences, health queries, stale silences.

Pure: every function takes what tasks/monitoring.py read from Prometheus (``/api/v1/alerts``,
``/api/v1/query``) and Alertmanager (``/api/v2/silences``) as plain data and returns a Verdict or data.

Matchers use the syntax Prometheus and Alertmanager share (``alertname=~"Watchdog|InfoInhibitor"``,
``severity!="none"``; several comma-separated, optionally in braces): ``=`` ``!=`` ``=~`` ``!~``, a regex
anchored at both ends as Prometheus anchors it (prometheus/prometheus model/labels/regexp.go
``NewFastRegexMatcher`` wraps it in ``^(?:...)$``). A label that is absent matches as the empty string,
as in Alertmanager (prometheus/alertmanager pkg/labels/matcher.go ``Matches``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from homelab.ceph_gate import Verdict

Op = Literal["=", "!=", "=~", "!~"]

# Who created a silence, in Alertmanager's createdBy: how the drift check tells this project's silences apart.
CREATED_BY = "homelab-flows"

# kube-prometheus-stack's two always-on alerts: Watchdog fires forever to prove the pipeline works, and
# InfoInhibitor fires whenever an info-level alert does, to inhibit it (kube-prometheus
# jsonnet/kube-prometheus/components/mixin/alerts/general.libsonnet).
DEFAULT_ALLOWED = ('alertname=~"Watchdog|InfoInhibitor"',)
# The labels by which kube-prometheus-stack's alerts name a node: `node` (kube-state-metrics, e.g.
# KubeNodeNotReady), `instance` (node-exporter and kubelet targets, <ip>:<port>), `kubernetes_node`
# (some ServiceMonitor relabelings).
DEFAULT_NODE_LABELS = ("node", "instance", "kubernetes_node")
# What the flow's own noout raises: OSDMAP_FLAGS makes Ceph HEALTH_WARN, which ceph-mixin's
# CephHealthWarning alerts on (ceph/ceph monitoring/ceph-mixin/prometheus_alerts.libsonnet:
# `ceph_health_status == 1`), shipped by Rook's chart as its PrometheusRule.
DEFAULT_CEPH_SILENCED = ("CephHealthWarning",)

_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_OP = re.compile(r"\s*(=~|!~|!=|=)\s*")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class MatcherError(ValueError):
    """A matcher text that cannot be parsed; the message quotes it and says what was expected."""


@dataclass(frozen=True)
class Matcher:
    name: str
    op: Op
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        have = labels.get(self.name, "")
        if self.op in ("=", "!="):
            hit = have == self.value
        else:
            hit = re.fullmatch(self.value, have, flags=re.DOTALL) is not None
        return hit if self.op in ("=", "=~") else not hit

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.name}{self.op}"{escaped}"'

    def as_alertmanager(self) -> dict[str, Any]:
        """The v2 API's matcher object (prometheus/alertmanager api/v2/openapi.yaml `matcher`)."""
        return {"name": self.name, "value": self.value, "isRegex": self.op in ("=~", "!~"),
                "isEqual": self.op in ("=", "=~")}


def _quoted(text: str, i: int, whole: str) -> tuple[str, int]:
    """The double-quoted string starting at text[i] (Go escapes \\" and \\\\) and the index after it."""
    out: list[str] = []
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text):
            nxt = text[j + 1]
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            j += 2
            continue
        if c == '"':
            return "".join(out), j + 1
        out.append(c)
        j += 1
    raise MatcherError(f"{whole!r}: a quoted value is not closed")


def parse_matchers(text: str) -> tuple[Matcher, ...]:
    """``alertname=~"Watchdog|InfoInhibitor", severity="none"`` (braces optional) -> its matchers."""
    whole = text
    s = text.strip()
    if s.startswith("{"):
        if not s.endswith("}"):
            raise MatcherError(f"{whole!r}: an opening brace without its closing brace")
        s = s[1:-1]
    out: list[Matcher] = []
    i = 0
    while True:
        while i < len(s) and s[i] in " \t\n,":
            i += 1
        if i >= len(s):
            break
        m = _LABEL.match(s, i)
        if not m:
            raise MatcherError(f"{whole!r}: expected a label name at {s[i:i + 20]!r}")
        name, i = m.group(0), m.end()
        op_m = _OP.match(s, i)
        if not op_m:
            raise MatcherError(f"{whole!r}: expected =, !=, =~ or !~ after {name!r}")
        op, i = op_m.group(1), op_m.end()
        if i < len(s) and s[i] == '"':
            value, i = _quoted(s, i, whole)
        else:  # Alertmanager also takes unquoted values (amtool silence add node=m720q-1)
            end = i
            while end < len(s) and s[end] not in ",}":
                end += 1
            value, i = s[i:end].strip(), end
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as e:
                raise MatcherError(f"{whole!r}: {name}{op} is not a valid regular expression: {e}") from None
        out.append(Matcher(name, op, value))  # type: ignore[arg-type]
        while i < len(s) and s[i] in " \t\n":
            i += 1
        if i < len(s) and s[i] != ",":
            raise MatcherError(f"{whole!r}: expected a comma after {name}{op}{value!r}")
    if not out:
        raise MatcherError(f"{whole!r}: no matcher in it (write e.g. alertname=\"Watchdog\")")
    return tuple(out)


def parse_matcher_sets(texts: Iterable[str]) -> list[tuple[Matcher, ...]]:
    """Each text is one set (all of its matchers must match); an alert matching any set is matched."""
    return [parse_matchers(t) for t in texts]


def matches_any(labels: Mapping[str, str], sets: Iterable[Sequence[Matcher]]) -> bool:
    return any(all(m.matches(labels) for m in ms) for ms in sets)


def is_alert_name(text: str) -> bool:
    """A name Prometheus accepts in a rule's `alert:` field (a metric name: rulefmt validates it so)."""
    return bool(_METRIC_NAME.match(text))


# --- settings ----------------------------------------------------------------------------------


class HealthQuery(BaseModel):
    """A PromQL expression that must hold after every node: a non-empty result whose every value is truthy."""

    name: str = Field(min_length=1, max_length=100, description="A short name, shown in the outcome table.")
    expr: str = Field(min_length=1, max_length=4000, description='PromQL, e.g. ceph_health_status == 0 or '
                                                                   'min(up{job="cnpg"}) == 1.')
    deadline_seconds: float = Field(default=300, gt=0, le=86400,
                                    description="How long it may take to hold after a node, in seconds.")


class MonitoringGates(BaseModel):
    """Per-run overrides of the Monitoring block's gates (the block holds each cluster's defaults)."""

    enabled: bool = Field(default=True, description="Off: no alert gate, silences or health queries in this run "
                                                     "(the plan says so).")
    allowed_alerts: list[str] | None = Field(
        default=None, description='Alerts that may fire, as matcher sets (e.g. alertname=~"Watchdog|InfoInhibitor"); '
                                  "empty means the block's list.")
    health_queries: list[HealthQuery] | None = Field(
        default=None, description="Replace the block's health queries for this run.")
    alert_gate_seconds: float | None = Field(
        default=None, gt=0, description="How long the alert gate waits for firing alerts to resolve before a node; "
                                        "empty means the block's.")


# --- alerts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """One entry of Prometheus' /api/v1/alerts: labels, state (pending|firing), since when."""

    labels: Mapping[str, str]
    state: str
    active_at: str = ""
    value: str = ""

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")

    def describe(self) -> str:
        rest = ", ".join(f'{k}="{v}"' for k, v in sorted(self.labels.items()) if k != "alertname")
        return f"{self.name}{{{rest}}}" if rest else self.name


def parse_alerts(body: Mapping[str, Any]) -> list[Alert]:
    """Prometheus /api/v1/alerts -> alerts (prometheus/prometheus web/api/v1/api.go `AlertDiscovery`)."""
    if body.get("status") != "success":
        raise ValueError(f"Prometheus answered status {body.get('status')!r}: {body.get('error', '')}")
    data = body.get("data") or {}
    out = []
    for a in data.get("alerts") or []:
        labels = {str(k): str(v) for k, v in (a.get("labels") or {}).items()}
        out.append(Alert(labels, str(a.get("state", "")), str(a.get("activeAt") or ""), str(a.get("value") or "")))
    return out


def alert_gate(alerts: Iterable[Alert], allowed: Sequence[Sequence[Matcher]],
               silenced: Sequence[Sequence[Matcher]] = ()) -> Verdict:
    """Open when no alert fires except those the allowlist or this run's own silences match.

    Pending alerts do not count: their `for:` has not elapsed, and Prometheus itself does not alert on them."""
    firing = [a for a in alerts if a.state == "firing"]
    blocking = [a for a in firing if not matches_any(a.labels, allowed) and not matches_any(a.labels, silenced)]
    if blocking:
        shown = "; ".join(a.describe() for a in sorted(blocking, key=lambda a: a.describe())[:10])
        more = f" and {len(blocking) - 10} more" if len(blocking) > 10 else ""
        return Verdict(False, f"{len(blocking)} alert(s) firing in Prometheus: {shown}{more}")
    tolerated = len(firing)
    return Verdict(True, f"no alert firing{f' beyond {tolerated} allowed or silenced' if tolerated else ''}")


# --- silences ----------------------------------------------------------------------------------


def still_held(prometheus: Iterable[Alert], alertmanager: Iterable[Mapping[str, Any]],
               sets: Sequence[Sequence[Matcher]], silence_ids: Iterable[str],
               other_sets: Sequence[Sequence[Matcher]] = (), other_ids: Iterable[str] = ()) -> list[str]:
    """The alerts a node's silences alone still hold: pending or firing in Prometheus and matched by one of
    the sets, or still active in Alertmanager and silenced by one of the ids — unless another silence in
    force (``other_sets`` / ``other_ids``) covers it too. Expiring the silences while any is left would let
    it notify: Prometheus sees a rebooted node well again only a scrape and an evaluation late, and tells
    Alertmanager of the resolution right after that evaluation (prometheus/prometheus rules/alerting.go
    ``Eval`` resolves, rules/group.go sends; Alertmanager computes ``status.silencedBy`` at each request,
    api/v2/api.go, openapi.yaml ``alertStatus``)."""
    ids, others = set(silence_ids), set(other_ids)
    held = {a.describe() for a in prometheus if a.state in ("pending", "firing") and matches_any(a.labels, sets)
            and not matches_any(a.labels, other_sets)}
    for a in alertmanager:
        status = a.get("status") or {}
        by = set(status.get("silencedBy") or [])
        if ids & by and not others & by:
            labels = {str(k): str(v) for k, v in (a.get("labels") or {}).items()}
            held.add(Alert(labels, "firing").describe())
    return sorted(held)


def node_silence_matchers(node: str, ip: str, labels: Sequence[str]) -> list[tuple[Matcher, ...]]:
    """One matcher set per label that names a node: the value is the node's name or address, with or
    without a port (an instance label is `<ip>:9100` on node-exporter, `<ip>:10250` on the kubelet).

    Alertmanager ANDs the matchers of one silence, so each label is a silence of its own."""
    names = "|".join(re.escape(x) for x in dict.fromkeys([node, ip]) if x)
    return [(Matcher(label, "=~", f"({names})(:[0-9]+)?"),) for label in labels]


def ceph_silence_matchers(alertnames: Sequence[str]) -> list[tuple[Matcher, ...]]:
    """The Ceph warnings this run's noout raises (cluster-wide alerts: they name no node)."""
    if not alertnames:
        return []
    return [(Matcher("alertname", "=~", "|".join(re.escape(a) for a in alertnames)),)]


def silence_body(matchers: Sequence[Matcher], starts: datetime, ends: datetime, comment: str) -> dict[str, Any]:
    """The POST /api/v2/silences body (prometheus/alertmanager api/v2/openapi.yaml `postableSilence`)."""
    return {"matchers": [m.as_alertmanager() for m in matchers], "startsAt": _iso(starts), "endsAt": _iso(ends),
            "createdBy": CREATED_BY, "comment": comment}


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Silence:
    """One entry of Alertmanager's /api/v2/silences."""

    id: str
    state: str  # active | pending | expired
    matchers: tuple[Matcher, ...]
    starts_at: datetime | None
    ends_at: datetime | None
    created_by: str
    comment: str

    def describe(self) -> str:
        return "{" + ", ".join(str(m) for m in self.matchers) + "}"


def parse_time(text: str | None) -> datetime | None:
    """RFC 3339 as Alertmanager writes it (`2025-01-02T03:04:05.678Z`, up to nanoseconds)."""
    if not text:
        return None
    s = text.strip().replace("Z", "+00:00")
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", s)
    if m:  # Python takes at most microseconds
        frac = (m.group(2) or "")[:7]
        s = m.group(1) + frac + m.group(3)
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_silence(obj: Mapping[str, Any]) -> Silence:
    matchers = []
    for m in obj.get("matchers") or []:
        regex, equal = bool(m.get("isRegex")), m.get("isEqual", True) is not False
        op: Op = ("=~" if equal else "!~") if regex else ("=" if equal else "!=")
        matchers.append(Matcher(str(m.get("name", "")), op, str(m.get("value", ""))))
    return Silence(str(obj.get("id", "")), str((obj.get("status") or {}).get("state", "")), tuple(matchers),
                   parse_time(obj.get("startsAt")), parse_time(obj.get("endsAt")), str(obj.get("createdBy", "")),
                   str(obj.get("comment", "")))


def stale_silences(silences: Iterable[Silence], now: datetime, older_than_s: float) -> list[Silence]:
    """The silences these flows created that are still in force and began more than ``older_than_s`` ago: a
    run that crashed before it expired its silence (a run expires its own as each node passes)."""
    out = []
    for s in silences:
        if s.created_by != CREATED_BY or s.state not in ("active", "pending") or s.starts_at is None:
            continue
        if (now - s.starts_at).total_seconds() > older_than_s:
            out.append(s)
    return sorted(out, key=lambda s: (s.starts_at or now, s.id))


# --- health queries ----------------------------------------------------------------------------


def _truthy(value: Any) -> bool:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return False
    return x != 0 and not math.isnan(x)


_CMP = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?")


def filters(expr: str) -> bool:
    """Whether the expression's outermost operation is a comparison without `bool`.

    Such a comparison keeps the series for which it holds, with their own value (PromQL: `x == 0` returns
    `x`'s series whose value is 0), so every series it returns is a truth even when its value is 0;
    `x == bool 0` returns 1 or 0 per series instead. Strings, label matchers, ranges and parentheses are
    skipped, so only an operator at the top level counts."""
    text = expr.strip()
    while text.startswith("(") and _closing(text, 0) == len(text) - 1:
        text = text[1:-1].strip()
    depth, i, found = 0, 0, False
    while i < len(text):
        c = text[i]
        if c in "\"'`":
            j = i + 1
            while j < len(text) and text[j] != c:
                j += 2 if text[j] == "\\" and c != "`" else 1
            i = j + 1
            continue
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif depth == 0:
            m = _CMP.match(text, i)
            if m and not (m.group(1) in ("<", ">") and text[i + 1:i + 2] == "="):
                if not m.group(2):
                    found = True
                i = m.end()
                continue
        i += 1
    return found


def _closing(text: str, start: int) -> int:
    """The index of the parenthesis closing the one at ``start`` (-1 when it is not closed)."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c in "\"'`":
            j = i + 1
            while j < len(text) and text[j] != c:
                j += 2 if text[j] == "\\" and c != "`" else 1
            i = j + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def health_verdict(q: HealthQuery, body: Mapping[str, Any]) -> Verdict:
    """A /api/v1/query answer judged: true = a non-empty result whose every value is truthy.

    A value is truthy when it is neither 0 nor NaN, except in the answer of a filtering comparison
    (`ceph_health_status == 0`, see filters()), where each series returned is one for which the comparison
    holds: there a non-empty answer is true, and an empty one (nothing holds) false."""
    if body.get("status") != "success":
        return Verdict(False, f"{q.name}: Prometheus refused `{q.expr}`: {body.get('errorType', '')} "
                              f"{body.get('error', '')}".rstrip())
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    values: list[tuple[str, Any]] = []
    if kind in ("scalar", "string"):
        values = [("", (result or [None, None])[1])]
    elif kind == "vector":
        values = [(_series(r.get("metric") or {}), (r.get("value") or [None, None])[1]) for r in result or []]
    elif kind == "matrix":
        values = [(_series(r.get("metric") or {}), ((r.get("values") or [[None, None]])[-1])[1]) for r in result or []]
    if not values:
        return Verdict(False, f"{q.name}: `{q.expr}` returned no series")
    kept = filters(q.expr)
    false = [(s, v) for s, v in values if not kept and not _truthy(v)]
    if false:
        shown = "; ".join(f"{s or 'value'} = {v}" for s, v in false[:5])
        return Verdict(False, f"{q.name}: `{q.expr}` is not true for {len(false)} of {len(values)} series: {shown}")
    return Verdict(True, f"{q.name}: true ({len(values)} series)")


def _series(metric: Mapping[str, Any]) -> str:
    name = str(metric.get("__name__", ""))
    rest = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{rest}}}" if rest else name or "{}"


@dataclass
class HealthResult:
    """A health query after a node, for the outcome table."""

    name: str
    ok: bool
    seconds: float
    reason: str


@dataclass
class NodeSilence:
    """A silence this run created for a node, and what became of it."""

    id: str
    node: str
    matchers: str
    # active | settling (the node passed; ends once what it holds resolved) | expiring (now) | expired |
    # left (could not be expired: it ends by itself at ends_at)
    state: str = "active"
    ends_at: str = ""

    def as_result(self) -> dict[str, str]:
        return {"id": self.id, "node": self.node, "state": self.state}


@dataclass
class Settings:
    """The monitoring gates of one run: the block's defaults with the run's overrides applied."""

    allowed: list[tuple[Matcher, ...]]
    node_labels: list[str]
    ceph_silenced: list[str]
    health_queries: list[HealthQuery]
    alert_gate_s: float
    allowed_texts: list[str] = field(default_factory=list)
    settle_s: float = 180.0


def settings(block_allowed: Sequence[str], node_labels: Sequence[str], ceph_silenced: Sequence[str],
             block_queries: Sequence[HealthQuery], block_alert_gate_s: float,
             run: MonitoringGates | None, *, settle_s: float = 180.0) -> Settings:
    """The run's overrides win field by field; a matcher that does not parse raises MatcherError."""
    allowed_texts = list(run.allowed_alerts if run is not None and run.allowed_alerts is not None else block_allowed)
    queries = list(run.health_queries if run is not None and run.health_queries is not None else block_queries)
    gate_s = run.alert_gate_seconds if run is not None and run.alert_gate_seconds is not None else block_alert_gate_s
    names = [q.name for q in queries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MatcherError(f"health queries: the name(s) {', '.join(dup)} are used twice; give each its own")
    return Settings(parse_matcher_sets(allowed_texts), list(node_labels), list(ceph_silenced), queries, gate_s,
                    allowed_texts, settle_s)


def describe_plan(s: Settings | None, why_not: str = "") -> str:
    """One line for the plan: what the monitoring gates will do, or why they are skipped."""
    if s is None:
        return f"monitoring gates skipped: {why_not}"
    allowed = ", ".join(s.allowed_texts) or "nothing"
    queries = ", ".join(q.name for q in s.health_queries) or "none"
    return (f"monitoring gates on: no alert firing before each node (allowed: {allowed}; waits up to "
            f"{s.alert_gate_s:g} s), a silence per node on {', '.join(s.node_labels) or 'no label'}"
            f"{' plus ' + ', '.join(s.ceph_silenced) if s.ceph_silenced else ''}, health queries after each "
            f"node: {queries}")
