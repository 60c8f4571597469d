"""One client connection, from its first byte to its last.

States (the only transitions):

    STARTUP --StartupMessage--> AUTHENTICATING --password--> LOGGING_IN --ok--> READY
       |  (SSLRequest/GSSENCRequest: answer 'N', stay; CancelRequest: forward, close)  |
       +-----------------------------------+-----------------------+-------------------+--> CLOSED

* STARTUP: untyped packets, at most 10,000 bytes each.
* AUTHENTICATING: we asked for a cleartext password (the token); the client sends one
  PasswordMessage and nothing else. Or, where [auth] offers OAUTHBEARER, the SASL exchange
  of auth/oauthbearer.py: one SASL message at a time; a refused token returns here from
  LOGGING_IN for the client's acknowledgement, then the session ends with 28000.
* LOGGING_IN: reading is paused while the credential is validated, the identity mapped
  to a role, a backend connection taken and switched to that role.
* READY: client messages are framed whole (bounded by ``server.max_message_size``) and
  handed to the session's ``Relay`` (frontend/relay.py), which forwards them and the
  replies, in either pool mode, and audits every statement.

Every exit goes through ``connection_lost``, which lets the relay hand the backend
connection back (reused only if nothing is in flight) and logs the reason. Every error
reaches the client through ``_fail`` as an ErrorResponse with its SQLSTATE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import secrets
import ssl
import time

from pgproxy.auth import oauthbearer as oauth
from pgproxy.auth.oauthbearer import AUTH_METHOD as OAUTH_METHOD, MECHANISM as OAUTH_MECHANISM
from pgproxy.auth.oauthbearer import OAuthBearerExchange, choose_method, discovery_url
from pgproxy.errors import (PgProxyError, ProxyFailure, insecure_transport, no_user_name, not_authorized,
                            protocol_violation, too_many_clients, unsupported)
from pgproxy.frontend.startup import client_settings, session_settings, text_array
from pgproxy.frontend.relay import Relay
from pgproxy.protocol import messages as msg
from pgproxy.protocol import switch
from pgproxy.protocol.framing import MessageReader, read_startup_packet
from pgproxy.roles import map_role
from pgproxy.tls import certificate_common_name, feed_protocol, plaintext_allowed

log = logging.getLogger("pgproxy.session")

_CLIENT_TYPES = frozenset(b"QPBESHCDXFdcfp")
_X = ord("X")
# Before authentication the only message is one PasswordMessage: a token (at most 16 KiB,
# auth/jwt.py) or a password. Bounding it here keeps an unauthenticated client from
# making the proxy buffer up to server.max_message_size; READY switches to that limit.
MAX_PASSWORD_MESSAGE = 32 * 1024


class SessionState(enum.Enum):
    STARTUP = "startup"
    AUTHENTICATING = "authenticating"
    LOGGING_IN = "logging_in"
    READY = "ready"
    CLOSED = "closed"


class _Statement:
    """One statement on its way through the database, for its audit record."""

    __slots__ = ("text", "params", "formats", "started", "t0", "tags", "sqlstate", "verdict", "changes")

    def __init__(self, text: str, params=None, formats=None, verdict=None) -> None:
        self.text, self.params, self.formats, self.verdict = text, params, formats, verdict
        self.started, self.t0 = time.time(), time.perf_counter()
        self.tags: list[bytes] = []  # raw CommandComplete bodies; the audit writer parses them
        self.sqlstate: str | None = None
        self.changes = ()  # settings the client takes along once this succeeds (session_state.py)


class ClientSession(asyncio.Protocol):
    # Slots: thousands of idle sessions are the memory budget (bench scenario 7).
    __slots__ = ("server", "state", "transport", "peer", "session_id", "user", "database", "role", "identity",
                 "backend", "pool", "cancel_key", "audit_prefix", "_startup_buf", "_reader",
                 "_settings", "_close_reason", "_auth_timer",
                 "_login_task", "connected_at", "relay", "peer_ip", "tls", "_upgrading", "protocol_minor", "_sasl")

    def __init__(self, server) -> None:
        self.server = server
        self.state = SessionState.STARTUP
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.session_id = secrets.token_hex(8)
        self.user = ""
        self.database = ""
        self.role = ""
        self.identity = None
        self.backend = None
        self.pool = None
        self.cancel_key: tuple[int, int] | None = None
        self.audit_prefix = ""  # this session's members of every statement record, as JSON
        self._startup_buf = bytearray()
        self._reader = MessageReader(MAX_PASSWORD_MESSAGE)  # until READY: see _finish_login
        self._settings: dict[str, str] = {}
        self._close_reason = ""
        self._auth_timer: asyncio.TimerHandle | None = None
        self._login_task: asyncio.Task | None = None
        self.connected_at = time.time()
        self.relay: Relay | None = None  # once logged in
        self.peer_ip = ""
        self.tls = None          # the ssl object once the client speaks TLS
        self._upgrading = False  # a TLS handshake is under way
        self.protocol_minor = 0  # the 3.x protocol agreed with the client (2: long cancel keys)
        self._sasl: OAuthBearerExchange | None = None  # while an OAUTHBEARER exchange runs

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.peer_ip = peer[0] if isinstance(peer, tuple) else "unix"
        self._auth_timer = asyncio.get_running_loop().call_later(
            self.server.cfg.server.auth_timeout_s, self._auth_timed_out)
        if not self.server.admit(self):
            self._fail(too_many_clients())

    def data_received(self, data: bytes) -> None:
        try:
            if self.state is SessionState.READY:
                self._relay_client(data)
            elif self.state is SessionState.STARTUP:
                self._startup(data)
            elif self.state is SessionState.AUTHENTICATING:
                self._password(data)
            elif self.state is SessionState.LOGGING_IN:
                raise protocol_violation("data sent before authentication finished")
        except PgProxyError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is SessionState.CLOSED and self.transport is None:
            return
        self.state = SessionState.CLOSED
        if self._auth_timer:
            self._auth_timer.cancel()
        reason = self._close_reason or (f"client connection lost: {exc}" if exc else "client closed the connection")
        if self.relay is not None:
            self.relay.close(reason)
            self.backend = None
        self.server.forget(self)
        if self.identity is not None:
            self.server.audit.event("session_end", session=self.session_id, user=self.user, role=self.role,
                                    reason=reason, duration_s=round(time.time() - self.connected_at, 3))
        log.info("client disconnected", extra={"session": self.session_id, "user": self.user or "-",
                                               "client": self.peer, "reason": reason})
        self.transport = None

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading the server.
        if self.backend is not None:
            self.backend.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.resume_reading()

    def pause_reading_client(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading_client(self) -> None:
        if self.transport is not None and self.state is SessionState.READY:
            self.transport.resume_reading()

    @property
    def logged_in(self) -> bool:
        return self.state is SessionState.READY

    @property
    def activity(self) -> str:
        """The state operators see: startup, authenticating, logging_in, idle, active or closed."""
        if self.state is SessionState.READY:
            return "active" if self.relay.active else "idle"
        return self.state.value

    @property
    def application_name(self) -> str:
        return self._settings.get("application_name", "")

    def startup_value(self, name: str) -> str | None:
        """The value the client gave a setting at startup (names are case-insensitive)."""
        return next((v for k, v in self._settings.items() if k.lower() == name), None)

    # --- errors and exits --------------------------------------------------------------

    def end(self, exc: PgProxyError) -> None:
        """End this session from outside (shutdown, later: an operator's kill)."""
        self._fail(exc)

    def _fail(self, exc: PgProxyError) -> None:
        """The one way an error reaches the client; FATAL (and any error before READY) closes."""
        level = logging.WARNING if isinstance(exc, ProxyFailure) or exc.fatal else logging.INFO
        if exc.denial:
            self.server.metrics.count("pgproxy_denials", exc.denial)
        log.log(level, "session error", extra={"session": self.session_id, "user": self.user or "-",
                                               "client": self.peer, "sqlstate": exc.sqlstate,
                                               "reason": exc.log_detail})
        if self.transport is None or self.transport.is_closing():
            return
        closing = exc.fatal or self.state is not SessionState.READY
        if closing and exc.severity != "FATAL":
            exc.severity = "FATAL"
        self.transport.write(msg.error_response(exc))
        if closing:
            self._close(exc.log_detail)

    def _close(self, reason: str) -> None:
        self._close_reason = self._close_reason or reason
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _auth_timed_out(self) -> None:
        if self.state is not SessionState.READY:
            self._fail(ProxyFailure("authentication timed out", sqlstate="08006", severity="FATAL"))

    # --- STARTUP -----------------------------------------------------------------------

    def _startup(self, data: bytes) -> None:
        buf = self._startup_buf
        if self._upgrading:  # the client's first bytes inside TLS, before start_tls returned
            buf += data
            return
        if not buf and self.tls is None and data[:1] == b"\x16":
            # A TLS ClientHello with no SSLRequest first: PostgreSQL 17's direct TLS.
            if self.server.cfg.client_tls is None:
                raise protocol_violation("TLS handshake, but this proxy has no certificate configured")
            self._start_tls(data)
            return
        buf += data
        while self.state is SessionState.STARTUP:
            packet = read_startup_packet(buf)
            if packet is None:
                return
            code, body = packet
            if code in (msg.SSL_REQUEST, msg.GSSENC_REQUEST):
                if body:
                    raise protocol_violation("malformed encryption request")
                if buf:  # bytes sent before our answer could be injected by a man in the middle
                    raise protocol_violation("data after encryption request before its answer")
                if code == msg.SSL_REQUEST and self.tls is None and self.server.cfg.client_tls is not None:
                    self.transport.write(b"S")
                    self._start_tls(b"")
                    return
                self.transport.write(msg.SSL_REFUSED)
            elif code == msg.CANCEL_REQUEST:
                pid, key = msg.parse_cancel_request(body)  # 4-byte keys (3.0) up to 256 (3.2)
                self.server.cancel(pid, key, self.peer)
                self._close("cancel request")
                return
            elif code >> 16 == 3:
                self._begin_auth(code & 0xFFFF, msg.parse_startup_params(body))
                if buf:
                    raise protocol_violation("data after startup packet before authentication")
            else:
                raise unsupported(f"protocol version {code >> 16}.{code & 0xFFFF}")

    def _start_tls(self, initial: bytes) -> None:
        self._upgrading = True
        self.transport.pause_reading()
        self._login_task = asyncio.get_running_loop().create_task(self._upgrade(initial))

    async def _upgrade(self, initial: bytes) -> None:
        """Switch the connection to TLS; ``initial``: a ClientHello already read (direct TLS)."""
        loop = asyncio.get_running_loop()
        raw = self.transport
        handshake = asyncio.ensure_future(loop.start_tls(
            raw, self, self.server.cfg.client_tls, server_side=True,
            ssl_handshake_timeout=self.server.cfg.server.auth_timeout_s))
        try:
            if initial:
                # start_tls has put its TLS protocol in front of ours; once that protocol
                # is connected, give it the bytes we already read.
                for _ in range(3):
                    await asyncio.sleep(0)
                feed_protocol(raw.get_protocol(), initial)
            transport = await handshake
        except (ssl.SSLError, OSError, ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
            self._close_reason = f"TLS handshake failed: {exc}"
            log.info("TLS handshake failed", extra={"session": self.session_id, "client": self.peer,
                                                    "reason": str(exc)})
            if not raw.is_closing():
                raw.close()
            self.connection_lost(None)  # the TLS layer may not tell us: forget the session here
            return
        finally:
            self._login_task = None
        self.transport = transport
        self.tls = transport.get_extra_info("ssl_object")
        self._upgrading = False
        pending, self._startup_buf = bytes(self._startup_buf), bytearray()
        if pending:
            self.data_received(pending)

    def _begin_auth(self, minor: int, params: dict[str, str]) -> None:
        self.user = params.get("user", "")
        if not self.user:
            raise no_user_name()
        self._check_transport_security()
        self.database = params.get("database") or self.user
        self._settings, protocol_options = client_settings(params)
        self._startup_buf = b""  # startup is over; the buffer is not needed again
        allowed = self.server.cfg.backend.databases
        if allowed and self.database not in allowed:
            raise not_authorized(self.user, f'database "{self.database}" is not in backend.databases')
        # As PostgreSQL does: a newer minor than ours, or _pq_ options (we support none), get
        # one NegotiateProtocolVersion with our newest minor; the session then speaks that.
        self.protocol_minor = min(minor, msg.PROTOCOL_LATEST_MINOR)
        if minor > msg.PROTOCOL_LATEST_MINOR or protocol_options:
            self.transport.write(msg.negotiate_protocol_version(self.protocol_minor, protocol_options))
        self._ask_for_credentials()
        self.state = SessionState.AUTHENTICATING

    def _ask_for_credentials(self) -> None:
        """Offer the one method [auth] chooses for this connection (auth/oauthbearer.py
        choose_method): a password prompt, or SASL OAUTHBEARER."""
        server, auth = self.server, self.server.cfg.auth
        sockname = self.transport.get_extra_info("sockname")
        listener = str(sockname[1]) if isinstance(sockname, tuple) else "unix"
        jwt = auth.jwt
        bearer_serves = server.jwt is not None and jwt is not None and (
            not jwt.databases or self.database in jwt.databases)
        method = choose_method(auth.methods, auth.listener_methods, auth.database_methods, listener,
                               self.database, bearer_serves, self.user)
        if method == OAUTH_METHOD:
            self._sasl = OAuthBearerExchange(discovery_url(auth.oauth_issuer or jwt.issuer), auth.oauth_scope)
            self.transport.write(msg.auth_sasl([OAUTH_MECHANISM]))
        else:
            self.transport.write(msg.AUTH_CLEARTEXT_PASSWORD)

    def _check_transport_security(self) -> None:
        """Passwords and tokens travel in the clear without TLS: only from trusted addresses.
        A client certificate, when given (or required), must name the user."""
        server_cfg = self.server.cfg.server
        if self.tls is None:
            if server_cfg.tls_client_certificates == "required":
                raise insecure_transport(self.user, "a client certificate is required, and this connection "
                                                    "has no TLS")
            if not plaintext_allowed(self.peer_ip, server_cfg.plaintext_networks):
                raise insecure_transport(self.user, f"plaintext login from {self.peer_ip}, outside "
                                                    "server.plaintext_networks")
            return
        if server_cfg.tls_client_certificates != "off":
            name = certificate_common_name(self.tls.getpeercert())
            if name is None and server_cfg.tls_client_certificates == "required":
                raise insecure_transport(self.user, "no client certificate")
            if name is not None and name != self.user:
                raise not_authorized(self.user, f'client certificate is for "{name}"')

    # --- AUTHENTICATING / LOGGING_IN ---------------------------------------------------

    def _password(self, data: bytes) -> None:
        messages = self._reader.feed(data)
        if not messages:
            return
        if len(messages) > 1 or self._reader.buffered or messages[0][0] != ord("p"):
            raise protocol_violation("expected exactly one password message" if self._sasl is None
                                     else "expected exactly one SASL response")
        if self._sasl is not None:
            self._sasl_response(messages[0][1][5:])
            return
        secret = messages[0][1][5:]
        if not secret.endswith(b"\0") or b"\0" in secret[:-1]:
            raise protocol_violation("malformed password message")
        self.state = SessionState.LOGGING_IN
        self.transport.pause_reading()
        self._login_task = asyncio.get_running_loop().create_task(
            self._login(secret[:-1].decode("utf-8", "replace")))

    # --- SASL OAUTHBEARER (auth/oauthbearer.py) ----------------------------------------

    def _sasl_response(self, body: bytes) -> None:
        step = self._sasl.receive(body)  # malformed: 08P01, raised to data_received
        if isinstance(step, oauth.Challenge):
            if self._sasl.step is oauth.Step.AWAIT_ACK:  # discovery, or a value that is no bearer token
                self._bearer_error(step)
            else:  # the empty challenge: the client sent no initial response yet
                self.transport.write(msg.auth_sasl_continue(step.data))
            return
        if isinstance(step, oauth.Validate):
            self.state = SessionState.LOGGING_IN
            self.transport.pause_reading()
            self._login_task = asyncio.get_running_loop().create_task(self._bearer_login(step.token))
            return
        # Refuse: the client acknowledged the error JSON; end as PostgreSQL does (FATAL 28000)
        refusal = oauth.bearer_refused(self.user, step.reason)
        if step.discovery:
            # Routine (libpq's first connection without a token), not a failed login: no
            # warning, no denial; the client reconnects with a token.
            log.debug("OAuth discovery answered", extra={"session": self.session_id, "client": self.peer})
            self.transport.write(msg.error_response(refusal))
            self._close("OAuth discovery answered; the client reconnects with a token")
            return
        raise refusal

    def _bearer_error(self, challenge: oauth.Challenge) -> None:
        """Send the error JSON; the client answers with a lone separator byte, then gets FATAL
        28000. A refused token is audited like a failed password; a discovery request is no
        failure."""
        if not self._sasl.discovery:
            self.server.audit.event("auth_failure", session=self.session_id, user=self.user, database=self.database,
                                    client=self.peer, reason=self._sasl.reason, auth_method=oauth.AUTH_METHOD)
        self.transport.write(msg.auth_sasl_continue(challenge.data))

    async def _bearer_login(self, token: str) -> None:
        try:
            reason = await self._bearer_authenticate(token)
            del token
            if self.state is SessionState.CLOSED:  # the client left while we worked
                return
            if reason is not None:
                self.state = SessionState.AUTHENTICATING
                self._bearer_error(self._sasl.refused(reason))
                self.transport.resume_reading()
                return
            self._sasl.accepted()
            self.identity = dataclasses.replace(self.identity, auth_method=oauth.AUTH_METHOD)
            await self._take_backend()
        except Exception as exc:  # e.g. the mapped role cannot be become
            self._login_failed(exc, {"auth_method": oauth.AUTH_METHOD})
        finally:
            self._login_task = None

    async def _bearer_authenticate(self, token: str) -> str | None:
        """Validate a bearer token where a token-as-password goes (``_authenticate``: the JWT
        validator, then identity and role mapping) and only there — never to the directory
        or the service accounts, which take passwords. None once the identity is set, else
        why the token is refused (for the log)."""
        server = self.server
        if server.authenticator_for(self.user, token, self.database) is not server.jwt:
            return ("the bearer token is not a JWT and [auth.jwt] has no introspection_url, or another "
                    "authenticator (service accounts, LDAP) claims this user or database")
        try:
            await self._authenticate(token)  # it chooses as authenticator_for just did: no await between
        except PgProxyError as exc:
            if exc.sqlstate in ("28P01", "28000"):
                return exc.log_detail
            raise
        return None

    async def _login(self, secret: str) -> None:
        try:
            await self._authenticate(secret)
            del secret
            await self._take_backend()
        except Exception as exc:
            self._login_failed(exc, {})
        finally:
            self._login_task = None

    def _login_failed(self, exc: Exception, extra: dict) -> None:
        """Either login path's end on an error: refusals audited, a bug costs this session only."""
        if not isinstance(exc, PgProxyError):
            log.exception("login failed unexpectedly", extra={"session": self.session_id}, exc_info=exc)
            exc = ProxyFailure("internal error", sqlstate="XX000", severity="FATAL", log_detail=repr(exc))
        elif exc.sqlstate in ("28P01", "28000"):
            self.server.audit.event("auth_failure", session=self.session_id, user=self.user, database=self.database,
                                    client=self.peer, reason=exc.log_detail, **extra)
        self._fail(exc)

    async def _authenticate(self, secret: str) -> None:
        identity = await self.server.authenticate(self.user, secret, self.database)
        self.user = identity.username  # svc:<name> for a service account
        role = map_role(identity, self.server.cfg.roles, self.server.cfg.auth.default_role)
        if role is None:
            raise not_authorized(self.user, f"no [[roles]] rule matches (groups: {', '.join(identity.groups) or '-'})")
        if role == self.server.cfg.backend.user:
            raise not_authorized(self.user, "role mapping names the pool role itself; refusing")
        self.identity, self.role = identity, role

    async def _take_backend(self) -> None:
        server = self.server
        if not server.audit.available:  # no session the trail cannot record (invariant 4)
            server.audit.note_refused("login")
            raise ProxyFailure("audit trail unavailable", sqlstate="58030", severity="FATAL",
                               log_detail=f"login refused: {server.audit.unavailable_reason}")
        pool = server.pool_for(self.database, self.role)
        transaction_mode = server.pool_mode_for(self.database, self.role) == "transaction"
        backend = await pool.acquire()
        identity = self.identity
        app = self._settings.get("application_name") or "unknown"
        identity_settings = {
            "pgproxy.user": identity.username, "pgproxy.groups": text_array(identity.groups),
            "pgproxy.auth_method": identity.auth_method, "pgproxy.subject": identity.subject,
            "application_name": f"{identity.username} via {app}"}
        if not transaction_mode:
            # Under transaction pooling a connection serves all sessions of one person with the
            # same settings without a switch, so it carries no session id.
            identity_settings["pgproxy.session_id"] = self.session_id
        policy, policy_settings = server.policy_for(self.role)
        settings = session_settings(self._settings, {**policy_settings, **identity_settings})
        person = (self.role, identity.username, identity.groups, identity.auth_method, identity.subject)
        relay = Relay(self, pool, self.role, person, settings, server.cfg.backend, pooled=transaction_mode,
                      policy=policy, signer=server.identity_signer(identity))
        try:
            if self.state is not SessionState.CLOSED and backend.state_key != relay.key:
                backend.switches += 1
                # The same switch the relay sends (protocol/switch.py), waited for here.
                await backend.exchange(switch.reset_messages(switch.DISCARD)
                                       + switch.apply_messages(self.role, relay.settings_for(backend),
                                                               switch.new_nonce()) + msg.SYNC, 1)
                backend.forget_state()
                backend.state_key, backend.person = relay.key, person
        except ProxyFailure as exc:
            # The apply is one statement: on error nothing of it was applied.
            backend.forget_state()
            pool.release(backend, reusable=not backend.broken, reason="identity switch failed")
            if exc.sqlstate.startswith(("42", "28")):
                raise not_authorized(self.user, f'cannot become role "{self.role}": {exc.log_detail}') from None
            raise
        except BaseException:
            pool.release(backend, reusable=False, reason="login interrupted")
            raise
        if self.state is SessionState.CLOSED:  # the client left while we worked
            pool.release(backend, reusable=True, reason="client left during login")
            return
        self.pool = pool
        self.relay = relay
        self._finish_login(backend, transaction_mode)
        if transaction_mode:
            pool.give_back(backend)  # taken again at the first statement
        else:
            relay.hold(backend)

    def _finish_login(self, backend, transaction_mode: bool) -> None:
        self.cancel_key = self.server.register_cancel(self)
        actor = {"client_id": self.identity.client_id} if self.identity.client_id else {}
        if self.identity.actors:
            actor["actors"] = list(self.identity.actors)  # an agent acting for the person (RFC 8693 'act')
        self.audit_prefix = self.server.audit.session_prefix(
            {"session": self.session_id, "user": self.user, "role": self.role, "auth_method": self.identity.auth_method,
             **actor, "application_name": self._settings.get("application_name", "")})
        params = dict(backend.params)
        out = [msg.AUTH_OK]
        out += [msg.parameter_status(k, v) for k, v in params.items()]
        out += [msg.backend_key_data(*self.cancel_key), msg.ready_for_query(b"I")]
        self.transport.write(b"".join(out))
        self._reader = MessageReader(self.server.cfg.server.max_message_size)  # logged in: the normal bound
        self.state = SessionState.READY
        if self._auth_timer:
            self._auth_timer.cancel()
        identity = self.identity
        self.server.audit.event("session_start", session=self.session_id, user=self.user, role=self.role,
                                subject=identity.subject, issuer=identity.issuer, groups=list(identity.groups),
                                auth_method=identity.auth_method, client_id=identity.client_id,
                                actors=list(identity.actors), client=self.peer, database=self.database,
                                application_name=self._settings.get("application_name", ""),
                                backend_pid=backend.pid, pool_mode="transaction" if transaction_mode else "session")
        log.info("session started", extra={"session": self.session_id, "user": self.user, "role": self.role,
                                           "client": self.peer, "database": self.database, "backend_pid": backend.pid})
        self.transport.resume_reading()

    # --- READY: client -> server -------------------------------------------------------

    def _relay_client(self, data: bytes) -> None:
        frames = self._reader.feed(data)
        if not frames:
            return
        for i, (kind, _) in enumerate(frames):
            if kind == _X or kind not in _CLIENT_TYPES:
                if i:
                    self.relay.client_frames(frames[:i])
                if kind == _X:
                    self._close("client sent Terminate")
                    return
                raise protocol_violation(f"unknown message type {bytes([kind])!r}")
        self.relay.client_frames(frames)

    # Services for the relay

    def new_statement(self, text: str, params=None, formats=None, verdict=None) -> _Statement:
        return _Statement(text, params, formats, verdict)

    def record_denial(self, text: str, reason: str) -> None:
        """The guard refused a statement: it never reached the database."""
        self.server.metrics.count("pgproxy_denials", "statement")
        self.server.audit.event("denied", session=self.session_id, user=self.user, role=self.role,
                                statement=text[:self.server.cfg.audit.max_statement_length], reason=reason)
        log.info("statement refused", extra={"session": self.session_id, "user": self.user, "reason": reason})

    def audit_local(self, tag: str) -> None:
        """A statement the proxy answered itself (DEALLOCATE, DISCARD ALL under transaction pooling)."""
        self.server.audit.statement(self.audit_prefix, tag, None, None, [tag.encode()], time.time(),
                                    0.0, "answered_by_proxy", None, None)

    def record_pin(self, reason: str, refused: bool) -> None:
        result = "refused" if refused else "pinned"
        self.server.metrics.count("pgproxy_pins", reason, result)
        self.server.audit.event("pin", session=self.session_id, user=self.user, role=self.role,
                                reason=reason, result=result)
        log.info("session pinned to its backend connection" if not refused else "session state refused",
                 extra={"session": self.session_id, "user": self.user, "reason": reason})

    def janitor_tick(self, now: float, idle_in_transaction_s: float) -> None:
        relay = self.relay
        if (relay is not None and idle_in_transaction_s and relay.backend is not None and not relay.active
                and (relay.txn_status in (b"T", b"E") or relay.sync_owed)
                and now - relay.idle_since > idle_in_transaction_s):
            self._fail(ProxyFailure("terminating connection due to idle-in-transaction timeout",
                                    sqlstate="25P03", severity="FATAL"))

    def audit_statement(self, st: _Statement, outcome: str, backend=None) -> None:
        backend = backend or self.backend
        seconds = time.perf_counter() - st.t0
        audit = self.server.audit
        seq = audit.statement(self.audit_prefix, st.text, st.params, st.formats, st.tags, st.started,
                              seconds, outcome, st.sqlstate, backend.pid if backend else None, st.verdict)
        if audit.before_result and self.relay is not None:
            self.relay.durable_due = seq  # its result reaches the client once this is on disk
        self.server.metrics.statement(st.text, seconds, outcome, st.verdict)

    def server_lost(self, reason: str) -> None:
        for st in self.relay.pending_statements():
            st.sqlstate = st.sqlstate or "08006"
            self.audit_statement(st, "connection_lost")
        self.relay.pipeline.clear()
        self._close(f"server connection lost: {reason}")
