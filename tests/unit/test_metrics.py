"""Metrics without a process: classes, summing workers' snapshots, and the dashboard and
alert rules referring only to series pgproxy declares."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgproxy.http_api import _is_loopback
from pgproxy.metrics import SERIES, STATEMENT_BUCKETS, Metrics, render, statement_class

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, expected", [
    ("SELECT 1", "READ"), ("  select * from t", "READ"), ("-- note\nSELECT 1", "READ"),
    ("/* hint */ (SELECT 1)", "READ"), ("with x as (select 1) select * from x", "READ"),
    ("INSERT INTO t VALUES (1)", "WRITE"), ("update t set a = 1", "WRITE"), ("COPY t FROM STDIN", "WRITE"),
    ("CREATE TABLE t (a int)", "DDL"), ("drop index i", "DDL"), ("GRANT SELECT ON t TO r", "ROLE"),
    ("DO $$ BEGIN END $$", "FUNCTION"), ("CALL p()", "FUNCTION"), ("BEGIN", "MISC"), ("SET x = 1", "MISC"),
    ("", "MISC"), ("<FunctionCall message>", "MISC"),
])
def test_statement_class_follows_pgaudits_names(text, expected):
    assert statement_class(text) == expected


def _samples(body: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_snapshots_of_two_workers_are_summed():
    first, second = Metrics(), Metrics()
    first.statement("SELECT 1", 0.0007, "ok")
    first.statement("SELECT 2", 0.2, "ok")
    second.statement("INSERT INTO t VALUES (1)", 0.003, "error")
    second.count("pgproxy_auth_attempts", "jwt", "ok", n=3)
    first.count("pgproxy_auth_attempts", "jwt", "ok")
    snapshots = [json.loads(json.dumps(m.snapshot([["pgproxy_client_connections", ["idle"], 2]])))
                 for m in (first, second)]  # as they travel over the control channel
    samples = _samples(render(snapshots))
    assert samples[("pgproxy_workers", ())] == 2
    assert samples[("pgproxy_client_connections", (("state", "idle"),))] == 4
    assert samples[("pgproxy_auth_attempts_total", (("method", "jwt"), ("result", "ok")))] == 4
    assert samples[("pgproxy_statements_total", (("class", "WRITE"), ("outcome", "error")))] == 1
    read = (("class", "READ"),)
    assert samples[("pgproxy_statement_duration_seconds_count", read)] == 2
    assert samples[("pgproxy_statement_duration_seconds_sum", read)] == pytest.approx(0.2007)
    assert samples[("pgproxy_statement_duration_seconds_bucket", (("class", "READ"), ("le", "0.001")))] == 1
    assert samples[("pgproxy_statement_duration_seconds_bucket", (("class", "READ"), ("le", "0.25")))] == 2
    assert samples[("pgproxy_statement_duration_seconds_bucket", (("class", "READ"), ("le", "+Inf")))] == 2
    assert len(STATEMENT_BUCKETS) + 1 == len([k for k in samples if k[0].endswith("_bucket") and k[1][0] == read[0]])
    assert samples[("pgproxy_admin_terminations_total", ())] == 0  # declared counters show from the start


def _referenced_series(text: str) -> set[str]:
    return set(re.findall(r"\bpgproxy_[a-z_]+", text))


def _declared_names() -> set[str]:
    names = set()
    for name, (kind, *_rest) in SERIES.items():
        names |= {"counter": {f"{name}_total"}, "gauge": {name},
                  "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}}[kind]
    return names


def test_dashboard_is_valid_json_and_uses_only_declared_series():
    dashboard = json.loads((ROOT / "conf/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set().union(*map(_referenced_series, exprs))
    assert used <= _declared_names(), used - _declared_names()
    # every declared series has a panel
    assert {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used} == set(SERIES)


def test_alert_rules_are_well_formed_and_use_only_declared_series():
    import yaml
    rules = yaml.safe_load((ROOT / "conf/prometheus-alerts.yml").read_text())["groups"][0]["rules"]
    assert len(rules) >= 8
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["alert"] and rule["expr"] and rule["labels"]["severity"] and rule["annotations"]["summary"]
    used = set().union(*(_referenced_series(rule["expr"]) for rule in rules))
    assert used and used <= _declared_names(), used - _declared_names()


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("::ffff:10.0.0.5", False), ("unix", False), ("", False),
])
def test_admin_api_loopback_check(address, loopback):
    assert _is_loopback(address) is loopback
