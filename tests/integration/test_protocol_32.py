"""Protocol 3.2 (PostgreSQL 18): libpq 18 asking for it connects, runs queries and cancels
them with its long cancel key, with one worker or several; newer minor versions and
unknown _pq_ options get exactly one NegotiateProtocolVersion, as PostgreSQL sends it."""

from __future__ import annotations

import struct
import threading
import time

import psycopg
import pytest

from pgproxy.protocol import messages as msg
from tests.support.wire import Wire, error_fields


def startup(port: int, version: int, params: dict[str, str]) -> tuple[Wire, list]:
    """A raw startup with any protocol version; the replies up to the password request."""
    wire = Wire(port)
    body = struct.pack("!i", version) + b"".join(msg.cstr(k) + msg.cstr(v) for k, v in params.items()) + b"\0"
    wire.send(struct.pack("!i", len(body) + 4) + body)
    replies = wire.read_until("RE")
    return wire, replies


def log_in(wire: Wire, token: str) -> list:
    wire.send(msg.password_message(token.encode() + b"\0"))
    return wire.read_until("ZE")


def key_of(replies: list) -> tuple[int, bytes]:
    (body,) = [b for k, b in replies if k == "K"]
    return struct.unpack_from("!i", body)[0], body[4:]


def cancel_packet(pid: int, key: bytes) -> bytes:
    return struct.pack("!iii", 12 + len(key), msg.CANCEL_REQUEST, pid) + key


def sleeps_until_cancelled(conn: psycopg.Connection, cancel) -> float:
    timer = threading.Timer(0.3, cancel)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
    finally:
        timer.cancel()
    return time.monotonic() - started


def test_psycopg_with_protocol_32_queries_and_cancels(proxy, issuer):
    with psycopg.connect(proxy.dsn("alice", max_protocol_version="3.2"), password=issuer.mint("alice", ["sales_emea"]),
                         autocommit=True) as conn:
        assert conn.pgconn.full_protocol_version == 30002  # no downgrade: the proxy speaks 3.2
        assert conn.execute("SELECT current_user, 6 * 7").fetchone() == ("emea_analyst", 42)
        assert sleeps_until_cancelled(conn, conn.cancel_safe) < 5    # PQcancelCreate, the 3.2 long key
        assert sleeps_until_cancelled(conn, conn.cancel) < 5         # PQcancel, the same key
        assert conn.execute("SELECT 1").fetchone() == (1,)           # the session goes on


def test_a_32_client_gets_a_long_cancel_key_and_a_30_client_a_short_one(proxy, issuer):
    token = issuer.mint("alice", ["sales_emea"])
    wire, replies = startup(proxy.port, msg.PROTOCOL_3_0 + 2, {"user": "alice", "database": "demo"})
    assert [k for k, _ in replies] == ["R"]  # 3.2 is ours: nothing to negotiate
    pid, key = key_of(log_in(wire, token))
    assert len(key) == 32
    old, old_replies = startup(proxy.port, msg.PROTOCOL_3_0, {"user": "alice", "database": "demo"})
    assert len(key_of(log_in(old, token))[1]) == 4

    # A raw cancel with the long key stops the 3.2 session's query; a wrong one does not.
    wire.send(msg.query("SELECT pg_sleep(20)"))
    time.sleep(0.3)
    for bad in (key[:-1] + bytes([key[-1] ^ 1]), key[:4], key + b"x"):
        Wire(proxy.port).send(cancel_packet(pid, bad))
    time.sleep(0.5)
    started = time.monotonic()
    Wire(proxy.port).send(cancel_packet(pid, key))
    replies = wire.read_until("Z")
    assert time.monotonic() - started < 5
    assert error_fields([b for k, b in replies if k == "E"][0])["C"] == "57014"
    assert proxy.log().count("cancel request ignored") >= 3


@pytest.mark.parametrize("size", [3, 257])
def test_cancel_keys_of_impossible_lengths_are_refused(proxy, size):
    wire = Wire(proxy.port)
    wire.send(cancel_packet(42, b"k" * size))
    reply = wire.read_message()
    assert reply is not None and error_fields(reply[1])["C"] == "08P01"
    assert wire.closed_by_server()


def test_a_newer_minor_and_unknown_options_get_exactly_one_negotiation(proxy, issuer):
    options = {"_pq_.test_protocol_negotiation": "1", "_pq_.compression": "zstd", "_pq_.xyzzy": ""}
    wire, replies = startup(proxy.port, msg.PROTOCOL_3_0 + 9999, {"user": "alice", "database": "demo", **options})
    assert [k for k, _ in replies] == ["v", "R"]
    body = replies[0][1]
    assert struct.unpack_from("!ii", body) == (msg.PROTOCOL_3_0 + 2, 3)
    assert body[8:].split(b"\0")[:-1] == [k.encode() for k in options]
    after = log_in(wire, issuer.mint("alice", ["sales_emea"]))
    assert [k for k, _ in after].count("v") == 0 and after[-1][0] == "Z"
    assert len(key_of(after)[1]) == 32  # the session speaks 3.2
    wire.send(msg.query("SELECT current_setting('pgproxy.user')"))
    rows = [b for k, b in wire.read_until("Z") if k == "D"]
    assert rows and rows[0].endswith(b"alice")


def test_unknown_options_alone_negotiate_the_version_asked_for(proxy, issuer):
    wire, replies = startup(proxy.port, msg.PROTOCOL_3_0, {"user": "alice", "database": "demo", "_pq_.x": "1"})
    assert [k for k, _ in replies] == ["v", "R"]
    assert struct.unpack_from("!ii", replies[0][1]) == (msg.PROTOCOL_3_0, 1)
    assert log_in(wire, issuer.mint("alice", ["sales_emea"]))[-1][0] == "Z"


def test_protocol_32_cancels_find_their_worker(make_proxy, issuer):
    proxy = make_proxy(server={"workers": 2}, backend={"pool_size": 8})
    conns = [psycopg.connect(proxy.dsn("alice", max_protocol_version="3.2"),
                             password=issuer.mint("alice", ["sales_emea"]), autocommit=True) for _ in range(8)]
    try:
        assert {c.pgconn.full_protocol_version for c in conns} == {30002}
        for conn in conns:  # each cancel is a new connection, which may land on either worker
            assert sleeps_until_cancelled(conn, conn.cancel_safe) < 5
    finally:
        for conn in conns:
            conn.close()
    log = proxy.log()
    assert 'msg="session started"' in log and "worker=1" in log and "worker=0" in log
    assert "cancel request passed to its worker" in log
