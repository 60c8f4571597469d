"""Which statements outlive their transaction (pin), and which the proxy answers itself."""

import pytest

from pgproxy.policy.session_state import NOTHING, repeated_effects, session_effects


@pytest.mark.parametrize("sql, reason", [
    ("SET myapp.tenant = 'x'", "SET"),
    ("SET TIME ZONE INTERVAL '+02:00' HOUR TO MINUTE", "SET"),
    ("RESET myapp.tenant", "SET"),
    ("BEGIN; SET search_path = app; COMMIT", "SET"),  # could be rolled back: not carried
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SET"),
    ("SELECT set_config('app.x', 'y', false)", "set_config"),
    ("SELECT set_config('search_path', lower('X'), false)", "set_config"),
    ("SELECT set_config('app.x', 'y', $1)", "set_config"),  # not a constant: assume the worst
    ("SELECT 1 FROM t WHERE set_config('app.x', 'y', false) IS NOT NULL", "set_config"),
    ("LISTEN jobs", "LISTEN"),
    ("CREATE TEMP TABLE scratch (x int)", "temporary object"),
    ("CREATE TEMPORARY VIEW v AS SELECT 1", "temporary object"),
    ("create table pg_temp.x (a int)", "temporary object"),
    ("SELECT * INTO TEMP copy FROM items", "temporary object"),
    ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'select 1'", "temporary object"),
    ("PREPARE q AS SELECT 1", "PREPARE"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "WITH HOLD cursor"),
    ("SELECT pg_advisory_lock(7)", "advisory lock"),
    ("SELECT pg_try_advisory_lock_shared(7)", "advisory lock"),
    ("LOAD 'auto_explain'", "LOAD"),
    ("SELECT 1; LISTEN late", "LISTEN"),
])
def test_session_state_pins(sql, reason):
    assert session_effects(sql).pin == reason


@pytest.mark.parametrize("sql", [
    "SELECT 1", "SET LOCAL search_path = app", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SELECT set_config('app.x', 'y', true)", "SELECT pg_advisory_xact_lock(7)", "DECLARE c CURSOR FOR SELECT 1",
    "CREATE TABLE permanent (x int)", "UNLISTEN *", "not sql at all",
])
def test_transaction_scoped_statements_do_not_pin(sql):
    assert session_effects(sql).pin == ""


def test_statement_bookkeeping_alone_is_answered_locally():
    assert session_effects("DEALLOCATE ALL").local == "deallocate_all"
    assert session_effects("deallocate prepare _pg3_7").local == "deallocate"
    assert session_effects("DEALLOCATE _pg3_7").name == "_pg3_7"
    assert session_effects("DISCARD ALL").local == "discard_all"
    mixed = session_effects("DISCARD ALL; SELECT 1")  # not alone: refused by the relay
    assert mixed.local == "" and mixed.reset == "DISCARD ALL" and mixed.deallocates and not mixed.alone


def test_statements_that_undo_the_identity_are_marked_as_resets():
    assert session_effects("RESET ALL").reset == "RESET ALL"
    assert session_effects("reset all").alone
    assert session_effects("SET SESSION AUTHORIZATION DEFAULT").reset == "SESSION AUTHORIZATION"
    assert session_effects("SELECT 1; RESET ALL").reset == "RESET ALL"
    assert not session_effects("SELECT 1").reset
    assert not session_effects("DISCARD TEMP").reset


@pytest.mark.parametrize("sql", [
    "SET client_encoding = 'SJIS'", "SET client_encoding TO gbk", "SET NAMES 'BIG5'", "set names 'Shift_JIS'",
    "SELECT set_config('client_encoding', 'GB18030', false)", "SELECT set_config('CLIENT_ENCODING', 'uhc', true)",
    "SELECT set_config('client_encoding', lower('SJIS'), false)", "SET client_encoding = 'win-936'",
    "SELECT set_config('client_encoding'::text, 'johab'::text, false)",
    "UPDATE pg_settings SET setting = 'GBK' WHERE name = 'client_encoding'",
    "update PG_CATALOG.pg_settings set setting = 'x' where name = chr(114) || 'ole'",
    "SET standard_conforming_strings = off", "SET LOCAL standard_conforming_strings TO false",
    "RESET standard_conforming_strings", "SELECT set_config('standard_conforming_strings', 'off', false)",
    "ALTER ROLE current_user SET standard_conforming_strings = off", "ALTER DATABASE demo SET search_path = x",
    "ALTER ROLE emea_analyst IN DATABASE demo SET client_encoding = 'SJIS'",
])
def test_client_only_encodings_are_flagged(sql):
    assert session_effects(sql).refusal


@pytest.mark.parametrize("sql", ["SET client_encoding = 'UTF8'", "SET NAMES 'LATIN1'", "SELECT 1",
                                 "SET standard_conforming_strings = on",
                                 "SET client_encoding TO DEFAULT", "SELECT set_config('application_name', 'x', false)"])
def test_safe_encodings_are_not_flagged(sql):
    assert not session_effects(sql).refusal


def test_copy_from_stdin_is_recognised():
    assert session_effects("COPY items FROM STDIN").copy_in
    assert not session_effects("COPY items TO STDOUT").copy_in


