"""The function allow-list against the live catalog of the PostgreSQL the tests run: every
built-in that runs SQL given as text is refused, and every name the list allows exists."""

from __future__ import annotations

from pgproxy.policy import builtins
from pgproxy.policy.guard import RolePolicy, classify

# Built-ins with a text argument that is SQL: by the argument's name, and the families
# known to run SQL (ts_rewrite's SQL argument has no name in pg_proc).
SQL_TEXT_FUNCTIONS = r"""
SELECT DISTINCT p.proname, p.pronargs
FROM pg_catalog.pg_proc p
CROSS JOIN LATERAL unnest(coalesce(p.proallargtypes, p.proargtypes::oid[]), p.proargnames,
                          coalesce(p.proargmodes, array_fill('i'::"char", ARRAY[p.pronargs]))) AS a(type, name, mode)
WHERE p.pronamespace IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  AND a.mode IN ('i', 'b', 'v') AND a.type = 'text'::regtype
  AND a.name IN ('query', 'sql', 'sqlquery', 'select', 'statement', 'command', 'stmt')
UNION
SELECT proname, pronargs FROM pg_catalog.pg_proc
WHERE pronamespace = 'pg_catalog'::regnamespace AND proname ~ '^(query|cursor)_to_xml|^ts_rewrite$|^ts_stat$'
ORDER BY 1, 2
"""


def _rows(database, sql: str) -> list[list[str]]:
    out = database.psql(sql, database="demo")
    return [line.split("|") for line in out.splitlines() if line]


def test_every_built_in_that_runs_sql_text_is_refused(database):
    found = [(name, int(nargs)) for name, nargs in _rows(database, SQL_TEXT_FUNCTIONS)]
    names = {name for name, _ in found}
    assert {"query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml",
            "cursor_to_xmlschema", "ts_rewrite", "ts_stat"} <= names, names
    for name, nargs in found:
        arguments = ", ".join(["'SELECT set_config(''role'', ''other_role'', false)'"] * max(nargs, 1))
        for call in (f"SELECT {name}({arguments})", f"SELECT * FROM pg_catalog.{name}({arguments})"):
            reason = RolePolicy().refusal(classify(call))
            assert f"{name}()" in reason and "is not allowed" in reason, (call, reason)


def test_every_allowed_name_is_in_the_live_catalog_or_a_documented_newer_built_in(database):
    live = {tuple(row) for row in _rows(database, "SELECT DISTINCT n.nspname, p.proname FROM pg_catalog.pg_proc p "
                                                  "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
                                                  "WHERE n.nspname IN ('pg_catalog', 'information_schema')")}
    catalog = {name for schema, name in live if schema == "pg_catalog"}
    missing = builtins.ALLOWED_PG_CATALOG - catalog - builtins.NEWER_FUNCTIONS
    assert not missing, f"allowed but not built in: {sorted(missing)}"
    assert builtins.ALLOWED_INFORMATION_SCHEMA <= {name for schema, name in live if schema == "information_schema"}
    major = database.psql("SHOW server_version_num", database="demo")[:2]
    if major == builtins.CATALOG_VERSION.split(".")[0]:
        # The same version the list was made from: it is complete (else run scripts/gen-builtin-functions).
        assert catalog == set(builtins.PG_CATALOG)
        assert not catalog & builtins.NEWER_FUNCTIONS, "NEWER_FUNCTIONS lists names this version has"


def test_denied_names_are_real_built_ins(database):
    catalog = {row[0] for row in _rows(database, "SELECT DISTINCT proname FROM pg_catalog.pg_proc "
                                                 "WHERE pronamespace = 'pg_catalog'::regnamespace")}
    older_or_newer = {"pg_start_backup", "pg_stop_backup", "pg_log_standby_snapshot", "pg_sync_replication_slots"}
    assert set(builtins.DENIED) - catalog <= older_or_newer  # a typo here would deny nothing

