"""The statement guard against a corpus of identity escapes, in both pool modes, through
the simple and the extended protocol, checked inside the database after every attempt."""

from __future__ import annotations

import pytest

from pgproxy.protocol import messages as msg
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import error_fields, login

# Each of these, run as alice (emea_analyst), would — without the guard — change her role
# (other_role is granted to the pool role), rewrite her identity settings, or run code
# that can. Every one must fail with 42501 and leave her identity untouched.
ESCAPES = [
    # SET / RESET ROLE and SESSION AUTHORIZATION, spelled every way the parser allows
    "SET ROLE other_role", "set role other_role", "SeT RoLe other_role", 'SET "role" TO other_role',
    'SET "ROLE" = other_role', "SET ROLE 'other_role'", "SET LOCAL ROLE other_role", "SET SESSION ROLE other_role",
    "RESET ROLE", "SET ROLE NONE", "/* hi */ SET /* there */ ROLE other_role", "-- comment\nSET ROLE other_role",
    'SET U&"\\0072ole" = other_role', 'SET U&"!0072ole" UESCAPE \'!\' = other_role',
    "SELECT 1; SET ROLE other_role", "SET ROLE other_role; SELECT current_user",
    "BEGIN; SET LOCAL ROLE other_role; SELECT current_user; COMMIT",
    "SET SESSION AUTHORIZATION other_role", "SET SESSION AUTHORIZATION DEFAULT", "RESET SESSION AUTHORIZATION",
    "SET session_authorization = other_role", "SET role = DEFAULT",
    # set_config with role, authorization or an identity name: constants in every quoting
    "SELECT set_config('role', 'other_role', false)", "SELECT pg_catalog.set_config('role', 'other_role', false)",
    "select SET_CONFIG('ROLE', 'other_role', false)", "SELECT set_config('Role'::text, 'other_role', false)",
    "SELECT set_config($$role$$, 'other_role', false)", "SELECT set_config($q$role$q$, 'other_role', true)",
    "SELECT set_config(E'r\\x6fle', 'other_role', false)", "SELECT set_config(U&'r\\006Fle', 'other_role', false)",
    "SELECT set_config('session_authorization', 'other_role', false)",
    "SELECT set_config('pgproxy.user', 'mallory', false)", "SELECT set_config('PGPROXY.USER', 'mallory', false)",
    "SELECT set_config('pgproxy.groups', '{admins}', true)", "SELECT set_config('pgproxy.auth_method', 'x', false)",
    'SET "pgproxy.user" = mallory', "SET pgproxy.groups = '{admins}'", "RESET pgproxy.groups",
    "SET LOCAL pgproxy.subject TO 'x'",
    # ... or a name that is not a constant
    "SELECT set_config(lower('ROLE'), 'other_role', false)", "SELECT set_config('ro' || 'le', 'other_role', false)",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'role'",
    # ... wherever the call appears
    "SELECT * FROM set_config('role', 'other_role', false)",
    "SELECT 1 WHERE set_config('role', 'other_role', false) IS NOT NULL",
    "WITH x AS (SELECT set_config('role', 'other_role', false)) SELECT * FROM x",
    "SELECT (SELECT set_config('role', 'other_role', false))",
    "SELECT count(*) FROM items WHERE name = set_config('pgproxy.user', 'mallory', false)",
    "CREATE TEMP TABLE trap (a text DEFAULT set_config('role', 'other_role', false))",
    "PREPARE trap AS SELECT set_config('role', 'other_role', false)",
    "EXPLAIN ANALYZE SELECT set_config('role', 'other_role', false)",
    "COPY (SELECT set_config('role', 'other_role', false)) TO STDOUT",
    "SELECT 1; SELECT set_config('role', 'other_role', false); SELECT 2",
    # RESET ALL / DISCARD ALL with statements after them
    "RESET ALL; SELECT current_setting('pgproxy.user')", "DISCARD ALL; SELECT current_user",
    # DO blocks and functions, pg_temp included
    "DO $$BEGIN EXECUTE 'SET ROLE other_role'; END$$",
    "do 'begin perform set_config(''role'', ''other_role'', false); end'",
    "DO LANGUAGE plpgsql $x$BEGIN NULL; END$x$",
    "CREATE FUNCTION pg_temp.f() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'SET ROLE other_role'; END$$",
    "CREATE FUNCTION pg_temp.g() RETURNS int LANGUAGE sql SET role = 'other_role' AS 'SELECT 1'",
    'CREATE FUNCTION "pg_temp".h() RETURNS int LANGUAGE sql AS \'SELECT 1\'',
    "CREATE OR REPLACE FUNCTION public.h() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE PROCEDURE pg_temp.p() LANGUAGE sql AS 'SELECT 1'",
    "ALTER FUNCTION now() SET role = other_role",
    "CREATE EXTENSION IF NOT EXISTS plpgsql",
    "CREATE AGGREGATE pg_temp.agg (int) (SFUNC = int4pl, STYPE = int)",
    # functions that run SQL given as text
    "SELECT query_to_xml('SELECT set_config(''role'', ''other_role'', false)', true, true, '')",
    "SELECT * FROM ts_stat('SELECT to_tsvector(set_config(''role'', ''other_role'', false))')",
    "SELECT pg_catalog.query_to_xmlschema('SELECT 1', true, true, '')",
    "SELECT query_to_xml_and_xmlschema('SELECT set_config(''role'', ''other_role'', false)', true, true, '')",
    "SELECT ts_rewrite('a'::tsquery, 'SELECT set_config(''role'', ''other_role'', false)::tsquery, ''a''::tsquery')",
    "SELECT pg_catalog.ts_rewrite('a'::tsquery, 'SELECT set_config(''pgproxy.user'', ''mallory'', false)::tsquery, "
    "''a''::tsquery')",
    "SELECT * FROM ts_rewrite('a'::tsquery, 'SELECT set_config(''role'', ''other_role'', true)::tsquery, ''a''::tsquery')",
    # set_config fed by what only looks like pg_settings' name column
    "WITH pg_settings AS (SELECT 'role' AS name) SELECT set_config(name, 'other_role', false) FROM pg_settings "
    "WHERE name = 'role'",
    "WITH pg_settings AS (SELECT 'role' AS name) SELECT set_config(name, 'other_role', false) FROM pg_settings "
    "WHERE name LIKE 'rol%'",
    "SELECT set_config(name, 'other_role', false) FROM (SELECT 'role' AS name) pg_settings WHERE name = 'x' OR true",
    "SELECT set_config(r.name, 'other_role', false) FROM pg_settings, (SELECT 'role' AS name) r "
    "WHERE pg_settings.name = 'work_mem'",
    "SELECT set_config(lower(name), 'other_role', false) FROM (VALUES ('ROLE')) pg_settings (name) "
    "WHERE lower(name) = 'role'",
    "SELECT set_config((SELECT 'role'), 'other_role', false) FROM pg_settings WHERE name = 'work_mem'",
    "SELECT set_config(new_value => 'other_role', setting_name => 'role', is_local => false)",
    "CREATE TEMP VIEW pg_settings AS SELECT 'role'::text AS name",
    # functions that are not built-ins, in every place a call can stand (each would SET ROLE)
    "SELECT public.guard_become_other()", "SELECT guard_become_other()", "SELECT * FROM public.guard_become_other()",
    "SELECT 1 WHERE public.guard_become_other() IS NOT NULL", "CALL public.guard_become_other_proc()",
    "SELECT public.guard_agg(1)", "SELECT public.guard_agg(x) OVER () FROM generate_series(1, 2) x",
    "SELECT public.guard_become_named(who => 'other_role')", "SELECT 1 OPERATOR(public.===) 2",
    "EXPLAIN ANALYZE SELECT public.guard_become_other()", "PREPARE trap2 AS SELECT public.guard_become_other()",
    "COPY (SELECT public.guard_become_other()) TO STDOUT", "VALUES (public.guard_become_other())",
    "WITH x AS (SELECT public.guard_become_other()) SELECT * FROM x",
    "SELECT count(*) FROM items WHERE name = public.guard_become_other()",
    "CREATE TEMP TABLE trap2 (a text DEFAULT public.guard_become_other())",
    "SELECT 1; SELECT public.guard_become_other()",
]

