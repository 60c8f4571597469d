"""Property tests of the PROXY header parser: whatever the bytes, it answers within its bounds."""

from __future__ import annotations

import ipaddress

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from pgproxy.protocol.proxy_header import (V1_MAX_LENGTH, V2_HEADER_LENGTH, V2_MAX_PAYLOAD, V2_SIGNATURE,  # noqa: E402
                                           ProxyHeaderError, parse_proxy_header, v1_header, v2_header)

LONGEST = V2_HEADER_LENGTH + V2_MAX_PAYLOAD
FAST = settings(max_examples=300, deadline=None, database=None)  # two shared cores: no timing flakes, no files

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv = st.tuples(st.integers(0, 255).filter(lambda t: t != 0x03), st.binary(max_size=40))


def _outcome(data: bytes):
    try:
        return parse_proxy_header(data)
    except ProxyHeaderError:
        return "refused"


def _prefixed(prefix: bytes):
    return st.binary(max_size=LONGEST + 64).map(lambda tail: prefix + tail)


@FAST
@given(st.one_of(st.binary(max_size=LONGEST + 64), _prefixed(b"PROXY "), _prefixed(b"PROXY TCP4 "),
                 _prefixed(V2_SIGNATURE), _prefixed(V2_SIGNATURE + b"\x21\x11"), _prefixed(V2_SIGNATURE + b"\x20")))
def test_any_bytes_give_a_header_need_more_or_a_refusal(data):
    result = _outcome(data)  # nothing else may escape: no IndexError, UnicodeError, ...
    if result is None:
        assert len(data) < LONGEST  # never waits past the longest header
    elif result != "refused":
        assert 0 < result.length <= min(len(data), LONGEST)
        assert result.length <= V1_MAX_LENGTH or result.version == 2
        # a header's verdict does not depend on what follows it
        assert _outcome(data[:result.length]) == result


@FAST
@given(st.one_of(st.tuples(ipv4, ports, ipv4, ports), st.tuples(ipv6, ports, ipv6, ports)),
       st.lists(tlv, max_size=6), st.booleans(), st.binary(max_size=64), st.sampled_from(["v1", "v2"]))
def test_a_valid_header_parses_back_at_every_cut(addresses, tlvs, checksum, rest, version):
    src, sport, dst, dport = addresses
    header = v1_header((src, sport), (dst, dport)) if version == "v1" else \
        v2_header((src, sport), (dst, dport), tlvs=tuple(tlvs), checksum=checksum)
    if len(header) > LONGEST:
        return
    parsed = parse_proxy_header(header + rest)
    assert parsed.source == (str(ipaddress.ip_address(src)), sport)
    assert parsed.destination == (str(ipaddress.ip_address(dst)), dport)
    assert parsed.length == len(header)
    for cut in range(0, len(header), max(1, len(header) // 16)):
        assert parse_proxy_header(header[:cut]) is None


@FAST
@given(st.one_of(st.tuples(ipv4, ports, ipv4, ports), st.tuples(ipv6, ports, ipv6, ports)),
       st.integers(min_value=0), st.integers(0, 255))
def test_a_corrupted_checksummed_header_never_names_another_client(addresses, where, flip):
    """With a CRC32C TLV, any one changed byte is refused, waits for bytes that never come,
    or leaves the addresses alone (the checksum's TLV type or the length changed, so it is
    no longer checked; the command became LOCAL): never a wrong client address."""
    src, sport, dst, dport = addresses
    header = bytearray(v2_header((src, sport), (dst, dport), checksum=True))
    where %= len(header)
    header[where] ^= flip or 1
    result = _outcome(bytes(header))
    assert result in (None, "refused") or result.source in (None, (str(ipaddress.ip_address(src)), sport))
