"""Native OAuth sign-in (SASL OAUTHBEARER) with a real libpq 18 — the one psycopg's binary
wheel bundles, driven through its PQAUTHDATA_OAUTH_BEARER_TOKEN hook with ctypes, as an
application would — and with raw sockets for what no client sends: libpq's discovery round
trip, the token checked by the same JWT validation as token-as-password, refusals with
28000, malformed SASL with 08P01; password clients on the same proxy; opaque tokens
through RFC 7662 introspection."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest

from pgproxy.pgcluster import free_port
from pgproxy.protocol import messages as msg
from tests.support.directory import PASSWORDS, SUFFIX, Slapd
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import Wire, error_fields

SCOPE = "openid pgproxy"
CLIENT_ID = "pgproxy-test-client"

# A libpq application: its OAuth hook hands libpq the token from argv (or fails if libpq
# never asks); prints what the hook was given and what the connection saw, as JSON.
LIBPQ_APP = r'''
import ctypes, json, sys
pq = ctypes.CDLL(sys.argv[3])

class PGoauthBearerRequest(ctypes.Structure):  # libpq-fe.h, PostgreSQL 18
    _fields_ = [("openid_configuration", ctypes.c_char_p), ("scope", ctypes.c_char_p),
                ("async_", ctypes.c_void_p), ("cleanup", ctypes.c_void_p),
                ("token", ctypes.c_void_p), ("user", ctypes.c_void_p)]

PQAUTHDATA_OAUTH_BEARER_TOKEN = 1
HOOK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
pq.PQdefaultAuthDataHook.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
pq.PQsetAuthDataHook.argtypes = [HOOK]
pq.PQconnectdb.restype = ctypes.c_void_p
pq.PQconnectdb.argtypes = [ctypes.c_char_p]
pq.PQstatus.argtypes = [ctypes.c_void_p]
pq.PQerrorMessage.restype = ctypes.c_char_p
pq.PQerrorMessage.argtypes = [ctypes.c_void_p]
pq.PQexec.restype = ctypes.c_void_p
pq.PQexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
pq.PQresultStatus.argtypes = [ctypes.c_void_p]
pq.PQgetvalue.restype = ctypes.c_char_p
pq.PQgetvalue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
pq.PQfinish.argtypes = [ctypes.c_void_p]

token = ctypes.create_string_buffer(sys.argv[2].encode())
calls = []

@HOOK
def hook(kind, conn, data):
    if kind != PQAUTHDATA_OAUTH_BEARER_TOKEN:
        return pq.PQdefaultAuthDataHook(kind, conn, data)
    request = PGoauthBearerRequest.from_address(data)
    calls.append({"openid_configuration": (request.openid_configuration or b"").decode(),
                  "scope": (request.scope or b"").decode()})
    request.token = ctypes.addressof(token)  # libpq copies it at once
    return 1

pq.PQsetAuthDataHook(hook)
conn = pq.PQconnectdb(sys.argv[1].encode())
out = {"calls": calls, "ok": pq.PQstatus(conn) == 0, "error": pq.PQerrorMessage(conn).decode()}
if out["ok"]:
    res = pq.PQexec(conn, b"SELECT current_user, current_setting('pgproxy.user'), "
                          b"current_setting('pgproxy.auth_method')")
    out["row"] = [pq.PQgetvalue(res, 0, i).decode() for i in range(3)] if pq.PQresultStatus(res) == 2 else None
pq.PQfinish(conn)
print(json.dumps(out))
'''


def bundled_libpq() -> str:
    libs = glob.glob(str(Path(psycopg.__file__).parents[1] / "psycopg_binary.libs" / "libpq-*.so*"))
    assert libs, "psycopg's binary wheel (with its libpq 18) is required"
    return libs[0]


def libpq_sign_in(proxy: ProxyProcess, issuer, token: str, user: str = "alice", **conninfo) -> dict:
    params = {"host": "127.0.0.1", "port": proxy.port, "user": user, "dbname": "demo", "sslmode": "disable",
              "oauth_issuer": issuer.url, "oauth_client_id": CLIENT_ID, **conninfo}
    dsn = " ".join(f"{k}={v}" for k, v in params.items())
    # libpq accepts an http:// issuer (the dev issuer's) only with this debugging switch.
    env = {**os.environ, "PGOAUTHDEBUG": "UNSAFE"}
    done = subprocess.run([sys.executable, "-c", LIBPQ_APP, dsn, token, bundled_libpq()], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def directory():
    slapd = Slapd().start()
    yield slapd
    slapd.stop()


@pytest.fixture(scope="module")
def oauth_proxy(base_config, directory):
    """OAUTHBEARER on the first port; the second port asks for a password (older clients),
    with a JWT or a directory password as before."""
    port, password_port = free_port(), free_port()
    proxy = ProxyProcess(merge(base_config, {
        "server": {"listen": [f"127.0.0.1:{port}", f"127.0.0.1:{password_port}"]},
        "auth": {"methods": ["oauthbearer", "password"], "oauth_scope": SCOPE,
                 "listener_methods": {str(password_port): "password"},
                 "ldap": {"urls": [directory.url], "user_dn_template": f"uid={{username}},ou=people,{SUFFIX}"}}}),
        port=port)
    proxy.password_port = password_port
    yield proxy
    assert proxy.stop() == 0, proxy.log()[-3000:]


def sasl_start(port: int, user: str = "alice") -> Wire:
    wire = Wire(port)
    wire.send(msg.startup_message({"user": user, "database": "demo"}))
    kind, body = wire.read_message()
    assert kind == "R" and body == struct.pack("!i", 10) + b"OAUTHBEARER\0\0", (kind, body)
    return wire


def sasl_initial(data: bytes, mechanism: str = "OAUTHBEARER") -> bytes:
    return msg.sasl_initial_response(mechanism, data)


def expect_fatal(wire: Wire, sqlstate: str) -> dict:
    reply = wire.read_message()
    assert reply is not None and reply[0] == "E", reply
    fields = error_fields(reply[1])
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate), fields
    assert wire.closed_by_server()
    return fields


def test_libpq_18_signs_in_with_its_discovery_round_trip_and_the_hook(oauth_proxy, issuer):
    token = issuer.mint("alice", ["sales_emea"])
    result = libpq_sign_in(oauth_proxy, issuer, token)
    assert result["ok"], result["error"] + oauth_proxy.log()[-3000:]
    # libpq asked the proxy where to get a token, then called the application's hook with it
    assert result["calls"] == [{"openid_configuration": f"{issuer.url}/.well-known/openid-configuration",
                                "scope": SCOPE}]
    assert result["row"] == ["emea_analyst", "alice", "oauthbearer"]  # what the database sees
    start = oauth_proxy.audit(lambda r: r.get("event") == "session_start" and r.get("auth_method") == "oauthbearer")
    start = [r for r in start if r.get("event") == "session_start" and r.get("auth_method") == "oauthbearer"]
    assert start and start[-1]["user"] == "alice" and start[-1]["role"] == "emea_analyst"
    assert start[-1]["subject"] == "dev|alice" and start[-1]["issuer"] == issuer.url
    # the discovery connection is no failed login
    assert not [r for r in oauth_proxy.audit() if r.get("event") == "auth_failure" and r.get("user") == "alice"
                and "discovery" in r.get("reason", "")]
    assert token not in oauth_proxy.log() and token not in oauth_proxy.audit_path.read_text()


@pytest.mark.parametrize("kind", ["expired", "wrong_audience", "wrong_issuer", "garbage", "opaque"])
def test_bad_bearer_tokens_are_refused_with_28000(oauth_proxy, issuer, kind):
    user = f"user_{kind}"
    token = {"expired": lambda: issuer.mint(user, ["sales_emea"], ttl_s=-3600),
             "wrong_audience": lambda: issuer.mint(user, ["sales_emea"], aud="someone-else"),
             "wrong_issuer": lambda: issuer.mint(user, ["sales_emea"], iss="https://evil.example"),
             "garbage": lambda: "eyJnYXJiYWdl.eyJnYXJiYWdl.Z2FyYmFnZQ",
             "opaque": lambda: "b3BhcXVlLXRva2VuLXdpdGhvdXQtaW50cm9zcGVjdGlvbg"}[kind]()
    result = libpq_sign_in(oauth_proxy, issuer, token, user=user)
    assert not result["ok"] and len(result["calls"]) == 1
    assert f'OAuth bearer authentication failed for user "{user}"' in result["error"], result["error"]
    # the same refusal on the wire: the error JSON, the client's separator, FATAL 28000
    wire = sasl_start(oauth_proxy.port, user)
    wire.send(sasl_initial(b"n,,\x01auth=Bearer " + token.encode() + b"\x01\x01"))
    kind_, body = wire.read_message()
    assert kind_ == "R" and struct.unpack_from("!i", body)[0] == 11
    assert json.loads(body[4:])["status"] == "invalid_token"
    wire.send(msg.message(b"p", b"\x01"))
    fields = expect_fatal(wire, "28000")
    assert token not in json.dumps(fields) and token not in result["error"]
    failures = oauth_proxy.audit(lambda r: r.get("event") == "auth_failure" and r.get("user") == user)
    assert any(r.get("event") == "auth_failure" and r.get("auth_method") == "oauthbearer" for r in failures)
    assert token not in oauth_proxy.log() and token not in oauth_proxy.audit_path.read_text()


def test_discovery_on_the_wire_is_answered_like_postgresql(oauth_proxy, issuer):
    wire = sasl_start(oauth_proxy.port)
    wire.send(sasl_initial(b"n,,\x01auth=\x01\x01"))
    kind, body = wire.read_message()
    assert kind == "R" and struct.unpack_from("!i", body)[0] == 11
    assert json.loads(body[4:]) == {"status": "invalid_token", "scope": SCOPE,
                                    "openid-configuration": f"{issuer.url}/.well-known/openid-configuration"}
    wire.send(msg.message(b"p", b"\x01"))
    fields = expect_fatal(wire, "28000")
    assert fields["M"] == 'OAuth bearer authentication failed for user "alice"'


@pytest.mark.parametrize("data", [
    b"p=tls-unique,,\x01auth=Bearer abc\x01\x01",      # channel binding
    b"x,,\x01auth=Bearer abc\x01\x01",                 # bad GS2 flag
    b"n,a=admin,\x01auth=Bearer abc\x01\x01",          # an authzid
    b"n,,\x01host=db\x01\x01",                         # no auth
    b"n,,\x01auth=Bearer abc,host=db,\x01",            # commas for separators
    b"n,,\x01auth=Bearer abc\x01",                     # no final separator
    b"n,,\x01auth=Bearer abc\x01\x01junk",             # data after it
    b"n,,\x01auth=Bearer " + b"a" * 24_000 + b"\x01\x01",  # oversized (past 20 KiB, within the message bound)
    b"n,,\x01auth=Bearer " + b"a" * 40_000 + b"\x01\x01",  # past the pre-login message bound
])
def test_malformed_sasl_messages_get_08p01_and_a_closed_connection(oauth_proxy, data):
    wire = sasl_start(oauth_proxy.port)
    wire.send(sasl_initial(data))
    expect_fatal(wire, "08P01")


def test_other_malformed_exchanges_get_08p01(oauth_proxy):
    wire = sasl_start(oauth_proxy.port)
    wire.send(sasl_initial(b"n,,\x01auth=\x01\x01", mechanism="SCRAM-SHA-256"))  # a mechanism not offered
    expect_fatal(wire, "08P01")
    wire = sasl_start(oauth_proxy.port)
    wire.send(msg.password_message(b"a-password\0"))  # a password where SASL was asked for
    expect_fatal(wire, "08P01")
    wire = sasl_start(oauth_proxy.port)
    wire.send(sasl_initial(b"n,,\x01auth=\x01\x01"))
    assert wire.read_message()[0] == "R"
    wire.send(msg.message(b"p", b"n,,\x01auth=\x01\x01"))  # anything but the lone separator
    expect_fatal(wire, "08P01")


def test_password_clients_on_the_same_proxy_still_sign_in(oauth_proxy, issuer):
    # A libpq before 18 (here psycopg without oauth settings) on the password port ...
    dsn = oauth_proxy.dsn("bob").replace(f"port={oauth_proxy.port}", f"port={oauth_proxy.password_port}")
    with psycopg.connect(dsn, password=issuer.mint("bob", ["sales_amer"])) as conn:
        assert conn.execute("SELECT current_user, current_setting('pgproxy.auth_method')").fetchone() == \
            ("amer_analyst", "jwt")
    with psycopg.connect(dsn.replace("user=bob", "user=alice"), password=PASSWORDS["alice"]) as conn:
        assert conn.execute("SELECT current_user, current_setting('pgproxy.auth_method')").fetchone() == \
            ("emea_analyst", "ldap")
    # ... while the OAUTHBEARER port offers only OAUTHBEARER, which a password client cannot do
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(oauth_proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"]), connect_timeout=10)
    assert "oauth" in str(info.value).lower()
    assert PASSWORDS["alice"] not in oauth_proxy.log()


def test_a_bearer_token_never_reaches_the_directory(oauth_proxy, issuer):
    """A non-JWT bearer value with LDAP serving the database is refused, not tried as a password."""
    wire = sasl_start(oauth_proxy.port)
    wire.send(sasl_initial(b"n,,\x01auth=Bearer " + PASSWORDS["alice"].encode() + b"\x01\x01"))
    assert wire.read_message()[0] == "R"
    wire.send(msg.message(b"p", b"\x01"))
    expect_fatal(wire, "28000")
    assert "not a JWT" in oauth_proxy.log()
    assert PASSWORDS["alice"] not in oauth_proxy.log()


def test_oauthbearer_needs_tls_outside_plaintext_networks(make_proxy, issuer):
    proxy = make_proxy(server={"plaintext_networks": []},
                       auth={"methods": ["oauthbearer"], "oauth_scope": SCOPE})
    wire = Wire(proxy.port)
    wire.send(msg.startup_message({"user": "alice", "database": "demo"}))
    kind, body = wire.read_message()
    assert kind == "E" and error_fields(body)["C"] == "28000"  # before any SASL


# --- opaque tokens: RFC 7662 introspection ---------------------------------------------------

class Introspection:
    """A tiny RFC 7662 endpoint on loopback: knows the tokens in ``active``."""

    def __init__(self, issuer_url: str) -> None:
        self.active: dict[str, dict] = {}
        self.requests: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                endpoint.requests.append({"authorization": self.headers.get("Authorization"), **form})
                if self.headers.get("Authorization") != endpoint.expected_authorization:
                    self.send_response(401)
                    self.end_headers()
                    return
                claims = endpoint.active.get(form.get("token", [""])[0])
                body = json.dumps({"active": True, **claims} if claims else {"active": False}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        import base64
        self.expected_authorization = "Basic " + base64.b64encode(f"{CLIENT_ID}:s3cret-introspection".encode()).decode()
        self.issuer_url = issuer_url
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/introspect"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def grant(self, token: str, user: str, groups: list[str], **over) -> None:
        now = int(time.time())
        self.active[token] = {"iss": self.issuer_url, "aud": "pgproxy", "exp": now + 600, "iat": now, "sub": f"op|{user}",
                              "preferred_username": user, "groups": groups, "client_id": CLIENT_ID, **over}

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_opaque_tokens_through_introspection(make_proxy, issuer, tmp_path):
    endpoint = Introspection(issuer.url)
    secret = tmp_path / "introspection-secret"
    secret.write_text("s3cret-introspection\n")
    try:
        proxy = make_proxy(auth={"methods": ["oauthbearer"], "oauth_scope": SCOPE, "jwt": {
            "introspection_url": endpoint.url, "introspection_client_id": CLIENT_ID,
            "introspection_client_secret_file": str(secret), "introspection_cache_s": 30}})
        good, revoked, foreign = "opaque-good-0123456789", "opaque-revoked-0123456789", "opaque-foreign-0123456789"
        endpoint.grant(good, "alice", ["sales_emea"])
        endpoint.grant(foreign, "alice", ["sales_emea"], aud="another-api")
        result = libpq_sign_in(proxy, issuer, good)
        assert result["ok"], result["error"] + proxy.log()[-3000:]
        assert result["row"] == ["emea_analyst", "alice", "oauthbearer"]
        asked = len(endpoint.requests)
        assert endpoint.requests[0]["token_type_hint"] == ["access_token"]
        assert libpq_sign_in(proxy, issuer, good)["ok"] and len(endpoint.requests) == asked  # remembered
        for token in (revoked, foreign):
            refused = libpq_sign_in(proxy, issuer, token)
            assert not refused["ok"] and "OAuth bearer authentication failed" in refused["error"]
        assert "not active" in proxy.log() and "does not name auth.jwt.audience" in proxy.log()
        # JWTs still go to the JWKS validation on the same proxy
        assert libpq_sign_in(proxy, issuer, issuer.mint("bob", ["sales_amer"]), user="bob")["row"][0] == "amer_analyst"
        endpoint.expected_authorization = "Basic d3Jvbmc="  # the endpoint no longer accepts us: fail closed
        endpoint.grant("opaque-new-0123456789", "alice", ["sales_emea"])
        assert not libpq_sign_in(proxy, issuer, "opaque-new-0123456789")["ok"]
        assert "answered HTTP 401" in proxy.log()
        for text in (proxy.log(), proxy.audit_path.read_text()):
            assert good not in text and "s3cret-introspection" not in text
    finally:
        endpoint.stop()


def test_libpq_bundled_with_psycopg_is_18():
    assert bundled_libpq() and psycopg.pq.version() >= 180000
