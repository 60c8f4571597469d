"""set_config decided by the settings it can write: constants, or pg_settings.name filtered
to constants (what pg_dump sends); search_path keeps pg_catalog first."""

import pytest

from pgproxy.policy import guard
from pgproxy.policy.guard import RolePolicy, classify

DEFAULT = RolePolicy()
PG_DUMP = ("SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings "
           "WHERE name = 'restrict_nonsystem_relation_kind'")


@pytest.mark.parametrize("sql, settings", [
    (PG_DUMP, ("restrict_nonsystem_relation_kind",)),
    ("SELECT pg_catalog.set_config(name, 'x', false) FROM pg_catalog.pg_settings WHERE name = 'work_mem'",
     ("work_mem",)),
    ("SELECT set_config(s.name, 'x', false) FROM pg_settings s WHERE s.name IN ('work_mem', 'TimeZone') "
     "AND s.setting <> ''", ("timezone", "work_mem")),
    ("SELECT set_config(name, 'x', false) FROM pg_settings WHERE 'work_mem' = name", ("work_mem",)),
    ("SELECT upper(set_config(name, 'x', true)) FROM pg_settings WHERE name = 'work_mem'::text", ("work_mem",)),
    ("SELECT set_config(setting_name => 'work_mem', new_value => '8MB', is_local => false)", ("work_mem",)),
    ("SELECT set_config(new_value => '8MB', is_local => true, setting_name => 'work_mem')", ("work_mem",)),
    ("UPDATE pg_settings SET setting = '8MB' WHERE name = 'work_mem'", ("work_mem",)),
])
def test_settings_it_can_name_pass_and_are_known(sql, settings):
    verdict = classify(sql)
    assert DEFAULT.refusal(verdict) == "" and verdict.settings == settings


@pytest.mark.parametrize("sql", [
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'role'",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'ROLE'",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name IN ('work_mem', 'session_authorization')",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'pgproxy.user'",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' OR name = 'role'",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' OR true",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE NOT name <> 'work_mem'",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name LIKE 'rol%'",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE lower(name) = 'work_mem'",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' COLLATE \"C\"",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'::app.loose",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = ANY('{work_mem,role}')",
    "SELECT set_config(name, 'x', false) FROM pg_settings",
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = (SELECT 'role')",
    "SELECT set_config(name, 'x', false) FROM (SELECT 'role' AS name) pg_settings WHERE name = 'work_mem'",
    "SELECT set_config(name, 'x', false) FROM pg_settings, (SELECT 'role' AS name) r WHERE name = 'work_mem'",
    "SELECT set_config(name, 'x', false) FROM pg_settings JOIN pg_class ON true WHERE name = 'work_mem'",
    "SELECT set_config(name, 'x', false) FROM pg_settings AS s(setting, name) WHERE name = 'work_mem'",
    "SELECT set_config(r.name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
    "SELECT set_config(name, 'x', false) FROM app.pg_settings WHERE name = 'work_mem'",
    "SELECT set_config(name, 'x', false) FROM pg_temp.pg_settings WHERE name = 'work_mem'",
    "WITH pg_settings AS (SELECT 'role' AS name) "
    "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
    "SELECT (SELECT set_config(name, 'x', false) FROM (SELECT 'role' AS name) q) FROM pg_settings "
    "WHERE name = 'work_mem'",
    "SELECT 1 FROM pg_settings WHERE name = 'work_mem' AND set_config(name, 'x', false) IS NOT NULL",
    "SELECT set_config(VARIADIC ARRAY['role', 'x', 'f'])",
    "SELECT set_config(new_value => 'x', is_local => false, setting_name => 'role')",
    "SELECT set_config(setting_name => lower('ROLE'), new_value => 'x', is_local => false)",
    "SELECT set_config('role'::app.text, 'x', false)",
    "UPDATE pg_settings SET setting = 'x'",
    "UPDATE pg_settings SET setting = 'x' WHERE name = 'work_mem' OR true",
    "UPDATE pg_catalog.pg_settings SET setting = 'mallory' WHERE name = 'pgproxy.user'",
])
def test_names_it_cannot_know_or_that_are_protected_are_refused(sql):
    verdict = classify(sql)
    assert verdict.refusal, sql
    assert verdict.literal_sensitive  # never shared through the shape cache


