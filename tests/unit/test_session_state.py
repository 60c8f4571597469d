"""Which statements outlive their transaction (pin), and which the proxy answers itself."""

import pytest

from pgproxy.policy.session_state import session_effects


@pytest.mark.parametrize("sql, reason", [
    ("SET search_path = app", "SET"),
    ("set TimeZone TO 'UTC'", "SET"),
    ("RESET statement_timeout", "SET"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SET"),
    ("SELECT set_config('app.x', 'y', false)", "set_config"),
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
    mixed = session_effects("DISCARD ALL; SELECT 1")  # not alone: the server runs it
    assert mixed.local == "" and mixed.stale and mixed.deallocates


def test_statements_that_undo_applied_settings_are_marked_stale():
    assert session_effects("RESET ALL").stale
    assert session_effects("SET SESSION AUTHORIZATION DEFAULT").stale
    assert not session_effects("SELECT 1").stale


def test_copy_from_stdin_is_recognised():
    assert session_effects("COPY items FROM STDIN").copy_in
    assert not session_effects("COPY items TO STDOUT").copy_in