@pytest.mark.parametrize("sql, settings", [
    ("SET search_path = app", (("search_path", "app"),)),
    ("set TimeZone TO 'UTC'", (("timezone", "UTC"),)),
    ("RESET statement_timeout", (("statement_timeout", None),)),
    ("SET extra_float_digits = 3", (("extra_float_digits", "3"),)),
    ("SET search_path = \"$user\", public, \"My Schema\"", (("search_path", '"$user", public, "My Schema"'),)),
    ("SET DateStyle = 'ISO';SET extra_float_digits = 2;show transaction_isolation",
     (("datestyle", "ISO"), ("extra_float_digits", "2"))),
    ("SET application_name TO DEFAULT", (("application_name", None),)),
    ("SELECT pg_catalog.set_config('search_path', '', false);", (("search_path", ""),)),
])
def test_ordinary_settings_follow_the_client(sql, settings):
    effects = session_effects(sql)
    assert effects.pin == "" and effects.settings == settings


def _fresh_caches():
    from pgproxy.policy import session_state
    session_state._cache.clear()
    session_state._inert_shapes.clear()
    session_state._repeated.clear()
    session_state._not_inert.clear()


def test_plain_dml_with_new_literals_is_parsed_once_per_shape(monkeypatch):
    """pgbench's UPDATE ... SET with new numbers every time must not cost a parse each."""
    from pgproxy.policy import session_state
    _fresh_caches()
    calls = []
    inspect = session_state._inspect
    monkeypatch.setattr(session_state, "_inspect", lambda sql: calls.append(sql) or inspect(sql))
    texts = [f"UPDATE pgbench_accounts SET abalance = abalance + {d} WHERE aid = {a};"
             for d, a in [(1, 2), (4711, 99), (0, 100000), (3, 3)]]
    for text in texts:
        assert session_effects(text) == inspect(text)
    assert len(calls) == 1


@pytest.mark.parametrize("first, second", [
    ("SELECT set_config('search_path', 'public', 'true')", "SELECT set_config('search_path', 'public', 'false')"),
    ("UPDATE t SET a = 1 WHERE b = 2", "UPDATE t SET a = set_config('search_path', 'x', false) WHERE b = 2"),
    ("UPDATE pg_settings SET setting = 'x' WHERE name = 'nothing_here'",
     "UPDATE pg_settings SET setting = 'public' WHERE name = 'search_path'"),
    ("SELECT pg_advisory_xact_lock(1) FROM t WHERE a = 'set'", "SELECT pg_advisory_lock(1) FROM t WHERE a = 'set'"),
    ("SELECT 1 FROM t WHERE a = 'set'", "SELECT 1 FROM t WHERE a = 'set'; SET search_path = 'x'"),
])
def test_what_a_literal_can_change_is_never_decided_by_shape(first, second):
    """A statement whose effect on the session depends on a literal (set_config's is_local,
    a pg_settings row, an advisory lock) gets its own inspection, not a look-alike's."""
    from pgproxy.policy.session_state import _inspect
    _fresh_caches()
    session_effects(first)
    assert session_effects(second) == _inspect(second)
    _fresh_caches()
    session_effects(second)
    assert session_effects(first) == _inspect(first)


@pytest.mark.parametrize("sql", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1", "SET search_path = app", "LISTEN jobs",
    "SELECT set_config('app.x', $1, false)", "COPY t FROM STDIN", "SELECT 1",
])
def test_a_repeated_text_gets_the_same_answer_each_time(sql):
    """Each Execute of a prepared statement asks again; the kept answer is the full check's."""
    _fresh_caches()
    assert [repeated_effects(sql) for _ in range(3)] == [session_effects(sql)] * 3


def test_kept_answers_are_bounded(monkeypatch):
    from pgproxy.policy import session_state
    _fresh_caches()
    monkeypatch.setattr(session_state, "CACHE_SIZE", 10)
    for n in range(25):
        repeated_effects(f"SELECT {n}")
    assert 0 < len(session_state._repeated) <= 10
    assert repeated_effects("LISTEN jobs") == session_effects("LISTEN jobs") != session_effects("SELECT 1")


def test_a_simple_query_the_guard_has_shaped_is_decided_once_per_shape(monkeypatch):
    """pgbench's SELECT with a new number each time: after the first, the guard's shape
    says it (no word scan, no parse) — and only when the guard shaped this very text."""
    from pgproxy.policy import session_state
    from pgproxy.policy.parsed import literal_shape
    _fresh_caches()
    scans, parses = [], []
    maybe, literal_free = session_state._maybe, session_state._literal_free
    monkeypatch.setattr(session_state, "_maybe", lambda sql: scans.append(sql) or maybe(sql))
    monkeypatch.setattr(session_state, "_literal_free", lambda sql: parses.append(sql) or literal_free(sql))
    texts = [f"SELECT abalance FROM pgbench_accounts WHERE aid = {n};" for n in (1, 22, 333, 4444)]
    for text in texts:
        literal_shape(text)  # what the guard's classify does first
        assert session_effects(text) is NOTHING
    assert scans == texts[:1] and parses == texts[:1]
    unshaped = "SELECT abalance FROM pgbench_accounts WHERE aid = 55555;"
    assert session_effects(unshaped) is NOTHING and scans[-1] == unshaped  # not shaped: scanned as before


@pytest.mark.parametrize("first, second", [
    ("SELECT * FROM t WHERE a = 'x'", "SELECT * FROM t WHERE a = 'set search_path = evil'"),
    ("SELECT now() FROM t WHERE a = 1", "SELECT now() FROM t WHERE a = 2"),
    ("SELECT set_config('search_path', 'x', 'true')", "SELECT set_config('search_path', 'x', 'false')"),
])
def test_a_shape_keeps_nothing_but_what_no_literal_can_change(first, second):
    """What a shape keeps holds for every text of it; a shape with a function call keeps
    nothing, and each of its texts is checked on its own."""
    from pgproxy.policy.parsed import literal_shape
    from pgproxy.policy.session_state import _inspect
    _fresh_caches()
    for text in (first, second, second):
        literal_shape(text)
        assert session_effects(text) == _inspect(text), text
