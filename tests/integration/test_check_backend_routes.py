"""pgproxy check-backend covers every route out of an identity, against a PostgreSQL of its own
(so that "every database" means only the ones made here): every database that allows
connections, TEMP for transaction-pooled roles, functions mapped roles may execute that run
SQL text or change the role or settings, SECURITY DEFINER functions without a pinned
search_path, and backend.login = per_role: logins as each mapped role (peer, cert, password)
with the pg_hba.conf / pg_ident.conf lines it prints, and memberships that SET ROLE reaches.

Each unsafe setup is reported with its fix; applying the printed fix makes it clean again."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from pgproxy.pgcluster import PgCluster
from pgproxy.signed_identity import generate_key, install_sql
from tests.support import certs
from tests.support.proxy import to_toml

CLIENT_CN = "pgproxy-backend"
POOL_SQL = """
SET password_encryption = 'scram-sha-256';
CREATE ROLE cbx_pool LOGIN NOINHERIT PASSWORD 'pool-secret';
REVOKE TEMPORARY ON DATABASE postgres FROM PUBLIC;
"""
# The README's setup in two databases, with functions that are not escape routes: plain
# code, a SECURITY DEFINER function with a pinned search_path, a function that runs SQL text
# but that no mapped role may execute, an extension's C functions, and pgproxy.person().
CLEAN_SQL = """
CREATE ROLE cbx_reader NOLOGIN;
CREATE ROLE cbx_writer NOLOGIN;
GRANT cbx_reader, cbx_writer TO cbx_pool;
CREATE DATABASE cbx_app;
CREATE DATABASE cbx_other;
REVOKE TEMPORARY ON DATABASE cbx_app FROM PUBLIC;
REVOKE TEMPORARY ON DATABASE cbx_other FROM PUBLIC;
\\c cbx_app
CREATE TABLE notes (id int, author text);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON notes USING (author = current_setting('pgproxy.user', true));
GRANT SELECT ON notes TO cbx_reader, cbx_writer;
CREATE FUNCTION public.add(a int, b int) RETURNS int LANGUAGE plpgsql AS $$BEGIN RETURN a + b; END$$;
CREATE FUNCTION public.whoami() RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp AS $$SELECT current_setting('pgproxy.user', true)$$;
CREATE FUNCTION public.admin_sql(q text) RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE q; END$$;
REVOKE EXECUTE ON FUNCTION public.admin_sql(text) FROM PUBLIC;
CREATE EXTENSION pg_trgm;
"""
DROP_SQL = """
DROP DATABASE IF EXISTS cbx_app WITH (FORCE);
DROP DATABASE IF EXISTS cbx_other WITH (FORCE);
DROP ROLE IF EXISTS cbx_reader;
DROP ROLE IF EXISTS cbx_writer;
DROP ROLE IF EXISTS cbx_mid;
"""
# pg_hba.conf around the lines a test adds: the superuser and the pool role log in as
# always; any other login that the added lines do not allow is rejected (never trusted).
HBA_BEFORE = ["local all postgres trust", "local all cbx_pool scram-sha-256",
              "host all cbx_pool 127.0.0.1/32 scram-sha-256"]
HBA_AFTER = ["local all all reject", "host all all 127.0.0.1/32 reject"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A PostgreSQL with TLS that verifies client certificates (for cert logins)."""
    directory = tmp_path_factory.mktemp("check-backend-routes")
    authority = certs.TestCA(directory)
    server = authority.issue("localhost", ["localhost", "127.0.0.1"], stem="postgres")
    authority.client = authority.issue(CLIENT_CN, [CLIENT_CN], stem="client")
    pg = PgCluster()
    for source, name in ((server[0], "server.pem"), (server[1], "server.key"), (authority.path, "ca.pem")):
        shutil.copy(source, pg.dir / name)
        (pg.dir / name).chmod(0o600)
        pg.give(pg.dir / name)
    pg.settings.update({"ssl": "on", "ssl_cert_file": f"'{pg.dir / 'server.pem'}'",
                        "ssl_key_file": f"'{pg.dir / 'server.key'}'", "ssl_ca_file": f"'{pg.dir / 'ca.pem'}'"})
    pg.start()
    pg.psql(POOL_SQL)
    pg.authority = authority
    pg.hba = (pg.data / "pg_hba.conf").read_text()
    yield pg
    pg.stop()