# Not built-ins: each runs SET ROLE other_role as its caller.
ESCAPE_FUNCTIONS = """
CREATE OR REPLACE FUNCTION public.guard_become_other() RETURNS text LANGUAGE plpgsql
    AS $$BEGIN EXECUTE 'SET ROLE other_role'; RETURN current_user; END$$;
CREATE OR REPLACE FUNCTION public.guard_become_named(who text) RETURNS text LANGUAGE plpgsql
    AS $$BEGIN EXECUTE format('SET ROLE %I', who); RETURN current_user; END$$;
CREATE OR REPLACE PROCEDURE public.guard_become_other_proc() LANGUAGE plpgsql
    AS $$BEGIN EXECUTE 'SET ROLE other_role'; END$$;
CREATE OR REPLACE FUNCTION public.guard_step(s int, x int) RETURNS int LANGUAGE plpgsql
    AS $$BEGIN EXECUTE 'SET ROLE other_role'; RETURN coalesce(s, 0) + x; END$$;
CREATE OR REPLACE AGGREGATE public.guard_agg(int) (SFUNC = public.guard_step, STYPE = int);
CREATE OR REPLACE FUNCTION public.guard_equal(a int, b int) RETURNS boolean LANGUAGE plpgsql
    AS $$BEGIN EXECUTE 'SET ROLE other_role'; RETURN a = b; END$$;
DROP OPERATOR IF EXISTS public.=== (int, int);
CREATE OPERATOR public.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = public.guard_equal);
CREATE OR REPLACE FUNCTION public.guard_harmless() RETURNS text LANGUAGE sql AS $$SELECT 'harmless'$$;
"""


