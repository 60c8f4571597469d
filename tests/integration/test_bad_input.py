"""Malformed and oversized input: an 08P01 error and a closed connection for that client only."""

from __future__ import annotations

import struct

import psycopg
import pytest

from pgproxy.protocol import messages as msg
from tests.support.wire import Wire, error_fields, login


@pytest.fixture
def small_proxy(make_proxy):
    return make_proxy(server={"max_message_size": 65536})


@pytest.fixture
def bystander(small_proxy, issuer):
    conn = psycopg.connect(small_proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"]), autocommit=True)
    yield conn
    # Every other session carries on.
    assert conn.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("bob",)
    conn.close()


def _expect_fatal(wire: Wire, sqlstate: str = "08P01") -> dict:
    reply = wire.read_message()
    assert reply is not None and reply[0] == "E", reply
    fields = error_fields(reply[1])
    assert fields["C"] == sqlstate and fields["S"] == "FATAL", fields
    assert wire.closed_by_server()
    wire.close()
    return fields


@pytest.mark.parametrize("packet", [
    struct.pack("!i", 3) + b"\0\0\0\0",                      # length below the minimum
    struct.pack("!ii", 1_000_000, 196608),                   # a huge startup packet
    struct.pack("!ii", 12, 196608) + b"usr\0",               # parameters not terminated
    struct.pack("!ii", 16, 196608) + b"user\0al\0\0\0",      # bytes after the terminator
])
def test_malformed_startup_packets(small_proxy, bystander, packet):
    wire = Wire(small_proxy.port)
    wire.send(packet)
    _expect_fatal(wire)


def test_garbage_bytes(small_proxy, bystander):
    wire = Wire(small_proxy.port)
    wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # "GET " read as a length: absurd
    assert "invalid startup packet length" in _expect_fatal(wire)["M"]


def test_unknown_protocol_code(small_proxy, bystander):
    wire = Wire(small_proxy.port)
    wire.send(struct.pack("!ii", 16, 0x00020000) + b"\0" * 8)  # protocol 2.0
    assert "protocol version 2.0" in _expect_fatal(wire, sqlstate="0A000")["M"]


def test_oversized_password_message(small_proxy, bystander):
    wire = Wire(small_proxy.port)
    wire.send(msg.startup_message({"user": "alice", "database": "demo"}))
    assert wire.read_message()[0] == "R"
    wire.send(b"p" + struct.pack("!I", 2**31))
    _expect_fatal(wire)


def test_oversized_and_undersized_messages_after_login(small_proxy, bystander, issuer):
    wire, replies = login(small_proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
    assert replies[-1][0] == "Z"
    wire.send(b"Q" + struct.pack("!I", 10_000_000))  # over max_message_size, nothing else sent
    _expect_fatal(wire)
    wire, _ = login(small_proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
    wire.send(b"Q" + struct.pack("!I", 2))
    _expect_fatal(wire)


def test_unknown_message_type_after_login(small_proxy, bystander, issuer):
    wire, _ = login(small_proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
    wire.send(msg.message(b"z", b"junk"))
    _expect_fatal(wire)


def test_messages_pipelined_before_an_unknown_type_run_and_are_audited_then_08p01(small_proxy, bystander, issuer):
    # One write: a query, then a message type no client may send. What came before it is
    # relayed as PostgreSQL would have read it (and audited under the real person); the
    # unknown type ends the session; it never reaches the server.
    wire, _ = login(small_proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
    wire.send(msg.query("SELECT 'before the junk'") + msg.message(b"z", b"junk"))
    while True:
        reply = wire.read_message()
        assert reply is not None
        if reply[0] == "E":
            break
        assert reply[0] in "TDCZ", reply  # the query's own answer, if it got out before the close
    fields = error_fields(reply[1])
    assert (fields["C"], fields["S"]) == ("08P01", "FATAL")
    assert wire.closed_by_server()
    records = small_proxy.audit(wait_for=lambda r: r.get("statement") == "SELECT 'before the junk'")
    [ran] = [r for r in records if r.get("statement") == "SELECT 'before the junk'"]
    assert ran["user"] == "alice"


def test_truncated_bind_is_refused_before_reaching_the_server(small_proxy, bystander, issuer):
    wire, _ = login(small_proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
    wire.send(msg.message(b"B", b"\0\0\x00\x05"))  # claims 5 format codes, has none
    _expect_fatal(wire)


def test_pipelined_bytes_after_ssl_request_are_refused(small_proxy, bystander):
    wire = Wire(small_proxy.port)
    wire.send(struct.pack("!ii", 8, msg.SSL_REQUEST) + msg.startup_message({"user": "alice"}))
    _expect_fatal(wire)


def test_ssl_request_is_answered_no_and_login_continues(small_proxy, bystander, issuer):
    wire = Wire(small_proxy.port)
    wire.send(struct.pack("!ii", 8, msg.SSL_REQUEST))
    assert wire.sock.recv(1) == b"N"
    wire.send(msg.startup_message({"user": "alice", "database": "demo"}))
    assert wire.read_message()[0] == "R"
    wire.send(msg.password_message(issuer.mint("alice", ["sales_emea"]).encode() + b"\0"))
    assert wire.read_until("ZE")[-1][0] == "Z"


def test_gssenc_then_ssl_requests_are_both_declined(small_proxy, bystander, issuer):
    wire = Wire(small_proxy.port)
    wire.send(struct.pack("!ii", 8, msg.GSSENC_REQUEST))
    assert wire.sock.recv(1) == b"N"
    wire.send(struct.pack("!ii", 8, msg.SSL_REQUEST))
    assert wire.sock.recv(1) == b"N"
    wire.send(msg.startup_message({"user": "alice", "database": "demo"}))
    assert wire.read_message()[0] == "R"


def test_newer_protocol_minor_version_is_negotiated_down(small_proxy, bystander, issuer):
    wire = Wire(small_proxy.port)
    body = struct.pack("!i", 196608 + 2) + b"user\0alice\0database\0demo\0_pq_.test\0x\0\0"
    wire.send(struct.pack("!i", len(body) + 4) + body)
    kind, payload = wire.read_message()
    assert kind == "v"
    assert struct.unpack_from("!ii", payload) == (196608 + 2, 1) and b"_pq_.test" in payload
    assert wire.read_message()[0] == "R"
