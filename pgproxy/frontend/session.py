"""One client connection, from its first byte to its last.

States (the only transitions):

    STARTUP --StartupMessage--> AUTHENTICATING --password--> LOGGING_IN --ok--> READY
       |  (SSLRequest/GSSENCRequest: answer 'N', stay; CancelRequest: forward, close)  |
       +-----------------------------------+-----------------------+-------------------+--> CLOSED

* STARTUP: untyped packets, at most 10,000 bytes each. On a server.proxy_protocol_listeners
  port the connection must first bring a PROXY header from a trusted balancer, which sets
  the client's address (``_take_proxy_header``); without one it is refused (08P01).
* AUTHENTICATING: we asked for a cleartext password (the token); the client sends one
  PasswordMessage and nothing else. Or, where [auth] offers OAUTHBEARER, the SASL exchange
  of auth/oauthbearer.py: one SASL message at a time; a refused token returns here from
  LOGGING_IN for the client's acknowledgement, then the session ends with 28000.
* LOGGING_IN: reading is paused while the credential is validated, the identity mapped
  to a role (and admitted by that role's [[access]] conditions, ``admit_role``), a backend
  connection taken and switched to that role.
* READY: client messages are framed whole (bounded by ``server.max_message_size``) and
  handed to the session's ``Relay`` (frontend/relay.py), which forwards them and the
  replies, in either pool mode, and audits every statement. Nothing passes once the
  session's token has expired (``credential_ends_at``, see pgproxy/revalidation.py).

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
import sys
import time

from pgproxy.auth import oauthbearer as oauth
from pgproxy.auth.oauthbearer import AUTH_METHOD as OAUTH_METHOD, MECHANISM as OAUTH_MECHANISM
from pgproxy.auth.oauthbearer import OAuthBearerExchange, choose_method, discovery_url
from pgproxy.errors import (PgProxyError, ProxyFailure, insecure_transport, no_user_name, not_authorized,
                            protocol_violation, proxy_protocol_refused, too_many_clients, unsupported)
from pgproxy.frontend.startup import client_settings, session_settings, text_array
from pgproxy.control_plane import instance_name
from pgproxy.frontend.engine import POOL_MODES, Engine
from pgproxy.frontend.relay import Relay
from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import MessageReader, first_outside, read_startup_packet
from pgproxy.protocol.proxy_header import ProxyHeaderError, from_trusted_proxy, parse_proxy_header
from pgproxy.policy.access import Context, access_refused, token_expired
from pgproxy.roles import admit_role
from pgproxy.tls import certificate_common_name, feed_protocol, plaintext_allowed

log = logging.getLogger("pgproxy.session")

_RELAYED_TYPES = frozenset(b"QPBESHCDFdcfp")  # what a logged-in client may send, less Terminate (X)
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


class ClientSession(asyncio.Protocol):
    # Slots: thousands of idle sessions are the memory budget (bench scenario 7).
    __slots__ = ("server", "state", "transport", "peer", "session_id", "user", "database", "role", "identity",
                 "pool", "cancel_key", "audit_prefix", "_startup_buf", "_reader",
                 "_settings", "_close_reason", "_auth_timer",
                 "_login_task", "connected_at", "relay", "peer_ip", "tls", "_upgrading", "protocol_minor", "_sasl",
                 "proxied_by", "_proxy_header_due", "credential_ends_at", "revalidated_at", "_end_cause")

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
        # peer / peer_ip: the client's address — on a server.proxy_protocol_listeners port,
        # the one its PROXY header names, set before any startup packet is read. Everything
        # that judges a client by address reads peer_ip (plaintext_networks, and per-role
        # network conditions); proxied_by is then the balancer's "ip:port", else "".
        self.peer_ip = ""
        self.proxied_by = ""
        self._proxy_header_due = False  # a PROXY header must come before anything else
        self.tls = None          # the ssl object once the client speaks TLS
        self._upgrading = False  # a TLS handshake is under way
        self.protocol_minor = 0  # the 3.x protocol agreed with the client (2: long cancel keys)
        self._sasl: OAuthBearerExchange | None = None  # while an OAUTHBEARER exchange runs
        # Sessions end when their credential does (pgproxy/revalidation.py): the token's exp +
        # leeway (time.time(); inf: no expiry), the last good directory re-check (monotonic),
        # and why the session was ended for it (the session_end record's cause).
        self.credential_ends_at = float("inf")
        self.revalidated_at = 0.0
        self._end_cause = ""

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        # One string per address, not per connection: clients come from few addresses.
        self.peer_ip = sys.intern(peer[0]) if isinstance(peer, tuple) else "unix"
        self._auth_timer = asyncio.get_running_loop().call_later(
            self.server.cfg.server.auth_timeout_s, self._auth_timed_out)  # the PROXY header's deadline too
        server_cfg = self.server.cfg.server
        sockname = transport.get_extra_info("sockname")
        # Listeners are named by local port, as auth.listener_methods names them.
        self._proxy_header_due = (isinstance(sockname, tuple)
                                  and str(sockname[1]) in server_cfg.proxy_protocol_listeners)
        if not self.server.admit(self):
            self._fail(too_many_clients())
        elif self._proxy_header_due and not from_trusted_proxy(self.peer_ip, server_cfg.trusted_proxies):
            # Refused, never served as a direct client: on this port the address is the header's.
            self._fail(proxy_protocol_refused(f"{self.peer} connected to PROXY protocol port {sockname[1]} and is "
                                              "not in server.trusted_proxies"))

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
        self.server.forget(self)
        if self.identity is not None:
            cause = {"cause": self._end_cause} if self._end_cause else {}
            self.server.audit.event("session_end", session=self.session_id, user=self.user, role=self.role,
                                    reason=reason, duration_s=round(time.time() - self.connected_at, 3), **cause)
        log.info("client disconnected", extra={"session": self.session_id, "user": self.user or "-",
                                               "client": self.peer, "reason": reason})
        self.transport = None

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading the server.
        backend = self.backend
        if backend is not None:
            backend.pause_reading()

    def resume_writing(self) -> None:
        backend = self.backend
        if backend is not None:
            backend.resume_reading()

    def pause_reading_client(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading_client(self) -> None:
        if self.transport is not None and self.state is SessionState.READY:
            self.transport.resume_reading()

    @property
    def backend(self):
        """The backend connection this session holds right now, if any."""
        return self.relay.backend if self.relay is not None else None

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
        if self._proxy_header_due:
            data = self._take_proxy_header(data)
            if not data:
                return
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

    def _take_proxy_header(self, data: bytes) -> bytes:
        """Consume the PROXY header (protocol/proxy_header.py) that must open a connection on
        a proxy_protocol_listeners port; returns the bytes after it — the client's first,
        handled as if nothing came before — or b"" until the header is complete. From here
        on the session's address is the client's, unless the header names none (v2 LOCAL:
        the balancer's health check; v1 UNKNOWN; UNSPEC): then it stays the balancer's."""
        if self.transport is None or self.transport.is_closing():
            return b""  # refused already (an untrusted peer): its header must not count
        buf = self._startup_buf
        buf += data  # bounded: the parser decides within the longest header (16 + 536 bytes)
        try:
            header = parse_proxy_header(buf)
        except ProxyHeaderError as exc:
            raise proxy_protocol_refused(f"invalid PROXY header from {self.peer}: {exc}") from None
        if header is None:
            return b""
        rest = bytes(buf[header.length:])
        self._startup_buf = bytearray()
        self._proxy_header_due = False
        if header.source is not None:
            self.proxied_by = self.peer
            host, port = header.source
            self.peer, self.peer_ip = f"{host}:{port}", sys.intern(host)
        log.debug("PROXY header accepted", extra={"session": self.session_id, "client": self.peer,
                                                  "balancer": self.proxied_by or self.peer,
                                                  "version": header.version, "command": header.command})
        return rest

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
            self.role = self.admit_role(self.role)
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
            self.role = self.admit_role(self.role)
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
        elif exc.sqlstate in ("28P01", "28000") and exc.denial != "access_condition":  # that has access_denied
            self.server.audit.event("auth_failure", session=self.session_id, user=self.user, database=self.database,
                                    client=self.peer, reason=exc.log_detail, **extra)
        self._fail(exc)

    async def _authenticate(self, secret: str) -> None:
        identity = await self.server.authenticate(self.user, secret, self.database)
        self.user = identity.username  # svc:<name> for a service account
        role = self.server.role_for(identity, self)  # [[roles]], or a grant in force (grants.py)
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
        engine = Engine(POOL_MODES["transaction" if transaction_mode else "session"], self.role, person, settings,
                        policy=policy, trail=server.audit, startup=self._settings,
                        signer=server.identity_signer(identity), refuse_state=server.cfg.backend.session_state == "refuse",
                        prepared_limit=server.cfg.backend.prepared_statements)
        try:
            batch = engine.login_switch(backend) if self.state is not SessionState.CLOSED else None
            if batch is not None:
                # The engine's own switch (protocol/switch.py), waited for here: its two Syncs.
                await backend.exchange(batch + msg.SYNC, 2)
                engine.login_switched(backend, ok=True)
        except ProxyFailure as exc:
            # The apply is one statement: on error nothing of it was applied.
            engine.login_switched(backend, ok=False)
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
        self.relay = Relay(self, pool, engine)
        self._finish_login(backend, transaction_mode)
        if transaction_mode:
            pool.give_back(backend)  # taken again at the first statement
        else:
            self.relay.hold(backend)

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
        self.credential_ends_at = self._credential_end()
        self.revalidated_at = time.monotonic()
        self.state = SessionState.READY
        if self._auth_timer:
            self._auth_timer.cancel()
            self._auth_timer = None  # a logged-in session keeps no handle (memory per idle client)
        identity = self.identity
        self.server.audit.event("session_start", session=self.session_id, user=self.user, role=self.role,
                                subject=identity.subject, issuer=identity.issuer, groups=list(identity.groups),
                                auth_method=identity.auth_method, client_id=identity.client_id,
                                actors=list(identity.actors), client=self.peer, database=self.database,
                                application_name=self._settings.get("application_name", ""),
                                backend_pid=backend.pid, pool_mode="transaction" if transaction_mode else "session",
                                instance=instance_name(self.server.cfg),
                                **({"balancer": self.proxied_by} if self.proxied_by else {}))
        log.info("session started", extra={"session": self.session_id, "user": self.user, "role": self.role,
                                           "client": self.peer, "database": self.database, "backend_pid": backend.pid})
        self.transport.resume_reading()

    # --- READY: client -> server -------------------------------------------------------

    def _relay_client(self, data: bytes) -> None:
        if time.time() >= self.credential_ends_at and self._token_over():
            return  # nothing the client sent after its token expired reaches the database
        frames = self._reader.feed(data)
        if not frames:
            return
        i = first_outside(frames, _RELAYED_TYPES)
        if i < 0:
            self.relay.client_frames(frames)
            return
        if i:
            self.relay.client_frames(frames[:i])
        if frames[i][0] == _X:
            self._close("client sent Terminate")
            return
        raise protocol_violation(f"unknown message type {bytes([frames[i][0]])!r}")

    # Services for the relay

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
        engine = self.relay.engine if self.relay is not None else None
        if (engine is not None and idle_in_transaction_s and engine.backend is not None and not engine.active
                and (engine.txn_status in (b"T", b"E") or engine.sync_owed)
                and now - engine.idle_since > idle_in_transaction_s):
            self._fail(ProxyFailure("terminating connection due to idle-in-transaction timeout",
                                    sqlstate="25P03", severity="FATAL"))

    # --- access conditions and the credential's lifetime (policy/access.py, revalidation.py)

    def admit_role(self, role: str) -> str:
        """The role this session may take for the mapped ``role`` under the [[access]]
        conditions: ``role``, a rule's fallback role (audited), or a refusal (28000, audited).
        At login; also for a session that takes a new mapped role later."""
        server = self.server
        if not server.cfg.access:
            return role
        admission = admit_role(self.identity, role, server.cfg.access, self.access_context(), time.time())
        for wanted, unmet, fallback in admission.lowered:
            self._record_access(wanted, unmet, "lowered", fallback)
        if admission.role is None:
            tried = admission.lowered[-1][2] if admission.lowered else role
            self._record_access(tried, admission.unmet, "refused")
            raise access_refused(self.user, list(admission.unmet))
        if admission.role == server.cfg.backend.user:
            raise not_authorized(self.user, "an access fallback names the pool role itself; refusing")
        return admission.role

    def access_context(self) -> Context:
        tls = self.tls
        return Context(peer_ip=self.peer_ip, tls=tls is not None, client_certificate=bool(tls and tls.getpeercert()),
                       application_name=self._settings.get("application_name", ""))

    def _record_access(self, role: str, unmet, result: str, fallback: str = "") -> None:
        """A role the conditions did not admit: counted, logged precisely, audited."""
        for condition in dict.fromkeys(u.condition for u in unmet):
            self.server.metrics.count("pgproxy_access_denials", condition, result)
        reason = "; ".join(u.detail for u in unmet)
        lowered = {"fallback_role": fallback} if fallback else {}
        self.server.audit.event("access_denied", session=self.session_id, user=self.user, role=role,
                                result=result, conditions=list(dict.fromkeys(u.condition for u in unmet)),
                                reason=reason, client=self.peer, database=self.database,
                                auth_method=self.identity.auth_method, **lowered)
        log.info("role lowered by its access conditions" if fallback else "role refused by its access conditions",
                 extra={"session": self.session_id, "user": self.user, "role": role, "client": self.peer,
                        "reason": reason, **lowered})

    def _credential_end(self) -> float:
        """When a token session must end: exp + auth.jwt.leeway_s (also for OAUTHBEARER and
        introspected tokens); directory and service-account sessions have no expiry."""
        identity, jwt = self.identity, self.server.cfg.auth.jwt
        if identity.expires_at is None or identity.auth_method not in ("jwt", OAUTH_METHOD):
            return float("inf")
        return identity.expires_at + (jwt.leeway_s if jwt is not None else 0.0)

    def _token_over(self) -> bool:
        """The token has expired: end the session now (True), or — auth.on_token_expiry =
        end_after_transaction, with a transaction open at the last ReadyForQuery — let it
        finish (False)."""
        relay = self.relay
        if (self.server.cfg.auth.on_token_expiry == "end_after_transaction" and relay is not None
                and relay.engine.txn_status in (b"T", b"E")):
            return False
        expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.identity.expires_at))
        self.end_credential(token_expired(f"token expired: exp {expired} + leeway passed "
                                          f"(auth.on_token_expiry = {self.server.cfg.auth.on_token_expiry})"),
                            "token_expired")
        return True

    def credential_tick(self, now: float) -> None:
        """The janitor, once a second: an idle session whose token has expired ends too (a
        statement still running finishes; the session ends when it is idle)."""
        if self.state is SessionState.READY and now >= self.credential_ends_at and not self.relay.active:
            self._token_over()

    def end_credential(self, exc: PgProxyError, cause: str) -> None:
        """End this session because its credential ended (``cause``: counted, and the
        session_end record's cause); an open transaction is rolled back as the connection
        is reset or discarded."""
        if self.state is SessionState.CLOSED or self._end_cause:
            return
        self._end_cause = cause
        self.server.metrics.count("pgproxy_sessions_ended", cause)
        self._fail(exc)

    def close_client(self, reason: str) -> None:
        """End the session without an error message (its server connection was lost)."""
        self._close(reason)
