from __future__ import annotations

import struct

import pytest

from pgproxy.errors import ClientError, PgProxyError, auth_failed
from pgproxy.protocol import messages as msg


def _bind(portal: bytes, stmt: bytes, formats: list[int], params: list[bytes | None]) -> bytes:
    body = portal + b"\0" + stmt + b"\0" + struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return body + struct.pack("!h", 0)


def test_bind_round_trip_with_null_and_binary():
    bind = msg.parse_bind(_bind(b"p1", b"s1", [0, 1], [b"42", None]))
    assert (bind.portal, bind.statement, bind.param_formats, bind.params) == ("p1", "s1", [0, 1], [b"42", None])


@pytest.mark.parametrize("body", [
    b"p\0s\0\x00\x01",                              # a format count with no formats
    b"p\0s\0\x00\x00\x00\x01\x00\x00\x00\x09ab",    # a parameter longer than the message
    b"p\0s\0\xff\xff",                              # a negative count
    b"p",                                           # an unterminated portal name
])
def test_truncated_bind_is_a_protocol_violation(body):
    with pytest.raises(ClientError) as info:
        msg.parse_bind(body)
    assert info.value.sqlstate == "08P01"


def test_parse_reads_parameter_types():
    body = b"stmt\0SELECT $1\0" + struct.pack("!hI", 1, 23)
    parse = msg.parse_parse(body)
    assert (parse.statement, parse.query, parse.param_types) == ("stmt", "SELECT $1", (23,))


@pytest.mark.parametrize("tag, expected", [
    (b"SELECT 3\0", ("SELECT", 3)), (b"INSERT 0 5\0", ("INSERT", 5)), (b"COPY 500\0", ("COPY", 500)),
    (b"CREATE TABLE\0", ("CREATE TABLE", None)), (b"BEGIN\0", ("BEGIN", None)),
])
def test_command_tags(tag, expected):
    assert msg.parse_command_tag(tag) == expected


def test_error_response_carries_severity_sqlstate_and_message_only():
    err = auth_failed("alice", "token expired 5 minutes ago")
    raw = msg.error_response(err)
    assert raw[0:1] == b"E" and struct.unpack("!I", raw[1:5])[0] == len(raw) - 1
    fields = msg.parse_error_fields(raw[5:])
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": 'authentication failed for user "alice"'}
    assert b"expired" not in raw  # the reason is for the log only


def test_startup_params_reject_duplicates_and_missing_terminator():
    with pytest.raises(ClientError):
        msg.parse_startup_params(b"user\0a\0user\0b\0\0")
    with pytest.raises(ClientError):
        msg.parse_startup_params(b"user\0a\0")


def test_a_data_row_reads_as_text_with_nulls_and_a_cut_one_is_refused():
    body = struct.pack("!h", 3) + struct.pack("!i", 2) + b"ok" + struct.pack("!i", -1) + struct.pack("!i", 0)
    assert msg.parse_data_row(body) == ["ok", None, ""]
    with pytest.raises(PgProxyError):
        msg.parse_data_row(body[:5])
