"""The PROXY protocol parser is pure: bytes in, a header / need-more / refusal out, bounded."""

from __future__ import annotations

import random

import pytest

from pgproxy.config import ConfigError, parse_config
from pgproxy.protocol import messages as msg
from pgproxy.protocol.proxy_header import (V1_MAX_LENGTH, V2_HEADER_LENGTH, V2_MAX_PAYLOAD, V2_SIGNATURE,
                                           ProxyHeaderError, crc32c, from_trusted_proxy, parse_proxy_header,
                                           v1_header, v2_header)

CLIENT4, BALANCER4 = ("203.0.113.7", 51234), ("10.0.0.5", 6432)
CLIENT6, BALANCER6 = ("2001:db8::7", 443), ("2001:db8::1", 6432)
STARTUP = msg.startup_message({"user": "alice", "database": "demo"})
SSL_REQUEST = msg.SSL_REQUEST_PACKET


def _refused(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as info:
        parse_proxy_header(data)
    return str(info.value)


# --- version 1 ----------------------------------------------------------------------

def test_v1_tcp4_names_the_client_and_leaves_what_follows():
    data = b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 6432\r\n" + SSL_REQUEST
    header = parse_proxy_header(data)
    assert header.version == 1 and header.command == "PROXY"
    assert header.source == CLIENT4 and header.destination == BALANCER4
    assert data[header.length:] == SSL_REQUEST


def test_v1_tcp6_addresses_are_normalised():
    header = parse_proxy_header(b"PROXY TCP6 2001:DB8:0:0::7 2001:db8::1 443 6432\r\n")
    assert header.source == CLIENT6 and header.destination == BALANCER6


def test_v1_unknown_names_no_client_and_ignores_the_rest_of_its_line():
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        header = parse_proxy_header(line + b"x")
        assert header.source is None and header.length == len(line)


def test_v1_longest_header_fits_and_one_more_byte_does_not():
    addresses = b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    assert parse_proxy_header(b"PROXY TCP6 " + addresses).source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    longest = b"PROXY UNKNOWN " + addresses  # the specification's worst case
    assert len(longest) == V1_MAX_LENGTH and parse_proxy_header(longest).length == V1_MAX_LENGTH
    assert "no CRLF" in _refused(b"PROXY UNKNOWN " + b"x" * 200)
    assert parse_proxy_header(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15)) is None  # one byte short of 107


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 6432\n",            # LF without CR
    b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 6432\r\r\n",
    b"PROXY TCP4  203.0.113.7 10.0.0.5 51234 6432\r\n",         # two spaces
    b"PROXY TCP4 203.0.113.7 10.0.0.5 51234\r\n",               # a field missing
    b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 6432 7\r\n",        # one too many
    b"PROXY TCP4 2001:db8::7 10.0.0.5 51234 6432\r\n",          # IPv6 under TCP4
    b"PROXY TCP6 203.0.113.7 2001:db8::1 51234 6432\r\n",       # IPv4 under TCP6
    b"PROXY TCP6 fe80::1%eth0 2001:db8::1 51234 6432\r\n",      # an interface zone
    b"PROXY TCP4 203.0.113.007 10.0.0.5 51234 6432\r\n",        # leading zeros (octal to some parsers)
    b"PROXY TCP4 203.0.113.7 10.0.0.5 051234 6432\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.5 65536 6432\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.5 -1 6432\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.5 +1 6432\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.5 \xd9\xa1 6432\r\n",       # a non-ASCII digit
    b"PROXY UDP4 203.0.113.7 10.0.0.5 51234 6432\r\n",
    b"PROXY tcp4 203.0.113.7 10.0.0.5 51234 6432\r\n",
    b"PROXY \r\n",
    b"PROXY\r\n",
])
def test_v1_malformed_lines_are_refused(line):
    _refused(line)


def test_v1_a_bad_byte_is_refused_when_it_arrives():
    _refused(b"PROXY TCP4 1.2\x00")
    _refused(b"PROXY TCP4 1.2\r3")  # CR only just before LF
    assert parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None  # waiting for the LF


# --- version 2 ----------------------------------------------------------------------

def test_v2_tcp4_and_tcp6():
    for client, balancer in ((CLIENT4, BALANCER4), (CLIENT6, BALANCER6)):
        data = v2_header(client, balancer) + SSL_REQUEST
        header = parse_proxy_header(data)
        assert header.version == 2 and header.command == "PROXY"
        assert header.source == client and header.destination == balancer
        assert data[header.length:] == SSL_REQUEST


