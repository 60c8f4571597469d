"""TLS on both sides, with a CA made at test time: clients verify-full, the plaintext
policy, direct TLS, client certificates, rotation on SIGHUP, the Unix socket, and a
PostgreSQL that accepts only hostssl + scram-sha-256 (with channel binding required)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.pgcluster import PgCluster
from pgproxy.protocol import messages as msg
from tests.support import certs
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import Wire, error_fields

ROOT = Path(__file__).resolve().parents[2]
PGJDBC = "/usr/share/java/postgresql.jar"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    authority = certs.TestCA(directory)
    authority.server = authority.issue("localhost", ["localhost", "127.0.0.1"], stem="proxy")
    return authority


def tls_server(ca, **extra) -> dict:
    cert, key = ca.server
    return {"server": {"tls_cert_file": str(cert), "tls_key_file": str(key), **extra}}


def _dsn(proxy, user="alice", **params) -> str:
    options = {"host": "localhost", "port": proxy.port, "dbname": "demo", "user": user, **params}
    return " ".join(f"{k}={v}" for k, v in options.items())


def _server_certificate(port: int, ca_path: Path) -> bytes:
    """The certificate the proxy presents, as DER (SSLRequest first, as libpq does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(msg.SSL_REQUEST_PACKET)
        assert raw.recv(1) == b"S"
        context = ssl.create_default_context(cafile=str(ca_path))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def test_psql_psycopg_and_pgjdbc_with_verify_full(make_proxy, issuer, ca, tmp_path):
    proxy = make_proxy(**tls_server(ca))
    token = issuer.mint("alice", ["sales_emea"])
    done = subprocess.run(["psql", "-X", "-A", "-t", "-c", "SELECT current_user, current_setting('pgproxy.user')",
                           _dsn(proxy, sslmode="verify-full", sslrootcert=ca.path)],
                          capture_output=True, text=True, env=proxy.env(token), timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "emea_analyst|alice"
    with psycopg.connect(_dsn(proxy, sslmode="verify-full", sslrootcert=ca.path), password=token) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("alice",)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed|verify"):
        other_ca = certs.TestCA(tmp_path, name="someone else")
        psycopg.connect(_dsn(proxy, sslmode="verify-full", sslrootcert=other_ca.path), password=token)
    if not (shutil.which("javac") and os.path.exists(PGJDBC)):
        pytest.fail("javac and Debian's libpostgresql-jdbc-java are required (scripts/install-deps --test)")
    classes = tmp_path / "classes"
    subprocess.run(["javac", "-d", str(classes), str(ROOT / "tests/jdbc/WhoAmI.java")], check=True, timeout=120)
    url = (f"jdbc:postgresql://localhost:{proxy.port}/demo?ssl=true&sslmode=verify-full"
           f"&sslrootcert={ca.path}")
    jdbc = subprocess.run(["java", "-cp", f"{classes}:{PGJDBC}", "WhoAmI", url, "alice"],
                          capture_output=True, text=True, env=proxy.env(token), timeout=120)
    assert jdbc.stdout.strip() == "emea_analyst|alice|jwt", jdbc.stdout + jdbc.stderr


def test_plaintext_login_from_outside_the_trusted_networks_is_refused_before_the_password(make_proxy, issuer, ca):
    proxy = make_proxy(**tls_server(ca, plaintext_networks=[]))  # not even loopback: stands for a remote client
    token = issuer.mint("alice", ["sales_emea"])
    with pytest.raises(psycopg.OperationalError, match="connection is not encrypted.*sslmode=require"):
        psycopg.connect(_dsn(proxy, sslmode="disable"), password=token)
    wire = Wire(proxy.port)  # the proxy never asks for the password over plaintext
    wire.send(msg.startup_message({"user": "alice", "database": "demo"}))
    kind, body = wire.read_message()
    assert kind == "E" and error_fields(body)["C"] == "28000"
    assert "outside server.plaintext_networks" in proxy.log() and token not in proxy.log()
    with psycopg.connect(_dsn(proxy, sslmode="require"), password=token) as conn:  # over TLS: fine
        assert conn.execute("SELECT current_user").fetchone() == ("emea_analyst",)


def test_direct_tls_with_alpn(make_proxy, issuer, ca):
    if psycopg.pq.version() < 170000:
        pytest.skip("psycopg's libpq is older than 17: no sslnegotiation=direct")
    proxy = make_proxy(**tls_server(ca, plaintext_networks=[]))
    with psycopg.connect(_dsn(proxy, sslmode="verify-full", sslrootcert=ca.path, sslnegotiation="direct"),
                         password=issuer.mint("alice", ["sales_emea"])) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("alice",)


def test_client_certificates_are_a_second_factor(make_proxy, issuer, ca, tmp_path):
    proxy = make_proxy(**tls_server(ca, tls_client_ca_file=str(ca.path), tls_client_certificates="required"))
    token = issuer.mint("alice", ["sales_emea"])
    alice_cert, alice_key = ca.issue("alice", [], stem="alice")
    bob_cert, bob_key = ca.issue("bob", [], stem="bob")
    with psycopg.connect(_dsn(proxy, sslmode="verify-full", sslrootcert=ca.path, sslcert=alice_cert,
                              sslkey=alice_key), password=token) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("emea_analyst",)
    with pytest.raises(psycopg.OperationalError):  # no certificate: the handshake fails
        psycopg.connect(_dsn(proxy, sslmode="verify-full", sslrootcert=ca.path), password=token)
    with pytest.raises(psycopg.OperationalError, match='user "alice" is not allowed to connect'):
        psycopg.connect(_dsn(proxy, sslmode="verify-full", sslrootcert=ca.path, sslcert=bob_cert, sslkey=bob_key),
                        password=token)  # bob's certificate, alice's token
    assert 'client certificate is for \\"bob\\"' in proxy.log()  # logfmt escapes the quotes


def test_certificate_rotation_on_sighup_keeps_sessions(make_proxy, issuer, ca, tmp_path):
    cert, key = ca.server
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(cert, live_cert)
    shutil.copy(key, live_key)
    proxy = make_proxy(server={"tls_cert_file": str(live_cert), "tls_key_file": str(live_key)})
    token = issuer.mint("alice", ["sales_emea"])
    before = _server_certificate(proxy.port, ca.path)
    session = psycopg.connect(_dsn(proxy, sslmode="verify-full", sslrootcert=ca.path), password=token,
                              autocommit=True)
    new_cert, new_key = ca.issue("localhost", ["localhost", "127.0.0.1"], stem="rotated")
    shutil.copy(new_cert, live_cert)
    shutil.copy(new_key, live_key)
    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    after = _server_certificate(proxy.port, ca.path)
    assert before != after and after == ssl.PEM_cert_to_DER_cert(new_cert.read_text())
    assert session.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("alice",)  # still there
    session.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_unix_socket_named_the_postgresql_way(base_config, issuer, tmp_path, workers):
    directory = tmp_path / "run"
    directory.mkdir()
    proxy = ProxyProcess(merge(base_config, {"server": {"unix_socket_dir": str(directory), "workers": workers,
                                                        "plaintext_networks": []}}))
    try:
        assert (directory / f".s.PGSQL.{proxy.port}").is_socket()
        for _ in range(3):  # with two workers, both inherited the supervisor's socket
            _psql_over_unix_socket(proxy, directory, issuer)
    finally:
        assert proxy.stop() == 0
    assert not (directory / f".s.PGSQL.{proxy.port}").exists()  # removed on exit


def _psql_over_unix_socket(proxy, directory, issuer) -> None:
    done = subprocess.run(["psql", "-X", "-A", "-t", "-h", str(directory), "-p", str(proxy.port), "-U", "alice",
                           "-d", "demo", "-c", "SELECT current_user, current_setting('pgproxy.user')"],
                          capture_output=True, text=True, env=proxy.env(issuer.mint("alice", ["sales_emea"])),
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "emea_analyst|alice"


@pytest.fixture(scope="module")
def ssl_only_database(ca):
    """A PostgreSQL whose pg_hba allows TCP logins only as hostssl + scram-sha-256."""
    issued = ca.issue("localhost", ["localhost", "127.0.0.1"], stem="postgres")
    cluster = PgCluster(hba=["hostssl all all 127.0.0.1/32 scram-sha-256", "host all all 127.0.0.1/32 reject"])
    cert, key = cluster.dir / "server.pem", cluster.dir / "server.key"  # where the server's user can read them
    for source, target in zip(issued, (cert, key)):
        shutil.copy(source, target)
        cluster.give(target)
    cluster.settings.update({"ssl": "on", "ssl_cert_file": f"'{cert}'", "ssl_key_file": f"'{key}'"})
    cluster.start()
    cluster.psql("SET password_encryption = 'scram-sha-256';"
                 "CREATE ROLE pgproxy_pool LOGIN NOINHERIT PASSWORD 'pool-secret';"
                 "CREATE ROLE emea_analyst NOLOGIN; GRANT emea_analyst TO pgproxy_pool;")
    yield cluster
    cluster.stop()


def _backend_tls(base_config, ssl_only_database, ca, tmp_path, **backend) -> dict:
    password = tmp_path / "pool-password"
    password.write_text("pool-secret\n")
    return merge(base_config, {"backend": {"host": "127.0.0.1", "port": ssl_only_database.port,
                                           "password_file": str(password), "databases": [],
                                           "sslmode": "verify-full", "sslrootcert": str(ca.path), **backend}})


@pytest.mark.parametrize("channel_binding", ["prefer", "require"])
def test_backend_that_accepts_only_hostssl_scram(base_config, issuer, ca, ssl_only_database, tmp_path,
                                                 channel_binding):
    proxy = ProxyProcess(_backend_tls(base_config, ssl_only_database, ca, tmp_path, channel_binding=channel_binding))
    try:
        with psycopg.connect(proxy.dsn("alice", database="postgres"), password=issuer.mint("alice", ["sales_emea"]),
                             autocommit=True) as conn:
            assert conn.execute("SELECT current_user, current_setting('pgproxy.user')").fetchone() == (
                "emea_analyst", "alice")  # through a pg_hba that rejects every TCP login without TLS
        # The pool logged in with channel binding (SCRAM-SHA-256-PLUS) over TLS 1.2+.
        assert 'msg="logged in to PostgreSQL" tls=TLSv1.3 mechanism=SCRAM-SHA-256-PLUS' in proxy.log()
    finally:
        assert proxy.stop() == 0


def test_backend_with_an_unknown_ca_or_without_tls_is_refused_with_the_reason_in_the_log(
        base_config, issuer, ca, ssl_only_database, tmp_path):
    stranger = certs.TestCA(tmp_path, name="not the database's CA")
    for backend, reason in (({"sslrootcert": str(stranger.path)}, "certificate verify failed"),
                            ({"sslmode": "disable"}, "pg_hba.conf rejects connection")):
        proxy = ProxyProcess(merge(_backend_tls(base_config, ssl_only_database, ca, tmp_path), {"backend": backend}))
        try:
            with pytest.raises(psycopg.OperationalError, match="database connection unavailable"):
                psycopg.connect(proxy.dsn("alice", database="postgres"),
                                password=issuer.mint("alice", ["sales_emea"]))
            assert reason in proxy.log()
        finally:
            assert proxy.stop() == 0
