"""Sessions end when their credential does, tried as a security administrator would.

A JWT session whose token expires inside a transaction gets FATAL 28000 "token expired,
sign in again" and its writes are not committed (checked in the database); one that
expires while idle is ended by the proxy without a word from the client; with
on_token_expiry = "end_after_transaction" the open transaction may commit first; an
OAUTHBEARER session likewise. A directory session ends within revalidate_s when its
account is locked with ppolicy or loses its group, and when the directory cannot be asked
(fail closed). Each has a session_end audit record with its cause, a metric and, before,
its credential's end in /admin/sessions."""

from __future__ import annotations

import json
import secrets
import shutil
import struct
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.pgcluster import free_port
from pgproxy.protocol import messages as msg
from tests.support.directory import PASSWORDS, SEARCH_DN, SEARCH_PASSWORD, SUFFIX, Slapd
from tests.support.ops import http_get, scrape, value
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import Wire, error_fields, login

ADMIN_TOKEN = "admin-token-" + secrets.token_hex(8)


def expiring(tmp_path: Path, **auth) -> dict:
    """No leeway, an HTTP port with the admin API, and the given [auth] options."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    return {"auth": {"jwt": {"leeway_s": 0.0}, **auth},
            "http": {"listen": f"127.0.0.1:{free_port()}", "admin_token_file": str(token_file)}}


def http_port(proxy: ProxyProcess) -> int:
    return int(proxy.config_path.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])


def wait_until_expired(exp: int) -> None:
    time.sleep(max(0.0, exp - time.time()) + 0.3)


def short_token(issuer, user: str, groups: list[str], ttl_s: int = 3) -> tuple[str, int]:
    token = issuer.mint(user, groups, ttl_s=ttl_s)
    return token, int(time.time()) + ttl_s


def committed(database, ids: list[int]) -> int:
    listed = ",".join(map(str, ids))
    return int(database.psql(f"SELECT count(*) FROM items WHERE id IN ({listed})", database="demo").strip())


def session_end(proxy: ProxyProcess, user: str, timeout: float = 5.0) -> dict:
    def match(r: dict) -> bool:
        return r.get("event") == "session_end" and r.get("user") == user
    records = [r for r in proxy.audit(match, timeout=timeout) if match(r)]
    assert records, f"no session_end for {user}: {proxy.log()[-3000:]}"
    return records[-1]


def expect_fatal(wire: Wire, message: str, timeout: float = 5.0) -> dict:
    wire.sock.settimeout(timeout)
    reply = wire.read_message()
    assert reply is not None and reply[0] == "E", reply
    fields = error_fields(reply[1])
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "28000", message), fields
    assert wire.closed_by_server()
    return fields


def query(wire: Wire, sql: str) -> list:
    wire.send(msg.query(sql))
    return wire.read_until("Z")


def test_a_token_expiring_inside_a_transaction_ends_the_session_and_its_writes_are_rolled_back(
        base_config, issuer, database, tmp_path):
    proxy = ProxyProcess(merge(base_config, expiring(tmp_path)))
    try:
        token, exp = short_token(issuer, "alice", ["sales_emea"])
        wire, replies = login(proxy.port, "alice", token)
        assert replies[-1][0] == "Z", replies
        ids = [9_170_001, 9_170_002]
        assert query(wire, "BEGIN")[-1] == ("Z", b"T")
        for i in ids:
            assert query(wire, f"INSERT INTO items VALUES ({i}, 'written before the token expired')")[-1] == ("Z", b"T")
        wait_until_expired(exp)
        try:
            wire.send(msg.query("COMMIT"))  # the next statement after expiry (if the janitor was not first)
        except OSError:
            pass
        expect_fatal(wire, "token expired, sign in again")
        assert committed(database, ids) == 0  # rolled back: the COMMIT never reached the database
        end = session_end(proxy, "alice")
        assert end["cause"] == "token_expired" and end["reason"].startswith("token expired: exp ")
        assert not any(r.get("event") == "statement" and r.get("statement") == "COMMIT" for r in proxy.audit())
        assert value(scrape(http_port(proxy)), "pgproxy_sessions_ended_total", cause="token_expired") == 1
        assert token not in proxy.log() and token not in proxy.audit_path.read_text()
    finally:
        assert proxy.stop() == 0


def test_a_token_expiring_while_idle_ends_the_session_without_a_statement(base_config, issuer, tmp_path):
    proxy = ProxyProcess(merge(base_config, expiring(tmp_path)))
    try:
        token, exp = short_token(issuer, "alice", ["sales_emea"], ttl_s=4)
        with psycopg.connect(proxy.dsn("alice"), password=token, autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("emea_analyst",)
            # an administrator sees when the credential ends the session
            status, body = http_get(http_port(proxy), "/admin/sessions", token=ADMIN_TOKEN)
            listed = [s for s in json.loads(body) if s["user"] == "alice"]
            assert status == 200 and len(listed) == 1, body
            assert listed[0]["credential_ends"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
            samples = scrape(http_port(proxy))
            assert value(samples, "pgproxy_sessions_by_credential_end", within="5m") == 1
            wait_until_expired(exp)
            end = session_end(proxy, "alice", timeout=3.0)  # the client has said nothing since
            assert end["cause"] == "token_expired"
            with pytest.raises(psycopg.OperationalError, match="token expired, sign in again"):
                conn.execute("SELECT 1")
        status, body = http_get(http_port(proxy), "/admin/sessions", token=ADMIN_TOKEN)
        assert [s for s in json.loads(body) if s["user"] == "alice"] == []
        # a service account's or a fresh token's session is not touched
        with psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"])) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("amer_analyst",)
    finally:
        assert proxy.stop() == 0


def test_end_after_transaction_lets_the_open_transaction_commit_then_ends(base_config, issuer, database, tmp_path):
    proxy = ProxyProcess(merge(base_config, expiring(tmp_path, on_token_expiry="end_after_transaction")))
    try:
        token, exp = short_token(issuer, "alice", ["sales_emea"])
        wire, replies = login(proxy.port, "alice", token)
        assert replies[-1][0] == "Z", replies
        ids = [9_170_011, 9_170_012]
        assert query(wire, "BEGIN")[-1] == ("Z", b"T")
        assert query(wire, f"INSERT INTO items VALUES ({ids[0]}, 'before expiry')")[-1] == ("Z", b"T")
        wait_until_expired(exp)
        assert query(wire, f"INSERT INTO items VALUES ({ids[1]}, 'after expiry, same transaction')")[-1] == \
            ("Z", b"T")
        assert query(wire, "COMMIT")[-1] == ("Z", b"I")
        expect_fatal(wire, "token expired, sign in again")  # the janitor ends it once the transaction is over
        assert committed(database, ids) == 2
        assert session_end(proxy, "alice")["cause"] == "token_expired"
    finally:
        assert proxy.stop() == 0


def test_an_oauthbearer_session_ends_when_its_token_does(base_config, issuer, database, tmp_path):
    proxy = ProxyProcess(merge(base_config, expiring(tmp_path, methods=["oauthbearer"],
                                                     oauth_scope="openid pgproxy")))
    try:
        token, exp = short_token(issuer, "alice", ["sales_emea"])
        wire = Wire(proxy.port)
        wire.send(msg.startup_message({"user": "alice", "database": "demo"}))
        kind, body = wire.read_message()
        assert kind == "R" and body == struct.pack("!i", 10) + b"OAUTHBEARER\0\0", (kind, body)
        wire.send(msg.sasl_initial_response("OAUTHBEARER", b"n,,\x01auth=Bearer " + token.encode() + b"\x01\x01"))
        assert wire.read_until("ZE")[-1][0] == "Z"
        assert query(wire, "BEGIN")[-1] == ("Z", b"T")
        assert query(wire, "INSERT INTO items VALUES (9170021, 'oauth')")[-1] == ("Z", b"T")
        wait_until_expired(exp)
        try:
            wire.send(msg.query("COMMIT"))
        except OSError:
            pass
        expect_fatal(wire, "token expired, sign in again")
        assert committed(database, [9_170_021]) == 0
        end = session_end(proxy, "alice")
        assert end["cause"] == "token_expired"
    finally:
        assert proxy.stop() == 0


# --- directory sessions -------------------------------------------------------------

@pytest.fixture(scope="module")
def directory():
    if not shutil.which("slapd") and not Path("/usr/sbin/slapd").exists():
        pytest.fail("slapd is required: install Debian's slapd (.ci/run does)")
    slapd = Slapd().start()
    yield slapd
    slapd.stop()


def revalidating(directory: Slapd, tmp_path: Path, **ldap) -> dict:
    secret = tmp_path / "ldap-bind-password"
    secret.write_text(SEARCH_PASSWORD + "\n")
    return merge(expiring(tmp_path), {"auth": {"ldap": {
        "urls": [directory.url], "bind_dn": SEARCH_DN, "bind_password_file": str(secret),
        "search_base": f"ou=people,{SUFFIX}", "timeout_s": 2.0, "cache_ttl_s": 30.0, "revalidate_s": 1.0, **ldap}}})


def test_locking_a_directory_account_ends_that_persons_sessions_within_revalidate_s(
        base_config, directory, tmp_path):
    proxy = ProxyProcess(merge(base_config, revalidating(directory, tmp_path)))
    try:
        alice = [psycopg.connect(proxy.dsn("alice"), password=PASSWORDS["alice"], autocommit=True) for _ in range(2)]
        dave = psycopg.connect(proxy.dsn("dave"), password=PASSWORDS["dave"], autocommit=True)
        assert alice[0].execute("SELECT current_user").fetchone() == ("emea_analyst",)
        time.sleep(1.5)  # a sweep or two with everyone in good standing
        assert all(c.execute("SELECT 1").fetchone() == (1,) for c in [*alice, dave])
        status, body = http_get(http_port(proxy), "/admin/sessions", token=ADMIN_TOKEN)
        assert {s["credential_ends"] for s in json.loads(body)} == {None}  # directory sessions do not expire

        locked_at = time.monotonic()
        directory.lock("alice")  # pwdAccountLockedTime, as ppolicy sets it after too many failures
        deadline = time.monotonic() + 4.0
        while True:
            records = [r for r in proxy.audit() if r.get("event") == "session_end" and r.get("user") == "alice"]
            if len(records) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(records) == 2 and {r["cause"] for r in records} == {"account_locked"}, records
        assert time.monotonic() - locked_at < 1.0 + 2.5  # revalidate_s, plus a janitor tick and the read
        assert "pwdAccountLockedTime" in records[0]["reason"]
        for conn in alice:
            with pytest.raises(psycopg.OperationalError, match="your sign-in is no longer valid, sign in again"):
                conn.execute("SELECT 1")
            conn.close()
        assert dave.execute("SELECT current_user").fetchone() == ("emea_analyst",)  # others go on
        # and the login cache does not let her straight back in
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn("alice"), password=PASSWORDS["alice"]).close()
        samples = scrape(http_port(proxy))
        assert value(samples, "pgproxy_sessions_ended_total", cause="account_locked") == 2
        assert value(samples, "pgproxy_directory_revalidations_total", result="locked") == 1  # one read per person
        dave.close()
        for secret in (*PASSWORDS.values(), SEARCH_PASSWORD):
            assert secret not in proxy.log() and secret not in proxy.audit_path.read_text()
    finally:
        assert proxy.stop() == 0


def test_a_person_removed_from_their_group_loses_their_sessions(base_config, directory, tmp_path):
    proxy = ProxyProcess(merge(base_config, revalidating(directory, tmp_path)))
    try:
        with psycopg.connect(proxy.dsn("erin"), password=PASSWORDS["erin"], autocommit=True) as erin:
            assert erin.execute("SELECT current_user, current_setting('pgproxy.groups')::text[]").fetchone() == \
                ("emea_analyst", ["sales_emea"])
            directory.remove_from_group("erin", "sales_emea")
            end = session_end(proxy, "erin", timeout=4.0)
            assert end["cause"] == "group_removed" and "no longer in sales_emea" in end["reason"]
            with pytest.raises(psycopg.OperationalError, match="sign in again"):
                erin.execute("SELECT 1")
    finally:
        assert proxy.stop() == 0


def test_directory_sessions_end_when_the_directory_cannot_be_asked(base_config, tmp_path):
    own = Slapd().start()  # this test stops it
    try:
        proxy = ProxyProcess(merge(base_config, revalidating(own, tmp_path, revalidate_grace_s=0.0)))
        try:
            conn = psycopg.connect(proxy.dsn("alice"), password=PASSWORDS["alice"], autocommit=True)
            assert conn.execute("SELECT current_user").fetchone() == ("emea_analyst",)
            own.stop()
            end = session_end(proxy, "alice", timeout=8.0)
            assert end["cause"] == "directory_unavailable" and "revalidate_grace_s" in end["reason"]
            assert value(scrape(http_port(proxy)), "pgproxy_directory_revalidations_total",
                         result="unavailable") >= 1
            conn.close()
        finally:
            assert proxy.stop() == 0
    finally:
        own.stop()
