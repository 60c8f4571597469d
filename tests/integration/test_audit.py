"""Every statement is audited under the person: simple protocol and extended protocol."""

from __future__ import annotations

import subprocess

import psycopg
import pytest


def test_psql_statements_are_audited_with_person_role_duration_and_outcome(proxy, issuer):
    token = issuer.mint("alice", ["sales_emea"])
    result = subprocess.run(["psql", "-X", "-c", "SELECT count(*) FROM orders", "-c", "SELECT 1/0", proxy.dsn("alice")],
                            capture_output=True, text=True, env=proxy.env(token), timeout=30)
    assert "division by zero" in result.stderr
    records = proxy.audit(lambda r: r.get("statement") == "SELECT 1/0")
    ok = [r for r in records if r.get("statement") == "SELECT count(*) FROM orders"][-1]
    assert (ok["user"], ok["role"], ok["command"], ok["rows"], ok["outcome"]) == ("alice", "emea_analyst", "SELECT", 1, "ok")
    assert ok["duration_ms"] >= 0 and ok["backend_pid"] > 0 and ok["session"]
    failed = [r for r in records if r.get("statement") == "SELECT 1/0"][-1]
    assert (failed["user"], failed["outcome"], failed["sqlstate"]) == ("alice", "error", "22012")
    start = [r for r in records if r["event"] == "session_start" and r["session"] == ok["session"]][0]
    assert start["groups"] == ["sales_emea"] and start["role"] == "emea_analyst" and start["issuer"] == issuer.url
    assert start["application_name"] == "psql" and start["database"] == "demo"
    assert token not in proxy.audit_path.read_text()


def test_psycopg_parameters_are_audited_with_the_statement(proxy, issuer):
    with psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"])) as conn:
        conn.execute("SELECT customer FROM orders WHERE amount > %s AND customer <> %s", (100, "nobody-xyz"))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM missing_table WHERE id = %s", (7,))
    records = proxy.audit(lambda r: "missing_table" in r.get("statement", ""))
    ok = [r for r in records if "nobody-xyz" in str(r.get("parameters"))][-1]
    assert ok["user"] == "bob" and ok["role"] == "amer_analyst"
    assert ok["statement"] == "SELECT customer FROM orders WHERE amount > $1 AND customer <> $2"
    assert ok["parameters"] == ["100", "nobody-xyz"]
    assert (ok["command"], ok["rows"], ok["outcome"]) == ("SELECT", 2, "ok")
    failed = [r for r in records if "missing_table" in r.get("statement", "")][-1]
    assert (failed["outcome"], failed["sqlstate"]) == ("error", "42P01")


def test_parameters_can_be_redacted(make_proxy, issuer):
    proxy = make_proxy(audit={"parameters": "redacted"})
    with psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"])) as conn:
        conn.execute("SELECT %s::text", ("secret-value-123",))
    records = proxy.audit(lambda r: r.get("parameters"))
    assert [r["parameters"] for r in records if r.get("parameters")] == [["<redacted>"]]
    assert "secret-value-123" not in proxy.audit_path.read_text()


def test_every_statement_is_flushed_on_sigterm(make_proxy, issuer):
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True) as conn:
        for i in range(300):
            conn.execute(f"SELECT {i}")
    assert proxy.stop() == 0
    texts = {r.get("statement") for r in proxy.audit()}
    assert all(f"SELECT {i}" in texts for i in range(300))