@pytest.fixture(scope="module", autouse=True)
def escape_functions(database):
    database.psql(ESCAPE_FUNCTIONS, database="demo")

WHO = "SELECT current_user, session_user, current_setting('pgproxy.user'), current_setting('pgproxy.groups')"


@pytest.fixture(scope="module", params=["session", "transaction"])
def guarded(request, base_config):
    process = ProxyProcess(merge(base_config, {"backend": {"pool_mode": request.param, "pool_size": 2}}))
    yield process
    assert process.stop() == 0


def _simple(wire, sql: str) -> list:
    wire.send(msg.query(sql))
    return wire.read_until("Z")


def _extended(wire, sql: str) -> list:
    wire.send(msg.parse_message("", sql) + msg.bind_message("", "") + msg.execute_message() + msg.SYNC)
    return wire.read_until("Z")


def _identity(wire) -> bytes:
    replies = _simple(wire, WHO)
    assert [k for k, _ in replies] == ["T", "D", "C", "Z"], replies
    return replies[1][1]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_every_escape_is_refused_and_the_identity_is_unchanged(guarded, issuer, protocol):
    wire, replies = login(guarded.port, "alice", issuer.mint("alice", ["sales_emea"]))
    assert replies[-1][0] == "Z"
    before = _identity(wire)
    assert b"emea_analyst" in before and b"alice" in before
    send = _simple if protocol == "simple" else _extended
    for sql in ESCAPES:
        if protocol == "extended" and ";" in sql.replace("';'", ""):
            continue  # several statements cannot be one Parse (PostgreSQL refuses them itself)
        replies = send(wire, sql)
        errors = [error_fields(body) for kind, body in replies if kind == "E"]
        assert [e["C"] for e in errors] == ["42501"], f"{sql!r}: {replies}"
        assert "statement refused" in errors[0]["M"]
        assert _identity(wire) == before, f"identity changed after {sql!r}"
    tried = {sql for sql in ESCAPES if protocol == "simple" or ";" not in sql.replace("';'", "")}
    denied = guarded.audit(lambda r: r.get("event") == "denied" and r.get("statement") == ESCAPES[-1])
    refused = {r["statement"] for r in denied if r.get("event") == "denied" and r.get("user") == "alice"}
    assert tried <= refused


