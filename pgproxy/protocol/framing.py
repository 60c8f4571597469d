"""Framing: cutting byte streams into PostgreSQL messages, bounded before allocating.

Three readers, one per stream shape:

* ``read_startup_packet`` — the untyped first packet (StartupMessage, SSLRequest,
  GSSENCRequest, CancelRequest): int32 length, int32 code, body.
* ``MessageReader`` — typed messages (type byte + int32 length) read completely. Used
  for client -> proxy traffic, which the proxy must see whole before forwarding, and for
  server -> proxy traffic while the proxy itself talks to the server.
* ``ServerStreamScanner`` — the relay's server -> client direction. The caller forwards
  each chunk as is; the scanner walks only the message headers and hands back the
  bodies of the few message types the proxy must read (CommandComplete,
  ReadyForQuery, ...). Everything else (DataRow, RowDescription, CopyData) is skipped
  without being copied.

Every length is checked against a maximum before a byte of its body is kept; a bad
length is a protocol violation (08P01) for that connection only.
"""

from __future__ import annotations

import struct

from pgproxy.errors import protocol_violation
from pgproxy.protocol.messages import MAX_STARTUP_PACKET

_HDR = struct.Struct("!cI")
_HDR_LEN = struct.Struct("!I")
_STARTUP = struct.Struct("!ii")


def read_startup_packet(buf: bytearray) -> tuple[int, bytes] | None:
    """Take one startup-phase packet off ``buf``: (code, body) or None when incomplete."""
    if len(buf) < 8:
        return None
    length, code = _STARTUP.unpack_from(buf)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise protocol_violation(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None
    body = bytes(buf[8:length])
    del buf[:length]
    return code, body


class MessageReader:
    """Cuts a stream into whole typed messages of at most ``max_size`` bytes."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_size: int) -> None:
        self._buf: bytes | bytearray = b""  # a bytearray only while it holds part of a message
        self._max = max_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return each message now complete as (type, raw) with its header."""
        buf = self._buf
        if not buf:
            return self._split(data)
        buf += data  # not empty: a bytearray
        return self._split(buf)

    def _split(self, data: bytes | bytearray) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(data)
        max_size = self._max
        while end - pos >= 5:
            kind, length = _HDR.unpack_from(data, pos)
            if length < 4 or length > max_size:
                raise protocol_violation(f"invalid message length {length}")
            stop = pos + 1 + length
            if stop > end:
                break
            # A read that is exactly one message (the common case) is passed on uncopied.
            whole = data if (pos == 0 and stop == end and type(data) is bytes) else bytes(data[pos:stop])
            out.append((kind[0], whole))
            pos = stop
        if data is self._buf:
            if pos == end:
                self._buf = b""  # idle sessions keep no spare buffer
            else:
                del data[:pos]
        elif pos < end:
            # A length check on a partial header happens when the rest arrives.
            self._buf = bytearray(data[pos:])
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        """The bytes of an incomplete message, handed on (and no longer held here)."""
        rest = bytes(self._buf)
        self._buf = b""
        return rest


def first_outside(frames: list[tuple[int, bytes]], kinds: frozenset) -> int:
    """The index of the first message whose type is not in ``kinds``; -1 if there is none.
    (A session checks every batch of client messages so: compiled, a C loop.)"""
    for i in range(len(frames)):
        if frames[i][0] not in kinds:
            return i
    return -1


_WANTED_SETS: dict[bytes, frozenset] = {}


class ServerStreamScanner:
    """Follows message boundaries across forwarded chunks without copying skipped bodies."""

    __slots__ = ("_wanted", "_max", "_skip", "_head", "_kind", "_need", "_body")

    def __init__(self, wanted: bytes, max_body: int) -> None:
        # One frozenset per kind of scanner, shared: each session has a scanner, and a set
        # of a dozen bytes costs 700 bytes.
        self._wanted = _WANTED_SETS.get(wanted) or _WANTED_SETS.setdefault(wanted, frozenset(wanted))
        self._max = max_body
        self._skip = 0      # bytes still to pass of a message nobody reads
        self._head = b""    # a header split across chunks
        self._kind = 0      # type of a wanted message whose body is incomplete
        self._need = 0      # bytes of that body still missing
        self._body = b""    # (bytes, not bytearray: idle sessions keep no spare buffers)

    def feed(self, data: bytes) -> list[tuple[int, bytes, int]]:
        """Each wanted message completed in ``data``: (type, body, offset just past it in data)."""
        out: list[tuple[int, bytes, int]] = []
        pos, end = 0, len(data)
        wanted = self._wanted
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                continue
            if self._need:
                take = min(self._need, end - pos)
                self._body += data[pos:pos + take]
                self._need -= take
                pos += take
                if not self._need:
                    out.append((self._kind, self._body, pos))
                    self._body = b""
                continue
            if self._head or end - pos < 5:
                take = min(5 - len(self._head), end - pos)
                self._head += data[pos:pos + take]
                pos += take
                if len(self._head) < 5:
                    continue
                kind, length = _HDR.unpack(self._head)
                self._head = b""
            else:
                kind, length = _HDR.unpack_from(data, pos)
                pos += 5
            if length < 4:
                raise protocol_violation(f"invalid server message length {length}")
            size = length - 4
            kind = kind[0]
            if kind not in wanted:
                self._skip = size
            elif size > self._max:
                raise protocol_violation(f"server message of {size} bytes is too large to read")
            elif end - pos >= size:
                pos += size
                out.append((kind, bytes(data[pos - size:pos]), pos))
            elif size:
                self._kind, self._need = kind, size
            else:
                out.append((kind, b"", pos))
        return out

    @property
    def at_boundary(self) -> bool:
        return not (self._skip or self._need or self._head)
