"""backend.login = per_role: each backend connection logs in as the mapped role itself, so
PostgreSQL — not the statement guard — keeps a session inside its role.

The guard is off in every proxy here (``guard.unsafe_disable``): whatever SQL reaches the
database, ``SET ROLE``, ``set_config('role', ...)``, ``SET SESSION AUTHORIZATION``, SQL text
run by ts_rewrite() and a pre-existing function's ``EXECUTE 'SET ROLE ...'`` must fail
with PostgreSQL's own permission error, and ``current_user`` and ``session_user`` stay the
mapped role. The same attempts succeed with login = pool_role, which is why per_role exists.

One cluster of our own (its pg_hba/pg_ident would disturb the shared one) with all three
login methods: peer over the Unix socket (pg_ident maps this OS user to each role), a
client certificate with a map over hostssl, and a password (hostnossl, SCRAM) from
backend.role_secrets_file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psycopg
import pytest

from pgproxy.pgcluster import PgCluster, free_port, peer_map
from tests.support import certs
from tests.support.ops import http_get
from tests.support.proxy import ProxyProcess, merge, to_toml
from tests.support.wire import login_error

CLIENT_CN = "pgproxy-backend"  # the proxy's client certificate; pg_ident maps it to each role
LOGINS = ["pgproxy_health", "pgproxy_pool", "emea_analyst", "amer_analyst", "apac_analyst"]
EMEA_PASSWORD = "emea-Secret-4711"  # only for the role_secrets_file test; never in a log
POOL_PASSWORD = "pool-Secret-0815"
ADMIN_TOKEN = "per-role-admin-token-0123456789"

SETUP = f"""
SET password_encryption = 'scram-sha-256';
CREATE ROLE pgproxy_health LOGIN;          -- /readyz in per_role mode: granted nothing
CREATE ROLE pgproxy_pool LOGIN NOINHERIT PASSWORD '{POOL_PASSWORD}';  -- login = pool_role, for the contrast
CREATE ROLE emea_analyst LOGIN PASSWORD '{EMEA_PASSWORD}';
CREATE ROLE amer_analyst LOGIN;            -- no password: peer or certificate only
CREATE ROLE apac_analyst NOLOGIN;          -- mapped, but cannot log in
CREATE ROLE other_role NOLOGIN;
GRANT emea_analyst, amer_analyst, apac_analyst, other_role TO pgproxy_pool;
CREATE DATABASE app;
\\c app
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
-- Pre-existing and harmless-looking: dynamic SQL the guard never sees.
CREATE FUNCTION public.become_amer() RETURNS text LANGUAGE plpgsql SECURITY INVOKER
  AS $$ BEGIN EXECUTE 'SET ROLE amer_analyst'; RETURN current_user; END $$;
