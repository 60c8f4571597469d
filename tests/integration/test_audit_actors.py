"""The audit tells a person from an agent acting for them, and binary parameters are readable."""

from __future__ import annotations

import asyncio
import datetime
import decimal

import asyncpg
import psycopg


def test_client_id_and_delegation_chain_are_in_session_and_statement_records(make_proxy, issuer):
    proxy = make_proxy()
    token = issuer.mint("alice", ["sales_emea"], azp="bi-agent",
                        act={"sub": "mcp-server", "act": {"sub": "llm-orchestrator"}})
    with psycopg.connect(proxy.dsn("alice", application_name="agent-runner"), password=token) as conn:
        conn.execute("SELECT 'actor check'").fetchone()
    records = proxy.audit(lambda r: r.get("statement") == "SELECT 'actor check'")
    start = next(r for r in records if r.get("event") == "session_start")
    assert start["client_id"] == "bi-agent" and start["actors"] == ["mcp-server", "llm-orchestrator"]
    statement = next(r for r in records if r.get("statement") == "SELECT 'actor check'")
    assert statement["user"] == "alice" and statement["client_id"] == "bi-agent"
    assert statement["actors"] == ["mcp-server", "llm-orchestrator"]
    assert statement["application_name"] == "agent-runner"


def test_a_person_without_an_agent_has_no_actor_fields(make_proxy, issuer):
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as conn:
        conn.execute("SELECT 'plain person'").fetchone()
    statement = next(r for r in proxy.audit(lambda r: r.get("statement") == "SELECT 'plain person'")
                     if r.get("statement") == "SELECT 'plain person'")
    assert "actors" not in statement and "client_id" not in statement


def test_asyncpg_binary_parameters_are_readable_in_the_trail(make_proxy, issuer):
    proxy = make_proxy()
    sql = "SELECT $1::int, $2::text, $3::numeric, $4::timestamp, $5::int[]"

    async def run():
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="alice", database="demo",
                                     password=issuer.mint("alice", ["sales_emea"]))
        try:
            return await conn.fetchrow(sql, 42, "héllo", decimal.Decimal("1234.5600"),
                                       datetime.datetime(2024, 1, 2, 3, 4, 5, 123456), [1, None, 3])
        finally:
            await conn.close()

    assert tuple(asyncio.run(run()))[0] == 42
    record = next(r for r in proxy.audit(lambda r: r.get("statement") == sql and r.get("parameters"))
                  if r.get("statement") == sql and r.get("parameters"))
    assert record["parameters"] == ["42", "héllo", "1234.5600", "2024-01-02 03:04:05.123456", "{1,NULL,3}"]


def test_a_lone_surrogate_in_a_tokens_claims_is_written_as_its_json_escape(make_proxy, issuer):
    """JSON's "\\udc00" escape decodes to a lone surrogate, which has no UTF-8. An agent name
    that holds one is in every statement record of the session: each is still written, as
    the same escape, and the chain verifies — not one record lost, nor the others queued with it."""
    from pgproxy.audit_verify import verify
    proxy = make_proxy()
    odd = issuer.mint("alice", ["sales_emea"], azp="bi-\ud800agent", act={"sub": "mcp-\udc00server"})
    plain = issuer.mint("alice", ["sales_emea"])
    with psycopg.connect(proxy.dsn("alice"), password=odd) as conn, \
            psycopg.connect(proxy.dsn("alice"), password=plain) as other:
        for i in range(3):
            conn.execute(f"SELECT 'odd agent {i}'").fetchone()
            other.execute(f"SELECT 'plain person {i}'").fetchone()
    records = proxy.audit(lambda r: r.get("statement") == "SELECT 'plain person 2'")
    statements = {r["statement"]: r for r in records if r.get("event") == "statement"}
    assert {f"SELECT 'odd agent {i}'" for i in range(3)} | {f"SELECT 'plain person {i}'" for i in range(3)} \
        <= set(statements)
    assert statements["SELECT 'odd agent 0'"]["actors"] == ["mcp-\udc00server"]
    assert statements["SELECT 'odd agent 0'"]["client_id"] == "bi-\ud800agent"
    assert any(r.get("event") == "session_start" and r.get("actors") == ["mcp-\udc00server"] for r in records)
    raw = proxy.audit_path.read_bytes()
    raw.decode("utf-8")  # valid UTF-8 throughout
    assert b"mcp-\\udc00server" in raw
    assert [p for p in verify([str(proxy.audit_path)]).problems if "closing seal" not in p[2]] == []
