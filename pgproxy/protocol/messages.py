"""Encoders and decoders for the PostgreSQL v3 messages pgproxy reads or writes.

Encoders return ready-to-send ``bytes``; decoders take a message *body* (without the
type byte and length) and raise ``ClientError`` (08P01) on malformed input, so a bad
peer can never raise anything but a protocol violation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pgproxy.errors import PgProxyError, protocol_violation

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!cI")

PROTOCOL_3_0 = 196608
# The newest protocol minor version pgproxy speaks with clients: 3.2 (PostgreSQL 18) made
# cancel keys variable-length (4 to 256 bytes); nothing else differs from 3.0.
PROTOCOL_LATEST_MINOR = 2
MIN_CANCEL_KEY, MAX_CANCEL_KEY = 4, 256  # bytes, as the 3.2 protocol allows
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP_PACKET = 10_000  # PostgreSQL's own MAX_STARTUP_PACKET_LENGTH


def message(kind: bytes, body: bytes = b"") -> bytes:
    return _HDR.pack(kind, len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


# --- proxy -> client ----------------------------------------------------------------

AUTH_OK = message(b"R", _I32.pack(0))
AUTH_CLEARTEXT_PASSWORD = message(b"R", _I32.pack(3))
AUTH_SASL, AUTH_SASL_CONTINUE = 10, 11
SSL_REFUSED = b"N"
SSL_REQUEST_PACKET = struct.pack("!ii", 8, SSL_REQUEST)


def error_response(err: PgProxyError) -> bytes:
    return _fields_message(b"E", err.severity, err.sqlstate, err.message)


def notice_response(sqlstate: str, text: str, severity: str = "NOTICE") -> bytes:
    return _fields_message(b"N", severity, sqlstate, text)


def _fields_message(kind: bytes, severity: str, sqlstate: str, text: str, position: int | None = None) -> bytes:
    body = (b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(sqlstate)
            + b"M" + cstr(text) + (b"P" + cstr(str(position)) if position else b"") + b"\0")
    return message(kind, body)


def statement_error(sqlstate: str, text: str, position: int | None = None) -> bytes:
    """An ERROR about one statement (the session carries on), with PostgreSQL's P field
    (1-based character position in the statement) when known."""
    return _fields_message(b"E", "ERROR", sqlstate, text, position)


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int | bytes) -> bytes:
    """The client's cancel key: a 4-byte secret (protocol 3.0), or the raw key bytes (3.2)."""
    key = struct.pack("!I", secret) if isinstance(secret, int) else secret
    return message(b"K", _I32.pack(pid) + key)


def negotiate_protocol_version(newest_minor: int, unknown_options: list[str]) -> bytes:
    """The newest 3.x version we speak, as PostgreSQL sends it: the full version number
    (196608 + minor), not the bare minor — libpq reads a bare 2 as a "downgrade to pre-3.0"."""
    body = struct.pack("!ii", PROTOCOL_3_0 + newest_minor, len(unknown_options))
    body += b"".join(cstr(o) for o in unknown_options)
    return message(b"v", body)


def auth_sasl(mechanisms: list[str]) -> bytes:
    """AuthenticationSASL: the mechanisms offered, each NUL-terminated, then an empty one."""
    return message(b"R", _I32.pack(AUTH_SASL) + b"".join(cstr(m) for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(AUTH_SASL_CONTINUE) + data)


# --- proxy -> server ----------------------------------------------------------------

def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!iiiI", 16, CANCEL_REQUEST, pid, secret)


def password_message(secret: bytes) -> bytes:
    return message(b"p", secret)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def query(text: str) -> bytes:
    return message(b"Q", cstr(text))


TERMINATE = message(b"X")
SYNC = message(b"S")
FLUSH = message(b"H")
PARSE_COMPLETE = message(b"1")
CLOSE_COMPLETE = message(b"3")


def parse_message(statement: str, text: str, param_types: tuple[int, ...] = ()) -> bytes:
    types = b"".join(_I32.pack(t - (1 << 32) if t >= 1 << 31 else t) for t in param_types)
    return message(b"P", cstr(statement) + cstr(text) + _I16.pack(len(param_types)) + types)


def bind_message(portal: str, statement: str, params: list[bytes] | tuple = ()) -> bytes:
    """Bind with text parameters (none by default); results in text."""
    values = b"".join(_I32.pack(len(p)) + p for p in params)
    return message(b"B", cstr(portal) + cstr(statement) + _I16.pack(0) + _I16.pack(len(params)) + values
                   + _I16.pack(0))


def execute_message(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", cstr(portal) + _I32.pack(max_rows))


def close_message(kind: str, name: str) -> bytes:
    return message(b"C", kind.encode() + cstr(name))


def describe_message(kind: str, name: str) -> bytes:
    return message(b"D", kind.encode() + cstr(name))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


# --- decoding -----------------------------------------------------------------------

class BodyReader:
    """Reads fields off one message body; any overrun is a protocol violation."""

    __slots__ = ("body", "pos")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def cstr(self) -> str:
        end = self.body.find(b"\0", self.pos)
        if end < 0:
            raise protocol_violation("unterminated string")
        raw = self.body[self.pos:end]
        self.pos = end + 1
        # Lenient: the client's encoding may not be UTF-8; text here is for logs and checks.
        return raw.decode("utf-8", "replace")

    def int16(self) -> int:
        return self._unpack("!h", 2)

    def int32(self) -> int:
        return self._unpack("!i", 4)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.body):
            raise protocol_violation("field runs past the end of the message")
        raw = self.body[self.pos:self.pos + n]
        self.pos += n
        return raw

    def _unpack(self, fmt: str, size: int) -> int:
        if self.pos + size > len(self.body):
            raise protocol_violation("message too short")
        (value,) = struct.unpack_from(fmt, self.body, self.pos)
        self.pos += size
        return value

    def rest(self) -> bytes:
        return self.body[self.pos:]


def parse_startup_params(body: bytes) -> dict[str, str]:
    """Key/value pairs of a StartupMessage body after the protocol code."""
    reader = BodyReader(body)
    params: dict[str, str] = {}
    while True:
        if reader.pos >= len(body):
            raise protocol_violation("startup packet is not terminated")
        if body[reader.pos] == 0:
            if reader.pos != len(body) - 1:
                raise protocol_violation("bytes after the end of the startup packet")
            return params
        key = reader.cstr()
        value = reader.cstr()
        if key in params:
            raise protocol_violation(f'startup parameter "{key}" given twice')
        params[key] = value


def parse_cancel_request(body: bytes) -> tuple[int, bytes]:
    """(process id, key) of a CancelRequest body after its code: keys of 4 bytes (protocol
    3.0) up to 256 bytes (3.2)."""
    if not MIN_CANCEL_KEY + 4 <= len(body) <= MAX_CANCEL_KEY + 4:
        raise protocol_violation("malformed cancel request")
    return _I32.unpack_from(body)[0], bytes(body[4:])


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes | None]:
    """(mechanism, initial response or None when the client sent none) of a
    SASLInitialResponse body; the data must fill the rest of the message exactly."""
    reader = BodyReader(body)
    mechanism = reader.cstr()
    length = reader.int32()
    if length == -1:
        data = None
    elif length < 0:
        raise protocol_violation("negative SASL response length")
    else:
        data = reader.take(length)
    if reader.pos != len(body):
        raise protocol_violation("bytes after the SASL initial response")
    return mechanism, data


