"""The PROXY protocol header (HAProxy's, versions 1 and 2): how a TCP load balancer tells
us whose connection it passes on.

Pure: ``parse_proxy_header(buffer)`` returns a ``ProxyHeader``, None while the bytes so far
could still begin a valid header, or raises ``ProxyHeaderError``. It never reads past the
header: ``ProxyHeader.length`` bytes are the header, the rest belongs to PostgreSQL's
protocol (SSLRequest, StartupMessage, a TLS ClientHello) and is the caller's.

Strict and bounded, because the bytes come from the network before anyone is trusted:

* v1 (text): ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``;
  at most 107 bytes, printable ASCII, single spaces, addresses of the stated family,
  decimal ports without leading zeros.
* v2 (binary): the 12-byte signature, version 2, command LOCAL or PROXY, a family byte
  (TCP over IPv4 or IPv6, stream Unix sockets, or UNSPEC), and a payload of at most
  ``V2_MAX_PAYLOAD`` bytes: the address block, then TLVs, each of which must fit; a
  CRC32C TLV, if sent, must match. Other TLVs are kept opaque.
* A prefix that can no longer become a header fails at once, so a client that sends a
  plain StartupMessage is refused without waiting for more bytes.

``source`` is None when the header names no client (v2 LOCAL — the balancer's own health
check —, v1 UNKNOWN, v2 UNSPEC or Unix-socket families): the caller keeps the address of
the connection itself, as the specification says.

Specification: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the specification's worst case: "PROXY UNKNOWN " + two full IPv6 addresses, ports, CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16
# Our bound (the length field would allow 65535): room for the largest address block
# (216 bytes, Unix sockets) and the TLVs balancers send (ALPN, authority, unique id, SSL
# details). A longer header is refused on its fixed 16 bytes, before its payload is waited for.
V2_MAX_PAYLOAD = 536

_LOCAL, _PROXY = 0x0, 0x1
# family byte -> (address block length, address length); only stream transports
_FAMILIES = {0x00: (0, 0), 0x11: (12, 4), 0x21: (36, 16), 0x31: (216, 108)}
_PP2_TYPE_CRC32C = 0x03
_V1_ALLOWED = frozenset(range(0x20, 0x7F))  # printable ASCII; CR LF end the line


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message says why (for the log)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int                             # bytes the header takes at the start of the stream
    version: int                            # 1 or 2
    source: tuple[str, int] | None          # the client's (address, port); None: keep the connection's
    destination: tuple[str, int] | None     # the address the client connected to (the balancer's)
    command: str = "PROXY"                  # v2: PROXY or LOCAL; v1: PROXY
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 type-length-values, in order


def parse_proxy_header(buffer: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``buffer``; None if more bytes are needed."""
    data = bytes(buffer[:V2_HEADER_LENGTH + V2_MAX_PAYLOAD])  # no header is longer: never copy more
    if not data:
        return None
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        return _parse_v2(data)
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        return _parse_v1(data)
    raise ProxyHeaderError("the connection does not begin with a PROXY protocol header")


# --- version 1 ----------------------------------------------------------------------

def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\n", 0, V1_MAX_LENGTH)
    line = data[:V1_MAX_LENGTH] if end < 0 else data[:end]
    text = line[:-1] if line.endswith(b"\r") else line  # CR only where the line ends
    for i, byte in enumerate(text):  # a bad byte fails when it arrives, not when the line is complete
        if byte not in _V1_ALLOWED:
            raise ProxyHeaderError(f"v1: byte {byte:#04x} at offset {i}")
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1: no CRLF within {V1_MAX_LENGTH} bytes")
        return None
    if not line.endswith(b"\r"):
        raise ProxyHeaderError("v1: the line does not end with CRLF")
    fields = data[:end - 1].decode("ascii").split(" ")
    if len(fields) < 2 or fields[1] not in ("TCP4", "TCP6", "UNKNOWN"):
        raise ProxyHeaderError("v1: the protocol is not TCP4, TCP6 or UNKNOWN")
    if fields[1] == "UNKNOWN":  # the specification: ignore whatever else is on the line
        return ProxyHeader(length=end + 1, version=1, source=None, destination=None)
    if len(fields) != 6:
        raise ProxyHeaderError("v1: expected PROXY <protocol> <source> <destination> <sport> <dport>")
    family = ipaddress.IPv4Address if fields[1] == "TCP4" else ipaddress.IPv6Address
    source = (_v1_address(family, fields[2]), _v1_port(fields[4]))
    destination = (_v1_address(family, fields[3]), _v1_port(fields[5]))
    return ProxyHeader(length=end + 1, version=1, source=source, destination=destination)


def _v1_address(family, text: str) -> str:
    try:
        if "%" in text:  # an IPv6 zone names an interface of the balancer's host: not a client
            raise ValueError
        return str(family(text))  # ipaddress refuses leading zeros in IPv4, stray characters, ...
    except ValueError:
        raise ProxyHeaderError(f"v1: not an {'IPv4' if family is ipaddress.IPv4Address else 'IPv6'} "
                               f"address: {text[:45]!r}") from None


