"""The guard's verdicts, pure: classes, relations, refusals, role policy and its caches."""

import pytest

from pgproxy.policy import guard
from pgproxy.policy.guard import RolePolicy, classify


@pytest.mark.parametrize("sql, classes", [
    ("SELECT * FROM orders", ("READ",)),
    ("INSERT INTO items VALUES (1)", ("WRITE",)),
    ("WITH x AS (UPDATE items SET name = 'a' RETURNING id) SELECT * FROM x", ("READ", "WRITE")),
    ("EXPLAIN ANALYZE DELETE FROM items", ("WRITE",)),
    ("COPY items FROM STDIN", ("WRITE",)), ("COPY items TO STDOUT", ("READ",)),
    ("CREATE TABLE t (a int)", ("DDL",)), ("ALTER TABLE t ADD COLUMN b int", ("DDL",)),
    ("SELECT * INTO new_table FROM items", ("DDL",)),
    ("GRANT SELECT ON items TO bob", ("ROLE",)), ("CREATE ROLE x", ("ROLE",)),
    ("CALL proc()", ("FUNCTION",)), ("SHOW search_path", ("READ",)), ("BEGIN", ("MISC",)),
])
def test_classes_in_pgaudit_terms(sql, classes):
    assert classify(sql).classes == classes


def test_relations_are_named_with_their_schema_and_ctes_are_not_relations():
    verdict = classify("WITH recent AS (SELECT * FROM sales.orders) SELECT * FROM recent JOIN customers USING (id)")
    assert verdict.relations == ("customers", "sales.orders")


def test_the_shape_cache_never_shares_a_decision_that_depends_on_a_literal():
    assert classify("SELECT set_config('app.x', 'y', false)").refusal == ""
    assert classify("SELECT set_config('role', 'y', false)").refusal  # same shape, other literal
    assert classify("SELECT set_config('pgproxy.user', 'y', false)").refusal


@pytest.mark.parametrize("allowed, denied", [
    ("SELECT * FROM €1", "SELECT * FROM €2"),           # PostgreSQL: any non-ASCII character continues a name
    ("SELECT * FROM t·1", "SELECT * FROM t·2"),
    ("SELECT * FROM report٣1", "SELECT * FROM report٣2"),  # a Unicode digit is a name's letter, not a number
])
def test_digits_inside_a_name_are_never_taken_for_a_literal(allowed, denied):
    """The shape cache must not hand one relation's verdict to another whose name differs
    in a digit: PostgreSQL reads these as names, so a denied relation stays denied."""
    name = denied.rpartition(" ")[2]
    policy = RolePolicy(denied_relations=frozenset({name}))
    assert policy.refusal(classify(allowed)) == ""
    assert classify(denied).relations == (name,)
    assert policy.refusal(classify(denied)) == "relation denied by policy"


def test_queries_that_differ_only_in_literals_share_one_parse(monkeypatch):
    classify("SELECT abalance FROM pgbench_accounts WHERE aid = 17")
    calls = []
    monkeypatch.setattr(guard, "_analyse", lambda sql: calls.append(sql))
    assert classify("SELECT abalance FROM pgbench_accounts WHERE aid = 4242").classes == ("READ",)
    assert classify("SELECT abalance FROM pgbench_accounts WHERE aid = 99 -- x") is None  # comments: parsed
    assert calls == ["SELECT abalance FROM pgbench_accounts WHERE aid = 99 -- x"]


def test_role_policy():
    read_only = RolePolicy(read_only=True, locked_settings=frozenset(guard.READ_ONLY_SETTINGS))
    assert read_only.refusal(classify("UPDATE items SET name = 'x'")) == "this role is read-only"
    assert read_only.refusal(classify("SELECT 1")) == ""
    assert "fixed by policy" in read_only.refusal(classify("SET default_transaction_read_only = off"))
    assert "fixed by policy" in read_only.refusal(classify("BEGIN READ WRITE"))
    assert "DO is not allowed" in RolePolicy().refusal(classify("DO $$BEGIN NULL; END$$"))
    assert RolePolicy(allow_functions=True).refusal(classify("DO $$BEGIN NULL; END$$")) == ""
    narrow = RolePolicy(allowed_classes=frozenset({"READ"}), denied_functions=frozenset({"pg_sleep"}),
                        denied_relations=frozenset({"hr.salaries", "payroll"}))
    assert "WRITE" in narrow.refusal(classify("DELETE FROM items"))
    assert narrow.refusal(classify("SELECT pg_catalog.pg_sleep(1)")) == "function pg_sleep is denied"
    assert narrow.refusal(classify("SELECT * FROM hr.salaries")) == "relation denied by policy"
    assert narrow.refusal(classify("SELECT * FROM public.payroll")) == "relation denied by policy"
    assert narrow.refusal(classify("SELECT * FROM orders")) == ""


def test_unparsable_text_is_refused_with_42601():
    verdict = classify("SELEC 1")
    assert verdict.refusal and verdict.sqlstate == "42601"
    assert RolePolicy(allow_functions=True).refusal(verdict) == verdict.refusal  # no policy lets it through


@pytest.mark.parametrize("sql, message, position", [
    ("selct 1", 'syntax error at or near "selct"', 1),
    ("SELECT 1 FROM", "syntax error at end of input", 14),
    ("SELECT 1 FROM   ", "syntax error at end of input", 17),  # PostgreSQL counts the trailing blanks
    ("SELECT 'abc", "unterminated quoted string at or near \"'abc\"", 8),
    ("SELECT 'é'; selct", 'syntax error at or near "selct"', 13),  # characters, not bytes
    ("SELECT 1 🎉 FROM", "syntax error at end of input", 16),
])
def test_a_syntax_error_carries_postgresqls_message_and_position(sql, message, position):
    verdict = classify(sql)
    assert (verdict.sqlstate, verdict.refusal, verdict.position) == ("42601", message, position)
    assert ", at index" not in verdict.refusal


def test_syntax_errors_that_differ_only_in_literals_get_their_own_position():
    # The message quotes the token and the position counts the literal's characters:
    # the shape cache must not hand one statement's error to another.
    assert classify("SELECT 'a' 'b'").refusal == 'syntax error at or near "\'b\'"'
    assert classify("SELECT 'aaaa' 'c'").refusal == 'syntax error at or near "\'c\'"'
    assert classify("SELECT 'aaaa' 'c'").position == 15
