"""Directory passwords against a real OpenLDAP slapd, and service accounts.

psql and PgJDBC log in with a directory password; groups map to roles; refusals for
wrong, empty and injected credentials, locked and denied accounts and an unreachable
directory; group removal and locking take effect within the cache TTL; another spelling
of a user name (case, spaces) is refused, or becomes the directory's spelling, so role
rules, pgproxy.user and operator blocks see one person."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import json

import ldap3
import psycopg
import pytest

from pgproxy.pgcluster import free_port
from tests.support.directory import PASSWORDS, SEARCH_DN, SEARCH_PASSWORD, SUFFIX, Slapd
from tests.support.ops import http_get, scrape, value
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import login_error

ROOT = Path(__file__).resolve().parents[2]
PGJDBC = Path("/usr/share/java/postgresql.jar")
INJECTIONS = ["*", ")(uid=*", "admin)(|(uid=*", "alice)(uid=*", "alice,ou=people"]


@pytest.fixture(scope="module")
def directory():
    if not shutil.which("slapd") and not Path("/usr/sbin/slapd").exists():
        pytest.fail("slapd is required: install Debian's slapd (.ci/run does)")
    slapd = Slapd().start()
    yield slapd
    slapd.stop()


def search_mode(directory: Slapd, tmp_path: Path, **ldap) -> dict:
    secret = tmp_path / "ldap-bind-password"
    secret.write_text(SEARCH_PASSWORD + "\n")
    dead = f"ldap://127.0.0.1:{free_port()}"  # failover: the first server is down
    return {"auth": {"ldap": {"urls": [dead, directory.url], "start_tls": True, "ca_file": str(directory.ca.path),
                              "timeout_s": 2.0, "bind_dn": SEARCH_DN, "bind_password_file": str(secret),
                              "search_base": f"ou=people,{SUFFIX}", **ldap}}}


def bind_mode(directory: Slapd, **ldap) -> dict:
    return {"auth": {"ldap": {"urls": [directory.url], "user_dn_template": f"uid={{username}},ou=people,{SUFFIX}",
                              "deny_filter": "(employeeType=contractor)", **ldap}}}


def psql(proxy: ProxyProcess, user: str, password: str, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", proxy.dsn(user), "-XAtc", sql], capture_output=True, text=True, timeout=30,
                          env=proxy.env(password))


def test_psql_and_pgjdbc_log_in_with_a_directory_password(base_config, directory, issuer, tmp_path):
    http_port = free_port()
    proxy = ProxyProcess(merge(base_config, merge(search_mode(directory, tmp_path),
                                                  {"http": {"listen": f"127.0.0.1:{http_port}"}})))
    try:
        done = psql(proxy, "alice", PASSWORDS["alice"],
                    "SELECT current_user, current_setting('pgproxy.user'), current_setting('pgproxy.auth_method')")
        assert done.returncode == 0, done.stderr + proxy.log()[-3000:]
        assert done.stdout.strip() == "emea_analyst|alice|ldap"

        if not PGJDBC.exists():
            pytest.fail("PgJDBC is required: install Debian's libpostgresql-jdbc-java (.ci/run does)")
        classes = tmp_path / "classes"
        subprocess.run(["javac", "-d", str(classes), str(ROOT / "tests/jdbc/WhoAmI.java")], check=True, timeout=120)
        jdbc = subprocess.run(["java", "-cp", f"{classes}:{PGJDBC}", "WhoAmI",
                               f"jdbc:postgresql://127.0.0.1:{proxy.port}/demo", "alice"],
                              capture_output=True, text=True, timeout=60, env=proxy.env(PASSWORDS["alice"]))
        assert jdbc.stdout.strip() == "emea_analyst|alice|ldap", jdbc.stdout + jdbc.stderr

        # A JWT-shaped password still goes to the IdP on the same proxy.
        with psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"])) as conn:
            assert conn.execute("SELECT current_setting('pgproxy.auth_method')").fetchone() == ("jwt",)

        for user in INJECTIONS:  # the filter is escaped: no entry, or not exactly one, is found
            assert login_error(proxy.port, user, PASSWORDS["admin"])["C"] == "28P01", user
        starts = [r for r in proxy.audit(lambda r: r.get("event") == "session_start" and r["user"] == "bob")
                  if r.get("event") == "session_start" and r["auth_method"] == "ldap"]
        assert len(starts) == 2 and {s["user"] for s in starts} == {"alice"}
        assert starts[0]["subject"] == f"uid=alice,ou=people,{SUFFIX}" and starts[0]["role"] == "emea_analyst"
        samples = scrape(http_port)
        assert value(samples, "pgproxy_directory_request_seconds_count", result="ok") == 1  # JDBC hit the cache
        assert value(samples, "pgproxy_auth_attempts_total", method="ldap", result="ok") == 2
        assert "the user search found 0 entries" in proxy.log()
        assert "no directory server usable" not in proxy.log()  # failover found the second server
        for secret in (*PASSWORDS.values(), SEARCH_PASSWORD):
            assert secret not in proxy.log() and secret not in proxy.audit_path.read_text()
    finally:
        assert proxy.stop() == 0


def test_refusals_say_why_in_the_log_and_never_show_the_password(base_config, directory, tmp_path):
    proxy = ProxyProcess(merge(base_config, bind_mode(directory)))
    try:
        assert login_error(proxy.port, "alice", "not-her-password")["C"] == "28P01"
        assert login_error(proxy.port, "alice", "")["C"] == "28P01"
        assert "empty password" in proxy.log()
        for user in INJECTIONS:
            assert login_error(proxy.port, user, PASSWORDS["admin"])["C"] == "28P01", user
        locked = login_error(proxy.port, "carol", PASSWORDS["carol"])
        assert locked["C"] == "28P01" and locked["M"] == 'authentication failed for user "carol"'
        denied = login_error(proxy.port, "dave", PASSWORDS["dave"])
        assert denied["C"] == "28000"
        assert "matches auth.ldap.deny_filter" in proxy.log()
        assert "directory refused the bind for uid=carol" in proxy.log()
        for secret in (*PASSWORDS.values(), "not-her-password"):
            assert secret not in proxy.log() and secret not in proxy.audit_path.read_text()
        records = proxy.audit(lambda r: r.get("event") == "auth_failure" and r["user"] == "dave")
        failures = [r for r in records if r.get("event") == "auth_failure"]
        assert len(failures) == 3 + len(INJECTIONS) + 1
    finally:
        assert proxy.stop() == 0


def test_an_unreachable_directory_means_no(base_config, directory):
    dead = [f"ldap://127.0.0.1:{free_port()}", f"ldap://127.0.0.1:{free_port()}"]
    proxy = ProxyProcess(merge(base_config, bind_mode(directory, urls=dead, timeout_s=1.0)))
    try:
        refused = login_error(proxy.port, "alice", PASSWORDS["alice"])
        assert refused["C"] == "28000" and refused["M"] == "authentication service unavailable"
        assert "no directory server usable" in proxy.log()
        assert PASSWORDS["alice"] not in proxy.log()
    finally:
        assert proxy.stop() == 0


def test_nested_groups_and_changes_take_effect_within_the_cache_ttl(base_config, directory):
    proxy = ProxyProcess(merge(base_config, bind_mode(
        directory, groups="search", group_search_base=f"ou=groups,{SUFFIX}", nested_groups=True, cache_ttl_s=1.0)))
    try:
        # bob is in amer_team, which is in sales_amer
        done = psql(proxy, "bob", PASSWORDS["bob"], "SELECT current_user")
        assert done.stdout.strip() == "amer_analyst", done.stderr

        assert psql(proxy, "erin", PASSWORDS["erin"], "SELECT current_user").stdout.strip() == "emea_analyst"
        directory.remove_from_group("erin", "sales_emea")
        time.sleep(1.2)  # the cache TTL
        removed = login_error(proxy.port, "erin", PASSWORDS["erin"])
        assert removed["C"] == "28000" and "no [[roles]] rule matches" in proxy.log()

        assert psql(proxy, "alice", PASSWORDS["alice"], "SELECT 1").returncode == 0
        directory.lock("alice")
        time.sleep(1.2)
        assert login_error(proxy.port, "alice", PASSWORDS["alice"])["C"] in ("28P01", "28000")
    finally:
        assert proxy.stop() == 0


@pytest.fixture(scope="module")
def etl_role(database):
    database.psql("\\c demo\nCREATE ROLE etl_writer NOLOGIN; GRANT etl_writer TO pgproxy_pool;\n"
                  "GRANT SELECT, INSERT ON items TO etl_writer;")
    return "etl_writer"


def test_service_accounts_log_in_with_their_own_role_and_are_audited_by_name(base_config, etl_role, tmp_path):
    secret = "etl-secret-" + os.urandom(8).hex()
    hashed = subprocess.run([sys.executable, "-m", "pgproxy", "hash-secret"], input=secret + "\n",
                            capture_output=True, text=True, check=True).stdout.strip()
    assert secret not in hashed and hashed.startswith("scrypt$")
    accounts = tmp_path / "service-accounts.toml"
    accounts.write_text(f'[[account]]\nname = "etl_nightly"\nrole = "{etl_role}"\nsecret_hash = "{hashed}"\n')
    proxy = ProxyProcess(merge(base_config, {"auth": {"service_accounts": {"file": str(accounts)}}}))
    try:
        with psycopg.connect(proxy.dsn("etl_nightly"), password=secret, autocommit=True) as conn:
            row = conn.execute("SELECT current_user, current_setting('pgproxy.user'), "
                               "current_setting('pgproxy.auth_method')").fetchone()
            assert row == ("etl_writer", "svc:etl_nightly", "service")
            conn.execute("INSERT INTO items VALUES (7001, 'nightly') ON CONFLICT DO NOTHING")
        assert login_error(proxy.port, "etl_nightly", secret + "x")["C"] == "28P01"
        records = proxy.audit(lambda r: "7001" in r.get("statement", ""))
        insert = [r for r in records if "7001" in r.get("statement", "")]
        assert insert and insert[0]["user"] == "svc:etl_nightly" and insert[0]["role"] == "etl_writer"
        assert secret not in proxy.log() and secret not in proxy.audit_path.read_text()
    finally:
        assert proxy.stop() == 0


ADMIN_TOKEN = "ldap-test-admin-token-0123456789"
SPELLINGS = ["ALICE", "Alice", " alice", "alice ", "  alice  ", "alice\u00a0"]


@pytest.mark.parametrize("case_insensitive", [False, True], ids=["exact", "case_insensitive"])
@pytest.mark.parametrize("mode", ["bind", "search"])
def test_other_spellings_of_a_user_are_refused_or_become_the_directory_spelling(
        base_config, directory, tmp_path, mode, case_insensitive):
    unlock(directory, "alice")
    ldap = {"username_case_insensitive": case_insensitive}
    auth = bind_mode(directory, **ldap) if mode == "bind" else search_mode(directory, tmp_path, **ldap)
    token = tmp_path / "admin-token"
    token.write_text(ADMIN_TOKEN + "\n")
    http_port = free_port()
    # A [[roles]] rule for alice by name: it must apply to every accepted spelling of her.
    roles = [{"user": "alice", "role": "other_role"}, *base_config["roles"]]
    proxy = ProxyProcess(merge(base_config, merge(auth, {
        "roles": roles, "http": {"listen": f"127.0.0.1:{http_port}", "admin_token_file": str(token)}})))
    sql = "SELECT current_user, current_setting('pgproxy.user')"
    opened = []
    try:
        def connect(user: str) -> psycopg.Connection:
            conn = psycopg.connect(host="127.0.0.1", port=proxy.port, dbname="demo", user=user,
                                   password=PASSWORDS["alice"], autocommit=True)
            opened.append(conn)
            return conn

        assert connect("alice").execute(sql).fetchone() == ("other_role", "alice")
        for user in SPELLINGS:
            if case_insensitive and user == user.strip():  # ALICE, Alice: mapped to the directory's alice
                assert connect(user).execute(sql).fetchone() == ("other_role", "alice"), user
            else:
                refused = login_error(proxy.port, user, PASSWORDS["alice"])
                assert refused["C"] == "28P01" and refused["M"].startswith("authentication failed"), user
        log = proxy.log()
        assert "whitespace in the user name" in log
        if not case_insensitive:
            assert "names another user ('alice', not 'ALICE', compared exactly)" in log
        starts = session_starts(proxy, 3 if case_insensitive else 1)
        assert {(r["user"], r["subject"]) for r in starts} == {("alice", f"uid=alice,ou=people,{SUFFIX}")}

        # An operator's block on alice ends every session of hers, however she spelled the name ...
        status, body = http_get(http_port, "/admin/terminate?user=alice&block_s=60", "POST", ADMIN_TOKEN)
        assert status == 200 and json.loads(body)["sessions_ended"] == len(opened)
        for conn in opened:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        # ... and holds against every spelling (alice's own login is in the success cache, too).
        for user in ["alice", *SPELLINGS]:
            refused = login_error(proxy.port, user, PASSWORDS["alice"])
            expected = "28000" if user == "alice" or (case_insensitive and user == user.strip()) else "28P01"
            assert refused["C"] == expected, (user, refused)
        assert "blocked by an operator" in proxy.log()
        assert PASSWORDS["alice"] not in proxy.log()
    finally:
        for conn in opened:
            conn.close()
        assert proxy.stop() == 0


def unlock(directory: Slapd, uid: str) -> None:
    """Undo Slapd.lock (an earlier test locks alice); no lock is fine too."""
    with directory.admin() as conn:
        conn.modify(f"uid={uid},ou=people,{SUFFIX}", {"pwdAccountLockedTime": [(ldap3.MODIFY_DELETE, [])]})
        assert conn.result["result"] in (0, 16), conn.result  # 16: there was no lock


def session_starts(proxy: ProxyProcess, count: int) -> list[dict]:
    """The audit's session_start records once there are ``count`` (the writer is asynchronous)."""
    deadline = time.monotonic() + 5
    while True:
        starts = [r for r in proxy.audit() if r.get("event") == "session_start"]
        if len(starts) >= count or time.monotonic() > deadline:
            assert len(starts) == count, starts
            return starts
        time.sleep(0.05)


def test_the_user_name_attribute_is_configurable_and_must_be_readable(base_config, directory):
    unlock(directory, "alice")
    # cn holds the same value as uid in this directory: logins work as before.
    proxy = ProxyProcess(merge(base_config, bind_mode(directory, username_attribute="cn")))
    try:
        assert psql(proxy, "alice", PASSWORDS["alice"], "SELECT current_setting('pgproxy.user')").stdout.strip() \
            == "alice"
    finally:
        assert proxy.stop() == 0
    # An attribute the entry does not have: no user name to trust, so no login.
    proxy = ProxyProcess(merge(base_config, bind_mode(directory, username_attribute="employeeNumber")))
    try:
        assert login_error(proxy.port, "alice", PASSWORDS["alice"])["C"] == "28P01"
        assert "the entry has 0 values of employeeNumber" in proxy.log()
    finally:
        assert proxy.stop() == 0