def parse_query(body: bytes) -> str:
    return BodyReader(body).cstr()


@dataclass(slots=True)
class Parse:
    statement: str
    query: str
    param_types: tuple[int, ...]


def parse_parse(body: bytes) -> Parse:
    reader = BodyReader(body)
    statement, query = reader.cstr(), reader.cstr()
    types = tuple(reader.int32() & 0xFFFFFFFF for _ in range(_count(reader)))
    return Parse(statement, query, types)


@dataclass(slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: list[int]
    params: list[bytes | None]
    tail: int  # where the body continues after the statement name (to rename the statement)




def parse_bind(body: bytes) -> Bind:
    """Bind is on the hot path of every prepared statement: read with unpack_from,
    every count and length still checked against the body."""
    try:
        portal_end = body.index(0)
        statement_end = body.index(0, portal_end + 1)
        pos = statement_end + 1
        (n_formats,) = _I16.unpack_from(body, pos)
        pos += 2
        if n_formats < 0:
            raise protocol_violation("negative count")
        formats = list(struct.unpack_from(f"!{n_formats}h", body, pos)) if n_formats else []
        pos += 2 * n_formats
        (n_params,) = _I16.unpack_from(body, pos)
        pos += 2
        if n_params < 0:
            raise protocol_violation("negative count")
        params: list[bytes | None] = []
        end = len(body)
        for _ in range(n_params):
            (size,) = _I32.unpack_from(body, pos)
            pos += 4
            if size == -1:
                params.append(None)
            elif size < 0 or pos + size > end:
                raise protocol_violation("field runs past the end of the message")
            else:
                params.append(body[pos:pos + size])
                pos += size
    except (ValueError, struct.error):
        raise protocol_violation("malformed Bind message") from None
    return Bind(body[:portal_end].decode("utf-8", "replace"),
                body[portal_end + 1:statement_end].decode("utf-8", "replace"), formats, params, statement_end + 1)


def _count(reader: BodyReader) -> int:
    n = reader.int16()
    if n < 0:
        raise protocol_violation("negative count")
    return n


def parse_data_row(body: bytes) -> list[str | None]:
    """A DataRow's columns as text (NULL as None): for the proxy's own queries, in text format."""
    try:
        (count,) = _I16.unpack_from(body, 0)
        pos, values = 2, []
        for _ in range(count):
            (size,) = _I32.unpack_from(body, pos)
            pos += 4
            if size < 0:
                values.append(None)
            else:
                values.append(body[pos:pos + size].decode("utf-8", "replace"))
                pos += size
    except struct.error:
        raise protocol_violation("malformed DataRow message") from None
    return values


def parse_execute_portal(body: bytes) -> str:
    end = body.find(0)
    if end < 0:
        raise protocol_violation("unterminated portal name")
    return body[:end].decode("utf-8", "replace") if end else ""


def parse_close(body: bytes) -> tuple[str, str]:
    """(kind, name) of a Close or Describe: kind is 'S' (statement) or 'P' (portal)."""
    reader = BodyReader(body)
    kind = reader.take(1).decode("latin-1")
    if kind not in ("S", "P"):
        raise protocol_violation("Close/Describe names neither a statement nor a portal")
    return kind, reader.cstr()


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.find(b"\0", pos + 1)
        if end < 0:
            break
        fields[chr(body[pos])] = body[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, _, rest = body.partition(b"\0")
    return name.decode("utf-8", "replace"), rest.rstrip(b"\0").decode("utf-8", "replace")


def parse_command_tag(body: bytes) -> tuple[str, int | None]:
    """('SELECT 3' body) -> ('SELECT', 3); rows is None for tags without a count."""
    tag = body.rstrip(b"\0").decode("ascii", "replace")
    head, _, last = tag.rpartition(" ")
    if head and last.isdigit():
        verb = head.split(" ")[0]
        return verb, int(last)
    return tag, None
