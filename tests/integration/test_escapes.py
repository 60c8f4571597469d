"""The red team's identity-escape corpus (issue 12): every attempt runs as alice through
pgproxy, in session pooling and in transaction pooling (one backend connection, so the
next person really shares it), through the simple and the extended protocol. After each,
inside the database through the proxy:

* alice's session is still hers: current_user is her mapped role, session_user the pool
  role, pgproxy.user "alice" (or the proxy ended the session);
* nothing the attempt returned shows it ran as another role or person;
* bob, next on the same backend connection, is himself and sees none of alice's state.

An attempt may be refused (any ErrorResponse) or run harmlessly; it may never leave the
session with another role or identity. Classes: client-only multibyte encodings and
standard_conforming_strings (the switch query and the guard read text differently from
PostgreSQL), statements pipelined after DISCARD ALL / RESET ALL (the read-only policy
included), functions that run SQL given as text, and the SET-like statements, setting
spellings and session-state makers of the PostgreSQL documentation.
"""

from __future__ import annotations

import pytest

from pgproxy.protocol import messages as msg
from tests.support.attacks import (FLUSH, SYNC, Client, Superuser, bind, data_rows, describe, execute, identity_leaks,
                                   output_leaks, parse, pbe, query, sqlstates, state_leaks, WHO)
from tests.support.proxy import ProxyProcess, merge
from tests.support.redteam import MODES, fresh, su, target  # noqa: F401 (fixtures)
from tests.support.redteam import redteam_config as _config

PROTOCOLS = ["simple", "extended"]


def _alice(proxy, issuer, params=None) -> Client:
    alice = Client.connect(proxy.port, issuer, "alice", params)
    assert alice.logged_in, describe([r for r in alice.login_replies if r])
    return alice


def _bystander_leaks(proxy, issuer) -> list[str]:
    """bob, next on the connection alice used: what of hers he sees."""
    bob = Client.connect(proxy.port, issuer, "bob")
    try:
        return [f"bob: {leak}" for leak in state_leaks(bob, "bob")]
    finally:
        bob.close()


def _report(what: str, proxy, replies: list, problems: list[str]) -> str:
    return (f"{what} [{proxy.mode} pooling] -> {describe(replies)[:600]}\n  " + "\n  ".join(problems))


# --- 3 and 7: single statements --------------------------------------------------------------
# (id, SQL). Statements with several parts run through the simple protocol only (one Parse
# holds one statement). Each would, if PostgreSQL ran it as written, change alice's role or
# identity, hide SQL from the guard, or create state the next person could see.

SQL_TEXT_FUNCTIONS = [
    ("ts_rewrite-from-subquery", "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery FROM "
                                 "(SELECT set_config(''role'', ''other_role'', false)) s')"),
    ("ts_rewrite-select-list", "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, "
                               "set_config(''role'', ''other_role'', false)::tsquery')"),
    ("ts_rewrite-where", "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery "
                         "WHERE set_config(''pgproxy.user'', ''mallory'', false) IS NOT NULL')"),
    ("ts_rewrite-session-authorization", "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery "
                                         "FROM (SELECT set_config(''session_authorization'', ''other_role'', "
                                         "false)) s')"),
    ("ts_rewrite-qualified-dollar", "SELECT pg_catalog.ts_rewrite('a'::tsquery, $q$SELECT 'a'::tsquery, "
                                    "set_config('role', 'other_role', false)::tsquery$q$)"),
    ("ts_rewrite-in-from", "SELECT * FROM ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, "
                           "set_config(''pgproxy.user'', ''mallory'', false)::tsquery')"),
    ("ts_rewrite-in-cte", "WITH r AS (SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, "
                          "set_config(''role'', ''other_role'', false)::tsquery') AS q) SELECT q FROM r"),
    ("ts_rewrite-search-path", "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery "
                               "FROM (SELECT set_config(''search_path'', ''pg_temp'', false)) s')"),
    ("ts_stat-dollar", "SELECT * FROM ts_stat($$SELECT to_tsvector(set_config('role', 'other_role', false))$$)"),
    ("ts_stat-weights", "SELECT * FROM ts_stat('SELECT to_tsvector(set_config(''pgproxy.user'', ''mallory'', "
                        "false))', 'ab')"),
    ("query_to_xml-user", "SELECT query_to_xml('SELECT set_config(''pgproxy.user'', ''mallory'', false)', "
                          "true, false, '')"),
    ("query_to_xmlschema", "SELECT query_to_xmlschema('SELECT set_config(''role'', ''other_role'', false)', "
                           "false, false, '')"),
    ("query_to_xml_and_xmlschema", "SELECT query_to_xml_and_xmlschema('SELECT set_config(''session_authorization'', "
                                   "''other_role'', false)', false, false, '')"),
    ("query_to_xml-uppercase-qualified", "SELECT PG_CATALOG.QUERY_TO_XML('SELECT set_config(''role'', "
                                         "''other_role'', false)', true, true, '')"),
    ("query_to_xml-nested", "SELECT xmlelement(name x, query_to_xml('SELECT set_config(''role'', ''other_role'', "
                            "false)', true, true, ''))"),
    ("cursor_to_xml-on-set_config", "BEGIN; DECLARE c CURSOR FOR SELECT set_config('role', 'other_role', false); "
                                    "SELECT cursor_to_xml('c', 1, false, false, ''); COMMIT"),
    ("cursor_to_xmlschema-on-set_config", "BEGIN; DECLARE c CURSOR FOR SELECT set_config('pgproxy.user', "
                                          "'mallory', false); SELECT cursor_to_xmlschema('c', false, false, ''); "
                                          "COMMIT"),
    ("cursor_to_xml-harmless", "BEGIN; DECLARE c CURSOR FOR SELECT current_setting('pgproxy.user'); "
                               "SELECT cursor_to_xml('c', 1, false, false, ''); COMMIT"),
    ("table_to_xml-pg_settings", "SELECT length(table_to_xml('pg_settings', false, false, '')::text) > 0"),
    ("schema_to_xml-public", "SELECT length(schema_to_xml('public', false, false, '')::text) > 0"),
    ("database_to_xml", "SELECT length(database_to_xml(false, false, '')::text) > 0"),
    ("table_to_xmlschema", "SELECT length(table_to_xmlschema('orders', false, false, '')::text) > 0"),
]

