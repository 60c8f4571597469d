"""Client side of PostgreSQL password authentication: SCRAM-SHA-256 (RFC 5802/7677) and md5.

Pure: each step takes the server's bytes and returns the bytes to send; the backend
connection does the I/O. With channel-binding data (TLS, tls-server-end-point) the
mechanism is SCRAM-SHA-256-PLUS and the GS2 header "p=tls-server-end-point,,"; over TLS
without it, "y,," (we could bind, the server did not offer to); without TLS, "n,,".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from pgproxy.errors import backend_unavailable


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


class ScramClient:
    MECHANISM = "SCRAM-SHA-256"
    PLUS = "SCRAM-SHA-256-PLUS"

    def __init__(self, password: str, binding: bytes | None = None, tls: bool = False) -> None:
        self._password = password.encode()
        self._nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self._first_bare = f"n=,r={self._nonce}"
        self._server_signature = b""
        self._binding = binding
        self._gs2 = "p=tls-server-end-point,," if binding is not None else ("y,," if tls else "n,,")
        self.mechanism = self.PLUS if binding is not None else self.MECHANISM

    def client_first(self) -> bytes:
        return (self._gs2 + self._first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        attrs = _attributes(server_first)
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or not salt or not iterations.isdigit():
            raise backend_unavailable("backend sent an invalid SCRAM server-first message")
        salted = hashlib.pbkdf2_hmac("sha256", self._password, base64.b64decode(salt), int(iterations))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        channel = base64.b64encode(self._gs2.encode() + (self._binding or b"")).decode()
        final_bare = f"c={channel},r={nonce}"
        auth_message = f"{self._first_bare},{server_first.decode()},{final_bare}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{final_bare},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        attrs = _attributes(server_final)
        expected = base64.b64encode(self._server_signature).decode()
        if not hmac.compare_digest(attrs.get("v", ""), expected):
            raise backend_unavailable("backend's SCRAM server signature does not verify")


def _attributes(data: bytes) -> dict[str, str]:
    out = {}
    for part in data.decode("ascii", "replace").split(","):
        key, _, value = part.partition("=")
        out[key] = value
    return out