@pytest.fixture
def setup(cluster):
    """The clean setup, made for one test and dropped after it (and initdb's pg_hba.conf back)."""
    cluster.psql(CLEAN_SQL)
    cluster.psql(install_sql(generate_key()), database="cbx_app")
    yield cluster
    (cluster.data / "pg_hba.conf").write_text(cluster.hba)
    (cluster.data / "pg_ident.conf").write_text("")
    _reload(cluster)
    cluster.psql(DROP_SQL)


def _reload(cluster) -> None:
    """Reload the configuration and wait until new sessions see it."""
    before = cluster.psql("SELECT pg_conf_load_time()")
    cluster.psql("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while cluster.psql("SELECT pg_conf_load_time()") == before:
        assert time.monotonic() < deadline, "PostgreSQL did not reload its configuration"
        time.sleep(0.05)


def _set_hba(cluster, hba: list[str], ident: list[str] = ()) -> None:
    (cluster.data / "pg_hba.conf").write_text("\n".join([*HBA_BEFORE, *hba, *HBA_AFTER]) + "\n")
    (cluster.data / "pg_ident.conf").write_text("".join(f"{line}\n" for line in ident))
    _reload(cluster)


class Checked:
    def __init__(self, done: subprocess.CompletedProcess) -> None:
        self.code, self.out = done.returncode, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        # (problem line, its fix) for every finding
        self.findings = [(line, lines[i + 1].removeprefix("    fix: ")) for i, line in enumerate(lines)
                         if line.startswith("UNSAFE")]
        self.hba = [line.split(":", 1)[1].strip() for line in lines if line.startswith("    pg_hba.conf:")]
        self.ident = [line.split(":", 1)[1].strip() for line in lines if line.startswith("    pg_ident.conf:")]

    def fixes_for(self, text: str) -> list[str]:
        return [fix for problem, fix in self.findings if text in problem]


def _check(cluster, tmp_path, **backend) -> Checked:
    (tmp_path / "pool-password").write_text("pool-secret\n")
    config = {"backend": {"host": "127.0.0.1", "port": cluster.port, "user": "cbx_pool",
                          "password_file": str(tmp_path / "pool-password"), "databases": [], **backend},
              "auth": {"jwt": {"issuer": "https://idp.example.org", "audience": "pgproxy"}},
              "audit": {"file": str(tmp_path / "audit.jsonl")},
              "roles": [{"any": True, "role": "cbx_reader"}, {"group": "writers", "role": "cbx_writer"}]}
    path = tmp_path / "pgproxy.toml"
    path.write_text(to_toml(config))
    return Checked(subprocess.run([sys.executable, "-m", "pgproxy", "check-backend", "-c", str(path)],
                                  capture_output=True, text=True, timeout=60))


# --- every database ---------------------------------------------------------------

def test_the_clean_setup_in_every_database_reports_nothing(setup, tmp_path):
    done = _check(setup, tmp_path)
    assert done.code == 0 and not done.findings, done.out
    # Every database that allows connections and is not a template; template1 is one.
    assert "in cbx_app, cbx_other, postgres" in done.out
    assert "note: backend.login = pool_role" in done.out  # a recommendation, not a finding


def test_a_problem_only_in_a_database_not_listed_is_found_when_databases_is_empty(setup, tmp_path):
    setup.psql("GRANT CREATE ON SCHEMA public TO cbx_reader", database="cbx_other")
    done = _check(setup, tmp_path)
    assert done.code == 1, done.out
    assert done.findings == [("UNSAFE [cbx_other] mapped role cbx_reader may CREATE in schema public",
                              "REVOKE CREATE ON SCHEMA public FROM cbx_reader (and from PUBLIC)")], done.out
    # Listing only cbx_app: clients can no longer ask for cbx_other, and it is not checked.
    assert _check(setup, tmp_path, databases=["cbx_app"]).code == 0


def test_a_database_the_pool_role_cannot_log_in_to_is_a_finding_and_the_others_are_checked(setup, tmp_path):
    setup.psql("REVOKE CONNECT ON DATABASE cbx_other FROM PUBLIC; "
               "GRANT TEMPORARY ON DATABASE cbx_app TO cbx_reader")
    done = _check(setup, tmp_path)
    assert done.code == 1, done.out
    assert any("[cbx_other] cannot log in to database cbx_other as pool role cbx_pool, so it was not checked"
               in problem and "permission denied for database" in problem for problem, _ in done.findings), done.out
    assert done.fixes_for("[cbx_app] mapped role cbx_reader may create temporary objects"), done.out
    assert "databases checked: cbx_app, postgres" in done.out
    # Only unreachable databases: nothing was checked, which is not "nothing unsafe".
    only = _check(setup, tmp_path, databases=["cbx_other", "cbx_missing"])
    assert only.code == 2 and "error: cannot log in to database cbx_missing" in only.out, only.out


# --- TEMP under transaction pooling -------------------------------------------------

@pytest.mark.parametrize("modes", [{"pool_mode": "transaction"},
                                   {"database_pool_modes": {"cbx_app": "transaction"}},
                                   {"role_pool_modes": {"cbx_reader": "transaction"}}],
                         ids=["pool_mode", "database_pool_modes", "role_pool_modes"])
def test_temp_for_a_transaction_pooled_role_is_reported_with_its_fix(setup, tmp_path, modes):
    setup.psql("GRANT TEMPORARY ON DATABASE cbx_app TO cbx_reader")
    done = _check(setup, tmp_path, **modes)
    assert done.code == 1, done.out
    assert done.findings == [
        ("UNSAFE [cbx_app] mapped role cbx_reader may create temporary objects in cbx_app, where it is "
         "transaction-pooled: temporary objects leak between people sharing a connection",
         "REVOKE TEMPORARY ON DATABASE cbx_app FROM PUBLIC, cbx_reader")], done.out
    setup.psql(done.findings[0][1])
    assert _check(setup, tmp_path, **modes).code == 0


def test_temp_for_a_session_pooled_role_keeps_its_finding(setup, tmp_path):
    setup.psql("GRANT TEMPORARY ON DATABASE cbx_app TO cbx_reader")
    # cbx_writer is transaction-pooled, cbx_reader (the one with TEMP) in session mode.
    done = _check(setup, tmp_path, database_pool_modes={"cbx_app": "transaction"},
                  role_pool_modes={"cbx_reader": "session"})
    assert done.findings == [("UNSAFE [cbx_app] mapped role cbx_reader may create temporary objects in cbx_app",
                              "REVOKE TEMPORARY ON DATABASE cbx_app FROM cbx_reader (and from PUBLIC)")], done.out


# --- functions mapped roles may execute ---------------------------------------------

FUNCTIONS = [  # (CREATE, kind and signature, why)
    ("CREATE FUNCTION public.run_sql(q text) RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE q; END$$",
     "FUNCTION public.run_sql(q text)", "runs dynamic SQL (EXECUTE)"),
    ("CREATE FUNCTION public.become(who text) RETURNS text LANGUAGE sql "
     "AS $$SELECT set_config('pgproxy.user', who, false)$$",
     "FUNCTION public.become(who text)", "changes settings with set_config"),
    ("CREATE PROCEDURE public.elevate() LANGUAGE plpgsql AS $$BEGIN SET ROLE cbx_writer; END$$",
     "PROCEDURE public.elevate()", "changes the role (SET ROLE / RESET ROLE)"),
    ("CREATE FUNCTION public.as_xml(q text) RETURNS xml LANGUAGE sql "
     "BEGIN ATOMIC SELECT query_to_xml(q, true, false, ''); END",  # kept parsed, not as text
     "FUNCTION public.as_xml(q text)", "runs SQL text it is given (query_to_xml)"),
    ("CREATE FUNCTION public.config_by_name(text, text, boolean) RETURNS text LANGUAGE internal "
     "AS 'set_config_by_name'",
     "FUNCTION public.config_by_name(text, text, boolean)", "runs C code (language internal)"),
]


@pytest.mark.parametrize("create, signature, why", FUNCTIONS, ids=[f[1] for f in FUNCTIONS])
def test_a_function_granted_to_a_mapped_role_that_can_leave_the_identity_is_reported(
        setup, tmp_path, create, signature, why):
    kind, name = signature.split(" ", 1)
    setup.psql(f"{create}; REVOKE EXECUTE ON {kind} {name} FROM PUBLIC; GRANT EXECUTE ON {kind} {name} TO cbx_reader",
               database="cbx_app")
    done = _check(setup, tmp_path)
    assert done.code == 1, done.out
    assert len(done.findings) == 1, done.out
    problem, fix = done.findings[0]
    assert problem.startswith(f"UNSAFE [cbx_app] {kind.lower()} {name} (owner postgres, ")
    assert "may be executed by mapped role cbx_reader and " in problem and why in problem
    assert fix == f"REVOKE EXECUTE ON {kind} {name} FROM PUBLIC, cbx_reader"
    setup.psql(fix, database="cbx_app")
    assert _check(setup, tmp_path).code == 0


@pytest.mark.parametrize("alter, why", [
    ("CREATE FUNCTION public.lookup() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'",
     "does not set search_path"),
    ("CREATE FUNCTION public.lookup() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = public "
     "AS 'SELECT 1'", "has search_path = public, which does not end with pg_temp"),
])
def test_a_security_definer_function_without_a_pinned_search_path_is_reported(setup, tmp_path, alter, why):
    setup.psql(alter, database="cbx_app")
    done = _check(setup, tmp_path)
    assert done.findings == [
        (f"UNSAFE [cbx_app] SECURITY DEFINER function public.lookup() (owner postgres) may be executed by mapped "
         f"roles cbx_reader, cbx_writer and {why}: it runs with postgres's privileges and finds the caller's "
         "objects first", "ALTER FUNCTION public.lookup() SET search_path = pg_catalog, pg_temp")], done.out
    setup.psql(done.findings[0][1], database="cbx_app")
    assert _check(setup, tmp_path).code == 0


def test_pgproxy_person_is_checked_like_any_function(setup, tmp_path):
    """It is clean because its search_path is pinned, not because it is skipped."""
    setup.psql("ALTER FUNCTION pgproxy.person() RESET search_path", database="cbx_app")
    done = _check(setup, tmp_path)
    assert done.fixes_for("SECURITY DEFINER function pgproxy.person()") == [
        "ALTER FUNCTION pgproxy.person() SET search_path = pg_catalog, pg_temp"], done.out


def test_dblink_is_reported(setup, tmp_path):
    setup.psql("CREATE EXTENSION dblink", database="cbx_other")
    done = _check(setup, tmp_path)
    assert done.fixes_for("[cbx_other] extension dblink is installed and mapped roles cbx_reader, cbx_writer") == [
        "DROP EXTENSION dblink (or REVOKE EXECUTE on each of its functions FROM PUBLIC, cbx_reader, cbx_writer)"]
    setup.psql("DROP EXTENSION dblink", database="cbx_other")
    assert _check(setup, tmp_path).code == 0


# --- backend.login = per_role -------------------------------------------------------

def _per_role_backend(cluster, method: str, tmp_path) -> dict:
    if method == "peer":
        return {"login": "per_role", "host": str(cluster.socket_dir)}
    if method == "cert":
        cert, key = cluster.authority.client
        return {"login": "per_role", "sslmode": "verify-full", "sslrootcert": str(cluster.authority.path),
                "sslcert": str(cert), "sslkey": str(key)}
    secrets = tmp_path / "role-secrets.toml"
    secrets.write_text('cbx_reader = "reader-secret"\ncbx_writer = "writer-secret"\n')
    secrets.chmod(0o600)
    return {"login": "per_role", "role_secrets_file": str(secrets)}


def _psql_as(cluster, role: str, backend: dict, tmp_path) -> str:
    """Log in as ``role`` the way pgproxy would, with psql: the lines work for libpq too."""
    if "sslcert" in backend:
        dsn = (f"host=127.0.0.1 port={cluster.port} sslmode=verify-full sslrootcert={backend['sslrootcert']} "
               f"sslcert={backend['sslcert']} sslkey={backend['sslkey']}")
    elif backend.get("host", "").startswith("/"):
        dsn = f"host={backend['host']} port={cluster.port}"
    else:
        dsn = f"host=127.0.0.1 port={cluster.port} password=reader-secret"
    done = subprocess.run(["psql", "-X", "-A", "-t", "-c", "SELECT session_user", f"{dsn} user={role} dbname=cbx_app"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("method", ["peer", "cert", "password"])
def test_per_role_logins_print_the_lines_that_make_them_work(setup, tmp_path, method):
    backend = _per_role_backend(setup, method, tmp_path)
    setup.psql("SET password_encryption = 'scram-sha-256'; ALTER ROLE cbx_reader LOGIN PASSWORD 'reader-secret'")
    _set_hba(setup, [])  # nothing lets the mapped roles in yet
    done = _check(setup, tmp_path, **backend)
    assert done.code == 1, done.out
    reader = done.fixes_for("mapped role cbx_reader cannot log in to cbx_app, cbx_other, postgres")
    assert reader == ["add the pg_hba.conf and pg_ident.conf lines below, then SELECT pg_reload_conf()"], done.out
    writer = done.fixes_for("mapped role cbx_writer cannot log in to cbx_app, cbx_other, postgres")
    assert writer == ["ALTER ROLE cbx_writer LOGIN"], done.out
    expected_hba = {"peer": "local all cbx_reader,cbx_writer peer map=pgproxy",
                    "cert": "hostssl all cbx_reader,cbx_writer 127.0.0.1/32 cert map=pgproxy",
                    "password": "host all cbx_reader,cbx_writer 127.0.0.1/32 scram-sha-256"}[method]
    assert done.hba == [expected_hba], done.out
    if method == "password":
        assert done.ident == []
    else:
        name = CLIENT_CN if method == "cert" else _os_user()
        assert done.ident == [f"pgproxy {name} cbx_reader", f"pgproxy {name} cbx_writer"], done.out

    _set_hba(setup, done.hba, done.ident)  # the printed lines, as printed
    assert _psql_as(setup, "cbx_reader", backend, tmp_path) == "cbx_reader"
    again = _check(setup, tmp_path, **backend)
    assert [fix for _, fix in again.findings] == ["ALTER ROLE cbx_writer LOGIN"], again.out
    setup.psql("ALTER ROLE cbx_writer LOGIN PASSWORD 'writer-secret'")
    clean = _check(setup, tmp_path, **backend)
    assert clean.code == 0 and not clean.findings, clean.out
    assert clean.hba == [expected_hba]  # still printed: it is guidance, not a finding
    assert "note: backend.login = pool_role" not in clean.out


def test_per_role_without_a_password_for_a_role_names_the_secrets_file(setup, tmp_path):
    backend = _per_role_backend(setup, "password", tmp_path)
    (tmp_path / "role-secrets.toml").write_text('cbx_reader = "reader-secret"\n')
    setup.psql("SET password_encryption = 'scram-sha-256'; ALTER ROLE cbx_reader LOGIN PASSWORD 'reader-secret'; "
               "ALTER ROLE cbx_writer LOGIN PASSWORD 'writer-secret'")
    done = _check(setup, tmp_path, **backend)  # initdb's pg_hba.conf: scram-sha-256 on loopback
    assert [fix for _, fix in done.findings] == [
        "put cbx_writer's password in backend.role_secrets_file (and the pg_hba.conf line below)"], done.out


def _os_user() -> str:
    import os
    import pwd
    return pwd.getpwuid(os.geteuid()).pw_name


MEMBERSHIPS = [  # (SQL, the finding, its fix)
    ("GRANT cbx_writer TO cbx_reader", "mapped role cbx_reader is a member of cbx_writer",
     "REVOKE cbx_writer FROM cbx_reader"),
    ("CREATE ROLE cbx_mid NOLOGIN; GRANT cbx_writer TO cbx_mid; GRANT cbx_mid TO cbx_reader",
     "mapped role cbx_reader is a member of cbx_writer", "REVOKE cbx_mid FROM cbx_reader"),
    # per_role needs no grants to the pool role (which would make the membership circular)
    ("REVOKE cbx_reader, cbx_writer FROM cbx_pool; GRANT cbx_pool TO cbx_writer",
     "mapped role cbx_writer is a member of cbx_pool, the pool role",
     "REVOKE cbx_pool FROM cbx_writer"),
]


@pytest.mark.parametrize("grant, reported, fix", MEMBERSHIPS, ids=["direct", "inherited", "pool role"])
def test_per_role_a_mapped_role_that_is_a_member_of_another_is_reported(setup, tmp_path, grant, reported, fix):
    backend = _per_role_backend(setup, "peer", tmp_path)
    setup.psql("ALTER ROLE cbx_reader LOGIN; ALTER ROLE cbx_writer LOGIN")
    _set_hba(setup, ["local all cbx_reader,cbx_writer peer map=pgproxy"],
             [f"pgproxy {_os_user()} cbx_reader", f"pgproxy {_os_user()} cbx_writer"])
    assert _check(setup, tmp_path, **backend).code == 0
    setup.psql(grant)
    done = _check(setup, tmp_path, **backend)
    assert done.code == 1, done.out
    assert [(p.removeprefix("UNSAFE [cluster] ").split(":")[0], f) for p, f in done.findings] == [(reported, fix)]
    assert "SET ROLE" in done.findings[0][0]
    # The pool role logs in and SET ROLEs: there the guard, not membership, keeps roles apart.
    assert not _check(setup, tmp_path).findings
    setup.psql(fix)
    assert _check(setup, tmp_path, **backend).code == 0