def test_turning_the_guard_off_is_logged_loudly(base_config, issuer):
    proxy = ProxyProcess(merge(base_config, {"guard": {"unsafe_disable": True}}))
    try:
        assert "UNSAFE: the statement guard is off" in proxy.log()
        wire, _ = login(proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
        assert "E" not in [k for k, _ in _simple(wire, "SET ROLE other_role")]  # what the guard prevents
        assert b"other_role" in _identity(wire)
        wire.close()
        wire, _ = login(proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
        assert "E" not in [k for k, _ in _simple(wire, "SELECT public.guard_become_other()")]  # so does this
        assert b"other_role" in _identity(wire)
        wire.close()
    finally:
        assert proxy.stop() == 0


def test_what_cannot_be_parsed_is_refused_with_42601(guarded, issuer):
    wire, _ = login(guarded.port, "alice", issuer.mint("alice", ["sales_emea"]))
    for sql in ("SET ROLE", "SELEC 1; SET ROLE other_role", "SELECT 'unterminated"):
        errors = [error_fields(b) for k, b in _simple(wire, sql) if k == "E"]
        assert [e["C"] for e in errors] == ["42601"], sql
    assert b"alice" in _identity(wire)


def test_function_call_message_is_refused(guarded, issuer):
    wire, _ = login(guarded.port, "alice", issuer.mint("alice", ["sales_emea"]))
    # FunctionCall of set_config (oid 2078) with role and other_role, text format.
    args = [b"role", b"other_role", b"f"]
    body = (2078).to_bytes(4, "big") + (0).to_bytes(2, "big") + len(args).to_bytes(2, "big")
    body += b"".join(len(a).to_bytes(4, "big") + a for a in args) + (0).to_bytes(2, "big")
    wire.send(msg.message(b"F", body))
    replies = wire.read_until("Z")
    assert [error_fields(b)["C"] for k, b in replies if k == "E"] == ["42501"]
    assert b"emea_analyst" in _identity(wire)


def test_ordinary_statements_pass_and_are_classified_in_the_audit(guarded, issuer):
    wire, _ = login(guarded.port, "alice", issuer.mint("alice", ["sales_emea"]))
    for sql in ("SELECT count(*) FROM orders", "INSERT INTO items VALUES (8801, 'guard') ON CONFLICT DO NOTHING",
                "WITH gone AS (DELETE FROM items WHERE id = 8801 RETURNING id) SELECT count(*) FROM gone",
                "SELECT set_config('app.tenant', 'emea', false)", "SET search_path = public", "RESET ALL"):
        assert "E" not in [k for k, _ in _simple(wire, sql)], sql
    assert b"alice" in _identity(wire)  # RESET ALL at the end: the identity is back before the next query
    records = {r["statement"]: r for r in guarded.audit(lambda r: r.get("statement") == "RESET ALL")
               if r.get("event") == "statement"}
    assert records["SELECT count(*) FROM orders"]["classes"] == ["READ"]
    assert records["SELECT count(*) FROM orders"]["relations"] == ["orders"]
    cte = records["WITH gone AS (DELETE FROM items WHERE id = 8801 RETURNING id) SELECT count(*) FROM gone"]
    assert cte["classes"] == ["READ", "WRITE"] and "items" in cte["relations"]


def test_a_read_only_role_cannot_write_not_even_through_a_function(base_config, issuer, database):
    database.psql("""
        CREATE ROLE ai_agent NOLOGIN; GRANT ai_agent TO pgproxy_pool;
        GRANT SELECT, INSERT, UPDATE ON items TO ai_agent;
        CREATE FUNCTION public.sneaky_write() RETURNS int LANGUAGE sql
            AS 'INSERT INTO items VALUES (9901, ''written by a function'') RETURNING id';
        GRANT EXECUTE ON FUNCTION public.sneaky_write() TO ai_agent;
    """, database="demo")
    config = merge(base_config, {"roles": [{"group": "agents", "role": "ai_agent"}],
                                 "policies": [{"role": "ai_agent", "read_only": True, "statement_timeout_ms": 5000,
                                               "allowed_functions": ["public.sneaky_write"]}]})
    for mode in ("session", "transaction"):
        proxy = ProxyProcess(merge(config, {"backend": {"pool_mode": mode}}))
        wire = None
        try:
            wire, _ = login(proxy.port, "robot", issuer.mint("robot", ["agents"]))
            assert b"ai_agent" in _identity(wire)
            for sql in ("INSERT INTO items VALUES (9900, 'agent')", "UPDATE items SET name = 'x' WHERE id = 1",
                        "CREATE TABLE agent_table (a int)", "GRANT ai_agent TO PUBLIC",
                        "SET default_transaction_read_only = off", "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
                        "BEGIN READ WRITE", "SELECT set_config('default_transaction_read_only', 'off', false)",
                        "SET statement_timeout = 0"):
                for send in (_simple, _extended):
                    errors = [error_fields(b) for k, b in send(wire, sql) if k == "E"]
                    assert [e["C"] for e in errors] == ["42501"], (mode, sql, errors)
            # A function the policy allows tries to write: the database refuses (read-only transaction).
            errors = [error_fields(b) for k, b in _simple(wire, "SELECT public.sneaky_write()") if k == "E"]
            assert [e["C"] for e in errors] == ["25006"], errors
            replies = _simple(wire, "SELECT current_setting('statement_timeout'), count(*) FROM items WHERE id = 9901")
            assert b"5s" in replies[1][1] and replies[1][1].endswith(b"0")
        finally:
            if wire is not None:
                wire.close()
            assert proxy.stop() == 0
    assert database.psql("SELECT count(*) FROM items WHERE id IN (9900, 9901)", database="demo") == "0"


def test_functions_the_configuration_allows_are_called_and_others_refused_by_name(base_config, issuer):
    config = merge(base_config, {"guard": {"allowed_functions": ["public.guard_harmless"]},
                                 "policies": [{"role": "amer_analyst", "allowed_functions": ["guard_become_other"]}]})
    proxy = ProxyProcess(config)
    try:
        wire, _ = login(proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
        replies = _simple(wire, "SELECT public.guard_harmless()")
        assert [k for k, _ in replies] == ["T", "D", "C", "Z"] and b"harmless" in replies[1][1]
        for sql, named in (("SELECT guard_harmless()", "function guard_harmless()"),  # unqualified: not listed
                           ("SELECT public.guard_become_other()", "function public.guard_become_other()")):
            errors = [error_fields(b) for k, b in _simple(wire, sql) if k == "E"]
            assert [e["C"] for e in errors] == ["42501"] and named in errors[0]["M"], (sql, errors)
        assert b"emea_analyst" in _identity(wire)
        wire.close()
        # amer_analyst's policy lists the function by name (any schema): it runs, and does what it does.
        wire, _ = login(proxy.port, "bob", issuer.mint("bob", ["sales_amer"]))
        assert "E" not in [k for k, _ in _simple(wire, "SELECT public.guard_harmless(), guard_become_other()")]
        assert b"other_role" in _identity(wire)
        wire.close()
    finally:
        assert proxy.stop() == 0


def test_a_denied_relation_whose_name_differs_in_a_digit_stays_denied(base_config, issuer, database):
    """PostgreSQL reads €1 and €2 as names (non-ASCII characters continue a name): the
    guard's shape cache must not hand €1's verdict to €2 — in either protocol."""
    database.psql("""
        CREATE TABLE IF NOT EXISTS public.€1 (a int); CREATE TABLE IF NOT EXISTS public.€2 (a int);
        TRUNCATE €1, €2; INSERT INTO €1 VALUES (1); INSERT INTO €2 VALUES (2);
        GRANT SELECT ON €1, €2 TO emea_analyst;
    """, database="demo")
    proxy = ProxyProcess(merge(base_config, {"policies": [{"role": "emea_analyst", "denied_relations": ["€2"]}]}))
    try:
        wire, _ = login(proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
        for send in (_simple, _extended):
            replies = send(wire, "SELECT a FROM €1")
            assert [b for k, b in replies if k == "D"] == [b"\x00\x01\x00\x00\x00\x011"], replies  # the row a = 1
            errors = [error_fields(b) for k, b in send(wire, "SELECT a FROM €2") if k == "E"]
            assert [e["C"] for e in errors] == ["42501"], errors
        wire.close()
    finally:
        assert proxy.stop() == 0