def _v1_port(text: str) -> int:
    if not (text.isdigit() and text.isascii() and len(text) <= 5) or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise ProxyHeaderError(f"v1: not a port: {text[:8]!r}")
    return int(text)


# --- version 2 ----------------------------------------------------------------------

def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_HEADER_LENGTH:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family = data[13]
    payload_length = int.from_bytes(data[14:16], "big")
    # Everything in the fixed part is checked before the payload is waited for.
    if version != 2:
        raise ProxyHeaderError(f"v2: version {version}")
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"v2: command {command:#x} is neither LOCAL nor PROXY")
    if payload_length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"v2: {payload_length} bytes of addresses and TLVs (at most {V2_MAX_PAYLOAD})")
    if command == _PROXY:
        if family not in _FAMILIES:
            raise ProxyHeaderError(f"v2: address family and transport {family:#04x} (only TCP over IPv4 "
                                   "or IPv6, stream Unix sockets, or UNSPEC)")
        if payload_length < _FAMILIES[family][0]:
            raise ProxyHeaderError(f"v2: {payload_length} bytes, too short for the addresses of family {family:#04x}")
    length = V2_HEADER_LENGTH + payload_length
    if len(data) < length:
        return None
    if command == _LOCAL:
        # The balancer speaking for itself (health checks): the specification says to
        # use the connection's own endpoints and discard the rest, family included.
        return ProxyHeader(length=length, version=2, source=None, destination=None, command="LOCAL")
    block, size = _FAMILIES[family]
    tlvs = _parse_tlvs(data[:length], V2_HEADER_LENGTH + block)
    if family in (0x11, 0x21):
        start = V2_HEADER_LENGTH
        make = ipaddress.IPv4Address if family == 0x11 else ipaddress.IPv6Address
        src = str(make(data[start:start + size]))
        dst = str(make(data[start + size:start + 2 * size]))
        ports = start + 2 * size
        sport = int.from_bytes(data[ports:ports + 2], "big")
        dport = int.from_bytes(data[ports + 2:ports + 4], "big")
        return ProxyHeader(length=length, version=2, source=(src, sport), destination=(dst, dport), tlvs=tlvs)
    # UNSPEC, or a client on the balancer's own Unix socket: no network address to report.
    return ProxyHeader(length=length, version=2, source=None, destination=None, tlvs=tlvs)


def _parse_tlvs(header: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    while offset < len(header):
        if offset + 3 > len(header):
            raise ProxyHeaderError("v2: a truncated TLV")
        kind = header[offset]
        size = int.from_bytes(header[offset + 1:offset + 3], "big")
        value_at = offset + 3
        if value_at + size > len(header):
            raise ProxyHeaderError(f"v2: TLV {kind:#04x} of {size} bytes runs past the header")
        value = header[value_at:value_at + size]
        if kind == _PP2_TYPE_CRC32C:
            if size != 4:
                raise ProxyHeaderError("v2: a CRC32C TLV of other than 4 bytes")
            zeroed = header[:value_at] + b"\0\0\0\0" + header[value_at + 4:]
            if crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyHeaderError("v2: the CRC32C checksum does not match")
        tlvs.append((kind, value))
        offset = value_at + size
    return tuple(tlvs)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the PP2_TYPE_CRC32C TLV carries it. Headers are at most
    552 bytes: a table-driven loop in Python is fast enough."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def from_trusted_proxy(address: str, networks: list[str]) -> bool:
    """Is ``address`` (the connection's own peer) one of ``networks`` (server.trusted_proxies)?
    An IPv4 client of an IPv6 listener (::ffff:a.b.c.d) is matched as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # "unix", or nothing: never a trusted balancer
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


# --- building headers (tests, tools) ---------------------------------------------

def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2_header(source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None, *,
              local: bool = False, tlvs: tuple[tuple[int, bytes], ...] = (), checksum: bool = False) -> bytes:
    """A v2 header: PROXY for ``source`` -> ``destination`` (TCP, IPv4 or IPv6), PROXY with
    UNSPEC when no addresses are given, or LOCAL. ``checksum`` appends a CRC32C TLV."""
    if source is None:
        family, block = 0x00, b""
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        family = 0x11 if src.version == 4 else 0x21
        block = src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    body = block + b"".join(bytes([k]) + len(v).to_bytes(2, "big") + v for k, v in tlvs)
    if checksum:
        body += bytes([_PP2_TYPE_CRC32C]) + (4).to_bytes(2, "big") + b"\0\0\0\0"
    head = V2_SIGNATURE + bytes([0x20 | (_LOCAL if local else _PROXY), family]) + len(body).to_bytes(2, "big")
    header = head + body
    if checksum:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header