@pytest.mark.parametrize("sql", [
    "CREATE TEMP VIEW pg_settings AS SELECT 'role' AS name", "CREATE TABLE pg_temp.pg_settings (name text)",
    "CREATE TEMP TABLE pg_settings AS SELECT 'role' AS name", "SELECT 'role' AS name INTO TEMP pg_settings",
    "CREATE MATERIALIZED VIEW pg_settings AS SELECT 1", "CREATE TEMP SEQUENCE pg_settings",
    "ALTER VIEW v RENAME TO pg_settings",
])
def test_no_relation_may_shadow_pg_settings(sql):
    assert "pg_settings" in classify(sql).refusal


def test_locked_settings_see_the_names_pg_settings_gives():
    policy = RolePolicy(locked_settings=frozenset({"statement_timeout"}))
    assert "fixed by policy" in policy.refusal(classify(
        "SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN ('statement_timeout', 'work_mem')"))
    assert "fixed by policy" in policy.refusal(classify(
        "UPDATE pg_settings SET setting = '0' WHERE name = 'statement_timeout'"))
    assert "fixed by policy" in policy.refusal(classify(
        "SELECT set_config(setting_name => 'statement_timeout', new_value => '0', is_local => false)"))
    assert policy.refusal(classify(PG_DUMP)) == ""


@pytest.mark.parametrize("sql, refused", [
    ("SET search_path = public", False), ("SET search_path = pg_catalog, public", False),
    ("SET search_path = pg_temp, pg_catalog, public", False), ('SET search_path = "$user", public', False),
    ("SET search_path TO DEFAULT", False), ("RESET search_path", False),
    ("SET search_path = 'PG_CATALOG', public", False),  # a string is one schema, as written: not pg_catalog
    ("SET search_path = public, pg_catalog", True), ("SET LOCAL search_path = public, PG_Catalog", True),
    ("SET search_path = 'public', 'pg_catalog'", True), ("SET search_path = \"$user\", pg_catalog", True),
    ("SELECT set_config('search_path', '', false)", False),
    ("SELECT set_config('search_path', 'pg_catalog, \"Public\"', false)", False),
    ("SELECT set_config('search_path', '\"pg_catalog\", public', false)", False),
    ("SELECT set_config('search_path', 'public,pg_catalog', false)", True),
    ("SELECT set_config('search_path', 'public, PG_CATALOG', false)", True),
    ("SELECT set_config('search_path', current_setting('search_path') || ', pg_catalog', false)", True),
    ("SELECT set_config('search_path', $1, false)", True),
    ("SELECT set_config(name, 'public, pg_catalog', false) FROM pg_settings WHERE name = 'search_path'", True),
    ("UPDATE pg_settings SET setting = 'public, pg_catalog' WHERE name = 'search_path'", True),
    ("ALTER ROLE me SET search_path = public, pg_catalog", True),
])
def test_search_path_keeps_pg_catalog_first(sql, refused):
    assert bool(classify(sql).refusal) is refused, classify(sql)


def test_the_shape_cache_never_shares_a_search_path_decision():
    assert classify("SET search_path = 'app', 'public'").refusal == ""
    assert classify("SET search_path = 'app', 'pg_catalog'").refusal  # same shape, other literal


@pytest.mark.parametrize("text, schemas", [
    ("", []), ("public", ["public"]), (' "$user" , Public ', ["$user", "public"]),
    ('"My ""Schema""", x', ['My "Schema"', "x"]), ("ÄPP", ["Äpp"]),
    ("a b", None), ('"open', None), ("a,,b", None), ("a,", None),
])
def test_list_settings_are_read_as_postgresql_reads_them(text, schemas):
    assert guard._split_identifiers(text) == schemas


@pytest.mark.parametrize("sql", ["ALTER SYSTEM SET \"pgproxy.user\" = 'mallory'", "ALTER SYSTEM SET work_mem = '1GB'",
                                 "ALTER SYSTEM RESET ALL"])
def test_alter_system_is_refused(sql):
    assert "ALTER SYSTEM is not allowed" in classify(sql).refusal
