"""The server side of SASL OAUTHBEARER (RFC 7628), as PostgreSQL 18 speaks it.

Pure: message bodies in, decisions out; the session (frontend/session.py) does the I/O
and hands a token to the same validation, identity and role mapping as token-as-password.

The exchange, as PostgreSQL's auth-oauth.c runs it (and libpq 18 expects it):

    proxy  AuthenticationSASL ["OAUTHBEARER"]
    client SASLInitialResponse "OAUTHBEARER", "n,," \\x01 "auth=" <value> \\x01 ... \\x01
             value empty            discovery: -> Challenge(error JSON), then the client's "\\x01"
                                    -> Refuse(discovery=True): FATAL 28000 and close. libpq then
                                    gets a token (device flow or application hook) and reconnects.
             value "Bearer <token>" -> Validate(token): the session validates it; AuthenticationOk,
                                    or refused(): Challenge(error JSON), "\\x01", Refuse, FATAL 28000.
    anything malformed              -> 08P01 (ClientError) and close.

The error JSON names where the client gets a token: {"status": "invalid_token",
"openid-configuration": "<issuer>/.well-known/openid-configuration", "scope": "<scopes>"}.
libpq compares that issuer byte for byte with its own ``oauth_issuer``.

Strict and bounded, like PostgreSQL: the GS2 header is ``n,,`` (``y,,`` is accepted as
PostgreSQL does: "the client could bind, but thinks we cannot", true, as there is no
OAUTHBEARER-PLUS; ``p`` — channel binding — and any authzid are refused), keys are ALPHA,
values VCHAR/SP/HTAB/CR/LF, one ``auth`` key, nothing after the final separator, at most
``MAX_CLIENT_RESPONSE`` bytes. A bearer value that is not ``Bearer <b64token>`` is an
authentication failure, not a protocol error, so nothing about the token is reflected to
the client; no error and no log line here ever holds a token.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from pgproxy.errors import ClientError, not_authorized, protocol_violation
from pgproxy.protocol import messages as msg

MECHANISM = "OAUTHBEARER"
AUTH_METHOD = "oauthbearer"   # the identity's auth_method (audit, pgproxy.auth_method)
PASSWORD = "password"
METHODS = (AUTH_METHOD, PASSWORD)
# A token is at most 16 KiB (auth/jwt.py MAX_TOKEN_LENGTH); the header, "auth=Bearer " and
# any host/port pairs fit in the rest.
MAX_CLIENT_RESPONSE = 20 * 1024
KVSEP = 0x01
_KEY_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VALUE_CHARS = frozenset(range(0x21, 0x7F)) | frozenset(b" \t\r\n")
_B64TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~+/")
_BEARER = "bearer "


def malformed(detail: str) -> ClientError:
    return protocol_violation(f"malformed OAUTHBEARER message: {detail}")


def bearer_refused(user: str, reason: str) -> ClientError:
    """How PostgreSQL ends a refused OAUTHBEARER exchange (the reason only in the log)."""
    return ClientError(f'OAuth bearer authentication failed for user "{user}"', sqlstate="28000",
                       severity="FATAL", log_detail=reason)


def discovery_url(issuer: str) -> str:
    """The OIDC discovery URL sent to clients: ``issuer`` itself if it is a .well-known URL
    already, else issuer + /.well-known/openid-configuration (as PostgreSQL builds it)."""
    return issuer if "/.well-known/" in issuer else issuer + "/.well-known/openid-configuration"


def error_challenge(openid_configuration: str, scope: str) -> bytes:
    """RFC 7628 section 3.2.2's server error: where to get a token, and for which scopes."""
    return json.dumps({"status": "invalid_token", "openid-configuration": openid_configuration,
                       "scope": scope}).encode()


def parse_client_response(data: bytes) -> str:
    """The ``auth`` value of a client's first OAUTHBEARER message (empty: discovery).
    Raises 08P01 on anything RFC 7628 (and PostgreSQL) do not allow."""
    if not data:
        raise malformed("the message is empty")
    if len(data) > MAX_CLIENT_RESPONSE:
        raise malformed(f"longer than {MAX_CLIENT_RESPONSE} bytes")
    if b"\0" in data:
        raise malformed("the message contains a NUL byte")
    flag = data[:1]
    if flag == b"p":
        raise malformed("channel binding is not supported for OAUTHBEARER")
    if flag not in (b"n", b"y"):
        raise malformed("unexpected channel-binding flag")
    if data[1:2] != b",":
        raise malformed("comma expected after the channel-binding flag")
    if data[2:3] == b"a":
        raise malformed("an authorization identity (authzid) is not supported")
    if data[2:3] != b",":
        raise malformed("unexpected attribute in the GS2 header")
    if data[3:4] != bytes([KVSEP]):
        raise malformed("key/value separator expected after the GS2 header")
    auth = None
    pos = 4
    while True:
        end = data.find(KVSEP, pos)
        if end < 0:
            raise malformed("unterminated key/value pair, or no final separator")
        if end == pos:  # the empty pair: the end of the list
            if end + 1 != len(data):
                raise malformed("data after the final separator")
            break
        key, sep, value = data[pos:end].partition(b"=")
        if not sep:
            raise malformed("a key without a value")
        if not key or not set(key) <= _KEY_CHARS:
            raise malformed("an empty or invalid key name")
        if not set(value) <= _VALUE_CHARS:
            raise malformed("an invalid character in a value")
        if key == b"auth":
            if auth is not None:
                raise malformed("more than one auth value")
            auth = value.decode("ascii")
        # host, port and unknown keys are ignored, as RFC 7628 section 3.1 requires
        pos = end + 1
    if auth is None:
        raise malformed("no auth value")
    return auth


