"""Errors the proxy answers itself behave as PostgreSQL's: inside a transaction they abort it,
in a pipeline the server skips to Sync, and syntax errors look like PostgreSQL's own.
Checked by reading the database afterwards, in both pool modes."""

from __future__ import annotations

import os
import shutil
import subprocess

import psycopg
import pytest

from pgproxy.protocol import messages as msg
from tests.support.ops import scrape, value
from tests.support.proxy import free_port
from tests.support.wire import error_fields, login

MODES = ["session", "transaction"]


@pytest.fixture(params=MODES)
def proxy(request, make_proxy):
    port = free_port()
    process = make_proxy(backend={"pool_mode": request.param, "pool_size": 2}, http={"listen": f"127.0.0.1:{port}"})
    process.mode, process.http_port = request.param, port
    return process


def _rows(database, ident: int) -> int:
    return int(database.psql(f"SELECT count(*) FROM items WHERE id = {ident}", database="demo"))


def _simple(wire, sql: str) -> list[tuple[str, bytes]]:
    wire.send(msg.query(sql))
    return wire.read_until("Z")


def _alice(proxy, issuer):
    return login(proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))[0]


@pytest.mark.parametrize("bad", ["selct 1", "SET ROLE other_role", "SELECT set_config('pgproxy.user', 'x', false)"])
def test_a_refused_or_unparsable_statement_aborts_the_transaction(proxy, issuer, database, bad):
    ident = 7100 + MODES.index(proxy.mode) * 10 + len(bad) % 10
    wire = _alice(proxy, issuer)
    _simple(wire, "BEGIN")
    assert "E" not in [k for k, _ in _simple(wire, f"INSERT INTO items VALUES ({ident}, 'aborted')")]
    replies = _simple(wire, bad)
    assert [k for k, _ in replies] == ["E", "Z"] and replies[-1][1] == b"E"  # the transaction failed
    later = _simple(wire, "SELECT 1")
    assert error_fields(later[0][1])["C"] == "25P02"
    commit = _simple(wire, "COMMIT")
    assert (b"ROLLBACK" in b"".join(b for k, b in commit if k == "C")) and commit[-1][1] == b"I"
    assert _rows(database, ident) == 0


def test_a_refusal_in_an_extended_pipeline_fails_its_implicit_transaction(proxy, issuer, database):
    ident = 7200 + MODES.index(proxy.mode)
    wire = _alice(proxy, issuer)
    insert = f"INSERT INTO items VALUES ({ident}, 'pipeline')"
    wire.send(msg.parse_message("", insert) + msg.bind_message("", "") + msg.execute_message()
              + msg.parse_message("", "SELECT set_config('role', 'other_role', false)") + msg.bind_message("", "")
              + msg.execute_message() + msg.parse_message("", "SELECT 1") + msg.bind_message("", "")
              + msg.execute_message() + msg.SYNC)
    replies = wire.read_until("Z")
    kinds = [k for k, _ in replies]
    assert kinds == ["1", "2", "C", "E", "Z"], kinds  # PostgreSQL skips what follows the error
    assert error_fields(replies[3][1])["C"] == "42501"
    assert _rows(database, ident) == 0  # the implicit transaction was rolled back
    assert b"alice" in b"".join(b for k, b in _simple(wire, "SELECT current_setting('pgproxy.user')") if k == "D")


def test_psql_single_transaction_with_a_typo_leaves_nothing_behind(proxy, issuer, database, tmp_path):
    ident = 7300 + MODES.index(proxy.mode)
    script = tmp_path / "migration.sql"
    script.write_text(f"INSERT INTO items VALUES ({ident}, 'one');\n"
                      f"UPDATE items SET name = 'two' WHERE id = {ident};\n"
                      "selct 1;\n"
                      f"INSERT INTO items VALUES ({ident + 50}, 'four');\n")
    env = {**os.environ, "PGPASSWORD": issuer.mint("alice", ["sales_emea"])}
    out = subprocess.run([shutil.which("psql"), "-X", "-1", "-v", "ON_ERROR_STOP=1", "-f", str(script),
                          proxy.dsn("alice")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert _rows(database, ident) == 0 and _rows(database, ident + 50) == 0


def test_a_multi_statement_query_with_a_refusal_runs_none_of_it(proxy, issuer, database):
    ident = 7400 + MODES.index(proxy.mode)
    wire = _alice(proxy, issuer)
    replies = _simple(wire, f"INSERT INTO items VALUES ({ident}, 'x'); SET ROLE other_role; SELECT 1")
    assert [k for k, _ in replies] == ["E", "Z"]
    assert _rows(database, ident) == 0


def test_a_typo_looks_like_postgresqls_own_and_is_not_a_denial(proxy, issuer, database):
    before = scrape(proxy.http_port)
    env = {**os.environ, "PGPASSWORD": issuer.mint("alice", ["sales_emea"])}
    out = subprocess.run([shutil.which("psql"), "-X", "-c", "selct 1", proxy.dsn("alice")], env=env,
                         capture_output=True, text=True, timeout=60)
    direct = subprocess.run([shutil.which("psql"), "-X", "-c", "selct 1", f"{database.superuser_dsn} dbname=demo"],
                            capture_output=True, text=True, timeout=60)
    assert "LINE 1: selct 1" in out.stderr and "^" in out.stderr, out.stderr
    assert out.stderr.replace("pgproxy", "") == direct.stderr, (out.stderr, direct.stderr)
    after = scrape(proxy.http_port)
    assert value(after, "pgproxy_denials_total", reason="statement") == value(before, "pgproxy_denials_total",
                                                                               reason="statement")
    record = [r for r in proxy.audit(lambda r: r.get("statement") == "selct 1") if r.get("statement") == "selct 1"][-1]
    assert record["event"] == "statement" and record["outcome"] == "error" and record["sqlstate"] == "42601"


def test_psycopg_in_a_transaction_gets_the_failed_state(proxy, issuer, database):
    ident = 7500 + MODES.index(proxy.mode)
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as conn:
        conn.execute("INSERT INTO items VALUES (%s, 'psycopg')", (ident,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT set_config('role', %s, false)", ("other_role",))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
    assert _rows(database, ident) == 0
