"""A typo through pgproxy looks exactly like a typo sent to PostgreSQL: same SQLSTATE,
message and position, audited as a failed statement and not as a denial."""

from __future__ import annotations

import psycopg
import pytest

from pgproxy.policy.guard import classify
from pgproxy.protocol import messages as msg
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import error_fields, login

TYPOS = ["selct 1", "SELECT 1 FROM", "SELECT 'abc", "SELECT * FROM t WHERE", "SELECT 1 FROM   ",
         "SELECT 'é', 1 FROM", "SELECT 'é'; selct", "SELECT $$abc", 'SELECT "abc', "SELECT 1 LIMIT 1,2",
         "select 1 /* unterminated", "SELECT 1; SET ROLE other_role; selct"]


def _direct(database, sql: str) -> tuple[str, str, str | None]:
    with psycopg.connect(f"{database.superuser_dsn} dbname=demo", autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(sql)
    diag = caught.value.diag
    return diag.sqlstate, diag.message_primary, diag.statement_position


@pytest.fixture(scope="module")
def postgresql_says(database):
    return {sql: _direct(database, sql) for sql in TYPOS}


@pytest.mark.parametrize("sql", TYPOS)
def test_the_guard_gives_postgresqls_message_and_position(postgresql_says, sql):
    sqlstate, message, position = postgresql_says[sql]
    verdict = classify(sql)
    assert (verdict.sqlstate, verdict.refusal, str(verdict.position)) == (sqlstate, message, position)


@pytest.fixture(scope="module", params=["session", "transaction"])
def proxy(request, base_config):
    process = ProxyProcess(merge(base_config, {"backend": {"pool_mode": request.param, "pool_size": 2}}))
    yield process
    assert process.stop() == 0


def test_through_the_proxy_a_typo_is_postgresqls_error_not_a_denial(proxy, issuer, postgresql_says):
    token = issuer.mint("alice", ["sales_emea"])
    with psycopg.connect(proxy.dsn("alice"), password=token, autocommit=True) as conn:  # extended protocol
        for sql in TYPOS:
            if ";" in sql:
                continue  # several statements cannot be one Parse
            with pytest.raises(psycopg.Error) as caught:
                conn.execute(sql)
            diag = caught.value.diag
            assert (diag.sqlstate, diag.message_primary, diag.statement_position) == postgresql_says[sql], sql
        assert conn.execute("SELECT current_user").fetchone() == ("emea_analyst",)
    wire, _ = login(proxy.port, "alice", token)
    for sql in TYPOS:  # the simple protocol
        wire.send(msg.query(sql))
        errors = [error_fields(body) for kind, body in wire.read_until("Z") if kind == "E"]
        assert [(e["C"], e["M"], e.get("P")) for e in errors] == [postgresql_says[sql]], sql
    wire.close()
    records = proxy.audit(lambda r: r.get("statement") == TYPOS[-1] and r.get("event") == "statement")
    assert [r for r in records if r.get("event") == "denied"] == []
    failed = {r["statement"] for r in records if r.get("event") == "statement" and r.get("sqlstate") == "42601"}
    assert set(TYPOS) <= failed