def bearer_token(auth: str) -> tuple[str | None, str]:
    """(token, "") from an ``auth`` value ``Bearer <b64token>`` (RFC 6750 section 2.1; the
    scheme compared without case), or (None, why not) — the reason never quotes the value."""
    if auth[:len(_BEARER)].lower() != _BEARER:
        return None, "the auth value is not a Bearer credential"
    token = auth[len(_BEARER):].lstrip(" ")
    if not token:
        return None, "the Bearer token is empty"
    body = token.rstrip("=")
    if not body or not set(body) <= _B64TOKEN_CHARS:
        return None, "the Bearer token is not a b64token (RFC 6750)"
    return token, ""


# --- the exchange --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Challenge:
    """Send AuthenticationSASLContinue with ``data``; the exchange goes on."""
    data: bytes


@dataclass(frozen=True, slots=True)
class Validate:
    """Validate this token (repr hides it); then ``accepted()`` or ``refused(reason)``."""
    token: str

    def __repr__(self) -> str:
        return "Validate(token=<hidden>)"


@dataclass(frozen=True, slots=True)
class Refuse:
    """The exchange is over and failed: end the session with ``bearer_refused``."""
    discovery: bool   # the client only asked where to get a token (not a failed login)
    reason: str


class Step(enum.Enum):
    INITIAL = "initial"              # waiting for SASLInitialResponse
    AWAIT_RESPONSE = "await"         # the initial response had no data; waiting for it
    VALIDATING = "validating"        # the session checks the token; no client message is allowed
    AWAIT_ACK = "await_ack"          # we sent the error JSON; waiting for the client's lone \x01
    DONE = "done"


class OAuthBearerExchange:
    """One OAUTHBEARER exchange, server side. ``receive`` takes each 'p' message body."""

    __slots__ = ("step", "discovery", "reason", "_challenge")

    def __init__(self, openid_configuration: str, scope: str) -> None:
        self.step = Step.INITIAL
        self.discovery = False  # the client asked where to get a token (an empty auth value)
        self.reason = ""        # why the exchange fails, for the log (never the token)
        self._challenge = error_challenge(openid_configuration, scope)

    def receive(self, body: bytes) -> Challenge | Validate | Refuse:
        step = self.step
        if step is Step.INITIAL:
            mechanism, data = msg.parse_sasl_initial_response(body)
            if mechanism != MECHANISM:
                raise protocol_violation("client selected an invalid SASL authentication mechanism")
            if data is None:  # no initial response: an empty challenge asks for it (RFC 4422)
                self.step = Step.AWAIT_RESPONSE
                return Challenge(b"")
            return self._client_first(data)
        if step is Step.AWAIT_RESPONSE:
            return self._client_first(body)
        if step is Step.AWAIT_ACK:
            if body != bytes([KVSEP]):
                raise malformed("the client did not answer the error with a lone separator")
            self.step = Step.DONE
            return Refuse(self.discovery, self.reason)
        raise protocol_violation("unexpected SASL message")

    def refused(self, reason: str) -> Challenge:
        """The token did not validate: send the error JSON, then expect the client's \\x01."""
        if self.step is not Step.VALIDATING:
            raise RuntimeError(f"refused() in step {self.step}")
        self.step, self.reason = Step.AWAIT_ACK, reason
        return Challenge(self._challenge)

    def accepted(self) -> None:
        if self.step is not Step.VALIDATING:
            raise RuntimeError(f"accepted() in step {self.step}")
        self.step = Step.DONE

    def _client_first(self, data: bytes) -> Challenge | Validate:
        auth = parse_client_response(data)
        if not auth:
            self.step, self.discovery, self.reason = Step.AWAIT_ACK, True, "OAuth discovery requested"
            return Challenge(self._challenge)
        token, why_not = bearer_token(auth)
        if token is None:
            self.step, self.reason = Step.AWAIT_ACK, why_not
            return Challenge(self._challenge)
        self.step = Step.VALIDATING
        return Validate(token)


# --- which method a connection is offered --------------------------------------------

def choose_method(methods: list[str], listener_methods: dict[str, str], database_methods: dict[str, str],
                  listener: str, database: str, bearer_serves: bool, user: str = "") -> str:
    """The one method a new connection is asked for (a libpq before 18 cannot choose between
    SASL and a password prompt, so each connection is offered exactly one).

    ``listener_methods[listener]`` (the local port, or "unix"), else
    ``database_methods[database]``, else the first of ``methods`` that can serve the
    connection: oauthbearer only where the JWT validator serves the database
    (``bearer_serves``). Refused (28000) if what was chosen cannot serve it."""
    chosen = listener_methods.get(listener) or database_methods.get(database)
    candidates = [chosen] if chosen else methods
    for method in candidates:
        if method == PASSWORD or (method == AUTH_METHOD and bearer_serves):
            return method
    raise not_authorized(user, f'auth method {candidates[0]} is configured for database "{database}" '
                             f"(listener {listener}), but [auth.jwt] does not serve that database")
