"""The function allow-list: built-ins pass, anything else is refused wherever it is called,
unless the policy names it."""

import pytest

from pgproxy.policy import builtins
from pgproxy.policy.guard import RolePolicy, classify

DEFAULT = RolePolicy()


@pytest.mark.parametrize("sql", [
    "SELECT lower(name), pg_catalog.upper(name), now(), coalesce(a, b) FROM items",
    "SELECT count(*), string_agg(name, ',' ORDER BY name), row_number() OVER (ORDER BY id) FROM items",
    "SELECT * FROM generate_series(1, 3) g, LATERAL unnest(ARRAY[g]) u",
    "SELECT extract(year FROM now()), position('a' IN 'b'), trim(' a '), substring('abc' FROM 2), "
    "'a' SIMILAR TO 'b' ESCAPE 'c', now() AT TIME ZONE 'UTC', collation for ('a'), overlay('a' PLACING 'b' FROM 1)",
    "SELECT make_interval(days => 3), jsonb_build_object('a', 1), xpath('/a', '<a/>')",
    "SELECT information_schema._pg_expandarray(ARRAY[1])",
    "SELECT pgproxy.person(), pgproxy.groups()",  # pgproxy's signed identity
    "SELECT 1 OPERATOR(pg_catalog.+) 2 ORDER BY 1 USING OPERATOR(pg_catalog.<)",
    "SELECT * FROM items TABLESAMPLE bernoulli(10)",
    "SELECT set_config('app.tenant', 'emea', false)",
    "SELECT system_user, casefold('A')",  # newer than the catalog the list was made from
])
def test_built_ins_pass(sql):
    verdict = classify(sql)
    assert verdict.unknown_functions == () and DEFAULT.refusal(verdict) == ""


# Each calls a function that is not a built-in, in one of the places a call can hide.
UNKNOWN = [
    ("SELECT become_other()", "become_other"),
    ("SELECT public.lower('x')", "public.lower"),  # not pg_catalog's lower
    ('SELECT "LOWER"(\'x\')', "LOWER"),  # a quoted name is another function
    ('SELECT "PG_CATALOG".lower(\'x\')', "PG_CATALOG.lower"),
    ("SELECT demo.pg_catalog.lower('x'), mydb.app.f()", "app.f"),
    ("SELECT pg_temp.f()", "pg_temp.f"),
    ("SELECT * FROM app.rows()", "app.rows"),
    ("SELECT * FROM ROWS FROM (generate_series(1, 2), app.rows())", "app.rows"),
    ("SELECT 1 WHERE app.check() AND true", "app.check"),
    ("SELECT (SELECT app.f())", "app.f"),
    ("WITH x AS (SELECT app.f()) SELECT * FROM x", "app.f"),
    ("SELECT app.total(amount) FROM orders", "app.total"),  # an aggregate
    ("SELECT app.rank() OVER (ORDER BY id) FROM orders", "app.rank"),  # a window function
    ("SELECT app.f(a => 1, b => 2)", "app.f"),  # named arguments
    ("CALL app.proc()", "app.proc"), ("CALL proc(1)", "proc"),
    ("EXPLAIN ANALYZE SELECT app.f()", "app.f"),
    ("PREPARE p AS SELECT app.f()", "app.f"),
    ("COPY (SELECT app.f()) TO STDOUT", "app.f"),
    ("CREATE TABLE t (a int DEFAULT app.f())", "app.f"),
    ("CREATE INDEX ON items (app.f(name))", "app.f"),
    ("CREATE VIEW v AS SELECT app.f()", "app.f"),
    ("INSERT INTO items VALUES (app.f(), 'x')", "app.f"),
    ("VALUES (app.f())", "app.f"),
    ("UPDATE items SET name = app.f() WHERE id = 1", "app.f"),
    ("DECLARE c CURSOR FOR SELECT app.f()", "app.f"),
    ("SELECT 1 OPERATOR(app.===) 2", "app.==="),  # a user's operator runs a user's function
    ("SELECT id FROM items ORDER BY id USING OPERATOR(app.<<<)", "app.<<<"),
    ("SELECT * FROM items TABLESAMPLE system_rows(10)", "system_rows"),  # an extension's sampling method
    ("SELECT uuid('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')", "uuid"),  # a cast in call syntax resolves as a function
]


