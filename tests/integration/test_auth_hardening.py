"""Authentication hardening through a real pgproxy process: the username claim is the
identity (other spellings refused, or mapped with username_case_insensitive) and an
operator's block holds against every spelling; a key the IdP withdraws from its JWKS is
refused within the refresh interval; before login a password message is bounded, so an
unauthenticated client cannot make the proxy buffer megabytes."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.auth.devissuer import DevIssuer
from pgproxy.frontend.session import MAX_PASSWORD_MESSAGE
from pgproxy.pgcluster import free_port
from pgproxy.protocol import messages as msg
from tests.support.ops import http_get
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import Wire, error_fields, login_error

ADMIN_TOKEN = "hardening-admin-token-0123456789"
WHO = "SELECT current_user, current_setting('pgproxy.user')"


def admin_http(tmp_path: Path) -> tuple[dict, int]:
    token = tmp_path / "admin-token"
    token.write_text(ADMIN_TOKEN + "\n")
    port = free_port()
    return {"listen": f"127.0.0.1:{port}", "admin_token_file": str(token)}, port


def connect(proxy: ProxyProcess, user: str, password: str) -> psycopg.Connection:
    # keyword arguments, so a user name with spaces reaches the proxy as it is
    return psycopg.connect(host="127.0.0.1", port=proxy.port, dbname="demo", user=user, password=password,
                           autocommit=True)


@pytest.mark.parametrize("case_insensitive", [False, True], ids=["exact", "case_insensitive"])
def test_the_username_claim_is_the_identity_and_a_block_holds_against_every_spelling(
        make_proxy, issuer, tmp_path, case_insensitive):
    http, http_port = admin_http(tmp_path)
    proxy = make_proxy(auth={"jwt": {"username_case_insensitive": case_insensitive}}, http=http,
                       roles=[{"user": "alice", "role": "other_role"}, {"group": "sales_emea", "role": "emea_analyst"}])
    token = issuer.mint("alice", ["sales_emea"])
    opened = [connect(proxy, "alice", token)]
    try:
        assert opened[0].execute(WHO).fetchone() == ("other_role", "alice")
        for user in ("ALICE", "Alice"):
            if case_insensitive:  # the session is the claim's alice: her role rule, her pgproxy.user
                opened.append(connect(proxy, user, token))
                assert opened[-1].execute(WHO).fetchone() == ("other_role", "alice")
            else:
                assert login_error(proxy.port, user, token)["C"] == "28P01"
        for user in (" alice", "alice ", " ALICE "):
            assert login_error(proxy.port, user, token)["C"] == "28P01"
        assert "whitespace in the user name" in proxy.log()
        if not case_insensitive:
            assert "claim 'preferred_username' names another user ('alice', not 'ALICE'" in proxy.log()

        status, body = http_get(http_port, "/admin/terminate?user=alice&block_s=60", "POST", ADMIN_TOKEN)
        assert status == 200 and json.loads(body)["sessions_ended"] == len(opened)
        for conn in opened:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        for user in ("alice", "ALICE", "Alice", " alice", "alice "):
            refused = login_error(proxy.port, user, token)  # the token is in the validated-token cache
            expected = "28000" if user == "alice" or (case_insensitive and user == user.strip()) else "28P01"
            assert refused["C"] == expected, (user, refused)
        # A person the IdP spells with capitals is that spelling, whatever the client typed.
        mixed = issuer.mint("Carol.Smith", ["sales_emea"])
        if case_insensitive:
            with connect(proxy, "carol.smith", mixed) as conn:
                assert conn.execute(WHO).fetchone() == ("emea_analyst", "Carol.Smith")
        else:
            assert login_error(proxy.port, "carol.smith", mixed)["C"] == "28P01"
        assert token not in proxy.log() and token not in proxy.audit_path.read_text()
    finally:
        for conn in opened:
            conn.close()


def test_a_key_withdrawn_from_the_jwks_is_refused_within_the_refresh_interval(base_config):
    idp = DevIssuer().start()  # our own IdP: the shared one must keep its keys
    try:
        remaining = idp._keys[-1][0]
        doomed = idp.rotate()
        proxy = ProxyProcess(merge(base_config, {"auth": {"jwt": {
            "issuer": idp.url, "jwks_refresh_interval_s": 1.0, "jwks_refresh_min_interval_s": 0.5}}}))
        try:
            token = idp.mint("alice", ["sales_emea"])
            other = idp.mint("bob", ["sales_amer"])  # signed by the same key, never used before
            for _ in range(2):  # the second login comes from the validated-token cache
                with connect(proxy, "alice", token) as conn:
                    assert conn.execute(WHO).fetchone() == ("emea_analyst", "alice")
            idp.retire(doomed)
            time.sleep(1.3)  # past the key set's lifetime
            assert login_error(proxy.port, "alice", token)["C"] == "28P01"
            assert login_error(proxy.port, "bob", other)["C"] == "28P01"
            log = proxy.log()
            assert f"signing keys no longer published, now refused: kid={doomed}" in log
            assert f"no signing key for kid='{doomed}'" in log
            # The key still published signs tokens that work.
            assert idp._keys[-1][0] == remaining
            with connect(proxy, "alice", idp.mint("alice", ["sales_emea"])) as conn:
                assert conn.execute(WHO).fetchone() == ("emea_analyst", "alice")
        finally:
            assert proxy.stop() == 0
    finally:
        idp.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_password_message_announcing_40_mb_is_refused_on_its_header(make_proxy, issuer):
    proxy = make_proxy()  # one worker: the proxy's pid is the process serving clients
    token = issuer.mint("alice", ["sales_emea"])
    with connect(proxy, "alice", token) as conn:  # warm up; after login the normal limit applies
        assert conn.execute("SELECT length(%s)", ("x" * 200_000,)).fetchone() == (200_000,)
    before = rss_kib(proxy.process.pid)
    size = 40 * 1024 * 1024
    for _ in range(2):
        wire = Wire(proxy.port, timeout=5)
        wire.send(msg.startup_message({"user": "alice", "database": "demo"}))
        assert wire.read_message() == ("R", struct.pack("!i", 3))
        wire.send(b"p" + struct.pack("!I", size + 4))  # the header alone: the answer must not wait for the body
        kind, body = wire.read_message()
        assert kind == "E" and error_fields(body)["C"] == "08P01", error_fields(body)
        chunk = b"x" * (1 << 20)
        try:  # stream the announced body anyway, as an attacker would
            for _ in range(size // len(chunk)):
                wire.sock.sendall(chunk)
        except OSError:
            pass  # the proxy has closed the connection
        assert wire.closed_by_server()
        wire.close()
    grown = rss_kib(proxy.process.pid) - before
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB"
    assert "invalid message length" in proxy.log()
    # A password message at the bound is read (and refused for what it is, not for its size).
    refused = login_error(proxy.port, "alice", "x" * (MAX_PASSWORD_MESSAGE - 6))
    assert refused["C"] == "28P01"
