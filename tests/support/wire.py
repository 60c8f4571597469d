"""A minimal raw-socket PostgreSQL client for tests that must see exact protocol replies
(SQLSTATEs of failed logins, answers to malformed packets)."""

from __future__ import annotations

import socket
import struct

from pgproxy.protocol import messages as msg


class Wire:
    opened: list["Wire"] = []  # closed after each test by the close_wires fixture

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        Wire.opened.append(self)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self) -> tuple[str, bytes] | None:
        """The next typed message, or None when the server closed the connection."""
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!I", self.buf, 1)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        length = struct.unpack_from("!I", self.buf, 1)[0]
        kind, body = chr(self.buf[0]), self.buf[5:1 + length]
        self.buf = self.buf[1 + length:]
        return kind, body

    def read_until(self, kinds: str) -> list[tuple[str, bytes]]:
        out = []
        while True:
            message = self.read_message()
            if message is None:
                return out
            out.append(message)
            if message[0] in kinds:
                return out

    def closed_by_server(self) -> bool:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def error_fields(body: bytes) -> dict[str, str]:
    return msg.parse_error_fields(body)


def login(port: int, user: str, password: str, database: str = "demo", **params) -> tuple[Wire, list]:
    """Start up and send the password; return the socket and every reply up to Z or E."""
    wire = Wire(port)
    wire.send(msg.startup_message({"user": user, "database": database, **params}))
    first = wire.read_message()
    if first is None or first[0] == "E":
        return wire, [first]
    assert first == ("R", struct.pack("!i", 3)), first
    wire.send(msg.password_message(password.encode() + b"\0"))
    return wire, wire.read_until("ZE")


def login_error(port: int, user: str, password: str, **params) -> dict[str, str]:
    """The ErrorResponse fields of a login that must fail."""
    wire, replies = login(port, user, password, **params)
    wire.close()
    last = replies[-1]
    assert last is not None and last[0] == "E", f"login did not fail: {replies}"
    return error_fields(last[1])
