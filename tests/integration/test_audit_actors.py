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