def test_v2_local_is_the_balancer_speaking_for_itself():
    header = parse_proxy_header(v2_header(local=True))
    assert header.command == "LOCAL" and header.source is None and header.length == V2_HEADER_LENGTH
    # LOCAL ignores the family and the whole address block, whatever they are
    odd = V2_SIGNATURE + bytes([0x20, 0x12]) + (5).to_bytes(2, "big") + b"12345"
    assert parse_proxy_header(odd).source is None and parse_proxy_header(odd).length == 21


def test_v2_unspec_and_unix_families_name_no_network_client():
    assert parse_proxy_header(v2_header()).source is None
    unix = V2_SIGNATURE + bytes([0x21, 0x31]) + (216).to_bytes(2, "big") + b"/run/client".ljust(108, b"\0") \
        + b"/run/haproxy".ljust(108, b"\0")
    header = parse_proxy_header(unix)
    assert header.command == "PROXY" and header.source is None and header.length == 16 + 216


def test_v2_tlvs_are_kept_opaque_and_a_checksum_is_checked():
    tlvs = ((0x05, b"\x01\x02"), (0x02, b"db.example.com"), (0x20, b"\x01\x00\x00\x00\x00"), (0xE0, b""))
    data = v2_header(CLIENT4, BALANCER4, tlvs=tlvs, checksum=True)
    header = parse_proxy_header(data)
    assert header.tlvs[:4] == tlvs and header.tlvs[4][0] == 0x03
    broken = bytearray(data)
    broken[-1] ^= 0x01
    assert "CRC32C" in _refused(bytes(broken))
    broken = bytearray(data)
    broken[16] ^= 0x01  # the client's address, after the checksum was taken
    assert "CRC32C" in _refused(bytes(broken))


def test_crc32c_matches_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283


def _v2(ver_cmd: int, family: int, payload: bytes, length: int | None = None) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, family]) + (len(payload) if length is None else length).to_bytes(2, "big") \
        + payload


@pytest.mark.parametrize("data, reason", [
    (_v2(0x11, 0x11, bytes(12)), "version 1"),
    (_v2(0x31, 0x11, bytes(12)), "version 3"),
    (_v2(0x22, 0x11, bytes(12)), "command"),
    (_v2(0x2F, 0x11, bytes(12)), "command"),
    (_v2(0x21, 0x12, bytes(12)), "family"),          # UDP over IPv4
    (_v2(0x21, 0x22, bytes(36)), "family"),          # UDP over IPv6
    (_v2(0x21, 0x32, bytes(216)), "family"),         # datagram Unix socket
    (_v2(0x21, 0x41, bytes(12)), "family"),
    (_v2(0x21, 0x10, bytes(12)), "family"),          # IPv4, transport unspecified
    (_v2(0x21, 0x11, bytes(11)), "too short"),
    (_v2(0x21, 0x21, bytes(35)), "too short"),
    (_v2(0x21, 0x11, bytes(12) + b"\x04\x00"), "truncated TLV"),
    (_v2(0x21, 0x11, bytes(12) + b"\x04\x00\x05abcd"), "runs past"),
    (_v2(0x21, 0x11, bytes(12) + b"\x03\x00\x02ab"), "CRC32C"),
])
def test_v2_malformed_headers_are_refused(data, reason):
    assert reason in _refused(data)


def test_v2_an_oversized_header_is_refused_before_its_payload_arrives():
    head = _v2(0x21, 0x11, b"", length=V2_MAX_PAYLOAD + 1)
    assert "at most" in _refused(head)
    largest = _v2(0x21, 0x11, bytes(12) + b"\xe0" + (V2_MAX_PAYLOAD - 15).to_bytes(2, "big")
                  + bytes(V2_MAX_PAYLOAD - 15))
    assert parse_proxy_header(largest).length == V2_HEADER_LENGTH + V2_MAX_PAYLOAD


def test_v2_bad_fixed_fields_fail_before_the_payload_is_waited_for():
    assert "command" in _refused(_v2(0x25, 0x11, b"", length=12))
    assert "too short" in _refused(_v2(0x21, 0x11, b"", length=4))
    assert parse_proxy_header(_v2(0x21, 0x11, b"", length=12)) is None  # fine so far: wait


# --- anything else, and split reads ---------------------------------------------

