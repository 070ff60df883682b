"""The monitoring gates' pure core: matchers, the alert gate, node silences, health queries, stale silences."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from homelab import drift
from homelab.monitoring import (
    CREATED_BY,
    Alert,
    HealthQuery,
    Matcher,
    MatcherError,
    MonitoringGates,
    Silence,
    alert_gate,
    ceph_silence_matchers,
    describe_plan,
    health_verdict,
    matches_any,
    node_silence_matchers,
    parse_alerts,
    parse_matcher_sets,
    parse_matchers,
    parse_silence,
    settings,
    silence_body,
    stale_silences,
    still_held,
)

DEFAULT_ALLOWED = parse_matcher_sets(['alertname=~"Watchdog|InfoInhibitor"'])


def firing(name: str, **labels: str) -> Alert:
    return Alert({"alertname": name, **labels}, "firing")


@pytest.mark.parametrize("text, labels, hit", [
    ('alertname=~"Watchdog|InfoInhibitor"', {"alertname": "Watchdog"}, True),
    ('alertname=~"Watchdog|InfoInhibitor"', {"alertname": "WatchdogX"}, False),  # anchored, as Prometheus does
    ('{alertname="KubeNodeNotReady", node="m720q-1"}', {"alertname": "KubeNodeNotReady", "node": "m720q-1"}, True),
    ('{alertname="KubeNodeNotReady", node="m720q-1"}', {"alertname": "KubeNodeNotReady", "node": "m720q-2"}, False),
    ('severity!="critical"', {"severity": "warning"}, True),
    ('severity!="critical"', {"severity": "critical"}, False),
    ('namespace!~"kube-.*"', {"namespace": "media"}, True),
    ('namespace!~"kube-.*"', {"namespace": "kube-system"}, False),
    ('team=""', {"alertname": "X"}, True),  # an absent label matches the empty string
    ("node=m720q-1", {"node": "m720q-1"}, True),  # amtool's unquoted form
    ('summary="say \\"hi\\""', {"summary": 'say "hi"'}, True),
])
def test_matchers_match_as_alertmanager_does(text, labels, hit):
    assert matches_any(labels, [parse_matchers(text)]) is hit


@pytest.mark.parametrize("text, words", [
    ('alertname=~"(unclosed"', "not a valid regular expression"),
    ("alertname", "expected =, !=, =~ or !~"),
    ('{alertname="x"', "closing brace"),
    ('alertname="x" severity="y"', "expected a comma"),
    ("", "no matcher"),
    ('alertname="unterminated', "not closed"),
])
def test_bad_matchers_are_refused_naming_the_problem(text, words):
    with pytest.raises(MatcherError, match=words):
        parse_matchers(text)


def test_monitoring_block_refuses_a_bad_allowlist_entry():
    from blocks import Monitoring

    with pytest.raises(ValueError, match="allowed_alerts"):
        Monitoring(prometheus_url="http://p", alertmanager_url="http://a", allowed_alerts=['alertname=~"("'])


def test_monitoring_block_hides_its_secrets():
    from pydantic import SecretStr

    from blocks import Homelab, Monitoring

    m = Monitoring(prometheus_url="http://p", alertmanager_url="http://a", bearer_token=SecretStr("tok-3xyz"),
                   basic_auth_user="u", basic_auth_password=SecretStr("pw-9abc"))
    shown = repr(m) + str(m) + m.model_dump_json()
    assert "tok-3xyz" not in shown and "pw-9abc" not in shown
    schema = Homelab.model_json_schema()
    assert "monitoring" in schema["properties"]


def test_alert_gate_names_the_firing_alert_and_its_labels():
    v = alert_gate([firing("Watchdog"), firing("TargetDown", job="cnpg", namespace="db")], DEFAULT_ALLOWED)
    assert not v.ok
    assert 'TargetDown{job="cnpg", namespace="db"}' in v.reason and "Watchdog" not in v.reason


def test_alert_gate_ignores_pending_allowed_and_own_silenced_alerts():
    own = node_silence_matchers("m720q-1", "10.42.0.101", ["node", "instance"])
    alerts = [Alert({"alertname": "CPUThrottlingHigh"}, "pending"), firing("InfoInhibitor"),
              firing("KubeNodeNotReady", node="m720q-1"), firing("NodeDown", instance="10.42.0.101:9100")]
    v = alert_gate(alerts, DEFAULT_ALLOWED, own)
    assert v.ok, v.reason
    # The same alert of another node is not this run's doing.
    assert not alert_gate([firing("KubeNodeNotReady", node="m720q-2")], DEFAULT_ALLOWED, own).ok


def test_node_silence_matches_name_or_address_with_any_port_and_nothing_else():
    sets = node_silence_matchers("m720q-1", "10.42.0.101", ["node", "instance", "kubernetes_node"])
    assert len(sets) == 3  # Alertmanager ANDs one silence's matchers: one silence per label
    instance = sets[1]
    assert matches_any({"instance": "10.42.0.101:9100"}, [instance])
    assert matches_any({"instance": "m720q-1"}, [instance])
    assert not matches_any({"instance": "10.42.0.1011:9100"}, [instance])
    assert not matches_any({"instance": "10.42.0.10:9100"}, [instance])
    assert not matches_any({"instance": "10x42x0x101:9100"}, [instance])  # the dots are escaped
    assert not matches_any({"node": "m720q-11"}, [sets[0]])


def test_silence_body_is_alertmanagers_postable_silence():
    start = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    [ceph] = ceph_silence_matchers(["CephHealthWarning", "CephOSDDown"])
    body = silence_body(ceph, start, start + timedelta(minutes=30), "talos-upgrade run x")
    assert body == {"matchers": [{"name": "alertname", "value": "CephHealthWarning|CephOSDDown", "isRegex": True,
                                  "isEqual": True}],
                    "startsAt": "2025-01-02T03:04:05.678Z", "endsAt": "2025-01-02T03:34:05.678Z",
                    "createdBy": CREATED_BY, "comment": "talos-upgrade run x"}
    assert ceph_silence_matchers([]) == []


def test_parse_silence_reads_every_operator_back():
    s = parse_silence({"id": "a1", "status": {"state": "active"}, "createdBy": CREATED_BY, "comment": "c",
                       "startsAt": "2025-01-02T03:04:05.123456789Z", "endsAt": "2025-01-02T04:00:00Z",
                       "matchers": [{"name": "a", "value": "1", "isRegex": False, "isEqual": True},
                                    {"name": "b", "value": "2", "isRegex": False, "isEqual": False},
                                    {"name": "c", "value": "3", "isRegex": True},
                                    {"name": "d", "value": "4", "isRegex": True, "isEqual": False}]})
    assert [m.op for m in s.matchers] == ["=", "!=", "=~", "!~"]
    assert s.starts_at == datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def vec(*values: str) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"__name__": "ceph_health_status", "i": str(i)}, "value": [1, v]} for i, v in enumerate(values)]}}


@pytest.mark.parametrize("expr, body, ok", [
    ("ceph_health_status == 0", vec("0"), True),  # the comparison kept the series: it holds
    ("(ceph_health_status == 0)", vec("0"), True),
    ("ceph_health_status == 0", vec(), False),
    ("ceph_health_status == bool 0", vec("0"), False),  # bool: the value is the truth
    ("ceph_health_status == bool 0", vec("1"), True),
    ('min(up{job="cnpg"}) == 1', vec("1"), True),
    ('min(up{job="cnpg"})', vec("0"), False),
    ('max(x{a="=="}) >= bool 2', vec("0"), False),  # operators inside matchers do not count
    ("sum(rate(x[5m]) > 0)", vec("0"), False),  # a comparison inside a call is not the outermost one
])
def test_filtering_comparisons_are_true_when_they_keep_a_series(expr, body, ok):
    v = health_verdict(HealthQuery(name="q", expr=expr), body)
    assert v.ok is ok, v.reason


@pytest.mark.parametrize("body, ok, words", [
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"__name__": "ceph_health_status"}, "value": [1, "0"]}]}}, False, "ceph_health_status = 0"),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "value": [1, "1"]}, {"metric": {"job": "cnpg"}, "value": [1, "1"]}]}}, True, "2 series"),
    ({"status": "success", "data": {"resultType": "vector", "result": []}}, False, "no series"),
    ({"status": "success", "data": {"resultType": "scalar", "result": [1, "NaN"]}}, False, "not true"),
    ({"status": "success", "data": {"resultType": "scalar", "result": [1, "3"]}}, True, "true"),
    ({"status": "error", "errorType": "bad_data", "error": "parse error"}, False, "bad_data parse error"),
])
def test_health_query_is_true_only_for_a_non_empty_all_truthy_result(body, ok, words):
    v = health_verdict(HealthQuery(name="q", expr="x"), body)
    assert v.ok is ok and words in v.reason


def test_stale_silences_are_this_projects_and_in_force_for_longer_than_the_limit():
    now = datetime(2025, 1, 3, tzinfo=UTC)
    day_ago = now - timedelta(days=1, minutes=1)

    def sil(i: str, by: str, state: str, start: datetime) -> Silence:
        return Silence(i, state, (Matcher("node", "=", "x"),), start, now + timedelta(hours=1), by, "c")

    found = stale_silences([sil("old", CREATED_BY, "active", day_ago), sil("fresh", CREATED_BY, "active", now),
                            sil("operator", "alice", "active", day_ago), sil("done", CREATED_BY, "expired", day_ago)],
                           now, 86400)
    assert [s.id for s in found] == ["old"]


def test_drift_lists_firing_alerts_but_allowed_ones_and_stale_silences():
    now = datetime(2025, 1, 3, tzinfo=UTC)
    stale = Silence("s1", "active", (Matcher("node", "=~", "m720q-1"),), now - timedelta(days=2), now, CREATED_BY,
                    "talos-upgrade run r")
    found = drift.compare_monitoring("m720q", [firing("Watchdog"), firing("CephOSDDown", severity="critical")],
                                     DEFAULT_ALLOWED, [stale], now)
    assert [(f.area, f.severity) for f in found] == [("monitoring", "error"), ("monitoring", "warning")]
    assert "CephOSDDown" in found[0].object and "s1" in found[1].object and "48.0 h" in found[1].live
    assert "## Monitoring" in drift.DriftReport(findings=found).markdown()


def test_run_overrides_win_over_the_block_defaults():
    q = HealthQuery(name="ceph", expr="ceph_health_status == 0")
    block = settings(['alertname="Watchdog"'], ["node"], ["CephHealthWarning"], [q], 900, None)
    assert block.alert_gate_s == 900 and [x.name for x in block.health_queries] == ["ceph"]
    run = settings(['alertname="Watchdog"'], ["node"], [], [q], 900,
                   MonitoringGates(allowed_alerts=['alertname="Probe"'], health_queries=[], alert_gate_seconds=5))
    assert run.alert_gate_s == 5 and run.health_queries == [] and run.allowed_texts == ['alertname="Probe"']
    assert "health queries after each node: none" in describe_plan(run)
    assert describe_plan(None, "no Monitoring block").startswith("monitoring gates skipped: no Monitoring block")
    with pytest.raises(MatcherError, match="used twice"):
        settings([], [], [], [q, q], 1, None)


def test_a_nodes_silences_hold_its_alerts_until_prometheus_and_alertmanager_both_let_go():
    sets = node_silence_matchers("m720q-2", "10.42.0.102", ["node", "instance"])
    other = Alert({"alertname": "KubeNodeNotReady", "node": "m720q-3"}, "firing")
    pending = Alert({"alertname": "KubeNodeNotReady", "node": "m720q-2"}, "pending")
    by_instance = Alert({"alertname": "NodeDown", "instance": "10.42.0.102:9100"}, "firing")
    assert still_held([other], [], sets, ["s1"]) == []
    assert still_held([pending, by_instance, other], [], sets, ["s1"]) == [
        'KubeNodeNotReady{node="m720q-2"}', 'NodeDown{instance="10.42.0.102:9100"}']
    # Resolved in Prometheus, but Alertmanager has not heard yet: still held by our silence s1, not by s9.
    am = [{"labels": {"alertname": "KubeNodeNotReady", "node": "m720q-2"},
           "status": {"state": "suppressed", "silencedBy": ["s1"], "inhibitedBy": []}},
          {"labels": {"alertname": "Other"}, "status": {"state": "suppressed", "silencedBy": ["s9"]}}]
    assert still_held([], am, sets, ["s1"]) == ['KubeNodeNotReady{node="m720q-2"}']
    assert still_held([], am, sets, ["s2"]) == []


def test_an_alert_another_silence_of_the_run_covers_is_not_held_by_the_passed_node():
    # m720q-1 passed; m720q-2's noout now fires CephHealthWarning, which both nodes' Ceph silences match.
    ceph = ceph_silence_matchers(["CephHealthWarning"])
    warning = Alert({"alertname": "CephHealthWarning"}, "firing")
    am = [{"labels": {"alertname": "CephHealthWarning"}, "status": {"silencedBy": ["a-ceph", "b-ceph"]}}]
    assert still_held([warning], am, ceph, ["a-ceph"]) == ["CephHealthWarning"]
    assert still_held([warning], am, ceph, ["a-ceph"], ceph, ["b-ceph"]) == []


def test_the_settle_time_comes_from_the_block():
    q = HealthQuery(name="ceph", expr="ceph_health_status == 0")
    assert settings([], ["node"], [], [q], 900, None).settle_s == 180
    assert settings([], ["node"], [], [q], 900, None, settle_s=7.5).settle_s == 7.5


def test_parse_alerts_refuses_an_error_answer():
    assert parse_alerts({"status": "success", "data": {"alerts": [
        {"labels": {"alertname": "A"}, "state": "firing", "activeAt": "t", "value": "1e+00"}]}})[0].name == "A"
    with pytest.raises(ValueError, match="error"):
        parse_alerts({"status": "error", "error": "boom"})
