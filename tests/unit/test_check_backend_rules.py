"""check-backend's rules on text: function bodies, search_path settings, pool modes, the
pg_hba.conf / pg_ident.conf guidance, and DataRow decoding. The queries are tested against
PostgreSQL in tests/integration/test_check_backend*.py."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from pgproxy import checkbackend as cb
from pgproxy.config import parse_config
from pgproxy.protocol import messages as msg
from pgproxy.server import ProxyServer

MINIMAL = {"backend": {"user": "pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "pgproxy"}},
           "audit": {"file": "/tmp/audit.jsonl"}}


@pytest.mark.parametrize("body, why", [
    ("BEGIN EXECUTE q; END", "dynamic SQL (EXECUTE)"),
    ("BEGIN RETURN QUERY execute format('SELECT %I', c); END", "dynamic SQL (EXECUTE)"),
    ("SELECT set_config('pgproxy.user', $1, false)", "set_config"),
    ("SELECT pg_catalog.SET_CONFIG('role', 'x', true)", "set_config"),
    ("BEGIN SET ROLE admin; END", "SET ROLE"),
    ("BEGIN SET LOCAL ROLE admin; END", "SET ROLE"),
    ("BEGIN\n  RESET\n  ROLE; END", "RESET ROLE"),
    ("BEGIN SET SESSION AUTHORIZATION admin; END", "SET SESSION AUTHORIZATION"),
    ("BEGIN SET session SESSION AUTHORIZATION admin; END", "SET SESSION AUTHORIZATION"),
    ("BEGIN RESET SESSION AUTHORIZATION; END", "SET SESSION AUTHORIZATION"),
    ("BEGIN SET pgproxy.user = 'bob'; END", "pgproxy's identity settings"),
    ("BEGIN SET LOCAL \"pgproxy.groups\" TO '{admins}'; END", "pgproxy's identity settings"),
    ("BEGIN RESET ALL; END", "RESET ALL"),
    ("SELECT * FROM dblink('dbname=x', $1) AS t(a int)", "dblink"),
    ("SELECT public.dblink_exec($1)", "dblink"),
    ("SELECT query_to_xml($1, true, false, '')", "query_to_xml"),
    ("SELECT query_to_xml_and_xmlschema($1, true, false, '')", "query_to_xml"),
    ("SELECT * FROM ts_stat($1)", "ts_stat"),
    ("SELECT ts_rewrite('a'::tsquery, $1)", "ts_rewrite"),
])
@pytest.mark.parametrize("language", ["plpgsql", "sql"])
def test_bodies_that_run_sql_text_or_change_role_or_settings_are_named(body, why, language):
    reasons = cb.body_reasons(language, body)
    assert len(reasons) == 1 and why in reasons[0], reasons


@pytest.mark.parametrize("body", [
    "BEGIN RETURN a + b; END",
    "SELECT current_setting('pgproxy.user', true)",  # reading the identity is what policies do
    "BEGIN PERFORM 1; SET search_path = pg_catalog; END",  # a setting that is not the role or identity
    "SELECT executed_at, reset_at, roles FROM jobs",  # words that only contain the keywords
    "SELECT my_set_config_log FROM t",
    None,
])
def test_bodies_that_do_none_of_that_are_not(body):
    assert cb.body_reasons("plpgsql", body) == []


def test_bodies_in_other_languages_are_not_read_but_the_language_is_the_reason():
    assert cb.body_reasons("plpython3u", "plpy.execute('SET ROLE admin')") == []
    assert "C code (language c)" in cb.language_reason("c", False)
    assert "C code (language internal)" in cb.language_reason("internal", False)
    assert "untrusted language plpython3u" in cb.language_reason("plpython3u", False)
    assert "language plperl, whose body check-backend does not read" in cb.language_reason("plperl", True)
    assert cb.language_reason("plpgsql", True) == cb.language_reason("sql", True) == ""


@pytest.mark.parametrize("value, pinned", [
    ("pg_catalog, pg_temp", True),
    ("pgproxy, pg_catalog, pg_temp", True),
    ("PG_CATALOG,PG_TEMP", True),          # unquoted names are folded to lower case
    (None, False),                         # not set: the caller's search_path
    ("", False),                           # empty: pg_temp is then searched first
    ("public", False),
    ("pg_catalog", False),                 # pg_temp not listed: searched first for tables
    ("pg_temp, pg_catalog", False),        # listed first
    ('"$user", public, pg_temp', False),   # the caller's own schema
    ('pg_catalog, "PG_TEMP"', False),      # a schema named PG_TEMP, not the temporary one
])
def test_a_search_path_is_pinned_when_it_ends_with_pg_temp(value, pinned):
    assert cb.search_path_pinned(value) is pinned


def test_pool_mode_is_chosen_as_the_server_chooses_it():
    cfg = parse_config({**MINIMAL, "backend": {"user": "pool", "pool_mode": "session",
                                               "database_pool_modes": {"app": "transaction"},
                                               "role_pool_modes": {"batch": "session", "web": "transaction"}}})
    server = SimpleNamespace(cfg=cfg)
    for database in ("app", "other"):
        for role in ("batch", "web", "reader"):
            assert cb.pool_mode_for(cfg, database, role) == ProxyServer.pool_mode_for(server, database, role)
    assert cb.pool_mode_for(cfg, "app", "reader") == "transaction"
    assert cb.pool_mode_for(cfg, "app", "batch") == "session"
    assert cb.pool_mode_for(cfg, "other", "web") == "transaction"
    assert cb.pool_mode_for(cfg, "other", "reader") == "session"


def test_login_mode_defaults_to_the_pool_role():
    assert cb.login_mode(parse_config(MINIMAL)) == "pool_role"
    assert cb.login_mode(parse_config({**MINIMAL, "backend": {"user": "pool", "login": "per_role"}})) == "per_role"


def test_the_method_follows_the_backend_section():
    def method(**backend):
        return cb.login_method(parse_config({**MINIMAL, "backend": {"user": "pool", **backend}}))
    assert method(host="/run/postgresql") == "peer"
    assert method(host="db.example.org", sslmode="require", sslcert="/c.pem", sslkey="/c.key") == "cert"
    assert method(host="db.example.org") == "password"


def test_guidance_lines_for_each_method():
    roles = ["emea_analyst", "Odd Role"]
    cert = cb.login_guidance("cert", ["app", "all"], roles, "10.0.0.5/32", "pgproxy-backend", "pgproxy", True)
    assert cert[:3] == [
        '    pg_hba.conf:   hostssl app,"all" emea_analyst,"Odd Role" 10.0.0.5/32 cert map=pgproxy',
        "    pg_ident.conf: pgproxy pgproxy-backend emea_analyst",
        '    pg_ident.conf: pgproxy pgproxy-backend "Odd Role"']
    peer = cb.login_guidance("peer", [], roles, "", "", "pgproxy", False)
    assert peer[:3] == ['    pg_hba.conf:   local all emea_analyst,"Odd Role" peer map=pgproxy',
                        "    pg_ident.conf: pgproxy pgproxy emea_analyst",
                        '    pg_ident.conf: pgproxy pgproxy "Odd Role"']
    password = cb.login_guidance("password", ["app"], ["emea_analyst"], "127.0.0.1/32", "", "x", False)
    assert password[0] == "    pg_hba.conf:   host app emea_analyst 127.0.0.1/32 scram-sha-256"
    assert not any("pg_ident.conf:" in line for line in password)
    assert cb.login_guidance("password", ["app"], ["r"], "::1/128", "", "x", True)[0].split()[1] == "hostssl"


def _data_row(*values) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return b"D" + struct.pack("!i", len(body) + 4) + body


def test_data_rows_are_decoded_with_nulls():
    assert msg.parse_data_row(_data_row(b"a", None, "é".encode(), b"")[5:]) == ["a", None, "é", ""]


def test_function_rows_become_findings_with_the_fix():
    rows = [["public.run(q text)", "function", "alice", "plpgsql", "true", "false", None, "BEGIN EXECUTE q; END",
             "reader"],
            ["public.lookup()", "function", "alice", "sql", "true", "true", None, "SELECT 1", "reader,writer"],
            ["pgproxy.person()", "function", "admin", "sql", "true", "true", "pg_catalog, pg_temp",
             "SELECT pg_catalog.current_setting('pgproxy.user', true)", "reader"],
            ["app.job()", "procedure", "alice", "plpgsql", "true", "false", None, "BEGIN COMMIT; END", "reader"]]
    found = cb._function_findings(rows)
    assert found == [
        ("function public.run(q text) (owner alice, plpgsql) may be executed by mapped role reader and runs "
         "dynamic SQL (EXECUTE)", "REVOKE EXECUTE ON FUNCTION public.run(q text) FROM PUBLIC, reader"),
        ("SECURITY DEFINER function public.lookup() (owner alice) may be executed by mapped roles reader, writer "
         "and does not set search_path: it runs with alice's privileges and finds the caller's objects first",
         "ALTER FUNCTION public.lookup() SET search_path = pg_catalog, pg_temp")]


def test_failed_logins_are_one_finding_per_role_and_fix():
    failed = [("app", "r1", "role \"r1\" is not permitted to log in", "ALTER ROLE r1 LOGIN"),
              ("other", "r1", "role \"r1\" is not permitted to log in", "ALTER ROLE r1 LOGIN"),
              ("other", "r2", "no pg_hba.conf entry", "add the lines")]
    found = cb._login_findings(failed)
    assert [(where, fix) for where, _, fix in found] == [("app, other", "ALTER ROLE r1 LOGIN"),
                                                          ("other", "add the lines")]
    assert found[0][1].startswith("mapped role r1 cannot log in to app, other (backend.login = per_role); app: ")