SET_LIKE = [
    ("session-authorization-quoted", "SET SESSION AUTHORIZATION 'other_role'"),
    ("session-authorization-lowercase", "set session authorization other_role"),
    ("local-session-authorization", "BEGIN; SET LOCAL SESSION AUTHORIZATION other_role; SELECT current_user; COMMIT"),
    ("reset-session_authorization", "RESET session_authorization"),
    ("session_authorization-default", "SET session_authorization TO DEFAULT"),
    ("role-quoted-value", "SET role = 'other_role'"),
    ("role-whitespace", "SET\trole\nTO other_role"),
    ("role-block-comments", "SET/**/role/**/TO/**/other_role"),
    ("role-nested-comment", "/* /* */ SET ROLE other_role */ SET ROLE other_role"),
    ("role-uescape-all", "SET U&\"!0072!006f!006c!0065\" UESCAPE '!' TO other_role"),
    ("role-pool-role", "SET ROLE pgproxy_pool"),
    ("session-authorization-pool-role", "SET SESSION AUTHORIZATION pgproxy_pool"),
    ("role-in-transaction-then-read", "BEGIN; SET LOCAL role = other_role; SELECT current_user; ROLLBACK"),
    ("set_config-local-in-transaction", "BEGIN; SELECT set_config('role', 'other_role', true); "
                                        "SELECT current_user; COMMIT"),
    ("set_config-local-alone", "SELECT set_config('role', 'other_role', true), current_user"),
    ("start-transaction-set_config", "START TRANSACTION; SELECT set_config('pgproxy.user', 'mallory', true); "
                                     "SELECT current_setting('pgproxy.user'); ROLLBACK"),
    ("identity-to-default", "SET pgproxy.\"user\" TO DEFAULT"),
    ("identity-reset", "RESET \"pgproxy\".\"user\""),
    ("identity-reserved-word-spelling", "SET pgproxy.user = 'mallory'"),
    ("identity-session-keyword", "SET SESSION pgproxy.auth_method = 'x'"),
    ("identity-local", "BEGIN; SET LOCAL pgproxy.\"user\" = 'mallory'; SELECT current_setting('pgproxy.user'); "
                       "COMMIT"),
    ("identity-quoted-mixed-case", "SET \"PgProxy.User\" = 'mallory'"),
    ("identity-spaced-dots", "SET pgproxy . \"user\" = 'mallory'"),
    ("identity-empty", "SET \"pgproxy.user\" = ''"),
    ("identity-groups-from-current", "SET pgproxy.groups FROM CURRENT"),
    ("identity-subject", "SET pgproxy.subject = 'dev|bob'"),
    ("identity-session_id", "SELECT set_config('pgproxy.session_id', 'x', false)"),
    ("identity-the-switch-nonce", "SELECT set_config('pgproxy.switch', '1', false)"),
    ("identity-homoglyph", "SELECT set_config('pgрroxy.user', 'x', false), current_setting('pgproxy.user')"),
    ("set_config-named-args", "SELECT set_config(setting_name => 'role', new_value => 'other_role', "
                              "is_local => false)"),
    ("set_config-named-args-reordered", "SELECT set_config(new_value => 'other_role', is_local => false, "
                                        "setting_name => 'role')"),
    ("set_config-collate", "SELECT set_config('role' COLLATE \"C\", 'other_role', false)"),
    ("set_config-varchar-cast", "SELECT set_config('role'::varchar, 'other_role', false)"),
    ("set_config-cast-syntax", "SELECT set_config(CAST('role' AS text), 'other_role', false)"),
    ("set_config-typed-literal", "SELECT set_config(text 'pgproxy.user', 'mallory', false)"),
    ("set_config-nested-casts", "SELECT set_config('role'::name::text, 'other_role', false)"),
    ("set_config-regrole-value", "SELECT set_config('role', 'other_role'::regrole::text, false)"),
    ("set_config-parenthesized", "SELECT set_config(('role'), 'other_role', false)"),
    ("set_config-string-continuation", "SELECT set_config('ro'\n'le', 'other_role', false)"),
    ("set_config-comment-in-args", "SELECT set_config(/* x */ 'role' -- y\n, 'other_role', false)"),
    ("set_config-unicode-plus", "SELECT set_config(U&'\\+000072ole', 'other_role', false)"),
    ("set_config-array-element", "SELECT set_config(('{role}'::text[])[1], 'other_role', false)"),
    ("set_config-case", "SELECT set_config(CASE WHEN true THEN 'role' END, 'other_role', false)"),
    ("set_config-coalesce", "SELECT set_config(coalesce('pgproxy.user'), 'mallory', false)"),
    ("set_config-format", "SELECT set_config(format('%s', 'role'), 'other_role', false)"),
    ("set_config-from-subquery", "SELECT set_config(n, 'other_role', false) FROM (SELECT 'role' AS n) s"),
    ("set_config-quoted-name", "SELECT \"set_config\"('role', 'other_role', false)"),
    ("set_config-quoted-qualified", "SELECT \"pg_catalog\".\"set_config\"('role', 'other_role', false)"),
    ("set_config-rows-from", "SELECT * FROM ROWS FROM (set_config('role', 'other_role', false))"),
    ("set_config-in-values", "VALUES (set_config('role', 'other_role', false))"),
    ("set_config-in-order-by", "SELECT 1 ORDER BY set_config('role', 'other_role', false)"),
    ("set_config-in-aggregate", "SELECT max(set_config('pgproxy.user', 'mallory', false))"),
    ("set_config-in-array", "SELECT ARRAY[set_config('role', 'other_role', false)]"),
    ("set_config-in-row", "SELECT (set_config('role', 'other_role', false), 1)"),
    ("set_config-zero-rows", "SELECT set_config('role', 'other_role', false) FROM generate_series(1, 0)"),
    ("set_config-in-insert", "INSERT INTO items VALUES (9700, set_config('role', 'other_role', false))"),
    ("set_config-in-update", "UPDATE items SET name = set_config('pgproxy.user', 'mallory', false) WHERE false"),
    ("set_config-in-delete", "DELETE FROM items WHERE set_config('role', 'other_role', false) IS NULL"),
    ("set_config-in-returning", "INSERT INTO items VALUES (9701, 'x') "
                                "RETURNING set_config('role', 'other_role', false)"),
    ("set_config-in-on-conflict", "INSERT INTO items VALUES (9702, 'x') ON CONFLICT (id) DO UPDATE "
                                  "SET name = set_config('role', 'other_role', false)"),
    ("set_config-in-merge", "MERGE INTO items USING (SELECT 1 AS id) s ON items.id = s.id WHEN MATCHED AND "
                            "set_config('role', 'other_role', false) IS NOT NULL THEN DO NOTHING"),
    ("set_config-materialized-cte", "WITH x AS MATERIALIZED (SELECT set_config('role', 'other_role', false)) "
                                    "SELECT * FROM x"),
    ("set_config-explain-json", "EXPLAIN (ANALYZE, FORMAT JSON) SELECT set_config('role', 'other_role', false)"),
    ("set_config-explain-user", "EXPLAIN ANALYZE SELECT set_config('pgproxy.user', 'mallory', false)"),
    ("set_config-create-table-as", "CREATE TEMP TABLE t AS SELECT set_config('role', 'other_role', false)"),
    ("set_config-select-into", "SELECT set_config('role', 'other_role', false) INTO TEMP t"),
    ("set_config-check-constraint", "CREATE TEMP TABLE t (a int CHECK (set_config('role', 'other_role', false) "
                                    "IS NOT NULL))"),
    ("set_config-generated", "CREATE TEMP TABLE t (a text GENERATED ALWAYS AS "
                             "(set_config('role', 'other_role', false)) STORED)"),
    ("set_config-temp-view", "CREATE TEMP VIEW v AS SELECT set_config('role', 'other_role', false)"),
    ("set_config-policy", "CREATE POLICY p ON items USING (set_config('role', 'other_role', false) IS NOT NULL)"),
    ("set_config-column-default", "ALTER TABLE items ALTER COLUMN name SET DEFAULT "
                                  "set_config('role', 'other_role', false)"),
    ("prepare-execute-param-name", "PREPARE p(text) AS SELECT set_config($1, 'other_role', false); "
                                   "EXECUTE p('role')"),
    ("prepare-execute-user", "PREPARE p AS SELECT set_config('pgproxy.user', 'mallory', false); EXECUTE p"),
    ("execute-without-prepare", "EXECUTE p"),
    ("rule-on-temp-table", "CREATE TEMP TABLE rt (a int); CREATE RULE r AS ON INSERT TO rt DO ALSO "
                           "SELECT set_config('role', 'other_role', false); INSERT INTO rt VALUES (1)"),
    ("rule-on-items", "CREATE RULE r AS ON INSERT TO items DO ALSO SELECT set_config('role', 'other_role', false)"),
    ("trigger", "CREATE TRIGGER t BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION now()"),
    ("security-definer-function", "CREATE FUNCTION pg_temp.f() RETURNS text SECURITY DEFINER LANGUAGE sql "
                                  "AS 'SELECT current_user'"),
    ("operator", "CREATE OPERATOR pg_temp.=== (LEFTARG = text, RIGHTARG = text, FUNCTION = texteq)"),
    ("cast", "CREATE CAST (text AS int) WITH INOUT"),
    ("extension-dblink", "CREATE EXTENSION dblink"),
    ("view-security-invoker", "CREATE TEMP VIEW v AS SELECT current_user AS u; "
                              "ALTER VIEW v SET (security_invoker = true); SELECT * FROM v"),
    ("alter-role-set-role", "ALTER ROLE emea_analyst SET role = 'other_role'"),
    ("alter-role-current-user-set", "ALTER ROLE CURRENT_USER SET search_path = pg_temp"),
    ("alter-role-all-set", "ALTER ROLE ALL SET pgproxy.user = 'mallory'"),
    ("alter-role-superuser", "ALTER ROLE emea_analyst SUPERUSER"),
    ("alter-database-set-role", "ALTER DATABASE demo SET role = 'other_role'"),
    ("alter-database-set-user", "ALTER DATABASE demo SET pgproxy.user = 'mallory'"),
    ("alter-system-role", "ALTER SYSTEM SET role = 'other_role'"),
    ("alter-system-search-path", "ALTER SYSTEM SET search_path = 'pg_temp'"),
    ("grant-other-role", "GRANT other_role TO emea_analyst"),
    ("create-role", "CREATE ROLE mallory SUPERUSER"),
    ("reassign-owned", "REASSIGN OWNED BY emea_analyst TO other_role"),
    ("set-transaction", "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE READ WRITE; SELECT current_user; COMMIT"),
    ("set-transaction-snapshot", "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '00000003-1'; "
                                 "COMMIT"),
    ("session-characteristics", "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
    ("session_replication_role", "SET session_replication_role = replica"),
    ("is_superuser", "SET is_superuser = on"),
    ("row_security-off", "SET row_security = off"),
    ("search_path-pg_temp-first", "SET search_path = pg_temp, public"),
    ("update-pg_settings-role", "UPDATE pg_settings SET setting = 'other_role' WHERE name = 'role'"),
    ("update-pg_settings-session-authorization", "UPDATE pg_settings SET setting = 'other_role' "
                                                 "WHERE name = 'session_authorization'"),
    ("update-pg_settings-identity", "UPDATE pg_catalog.pg_settings SET setting = 'mallory' "
                                    "WHERE name = 'pgproxy.user'"),
    ("update-pg_settings-by-pattern", "UPDATE pg_settings SET setting = 'other_role' WHERE name LIKE 'rol%'"),
    ("update-view-on-pg_settings", "CREATE TEMP VIEW s AS SELECT * FROM pg_settings; "
                                   "UPDATE s SET setting = 'other_role' WHERE name = 'role'"),
    ("copy-to-program", "COPY (SELECT 1) TO PROGRAM 'id'"),
    ("copy-from-program", "COPY items FROM PROGRAM 'echo 9703,x'"),
    ("copy-to-file", "COPY (SELECT current_user) TO '/tmp/pgproxy-escape'"),
    ("load", "LOAD 'plpgsql'"),
    ("prepare-transaction", "BEGIN; PREPARE TRANSACTION 'alice'"),
    ("commit-prepared", "COMMIT PREPARED 'alice'"),
    ("cancel-other-backends", "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"),
    ("read-server-file", "SELECT pg_read_file('/etc/hostname')"),
    ("reload-conf", "SELECT pg_reload_conf()"),
    ("options-to-table", "SELECT option_name FROM pg_options_to_table(ARRAY['role=other_role'])"),
    ("discard-temp-alone", "DISCARD TEMP"),
    ("discard-plans-alone", "DISCARD PLANS"),
    ("discard-sequences-alone", "DISCARD SEQUENCES"),
    ("reset-all-alone", "RESET ALL"),
    ("discard-all-alone", "DISCARD ALL"),
    ("select-then-reset-all", "SELECT 1; RESET ALL"),
    ("dollar-quote-hiding", "SELECT $a$ $b$ $a$; SET ROLE other_role; -- $b$"),
    ("e-string-hiding", "SELECT E'\\''; SET ROLE other_role; -- '"),
    ("u-string-hiding", "SELECT U&'\\0027'; SET ROLE other_role; -- '"),
    ("comment-hiding", "SELECT 1 /* ; */; SET ROLE other_role /* */"),
]

SINGLE = SQL_TEXT_FUNCTIONS + SET_LIKE
# (id, protocol): the extended protocol only for one-statement attempts.
_CASES = [pytest.param(sql, protocol, id=f"{name}-{protocol}") for name, sql in SINGLE for protocol in PROTOCOLS
          if protocol == "simple" or ";" not in sql.replace("';'", "")]


def test_the_corpus_is_as_large_as_promised():
    assert len({name for name, _ in SINGLE}) == len(SINGLE)
    assert len(SET_LIKE) >= 60 and len(SQL_TEXT_FUNCTIONS) >= 10


@pytest.mark.parametrize("sql, protocol", _CASES)
def test_statement_leaves_the_identity_intact(target, issuer, fresh, sql, protocol):
    alice = _alice(target, issuer)
    replies = alice.run(protocol, sql)
    if replies and replies[-1][0] == "Z" and replies[-1][1] != b"I":
        replies += alice.simple("ROLLBACK")  # a transaction left open (PREPARE TRANSACTION's failure)
    problems = output_leaks(replies, "alice") + identity_leaks(alice, "alice")
    alice.close()
    problems += _bystander_leaks(target, issuer)
    fresh.conn.execute("DELETE FROM items WHERE id BETWEEN 9700 AND 9799")
    assert not problems, _report(repr(sql), target, replies, problems)


def test_set_config_with_bound_parameters_is_refused(target, issuer, fresh):
    """The extended protocol with the setting name or value as parameters."""
    alice = _alice(target, issuer)
    problems = []
    for sql, params in (("SELECT set_config($1, $2, false)", [b"role", b"other_role"]),
                        ("SELECT set_config($1::text, 'mallory', false)", [b"pgproxy.user"]),
                        ("SELECT set_config('role', $1, false)", [b"other_role"]),
                        ("SELECT set_config(lower($1), $2, $3::bool)", [b"ROLE", b"other_role", b"false"])):
        alice.send(parse(sql) + bind("", "", params) + execute() + SYNC)
        replies = alice.replies()
        problems += [f"{sql}: {p}" for p in output_leaks(replies, "alice") + identity_leaks(alice, "alice")]
    alice.close()
    problems += _bystander_leaks(target, issuer)
    assert not problems, "\n".join(problems)


def test_copy_from_stdin_with_a_where_clause(target, issuer, fresh):
    alice = _alice(target, issuer)
    alice.send(query("COPY items FROM STDIN WHERE set_config('role', 'other_role', false) IS NOT NULL")
               + msg.message(b"d", b"9704\tcopied\n") + msg.message(b"c"))
    replies = alice.replies()
    problems = output_leaks(replies, "alice") + identity_leaks(alice, "alice")
    alice.close()
    problems += _bystander_leaks(target, issuer)
    written = fresh.value("SELECT count(*) FROM items WHERE id = 9704")
    fresh.conn.execute("DELETE FROM items WHERE id = 9704")
    assert not problems and written == 0, _report("COPY FROM STDIN WHERE set_config", target, replies, problems)


# --- 1: client-only multibyte encodings and standard_conforming_strings ---------------------
# In GBK, SJIS, BIG5 and GB18030 a byte >= 0x80 may start a character whose second byte is
# 0x5C (backslash). Text escaped for UTF-8 (a backslash doubled, a quote doubled) then reads
# differently: the lead byte swallows one backslash, the other escapes the quote, and the
# string ends early. PostgreSQL refuses \' under a client-only encoding unless
# backslash_quote = on, which a client may set.

# A character whose UTF-8 bytes end in a lead byte of the encoding (checked against
# PostgreSQL 15's conversion tables), and a raw lead byte (invalid UTF-8: the proxy may
# turn it into U+FFFD, whose last UTF-8 byte is also a lead byte in GBK, BIG5, GB18030).
ENCODINGS = {"GBK": ("中", b"\x95"), "SJIS": ("、", b"\x81"), "BIG5": ("中", b"\xa4"), "GB18030": ("中", b"\x95")}


def _injection(char: bytes, nonce: str) -> bytes:
    """After the string ends early: become other_role and mallory, set the proxy's switch
    nonce so its guard statement passes, and comment out the rest of the switch query.
    Dollar quotes, because the proxy doubles every single quote."""
    return (char + b"\\'" + b", false), set_config($$role$$, $$other_role$$, false), "
            b"set_config($$pgproxy.user$$, $$mallory$$, false), set_config($$pgproxy.switch$$, $$" + nonce.encode()
            + b"$$, false) --")


def _carrier(name: str, payload: bytes) -> tuple[str, bytes]:
    """The startup parameter that carries the payload into the switch query."""
    if name == "options":
        escaped = payload.replace(b"\\", b"\\\\").replace(b" ", b"\\ ")
        return "options", b"-c myapp.x=" + escaped
    return name, payload


def _next_nonce(proxy, issuer, ahead: int) -> str:
    """The proxy's switch nonce ``ahead`` switches from now on the only backend connection:
    what an attacker learns by logging in once first (0 when there is none to read)."""
    probe = _alice(proxy, issuer)
    value = probe.value("SELECT coalesce(current_setting('pgproxy.switch', true), '0')")
    probe.close()
    return str(int(value) + ahead) if value.isdigit() else "0"


def _encoding_problems(client: Client, replies: list, user: str = "alice") -> list[str]:
    problems = output_leaks(replies, user)
    if client.logged_in:
        problems += identity_leaks(client, user)
    return problems


@pytest.mark.parametrize("carrier", ["application_name", "myapp.x", "options"])
@pytest.mark.parametrize("char", ["utf8", "raw-lead-byte"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_the_next_login_on_a_connection_left_in_a_client_only_encoding(target, issuer, fresh, encoding, char,
                                                                         carrier):
    """alice's first session sets the encoding and backslash_quote at startup; her second,
    on the same connection, carries the payload in a startup parameter."""
    first = Client.connect(target.port, issuer, "alice", [("client_encoding", encoding), ("backslash_quote", "on")])
    if first.logged_in:
        first.simple("SELECT 1")
    if target.mode == "session" or not first.logged_in:
        first.close()  # one connection: it must come back for the second session
    lead = ENCODINGS[encoding][0].encode() if char == "utf8" else ENCODINGS[encoding][1]
    second = Client.connect(target.port, issuer, "alice", [_carrier(carrier, _injection(lead, "0"))])
    replies = second.simple(WHO) if second.logged_in else []
    problems = _encoding_problems(second, replies)
    first.close()
    second.close()
    problems += _bystander_leaks(target, issuer)
    assert not problems, _report(f"{encoding} {char} via {carrier}", target, replies, problems)


@pytest.mark.parametrize("how", ["startup", "SET", "pg_settings", "set_config"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_a_switch_in_the_same_session_after_the_encoding_changed(target, issuer, fresh, encoding, how):
    """The encoding (and backslash_quote) set at startup or at run time; then a statement
    that makes the proxy re-apply the identity (DISCARD PLANS), so the switch query is read
    in the client-only encoding, with the payload from alice's own application_name."""
    nonce = _next_nonce(target, issuer, 2)
    params = [("application_name", _injection(ENCODINGS[encoding][0].encode(), nonce))]
    if how == "startup":
        params += [("client_encoding", encoding), ("backslash_quote", "on")]
    alice = Client.connect(target.port, issuer, "alice", params)
    replies: list = []
    if alice.logged_in:
        set_them = {"startup": [],
                    "SET": [f"SET client_encoding = '{encoding}'", "SET backslash_quote = on"],
                    "pg_settings": [f"UPDATE pg_settings SET setting = '{encoding}' WHERE name = 'client_encoding'",
                                    "UPDATE pg_settings SET setting = 'on' WHERE name = 'backslash_quote'"],
                    "set_config": [f"SELECT set_config('client_encoding', '{encoding}', false), "
                                   "set_config('backslash_quote', 'on', false)"]}[how]
        for sql in set_them + ["DISCARD PLANS"]:
            replies += alice.simple(sql)
        replies += alice.simple(WHO)
    problems = _encoding_problems(alice, replies)
    alice.close()
    problems += _bystander_leaks(target, issuer)
    assert not problems, _report(f"{encoding} set by {how}, then DISCARD PLANS", target, replies, problems)


@pytest.mark.parametrize("then", ["another-login", "bob-then-alice", "discard-all", "reset-all",
                                  "crafted-set-application_name"])
def test_the_next_identity_switch_after_pg_settings_changed_the_encoding(target, issuer, fresh, then):
    """alice sets GBK and backslash_quote through pg_settings (no SET statement), then the
    connection's next identity switch: another session of hers with the payload, bob and
    then her again, the same session after DISCARD ALL / RESET ALL, or after a crafted SET
    application_name."""
    nonce = _next_nonce(target, issuer, 2)
    payload = _injection("中".encode(), nonce)
    alice = Client.connect(target.port, issuer, "alice",
                           [("application_name", payload)] if then in ("discard-all", "reset-all") else [])
    replies = alice.simple("UPDATE pg_settings SET setting = 'GBK' WHERE name = 'client_encoding'")
    replies += alice.simple("UPDATE pg_settings SET setting = 'on' WHERE name = 'backslash_quote'")
    who, bob_problems = alice, []
    if then == "another-login":
        if target.mode == "session":
            alice.close()
        who = Client.connect(target.port, issuer, "alice", [("application_name", payload)])
    elif then == "bob-then-alice":
        if target.mode == "session":
            alice.close()
        bob = Client.connect(target.port, issuer, "bob")
        bob_problems = [f"bob: {p}" for p in output_leaks(bob.simple(WHO), "bob")]
        bob.close()
        alice.close()
        who = Client.connect(target.port, issuer, "alice", [("application_name", payload)])
    elif then in ("discard-all", "reset-all"):
        replies += alice.simple("DISCARD ALL" if then == "discard-all" else "RESET ALL")
    else:
        replies += alice.simple(b"SET application_name = E'" + "中".encode() + b"\\\\'' , set_config($$role$$, "
                                b"$$other_role$$, false) --'")
        replies += alice.simple("DISCARD PLANS")
    if who.logged_in:
        replies += who.simple(WHO)
    problems = _encoding_problems(who, replies) + bob_problems
    alice.close()
    who.close()
    problems += _bystander_leaks(target, issuer)
    assert not problems, _report(f"GBK through pg_settings, then {then}", target, replies, problems)


# The guard parses the client's bytes as UTF-8; PostgreSQL reads them in the client's
# encoding. lead + backslash is one character to PostgreSQL, so its string ends at the
# next quote; to a UTF-8 reader the backslash escapes that quote and the string runs on,
# hiding what follows. Dollar quotes inside, so the UTF-8 reading sees one string.
def _hidden(lead: bytes, protocol: str) -> bytes:
    if protocol == "simple":
        return b"SELECT E'" + lead + b"\\'; SELECT set_config($$role$$, $$other_role$$, false), " \
               b"set_config($$pgproxy.user$$, $$mallory$$, false); -- '"
    return b"SELECT E'" + lead + b"\\', set_config($$role$$, $$other_role$$, false), " \
           b"set_config($$pgproxy.user$$, $$mallory$$, false) -- '"


def _encoding_set(alice: Client, how: str, encoding: str) -> list:
    return {"startup": lambda: [],
            "options": lambda: [],
            "SET": lambda: alice.simple(f"SET client_encoding TO '{encoding}'"),
            "set_config": lambda: alice.simple(f"SELECT set_config('client_encoding', '{encoding}', false)"),
            "pg_settings": lambda: alice.simple(f"UPDATE pg_settings SET setting = '{encoding}' "
                                                "WHERE name = 'client_encoding'"),
            "SET-in-transaction": lambda: alice.simple(f"BEGIN; SET LOCAL client_encoding = '{encoding}'")}[how]()


_GUARD_ENCODING_CASES = [(e, "startup") for e in ENCODINGS] + [
    ("GBK", how) for how in ("options", "SET", "set_config", "pg_settings", "SET-in-transaction")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("encoding, how", _GUARD_ENCODING_CASES, ids=[f"{e}-{h}" for e, h in _GUARD_ENCODING_CASES])
def test_the_guard_reads_statements_as_postgresql_does_in_client_only_encodings(target, issuer, fresh, encoding,
                                                                               how, protocol):
    params = {"startup": [("client_encoding", encoding)],
              "options": [("options", f"-c client_encoding={encoding}")]}.get(how, [])
    alice = Client.connect(target.port, issuer, "alice", params)
    replies: list = []
    if alice.logged_in:
        replies += _encoding_set(alice, how, encoding)
        replies += alice.run(protocol, _hidden(ENCODINGS[encoding][1], protocol))
    problems = _encoding_problems(alice, replies)
    alice.close()
    problems += _bystander_leaks(target, issuer)
    assert not problems, _report(f"{encoding} set by {how}, hidden set_config", target, replies, problems)


# With standard_conforming_strings off, PostgreSQL reads '\'' as one quote character in a
# string that goes on; a reader with it on sees the string '\' and then the string ' ...'.
_SCS_HIDDEN = {"simple": "SELECT '\\''; SELECT set_config($$role$$, $$other_role$$, false), "
                         "set_config($$pgproxy.user$$, $$mallory$$, false); -- '",
               "extended": "SELECT '\\'', set_config($$role$$, $$other_role$$, false), "
                           "set_config($$pgproxy.user$$, $$mallory$$, false) -- '"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("how", ["startup", "options", "SET", "SET-LOCAL", "set_config", "pg_settings"])
def test_the_guard_reads_statements_as_postgresql_does_without_standard_conforming_strings(target, issuer, fresh,
                                                                                         how, protocol):
    params = {"startup": [("standard_conforming_strings", "off")],
              "options": [("options", "-c standard_conforming_strings=off")]}.get(how, [])
    alice = Client.connect(target.port, issuer, "alice", params)
    if not alice.logged_in:  # refusing the setting at login is fine: nothing runs
        assert alice.login_error is not None, alice.login_replies
        alice.close()
        assert not _bystander_leaks(target, issuer)
        return
    replies = {"startup": lambda: [], "options": lambda: [],
               "SET": lambda: alice.simple("SET standard_conforming_strings = off"),
               "SET-LOCAL": lambda: alice.simple("BEGIN; SET LOCAL standard_conforming_strings = off"),
               "set_config": lambda: alice.simple("SELECT set_config('standard_conforming_strings', 'off', false)"),
               "pg_settings": lambda: alice.simple("UPDATE pg_settings SET setting = 'off' "
                                                   "WHERE name = 'standard_conforming_strings'")}[how]()
    replies += alice.run(protocol, _SCS_HIDDEN[protocol])
    problems = output_leaks(replies, "alice") + identity_leaks(alice, "alice")
    alice.close()
    problems += _bystander_leaks(target, issuer)
    assert not problems, _report(f"standard_conforming_strings off by {how}", target, replies, problems)


# --- 2: statements pipelined after DISCARD ALL, RESET ALL and friends ----------------------
# (id, writes): each write is sent whole, then its replies read (up to the number of
# ReadyForQuery it owes). Every WHO row returned must be alice's.

def _z(data: bytes) -> int:
    """ReadyForQuery replies a write owes: one per Query and per Sync."""
    count, pos = 0, 0
    while pos < len(data):
        kind, length = data[pos:pos + 1], int.from_bytes(data[pos + 1:pos + 5], "big")
        count += kind in (b"Q", b"S")
        pos += 1 + length
    return count


PIPELINES = [
    ("discard-all-then-query", [query("DISCARD ALL") + query(WHO)]),
    ("reset-all-then-query", [query("RESET ALL") + query(WHO)]),
    ("session-authorization-default-then-query", [query("SET SESSION AUTHORIZATION DEFAULT") + query(WHO)]),
    ("reset-role-then-query", [query("RESET ROLE") + query(WHO)]),
    ("discard-temp-then-query", [query("DISCARD TEMP") + query(WHO)]),
    ("discard-sequences-then-query", [query("DISCARD SEQUENCES") + query(WHO)]),
    ("select-reset-all-then-query", [query("SELECT 1; RESET ALL") + query(WHO)]),
    ("reset-all-three-queries", [query("RESET ALL") + query("SELECT 1") + query(WHO)]),
    ("extended-discard-all-twice", [pbe("DISCARD ALL") + pbe(WHO) + SYNC]),
    ("extended-reset-all-twice", [pbe("RESET ALL") + pbe(WHO) + SYNC]),
    ("extended-session-authorization-default", [pbe("SET SESSION AUTHORIZATION DEFAULT") + pbe(WHO) + SYNC]),
    ("extended-reset-role", [pbe("RESET ROLE") + pbe(WHO) + SYNC]),
    ("extended-discard-all-flush-then-rest", [pbe("DISCARD ALL") + FLUSH, pbe(WHO) + SYNC]),
    ("extended-reset-all-flush-then-rest", [pbe("RESET ALL") + FLUSH, pbe(WHO) + SYNC]),
    ("extended-discard-all-flush-in-one-write", [pbe("DISCARD ALL") + FLUSH + pbe(WHO) + SYNC]),
    ("extended-discard-all-sync-then-extended", [pbe("DISCARD ALL") + SYNC + pbe(WHO) + SYNC]),
    ("extended-reset-all-sync-then-simple", [pbe("RESET ALL") + SYNC + query(WHO)]),
    ("simple-reset-all-then-extended", [query("RESET ALL") + pbe(WHO) + SYNC]),
    ("simple-discard-all-then-extended", [query("DISCARD ALL") + pbe(WHO) + SYNC]),
    ("extended-discard-all-then-named-statement", [parse(WHO, "who") + SYNC,
                                                   query("DISCARD ALL") + bind("", "who") + execute() + SYNC]),
    ("extended-reset-all-twice-flush-then-sync", [pbe("RESET ALL") + pbe(WHO) + FLUSH, SYNC]),
    ("discard-all-next-write", [query("DISCARD ALL"), query(WHO)]),
    ("reset-all-next-write", [query("RESET ALL"), query(WHO)]),
    ("extended-discard-all-next-write", [pbe("DISCARD ALL") + SYNC, pbe(WHO) + SYNC]),
    ("extended-reset-all-next-write", [pbe("RESET ALL") + SYNC, pbe(WHO) + SYNC]),
    ("reset-all-in-transaction-then-query", [query("BEGIN") + query("RESET ALL") + query(WHO) + query("COMMIT")]),
    ("extended-reset-all-in-transaction", [query("BEGIN"), pbe("RESET ALL") + pbe(WHO) + SYNC, query("COMMIT")]),
]


def _run_writes(client: Client, writes: list[bytes]) -> list:
    replies: list = []
    for data in writes:
        client.send(data)
        owed = _z(data)
        if owed:
            replies += client.replies(count=owed)
        else:  # Flush only: read what has come by the time it answers (at least one message)
            client.wire.sock.settimeout(1.0)
            try:
                while True:
                    message = client.wire.read_message()
                    if message is None:
                        break
                    replies.append(message)
            except TimeoutError:
                pass
            finally:
                client.wire.sock.settimeout(15)
    return replies


@pytest.mark.parametrize("writes", [pytest.param(w, id=name) for name, w in PIPELINES])
def test_statements_pipelined_after_a_reset_run_as_alice(target, issuer, fresh, writes):
    alice = _alice(target, issuer)
    replies = _run_writes(alice, writes)
    problems = output_leaks(replies, "alice") + identity_leaks(alice, "alice")
    alice.close()
    problems += _bystander_leaks(target, issuer)
    assert not problems, _report("pipeline", target, replies, problems)


# The same for a role whose policy is read-only: the policy's default_transaction_read_only
# must survive RESET ALL / DISCARD ALL, so a function that writes still cannot.

@pytest.fixture(scope="module", params=MODES)
def read_only(request, base_config, su):
    process = ProxyProcess(merge(_config(base_config, su, request.param),
                                 {"policies": [{"role": "emea_analyst", "read_only": True}]}))
    process.mode = request.param
    yield process
    assert process.stop() == 0, process.log()[-3000:]


WRITE = "SELECT public.escape_write(9750)"
READ_ONLY_PIPELINES = [
    ("reset-all-then-write", [query("RESET ALL") + query(WRITE)]),
    ("discard-all-then-write", [query("DISCARD ALL") + query(WRITE)]),
    ("select-reset-all-then-write", [query("SELECT 1; RESET ALL") + query(WRITE)]),
    ("extended-reset-all-then-write", [pbe("RESET ALL") + pbe(WRITE) + SYNC]),
    ("extended-discard-all-then-write", [pbe("DISCARD ALL") + pbe(WRITE) + SYNC]),
    ("extended-reset-all-flush-then-write", [pbe("RESET ALL") + FLUSH, pbe(WRITE) + SYNC]),
    ("simple-reset-all-then-extended-write", [query("RESET ALL") + pbe(WRITE) + SYNC]),
    ("reset-all-next-write", [query("RESET ALL"), query(WRITE)]),
    ("discard-all-next-write", [query("DISCARD ALL"), query(WRITE)]),
    ("reset-setting-next-write", [query("RESET default_transaction_read_only"), query(WRITE)]),
    ("pg_settings-next-write", [query("UPDATE pg_settings SET setting = 'off' "
                                      "WHERE name = 'default_transaction_read_only'"), query(WRITE)]),
    ("begin-read-write", [query("BEGIN; SET TRANSACTION READ WRITE; " + WRITE + "; COMMIT")]),
    ("set-transaction-read-write", [query("BEGIN"), query("SET TRANSACTION READ WRITE"), query(WRITE),
                                    query("COMMIT")]),
    ("ts_rewrite-read-write", [query("SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery FROM "
                                     "(SELECT set_config(''default_transaction_read_only'', ''off'', false)) s')"),
                               query(WRITE)]),
]


@pytest.mark.parametrize("writes", [pytest.param(w, id=name) for name, w in READ_ONLY_PIPELINES])
def test_a_read_only_role_stays_read_only_after_a_reset(read_only, issuer, fresh, writes):
    alice = _alice(read_only, issuer)
    replies = _run_writes(alice, writes)
    problems = output_leaks(replies, "alice") + identity_leaks(alice, "alice")
    if any("9750" in str(row) for row in data_rows(replies)):
        problems.append("the write returned its row")
    setting = alice.simple("SELECT current_setting('default_transaction_read_only')")
    if data_rows(setting) != [("on",)]:
        problems.append(f"default_transaction_read_only afterwards: {describe(setting)}")
    later = alice.simple(WRITE.replace("9750", "9751"))
    if sqlstates(later) not in (["25006"], ["42501"]):
        problems.append(f"a later write: {describe(later)}")
    alice.close()
    written = fresh.value("SELECT count(*) FROM items WHERE id IN (9750, 9751)")
    fresh.conn.execute("DELETE FROM items WHERE id IN (9750, 9751)")
    if written:
        problems.append(f"{written} row(s) were written (checked as superuser)")
    assert not problems, _report("read-only pipeline", read_only, replies, problems)