@pytest.mark.parametrize("sql, name", UNKNOWN)
def test_a_call_of_anything_else_is_refused_wherever_it_is(sql, name):
    verdict = classify(sql)
    assert verdict.refusal == "" and name in verdict.unknown_functions
    reason = DEFAULT.refusal(verdict)
    assert reason.endswith("is not allowed: it is not a known-safe built-in (allowed_functions can allow it)")
    assert name in reason


@pytest.mark.parametrize("sql, reason", [
    ("SELECT ts_rewrite('a'::tsquery, 'SELECT set_config(''role'', ''x'', false)')", "runs SQL given as text"),
    ("SELECT * FROM ts_stat('SELECT to_tsvector(1)')", "runs SQL given as text"),
    ("SELECT pg_catalog.query_to_xml('SELECT 1', true, true, '')", "runs SQL given as text"),
    ("SELECT cursor_to_xml('c', 1, true, true, '')", "runs SQL given as text"),
    ("SELECT table_to_xml('hr.salaries', true, true, '')", "reads tables named by a value"),
    ("SELECT database_to_xml(true, true, '')", "reads tables named by a value"),
    ("SELECT pg_terminate_backend(42)", "acts on other sessions"),
    ("SELECT pg_cancel_backend(42)", "acts on other sessions"),
    ("SELECT pg_read_file('/etc/passwd')", "server's files"),
    ("SELECT * FROM pg_ls_dir('.')", "server's files"),
    ("SELECT lo_import('/etc/passwd')", "server's files"),
    ("SELECT pg_reload_conf()", "configuration"),
    ("SELECT pg_stat_reset()", "statistics that everyone's monitoring reads"),
    ("SELECT pg_drop_replication_slot('s')", "replication"),
    ("SELECT binary_upgrade_set_next_pg_type_oid(1)", "machinery"),
])
def test_dangerous_built_ins_are_refused_with_the_reason(sql, reason):
    verdict = classify(sql)
    assert reason in DEFAULT.refusal(verdict)


def test_the_policy_can_allow_functions_by_name_or_by_schema_and_name():
    by_name = RolePolicy(allowed_functions=frozenset({"total", "ts_rewrite"}))
    assert by_name.refusal(classify("SELECT total(x), app.total(x) FROM t")) == ""  # a name: any schema
    assert by_name.refusal(classify("SELECT ts_rewrite('a'::tsquery, 'SELECT 1')")) == ""
    qualified = RolePolicy(allowed_functions=frozenset({"app.total"}))
    assert qualified.refusal(classify("SELECT app.total(x) FROM t")) == ""
    assert "total()" in qualified.refusal(classify("SELECT total(x) FROM t"))  # unqualified: could be another
    assert "other.total()" in qualified.refusal(classify("SELECT other.total(x) FROM t"))
    assert "app.rank()" in qualified.refusal(classify("SELECT app.total(x), app.rank() OVER () FROM t"))
    assert RolePolicy(allow_functions=True).refusal(classify("SELECT app.anything(), dblink('a', 'b')")) == ""


def test_the_shipped_list_is_the_catalog_minus_the_deny_set():
    assert {"lower", "set_config", "current_setting", "pg_get_viewdef", "format_type"} <= builtins.ALLOWED_PG_CATALOG
    for name in ("ts_rewrite", "ts_stat", "query_to_xml", "pg_terminate_backend", "pg_ls_waldir", "lo_export"):
        assert name in builtins.PG_CATALOG and name not in builtins.ALLOWED_PG_CATALOG, name
    assert builtins.ALLOWED_PG_CATALOG <= builtins.PG_CATALOG | builtins.NEWER_FUNCTIONS
    assert all(not builtins.denial(name) for name in builtins.ALLOWED_PG_CATALOG)


def test_server_files_and_programs_through_copy_are_code():
    for sql in ("COPY items TO '/tmp/items'", "COPY items FROM '/etc/passwd'", "COPY items FROM PROGRAM 'id'"):
        assert "COPY to or from a server file or program" in DEFAULT.refusal(classify(sql)), sql
        assert RolePolicy(allow_functions=True).refusal(classify(sql)) == ""
    assert DEFAULT.refusal(classify("COPY items TO STDOUT (FORMAT csv)")) == ""

