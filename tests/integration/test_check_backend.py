"""pgproxy check-backend: each unsafe database setup is reported with its fix; the setup
the README recommends reports nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.proxy import to_toml

SAFE_SETUP = """
CREATE ROLE cb_pool LOGIN NOINHERIT PASSWORD 'cb-secret';
CREATE ROLE cb_reader NOLOGIN;
GRANT cb_reader TO cb_pool;
CREATE DATABASE cb_app;
REVOKE TEMPORARY ON DATABASE cb_app FROM PUBLIC;
\\c cb_app
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
CREATE TABLE notes (id int, author text);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON notes USING (author = current_setting('pgproxy.user', true));
GRANT SELECT ON notes TO cb_reader;
"""

# (SQL that makes the setup unsafe, the line check-backend must print, SQL that undoes it)
UNSAFE = [
    ("ALTER ROLE cb_pool SUPERUSER", "pool role cb_pool is a superuser", "ALTER ROLE cb_pool NOSUPERUSER"),
    ("ALTER ROLE cb_pool BYPASSRLS", "pool role cb_pool has BYPASSRLS", "ALTER ROLE cb_pool NOBYPASSRLS"),
    ("ALTER ROLE cb_pool CREATEROLE", "pool role cb_pool has CREATEROLE", "ALTER ROLE cb_pool NOCREATEROLE"),
    ("ALTER ROLE cb_pool INHERIT", "pool role cb_pool INHERITs", "ALTER ROLE cb_pool NOINHERIT"),
    ("ALTER ROLE cb_reader SUPERUSER", "mapped role cb_reader is a superuser", "ALTER ROLE cb_reader NOSUPERUSER"),
    ("ALTER ROLE cb_reader BYPASSRLS", "mapped role cb_reader has BYPASSRLS", "ALTER ROLE cb_reader NOBYPASSRLS"),
    ("ALTER ROLE cb_reader CREATEROLE", "mapped role cb_reader has CREATEROLE", "ALTER ROLE cb_reader NOCREATEROLE"),
    ("GRANT TEMPORARY ON DATABASE cb_app TO PUBLIC", "TEMP on database cb_app is granted to PUBLIC",
     "REVOKE TEMPORARY ON DATABASE cb_app FROM PUBLIC"),
    ("GRANT TEMPORARY ON DATABASE cb_app TO cb_reader", "mapped role cb_reader may create temporary objects",
     "REVOKE TEMPORARY ON DATABASE cb_app FROM cb_reader"),
    ("GRANT CREATE ON SCHEMA public TO cb_reader", "mapped role cb_reader may CREATE in schema public",
     "REVOKE CREATE ON SCHEMA public FROM cb_reader"),
    ("ALTER TABLE notes OWNER TO cb_reader", "table notes has row-level security that its owner cb_reader",
     "ALTER TABLE notes OWNER TO postgres"),
]


@pytest.fixture(scope="module")
def checked_database(database, tmp_path_factory):
    database.psql(SAFE_SETUP)
    directory = tmp_path_factory.mktemp("check-backend")
    (directory / "pool-password").write_text("cb-secret\n")
    config = {"backend": {"host": database.host, "port": database.port, "user": "cb_pool",
                          "password_file": str(directory / "pool-password"), "databases": ["cb_app"]},
              "auth": {"jwt": {"issuer": "https://idp.example.org", "audience": "pgproxy"}},
              "audit": {"file": str(directory / "audit.jsonl")},
              "roles": [{"any": True, "role": "cb_reader"}]}
    path = directory / "pgproxy.toml"
    path.write_text(to_toml(config))
    yield path
    database.psql("DROP DATABASE cb_app; DROP ROLE cb_pool; DROP ROLE cb_reader;")


def _check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgproxy", "check-backend", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_the_recommended_setup_reports_nothing(checked_database):
    done = _check(checked_database)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok: no unsafe setting found") and "UNSAFE" not in done.stdout


@pytest.mark.parametrize("unsafe, reported, undo", UNSAFE, ids=[u[1] for u in UNSAFE])
def test_each_unsafe_setup_is_reported_with_its_fix(checked_database, database, unsafe, reported, undo):
    database.psql(unsafe, database="cb_app")
    try:
        done = _check(checked_database)
    finally:
        database.psql(undo, database="cb_app")
    assert done.returncode == 1, done.stdout + done.stderr
    problems = [line for line in done.stdout.splitlines() if line.startswith("UNSAFE")]
    assert any(reported in problem for problem in problems), done.stdout
    if "superuser" not in reported:  # a superuser can do everything, so more findings follow from it
        # TEMP for PUBLIC also gives it to every mapped role: reported as both.
        assert len(problems) == (2 if "PUBLIC" in reported else 1), done.stdout
    assert "fix:" in done.stdout