@pytest.mark.parametrize("first", [SSL_REQUEST, STARTUP, b"\x16\x03\x01\x02\x00\x01", b"GET / HTTP/1.1\r\n",
                                   b"proxy TCP4", b"\r\n\r\n\x00\r\nquit\n", b"\r\r", b"\x00"])
def test_anything_but_a_header_is_refused_at_its_first_wrong_byte(first):
    assert "does not begin with a PROXY" in _refused(first)


def test_empty_and_partial_signatures_wait():
    for data in (b"", b"P", b"PROXY", b"PROXY ", b"\r", b"\r\n\r\n\x00", V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11"):
        assert parse_proxy_header(data) is None


@pytest.mark.parametrize("header", [
    v1_header(CLIENT4, BALANCER4), v1_header(CLIENT6, BALANCER6), b"PROXY UNKNOWN\r\n",
    v2_header(CLIENT4, BALANCER4), v2_header(CLIENT6, BALANCER6, tlvs=((0x01, b"postgresql"),), checksum=True),
    v2_header(local=True), v2_header(),
])
def test_every_cut_waits_then_gives_the_same_header(header):
    whole = parse_proxy_header(header + STARTUP)
    assert whole.length == len(header)
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) is None, cut
    rng = random.Random(len(header))
    for _ in range(20):  # arbitrary read sizes, as the network delivers them
        buf, offset = bytearray(), 0
        stream = header + STARTUP
        result = None
        while result is None:
            step = rng.randint(1, 9)
            buf += stream[offset:offset + step]
            offset += step
            result = parse_proxy_header(buf)
        assert result == whole and bytes(buf[result.length:]) + stream[offset:] == STARTUP


def test_the_parser_never_looks_past_the_longest_header():
    # A header that starts fine and never ends is refused once 16 + 536 (v2) or 107 (v1) bytes are in.
    assert "at most" in _refused(_v2(0x21, 0x11, b"", length=0xFFFF) + bytes(100_000))
    assert "no CRLF" in _refused(b"PROXY TCP4 " + b"1" * 100_000)


# --- who may send one -------------------------------------------------------------

def test_trusted_proxies_by_address_and_network():
    networks = ["10.0.0.0/24", "2001:db8::1", "127.0.0.2/32"]
    assert from_trusted_proxy("10.0.0.77", networks) and from_trusted_proxy("2001:db8::1", networks)
    assert from_trusted_proxy("::ffff:10.0.0.9", networks)  # an IPv4 balancer on an IPv6 listener
    assert not from_trusted_proxy("10.0.1.1", networks) and not from_trusted_proxy("127.0.0.1", networks)
    assert not from_trusted_proxy("unix", networks) and not from_trusted_proxy("", networks)
    assert not from_trusted_proxy("10.0.0.77", [])


# --- configuration ------------------------------------------------------------------

MINIMAL = {"backend": {"user": "pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "pgproxy"}},
           "audit": {"file": "/tmp/audit.jsonl"}}


def _config(**server):
    return {**MINIMAL, "server": {"listen": ["127.0.0.1:6432", "0.0.0.0:6440"], **server}}


def _problems(table) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(table)
    return info.value.problems


def test_proxy_protocol_is_off_by_default_and_names_listening_ports():
    cfg = parse_config(MINIMAL)
    assert cfg.server.proxy_protocol_listeners == [] and cfg.server.trusted_proxies == []
    cfg = parse_config(_config(proxy_protocol_listeners=["6440"], trusted_proxies=["10.0.0.0/24", "::1"]))
    assert cfg.server.proxy_protocol_listeners == ["6440"]


def test_proxy_protocol_configuration_mistakes_are_named():
    problems = _problems(_config(proxy_protocol_listeners=["6441", "unix", "127.0.0.1:6440"],
                                 trusted_proxies=["10.0.0.0/33", "balancer"]))
    assert "server.proxy_protocol_listeners[0]: port 6441 is not in server.listen" in problems
    assert any(p.startswith("server.proxy_protocol_listeners[1]: a port number") for p in problems)
    assert any(p.startswith("server.proxy_protocol_listeners[2]: a port number") for p in problems)
    assert "server.trusted_proxies[0]: not an address or network: '10.0.0.0/33'" in problems
    assert "server.trusted_proxies[1]: not an address or network: 'balancer'" in problems
    assert any(p.startswith("server.trusted_proxies: list the load balancers")
               for p in _problems(_config(proxy_protocol_listeners=["6440"])))
