"""The identity switch carries no client text as SQL: constant ASCII statements, values bound."""

import struct

from pgproxy.protocol import messages as msg
from pgproxy.protocol import switch
from pgproxy.protocol.framing import MessageReader


def _messages(data: bytes):
    return MessageReader(1 << 20).feed(data)


def _bind_values(raw: bytes) -> list[bytes]:
    bind = msg.parse_bind(raw[5:])
    return list(bind.params)


def test_statements_are_constant_ascii_whatever_the_values():
    hostile = {"application_name": "\u00bf\\'; SELECT set_config('role','x',false) --", "TimeZone": "UTC"}
    data = switch.apply_messages("emea_analyst", hostile, "n1")
    parse, bind, execute = _messages(data)
    text = msg.parse_parse(parse[1][5:]).query
    assert text == switch.apply_text(4)  # role, standard_conforming_strings, 2 settings, nonce
    assert text.isascii() and "set_config('role', $1, false)" in text
    assert "emea_analyst" not in text and "application_name" not in text
    values = _bind_values(bind[1])
    assert values[0] == b"emea_analyst"
    assert hostile["application_name"].encode() in values
    assert values[-2:] == [b"pgproxy.switch", b"n1"]


def test_client_encoding_is_applied_last():
    data = switch.apply_messages("r", {"client_encoding": "LATIN1", "a": "1", "z": "2"}, "n")
    values = _bind_values(_messages(data)[1][1])
    names = values[1:-2:2]
    assert names[-1] == b"client_encoding"


def test_the_guard_binds_the_nonce_and_nonces_are_random():
    parse, bind, _ = _messages(switch.guard_messages("abc"))
    assert msg.parse_parse(parse[1][5:]).query == switch.GUARD_SQL
    assert _bind_values(bind[1]) == [b"abc"]
    assert len({switch.new_nonce() for _ in range(100)}) == 100


def test_resets_are_constant_statements():
    for reset in (switch.DISCARD, switch.RESET):
        parse, bind, execute = _messages(switch.reset_messages(reset))
        assert msg.parse_parse(parse[1][5:]).query == reset
        assert struct.unpack("!h", bind[1][-2:])[0] == 0
