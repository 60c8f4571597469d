"""Framing is pure: bytes in, messages out, every length bounded."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgproxy.errors import ClientError
from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import MessageReader, ServerStreamScanner, first_outside, read_startup_packet


def _server_stream() -> tuple[bytes, list[tuple[int, bytes]]]:
    """A realistic server stream and the (type, body) pairs a scanner wanting C, Z, E must find."""
    parts = [
        (b"T", b"\x00\x01id\x00" + b"\x00" * 18),
        (b"D", b"\x00\x01\x00\x00\x00\x03abc"),
        (b"D", b"\x00\x01\x00\x00\x10\x00" + b"x" * 4096),
        (b"C", b"SELECT 2\x00"),
        (b"Z", b"I"),
        (b"E", b"SERROR\x00C42P01\x00Mno such table\x00\x00"),
        (b"Z", b"E"),
        (b"n", b""),
    ]
    stream = b"".join(msg.message(k, b) for k, b in parts)
    wanted = [(k[0], b) for k, b in parts if k in (b"C", b"Z", b"E")]
    return stream, wanted


def test_scanner_finds_wanted_bodies_however_the_stream_is_cut():
    stream, wanted = _server_stream()
    rng = random.Random(7)
    for _ in range(300):
        scanner = ServerStreamScanner(b"CZE", 1 << 20)
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 40)))
        found, ends = [], []
        for start, end in zip([0] + cuts, cuts + [len(stream)]):
            for kind, body, stop in scanner.feed(stream[start:end]):
                found.append((kind, body))
                ends.append(start + stop)
        assert found == wanted
        assert ends == _message_ends(stream, b"CZE")  # where each wanted message ends, to split the stream
        assert scanner.at_boundary


def _message_ends(stream: bytes, kinds: bytes) -> list[int]:
    ends, pos = [], 0
    while pos < len(stream):
        length = struct.unpack_from("!I", stream, pos + 1)[0]
        pos += 1 + length
        if stream[pos - 1 - length] in kinds:
            ends.append(pos)
    return ends


def test_scanner_byte_by_byte_and_not_at_boundary_mid_message():
    stream, wanted = _server_stream()
    scanner = ServerStreamScanner(b"CZE", 1 << 20)
    found = []
    for i in range(len(stream) - 1):
        found += [(kind, body) for kind, body, _ in scanner.feed(stream[i:i + 1])]
    assert not scanner.at_boundary
    found += [(kind, body) for kind, body, _ in scanner.feed(stream[-1:])]
    assert found == wanted


def test_scanner_rejects_a_length_below_four_and_a_wanted_body_over_the_limit():
    with pytest.raises(ClientError) as info:
        ServerStreamScanner(b"C", 100).feed(b"D" + struct.pack("!I", 3))
    assert info.value.sqlstate == "08P01"
    with pytest.raises(ClientError):
        ServerStreamScanner(b"C", 100).feed(b"C" + struct.pack("!I", 5000))
    # An unwanted large message is skipped, not buffered:
    scanner = ServerStreamScanner(b"C", 100)
    assert scanner.feed(b"D" + struct.pack("!I", 1_000_004) + b"x" * 10) == []
    assert not scanner.at_boundary


def test_message_reader_returns_whole_messages_with_headers():
    reader = MessageReader(1024)
    q = msg.query("SELECT 1")
    s = msg.SYNC
    assert reader.feed(q[:3]) == []
    assert reader.feed(q[3:] + s[:2]) == [(ord("Q"), q)]
    assert reader.buffered == 2
    assert reader.feed(s[2:]) == [(ord("S"), s)]
    assert reader.buffered == 0


@pytest.mark.parametrize("length", [0, 3, 1025, 2**32 - 1])
def test_message_reader_rejects_bad_lengths_before_buffering(length):
    reader = MessageReader(1024)
    with pytest.raises(ClientError) as info:
        reader.feed(b"Q" + struct.pack("!I", length))
    assert info.value.sqlstate == "08P01" and info.value.fatal


def test_startup_packet_bounds():
    assert read_startup_packet(bytearray(b"\x00\x00")) is None
    with pytest.raises(ClientError):
        read_startup_packet(bytearray(struct.pack("!ii", 7, 0)))
    with pytest.raises(ClientError):
        read_startup_packet(bytearray(struct.pack("!ii", 10_001, 196608)))
    buf = bytearray(msg.startup_message({"user": "a"}) + b"extra")
    code, body = read_startup_packet(buf)
    assert code == 196608 and msg.parse_startup_params(body) == {"user": "a"}
    assert buf == b"extra"


def test_message_reader_hands_on_an_incomplete_message():
    reader = MessageReader(1 << 20)
    whole = msg.message(b"S", b"a\0b\0")
    assert reader.feed(whole + whole[:6]) == [(ord("S"), whole)]
    assert reader.take_rest() == whole[:6]
    assert reader.buffered == 0 and reader.take_rest() == b""
    assert reader.feed(whole) == [(ord("S"), whole)]  # after it, framing starts afresh


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8), st.lists(st.integers(0, 400), max_size=12))
def test_message_reader_returns_every_message_whole_however_the_stream_is_cut(bodies, cuts):
    """Cuts anywhere, the header included; between partial messages the reader switches
    between holding nothing and holding a buffer of its own, and must lose no byte."""
    messages = [msg.message(b"d", body) for body in bodies]
    stream = b"".join(messages)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = MessageReader(1024)
    got = []
    for start, stop in zip(points, points[1:]):
        got += reader.feed(stream[start:stop])
        assert reader.buffered == stop - sum(len(raw) for _, raw in got)
    assert got == [(ord("d"), m) for m in messages] and reader.buffered == 0


def test_first_outside_names_the_first_message_of_another_type():
    relayed = frozenset(b"QPBES")
    frames = MessageReader(1 << 20).feed(msg.bind_message("", "s", [b"1"]) + msg.execute_message() + msg.SYNC)
    assert first_outside(frames, relayed) == -1
    assert first_outside(frames + [(ord("X"), b"X\0\0\0\4")], relayed) == 3
    assert first_outside([(ord("X"), b"X\0\0\0\4")] + frames, relayed) == 0
    assert first_outside([], relayed) == -1