REVOKE ALL ON FUNCTION public.become_amer() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.become_amer() TO emea_analyst, amer_analyst;
"""

# (statement, the role it reaches when the login role is a member of everything)
ESCAPES = [
    ("SET ROLE other_role", "other_role"),
    ("SET ROLE amer_analyst", "amer_analyst"),
    ("SELECT set_config('role', 'amer_analyst', false)", "amer_analyst"),
    ("SET SESSION AUTHORIZATION amer_analyst", None),  # needs a superuser session in both modes
    # ts_rewrite's second argument is SQL text that it runs (SPI) to fetch its rewrite rules.
    ("SELECT ts_rewrite('a'::tsquery, "
     "'SELECT set_config(''role'', ''amer_analyst'', false)::tsquery, ''a''::tsquery')", "amer_analyst"),
    ("SELECT public.become_amer()", "amer_analyst"),
]
ESCAPE_IDS = ["set-role-other", "set-role", "set-config", "session-authorization", "ts-rewrite", "function"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return certs.TestCA(tmp_path_factory.mktemp("per-role-ca"))


@pytest.fixture(scope="module")
def cluster(ca):
    ident = peer_map(LOGINS) + [f"pgproxy {CLIENT_CN} {role}" for role in LOGINS]
    pg = PgCluster(local_hba=["local all all peer map=pgproxy"],
                   hba=["hostssl all all 127.0.0.1/32 cert map=pgproxy",
                        "hostnossl all all 127.0.0.1/32 scram-sha-256"], ident=ident)
    pg.use_tls(*ca.issue("localhost", ["localhost", "127.0.0.1"], stem="postgres"), client_ca=ca.path)
    pg.start()
    pg.psql(SETUP)
    yield pg
    pg.stop()


def config(cluster, issuer, login: str = "per_role", pool_mode: str = "session", **backend) -> dict:
    return {
        "server": {"workers": 1},
        "backend": {"host": str(cluster.socket_dir), "port": cluster.port, "user": "pgproxy_health",
                    "login": login, "pool_mode": pool_mode, "pool_size": 3, **backend},
        "auth": {"jwt": {"issuer": issuer.url, "audience": "pgproxy"}},
        "roles": [{"group": "sales_emea", "role": "emea_analyst"}, {"group": "sales_amer", "role": "amer_analyst"},
                  {"group": "sales_apac", "role": "apac_analyst"}],
        "guard": {"unsafe_disable": True},
    }


@pytest.fixture(scope="module", params=["session", "transaction"])
def pool_mode(request):
    return request.param


@pytest.fixture(scope="module")
def per_role_proxy(cluster, issuer, pool_mode):
    proxy = ProxyProcess(config(cluster, issuer, pool_mode=pool_mode))
    yield proxy
    assert proxy.stop() == 0


@pytest.fixture(scope="module")
def pool_role_proxy(cluster, issuer, pool_mode):
    proxy = ProxyProcess(config(cluster, issuer, login="pool_role", pool_mode=pool_mode, user="pgproxy_pool"))
    yield proxy
    assert proxy.stop() == 0


def connect(proxy, issuer, user="alice", groups=("sales_emea",)) -> psycopg.Connection:
    """The extended protocol: every statement parsed, bound and executed as a prepared statement."""
    return psycopg.connect(proxy.dsn(user, database="app"), password=issuer.mint(user, list(groups)),
                           autocommit=True, prepare_threshold=0)


def psql(proxy, issuer, *commands: str, user="alice", groups=("sales_emea",)) -> subprocess.CompletedProcess:
    """The simple protocol: each -c is one Query message; errors do not stop psql."""
    args = ["psql", "-X", "-A", "-t", "-v", "VERBOSITY=verbose", proxy.dsn(user, database="app")]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=30,
                          env=proxy.env(issuer.mint(user, list(groups))))


WHO = "SELECT current_user, session_user"


# --- per_role: PostgreSQL refuses every escape ----------------------------------------

@pytest.mark.parametrize("statement", [s for s, _ in ESCAPES], ids=ESCAPE_IDS)
def test_per_role_refuses_role_escapes_extended_protocol(per_role_proxy, issuer, statement):
    with connect(per_role_proxy, issuer) as conn:
        assert conn.execute(WHO).fetchone() == ("emea_analyst", "emea_analyst")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(statement)
        assert conn.execute(WHO).fetchone() == ("emea_analyst", "emea_analyst")
        assert conn.execute("SELECT pg_has_role('amer_analyst', 'MEMBER')").fetchone() == (False,)


@pytest.mark.parametrize("statement", [s for s, _ in ESCAPES], ids=ESCAPE_IDS)
def test_per_role_refuses_role_escapes_simple_protocol(per_role_proxy, issuer, statement):
    done = psql(per_role_proxy, issuer, statement, WHO)
    assert "ERROR:  42501: permission denied" in done.stderr, done.stderr
    assert done.stdout.strip() == "emea_analyst|emea_analyst", done.stderr


# --- pool_role: the same statements get out (what per_role closes) ---------------------

ESCAPING = [(s, role) for s, role in ESCAPES if role is not None]
ESCAPING_IDS = [i for i, (_, role) in zip(ESCAPE_IDS, ESCAPES) if role is not None]


@pytest.mark.parametrize("statement,reached", ESCAPING, ids=ESCAPING_IDS)
def test_pool_role_lets_the_same_statements_switch_role(pool_role_proxy, issuer, statement, reached):
    with connect(pool_role_proxy, issuer) as conn:
        assert conn.execute(WHO).fetchone() == ("emea_analyst", "pgproxy_pool")
        with conn.transaction(force_rollback=True):  # one transaction: one backend in both pool modes
            conn.execute(statement)
            assert conn.execute("SELECT current_user").fetchone() == (reached,)
    done = psql(pool_role_proxy, issuer, f"{statement}; SELECT current_user")  # one implicit transaction
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == reached, done.stderr


# --- the three login methods ------------------------------------------------------------

def _backend_of(cluster, pid: int) -> str:
    """usename|ssl|client_dn|client_addr of a backend, as PostgreSQL sees it."""
    return cluster.psql(f"SELECT a.usename, s.ssl, coalesce(s.client_dn, ''), coalesce(host(a.client_addr), 'local') "
                        f"FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.pid = {pid}")


def _check_logged_in_as_role(proxy, issuer, cluster) -> str:
    with connect(proxy, issuer) as conn:
        assert conn.execute(WHO).fetchone() == ("emea_analyst", "emea_analyst")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET ROLE amer_analyst")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        return _backend_of(cluster, pid)


def test_peer_login_over_the_unix_socket(cluster, issuer):
    proxy = ProxyProcess(config(cluster, issuer))
    try:
        assert _check_logged_in_as_role(proxy, issuer, cluster) == "emea_analyst|f||local"
    finally:
        assert proxy.stop() == 0


def test_client_certificate_login_with_a_map(cluster, issuer, ca, tmp_path):
    cert, key = ca.issue(CLIENT_CN, [], stem="pgproxy-client")
    proxy = ProxyProcess(config(cluster, issuer, host="127.0.0.1", sslmode="verify-full", sslrootcert=str(ca.path),
                                sslcert=str(cert), sslkey=str(key)))
    try:
        assert _check_logged_in_as_role(proxy, issuer, cluster) == f"emea_analyst|t|/CN={CLIENT_CN}|127.0.0.1"
        # No password was asked for: the certificate was the proof.
        assert 'msg="logged in to PostgreSQL" tls=TLSv1.3 mechanism="auth 0"' in proxy.log()
    finally:
        assert proxy.stop() == 0


def test_password_from_role_secrets_file(cluster, issuer, tmp_path):
    secrets = tmp_path / "role-secrets.toml"
    secrets.write_text(f'emea_analyst = "{EMEA_PASSWORD}"\n')
    secrets.chmod(0o600)
    proxy = ProxyProcess(config(cluster, issuer, host="127.0.0.1", role_secrets_file=str(secrets)))
    try:
        assert _check_logged_in_as_role(proxy, issuer, cluster) == "emea_analyst|f||127.0.0.1"
        assert 'msg="logged in to PostgreSQL" tls=no mechanism=SCRAM-SHA-256\n' in proxy.log()
        # amer_analyst has no password (and no entry): refused with the reason in the log.
        fields = login_error(proxy.port, "bob", issuer.mint("bob", ["sales_amer"]), database="app")
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "08006", "database connection unavailable")
        log = proxy.log().replace('\\"', '"')  # logfmt escapes the quotes in a value
        assert ('cannot log in to PostgreSQL as mapped role "amer_analyst" (backend.login = per_role) without a '
                'password (backend.role_secrets_file has none for it): server asks for a password (method 10) '
                'for role "amer_analyst"') in log
        assert EMEA_PASSWORD not in log and "Traceback" not in log
    finally:
        assert proxy.stop() == 0


def test_mapped_role_that_cannot_log_in_is_a_clear_error(cluster, issuer):
    proxy = ProxyProcess(config(cluster, issuer))
    try:
        fields = login_error(proxy.port, "carol", issuer.mint("carol", ["sales_apac"]), database="app")
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "08006", "database connection unavailable")
        with pytest.raises(psycopg.OperationalError, match="database connection unavailable"):
            connect(proxy, issuer, "carol", ["sales_apac"])  # and a driver says so
        log = proxy.log().replace('\\"', '"')  # logfmt escapes the quotes in a value
        assert ('cannot log in to PostgreSQL as mapped role "apac_analyst" (backend.login = per_role) without a '
                'password (backend.role_secrets_file has none for it): server refused login as role '
                '"apac_analyst": 28000 role "apac_analyst" is not permitted to log in') in log
        assert "Traceback" not in log
        with connect(proxy, issuer) as conn:  # other roles are unaffected
            assert conn.execute(WHO).fetchone() == ("emea_analyst", "emea_analyst")
    finally:
        assert proxy.stop() == 0


# --- pools per (database, role) ---------------------------------------------------------

def test_transaction_pooling_multiplexes_people_of_one_role_only(cluster, issuer, tmp_path):
    token = tmp_path / "admin-token"
    token.write_text(ADMIN_TOKEN + "\n")
    http_port = free_port()
    proxy = ProxyProcess(merge(config(cluster, issuer, pool_mode="transaction", pool_size=1),
                               {"http": {"listen": f"127.0.0.1:{http_port}", "admin_token_file": str(token)}}))
    try:
        pid = "SELECT pg_backend_pid()"
        with connect(proxy, issuer) as alice, connect(proxy, issuer, "dave", ["sales_emea"]) as dave, \
                connect(proxy, issuer, "bob", ["sales_amer"]) as bob:
            # pool_size is per pool: one connection for emea_analyst, one for amer_analyst.
            alice_pid, dave_pid, bob_pid = (c.execute(pid).fetchone()[0] for c in (alice, dave, bob))
            assert alice_pid == dave_pid != bob_pid  # alice and dave share their role's one connection
            assert alice.execute("SELECT current_setting('pgproxy.user'), session_user").fetchone() == (
                "alice", "emea_analyst")
            assert dave.execute("SELECT current_setting('pgproxy.user'), session_user").fetchone() == (
                "dave", "emea_analyst")
            assert bob.execute(WHO).fetchone() == ("amer_analyst", "amer_analyst")
            assert _backend_of(cluster, alice_pid).startswith("emea_analyst|")
            assert _backend_of(cluster, bob_pid).startswith("amer_analyst|")
            status, body = http_get(http_port, "/admin/pools", token=ADMIN_TOKEN)
            assert status == 200
            pools = {(p["database"], p["login_role"]): p["size"] for p in json.loads(body)}
            assert pools == {("app", "emea_analyst"): 1, ("app", "amer_analyst"): 1}
        # /readyz logs in as backend.user (pgproxy_health, granted nothing).
        assert http_get(http_port, "/readyz")[0] == 200
    finally:
        assert proxy.stop() == 0


# --- SIGHUP -----------------------------------------------------------------------------

def _reload(proxy, config_table: dict) -> None:
    proxy.config_path.write_text(to_toml(merge({"server": {"listen": [f"127.0.0.1:{proxy.port}"]},
                                                "audit": {"file": str(proxy.audit_path)}, "log": {"level": "debug"}},
                                               config_table)))
    before = proxy.log().count("configuration reloaded")
    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proxy.log().count("configuration reloaded") <= before:
        assert time.monotonic() < deadline and "reload rejected" not in proxy.log(), proxy.log()[-2000:]
        time.sleep(0.05)


def test_sighup_switches_the_login_mode_and_rereads_role_passwords(cluster, issuer, tmp_path):
    pool_password, secrets = tmp_path / "pool-password", tmp_path / "role-secrets.toml"
    pool_password.write_text(POOL_PASSWORD + "\n")
    secrets.write_text('emea_analyst = "not-the-password"\n')
    secrets.chmod(0o600)
    # host and user are restart-only: the same in both modes (TCP without TLS: SCRAM).
    pool_role = config(cluster, issuer, login="pool_role", host="127.0.0.1", user="pgproxy_pool",
                       password_file=str(pool_password))
    per_role = merge(pool_role, {"backend": {"login": "per_role", "role_secrets_file": str(secrets)}})
    proxy = ProxyProcess(pool_role)
    before = None
    try:
        before = connect(proxy, issuer)
        assert before.execute(WHO).fetchone() == ("emea_analyst", "pgproxy_pool")
        _reload(proxy, per_role)
        fields = login_error(proxy.port, "alice", issuer.mint("alice", ["sales_emea"]), database="app")
        assert fields["C"] == "08006"  # logs in as emea_analyst now, with the wrong password
        assert 'password authentication failed for user \\"emea_analyst\\"' in proxy.log()
        secrets.write_text(f'emea_analyst = "{EMEA_PASSWORD}"\n')
        _reload(proxy, per_role)  # the same file name: the new content counts
        with connect(proxy, issuer) as after:
            assert after.execute(WHO).fetchone() == ("emea_analyst", "emea_analyst")
        assert before.execute(WHO).fetchone() == ("emea_analyst", "pgproxy_pool")  # carried on
        assert EMEA_PASSWORD not in proxy.log() and POOL_PASSWORD not in proxy.log()
    finally:
        if before is not None:
            before.close()
        assert proxy.stop() == 0
