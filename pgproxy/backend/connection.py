"""One login to PostgreSQL, owned by the pool and lent to one client session at a time.

States (the only transitions):

    CONNECTING --login ok--> IDLE --attach--> ATTACHED --detach--> RESETTING --ok--> IDLE
         |                    |                  |                    |
         +--------------------+------------------+--------------------+--> CLOSED

In every state but ATTACHED the connection is in *control mode*: the proxy itself
talks to PostgreSQL (login, identity switch, reset, health check) and incoming bytes
are framed and queued for the awaiting coroutine. While ATTACHED it is in *relay mode*:
bytes go straight to the client session, untouched. A connection that fails any
control step, or that the session hands back in an unknown state, is CLOSED with a
logged reason — never reused.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import struct
import time
from types import MappingProxyType

from pgproxy.backend.identity import EMPTY, ConnectionIdentity
from pgproxy.errors import PgProxyError, ProxyFailure, backend_unavailable
from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import MessageReader
from pgproxy.protocol.scram import ScramClient, md5_password
from pgproxy.tls import server_end_point

log = logging.getLogger("pgproxy.backend")

CONTROL_MAX_MESSAGE = 1 << 20

# A connection's ParameterStatus values, shared read-only between connections that have the
# same ones (session pooling holds a connection per idle client: a dict each was about 400 B
# of the memory per idle client). Read-only, so that no connection can change another's:
# an update replaces the connection's own mapping (set_param). Bounded: emptied when full.
_SHARED_PARAMS: dict[tuple, MappingProxyType] = {}
_SHARED_PARAMS_MAX = 1024


def shared_params(params: dict[str, str]) -> MappingProxyType:
    """The read-only mapping of exactly ``params``, the same object for equal contents."""
    key = tuple(params.items())
    found = _SHARED_PARAMS.get(key)
    if found is None:
        if len(_SHARED_PARAMS) >= _SHARED_PARAMS_MAX:
            _SHARED_PARAMS.clear()
        found = _SHARED_PARAMS[key] = MappingProxyType(dict(key))  # the key's strings, not copies
    return found


class BackendState(enum.Enum):
    CONNECTING = "connecting"
    IDLE = "idle"            # in the pool's idle list
    ATTACHED = "attached"    # relaying for one client session
    RESETTING = "resetting"  # back from a session, being cleaned
    CLOSED = "closed"


class BackendConnection(asyncio.Protocol):
    __slots__ = ("database", "state", "transport", "pid", "secret", "params", "txn_status", "created_at",
                 "idle_since", "close_reason", "session", "forgotten", "_reader", "_inbox", "_waiter",
                 "identity", "reading_paused", "_tls_answer", "_asking_tls", "_drainer", "login_role")

    def __init__(self, database: str) -> None:
        self.database = database
        self.state = BackendState.CONNECTING
        self.transport: asyncio.Transport | None = None
        self.pid = 0
        self.secret = 0
        self.params: MappingProxyType = EMPTY  # read-only and shared: see set_param
        self.txn_status = b"I"
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.close_reason = ""
        self.session = None  # the session's Relay (or a drainer) we deliver to, when ATTACHED
        self.forgotten = False  # the pool has stopped counting this connection
        # Control mode's framing; None while ATTACHED (the relay frames the stream then), so a
        # connection held by an idle session keeps no reader (memory per idle client).
        self._reader: MessageReader | None = MessageReader(CONTROL_MAX_MESSAGE)
        # Control mode's messages (login, exchange): a list, emptied at attach — a deque keeps
        # a 600-byte block even when empty, for as long as the connection lives.
        self._inbox: list[tuple[int, bytes]] = ()  # a list only while messages wait: idle connections keep none
        self._waiter: asyncio.Future | None = None
        # Whose connection this is (transaction pooling keeps it between clients); the
        # session engine changes it through its methods only.
        self.identity = ConnectionIdentity()
        self.reading_paused = False
        self._asking_tls = False  # an SSLRequest was sent; its one-byte answer is due
        self._drainer = None      # set while drain_and_close runs
        self._tls_answer = b""
        self.login_role = ""  # the role this connection logged in as (session_user), set by open_connection

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.server_data(data)
            return
        if self._asking_tls:
            self._asking_tls = False
            self._tls_answer = data  # the one-byte answer to SSLRequest ('S' or 'N')
            self._wake()
            return
        reader = self._reader
        if reader is None:  # back in control mode after an attachment
            reader = self._reader = MessageReader(CONTROL_MAX_MESSAGE)
        try:
            if self._inbox:
                self._inbox.extend(reader.feed(data))
            else:
                self._inbox = reader.feed(data)  # a new list of its own
        except PgProxyError as exc:
            self.close(f"unreadable data from server: {exc.log_detail}")
            return
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._drainer is not None and not self._drainer.lost.done():
            self._drainer.lost.set_result(None)
        if self.state is not BackendState.CLOSED:
            self.close_reason = self.close_reason or f"server closed the connection ({exc or 'EOF'})"
            self.state = BackendState.CLOSED
            log.info("backend connection lost", extra={"backend_pid": self.pid, "reason": self.close_reason})
        self._wake()
        if self.session is not None:
            self.session.server_lost(self.close_reason)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_reading_client()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_reading_client()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- control mode ------------------------------------------------------------------

    @property
    def broken(self) -> bool:
        return self.state is BackendState.CLOSED or self.transport is None or self.transport.is_closing()

    async def _next(self) -> tuple[int, bytes]:
        while not self._inbox:
            if self.broken:
                raise backend_unavailable(f"server connection closed: {self.close_reason or 'EOF'}")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        inbox = self._inbox
        message = inbox.pop(0)  # a handful of messages: a login's, an exchange's
        if not inbox:
            self._inbox = ()
        return message

    async def login(self, user: str, password: str | None, extra: dict[str, str],
                    channel_binding: str = "prefer") -> None:
        self.transport.write(msg.startup_message({"user": user, "database": self.database, **extra}))
        scram: ScramClient | None = None
        ssl_object = self.transport.get_extra_info("ssl_object")
        params: dict[str, str] = {}
        while True:
            kind, raw = await self._next()
            body = raw[5:]
            if kind == ord("R"):
                code = struct.unpack_from("!i", body)[0]
                if code == 0:
                    if channel_binding == "require" and (scram is None or scram.mechanism != ScramClient.PLUS):
                        raise backend_unavailable("server authenticated without channel binding, and "
                                                  "backend.channel_binding = require")
                    log.debug("logged in to PostgreSQL", extra={
                        "tls": ssl_object.version() if ssl_object is not None else "no",
                        "mechanism": scram.mechanism if scram is not None else f"auth {code}"})
                    continue
                if password is None:
                    raise backend_unavailable(f'server asks for a password (method {code}) for role "{user}" '
                                              "but none is configured")
                if code == 3:
                    self.transport.write(msg.password_message(password.encode() + b"\0"))
                elif code == 5:
                    self.transport.write(msg.password_message(md5_password(user, password, body[4:8])))
                elif code == 10:
                    scram = self._scram(body[4:].split(b"\0"), password, ssl_object, channel_binding)
                    self.transport.write(msg.sasl_initial_response(scram.mechanism, scram.client_first()))
                elif code == 11 and scram:
                    self.transport.write(msg.password_message(scram.client_final(body[4:])))
                elif code == 12 and scram:
                    scram.verify_server_final(body[4:])
                else:
                    raise backend_unavailable(f"unsupported authentication request {code} from server")
            elif kind == ord("E"):
                fields = msg.parse_error_fields(body)
                raise backend_unavailable(f'server refused login as role "{user}": {fields.get("C")} '
                                          f'{fields.get("M")}')
            elif kind == ord("S"):
                name, value = msg.parse_parameter_status(body)
                params[name] = value
            elif kind == ord("K"):
                self.pid, self.secret = struct.unpack("!iI", body[:8])
            elif kind == ord("Z"):
                self.txn_status = body[:1]
                self.params = shared_params(params)
                self.state = BackendState.IDLE
                return

    @staticmethod
    def _scram(mechanisms: list[bytes], password: str, ssl_object, channel_binding: str) -> ScramClient:
        plus = ssl_object is not None and channel_binding != "disable" and ScramClient.PLUS.encode() in mechanisms
        if plus:
            return ScramClient(password, binding=server_end_point(ssl_object.getpeercert(binary_form=True)))
        if channel_binding == "require":
            raise backend_unavailable("server does not offer SCRAM-SHA-256-PLUS (channel binding), and "
                                      "backend.channel_binding = require")
        if ScramClient.MECHANISM.encode() not in mechanisms:
            raise backend_unavailable(f"server offers no supported SASL mechanism: {mechanisms!r}")
        return ScramClient(password, tls=ssl_object is not None)

    async def run(self, *queries: str) -> list[tuple[int, bytes]]:
        """Send simple queries in one write; return every message up to the last ReadyForQuery.

        Raises ProxyFailure carrying the server's SQLSTATE if any of them failed.
        """
        return await self.exchange(b"".join(msg.query(q) for q in queries), len(queries))

    async def exchange(self, data: bytes, ready_count: int) -> list[tuple[int, bytes]]:
        """Send ``data`` (simple queries, or extended messages ending in Sync); return every
        message up to the ``ready_count``-th ReadyForQuery. Raises ProxyFailure carrying the
        server's SQLSTATE if anything failed."""
        if self.broken:
            raise backend_unavailable(f"server connection closed: {self.close_reason or 'EOF'}")
        self.transport.write(data)
        replies: list[tuple[int, bytes]] = []
        error: dict[str, str] | None = None
        remaining = ready_count
        while remaining:
            kind, raw = await self._next()
            body = raw[5:]
            if kind == ord("Z"):
                self.txn_status = body[:1]
                remaining -= 1
            elif kind == ord("E"):
                error = error or msg.parse_error_fields(body)
            elif kind == ord("S"):
                self.set_param(*msg.parse_parameter_status(body))
            replies.append((kind, raw))
        if error:
            raise ProxyFailure(error.get("M", "server error"), sqlstate=error.get("C", "XX000"),
                               severity="FATAL", log_detail=f"server error {error.get('C')}: {error.get('M')}")
        return replies

    async def health_check(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.run(""), timeout)
            return self.txn_status == b"I"
        except (PgProxyError, asyncio.TimeoutError) as exc:
            self.close(f"health check failed: {exc}")
            return False

    async def reset(self) -> None:
        """Undo everything a session did: transaction, role, settings, prepared statements,
        cursors, temp objects, LISTEN, advisory locks. DISCARD ALL does all of these."""
        self.state = BackendState.RESETTING
        queries = ("ROLLBACK", "DISCARD ALL") if self.txn_status != b"I" else ("DISCARD ALL",)
        self.identity.forget()
        await self.run(*queries)
        if self.txn_status != b"I":
            raise backend_unavailable("connection still in a transaction after reset")
        self.idle_since = time.monotonic()
        self.state = BackendState.IDLE

    async def start_tls(self, context: ssl.SSLContext, host: str) -> None:
        """SSLRequest, then the handshake; a server that answers 'N' is refused (sslmode
        require and stricter never fall back to plaintext)."""
        self._asking_tls, self._tls_answer = True, b""
        self.transport.write(msg.SSL_REQUEST_PACKET)
        while self._asking_tls:
            if self.broken:
                raise backend_unavailable("server closed the connection during the TLS request")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        answer = self._tls_answer
        if answer != b"S":
            raise backend_unavailable("server does not support TLS (answered the SSLRequest with "
                                      f"{answer[:1]!r}) and backend.sslmode requires it")
        try:
            self.transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, context, server_hostname=host)
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            raise backend_unavailable(f"TLS handshake with the server failed: {exc}") from None

    # --- relay mode --------------------------------------------------------------------

    def set_param(self, name: str, value: str) -> None:
        """A ParameterStatus: this connection's mapping is replaced, never changed in place
        (it is shared with every connection whose values are the same)."""
        if self.params.get(name) != value:
            self.params = shared_params({**self.params, name: value})

    def attach(self, session) -> bytes:
        """Hand the byte stream to a client session; returns what was already read, for it:
        the whole messages queued and the start of one not yet complete (its rest comes to
        the session), so the session's framing starts on a message boundary."""
        leftover = b""
        if self._inbox:  # (a pooled connection's usual case under transaction pooling: nothing)
            leftover = b"".join(raw for _, raw in self._inbox)
            self._inbox = ()
        if self._reader is not None:
            leftover += self._reader.take_rest()
            self._reader = None
        self.session = session
        self.state = BackendState.ATTACHED
        return leftover

    def detach(self) -> None:
        self.session = None
        self.resume_reading()

    def start_drain(self, reason: str) -> None:
        """Its client left mid-request: log out at once, discarding whatever the server still
        sends. PostgreSQL reads the Terminate after everything sent before it, so an unsynced
        batch is rolled back, never committed; the half-close ends even a COPY FROM STDIN
        that takes the Terminate for bad input. The server closes its end once the queries
        queued ahead have finished: the pool's cancels see to that."""
        self._drainer = _Drainer()
        self.attach(self._drainer)
        if self.state is not BackendState.CLOSED:
            self.close_reason = f"{reason}; drained and logged out"  # logged when the server has left
            self.transport.write(msg.TERMINATE)
            if self.transport.can_write_eof():
                self.transport.write_eof()
        self.resume_reading()

    async def gone(self, timeout: float) -> bool:
        """After start_drain: whether the server has closed its end within ``timeout``."""
        lost = self._drainer.lost
        if not lost.done() and self.state is not BackendState.CLOSED:
            await asyncio.wait((lost,), timeout=timeout)
        return lost.done() or self.state is BackendState.CLOSED

    def end_drain(self, reason: str, left: bool) -> None:
        """After start_drain: ``left``: the server has closed its end (PostgreSQL's backend
        is going away, so the pool may open another); else abort the connection."""
        self.session = None
        if left:
            self.close(self.close_reason or reason)
        else:
            self.close(f"{reason}; draining failed: the server did not log out in time", abort=True)

    def pause_reading(self) -> None:
        """The client reads slower than we receive: stop reading the server."""
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self, reason: str, abort: bool = False) -> None:
        """Close with a logged reason. ``abort``: drop unsent bytes and reset the socket at
        once — for a connection still busy, whose server may be blocked writing to us (and
        we to it): a graceful close would wait for buffers that never drain."""
        if self.state is BackendState.CLOSED:
            return
        self.close_reason = reason
        self.state = BackendState.CLOSED
        log.info("closing backend connection", extra={"backend_pid": self.pid, "reason": reason})
        if self.transport is not None and not self.transport.is_closing():
            if abort:
                self.transport.abort()
            else:
                self.transport.write(msg.TERMINATE)
                self.transport.close()
        self._wake()


async def open_connection(host: str, port: int, database: str, user: str, password: str | None,
                          timeout: float, tls: ssl.SSLContext | None = None,
                          channel_binding: str = "prefer") -> BackendConnection:
    loop = asyncio.get_running_loop()

    async def connect() -> BackendConnection:
        if host.startswith("/"):
            _, conn = await loop.create_unix_connection(lambda: BackendConnection(database),
                                                        f"{host}/.s.PGSQL.{port}")
        else:
            _, conn = await loop.create_connection(lambda: BackendConnection(database), host, port)
        try:
            if tls is not None and not host.startswith("/"):
                await conn.start_tls(tls, host)
            await conn.login(user, password, {"application_name": "pgproxy", "client_encoding": "UTF8"},
                             channel_binding)
            conn.login_role = user  # pools check it before handing the connection to anyone
        except BaseException:
            conn.close("login failed")
            raise
        return conn

    try:
        return await asyncio.wait_for(connect(), timeout)
    except asyncio.TimeoutError:
        raise backend_unavailable(f"connecting to {host}:{port} timed out after {timeout}s") from None
    except OSError as exc:
        raise backend_unavailable(f"cannot connect to {host}:{port}: {exc}") from None


async def send_cancel(host: str, port: int, pid: int, secret: int) -> None:
    """Forward a cancel to PostgreSQL on a fresh connection, as the protocol requires."""
    if host.startswith("/"):
        _, writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
    else:
        _, writer = await asyncio.open_connection(host, port)
    writer.write(msg.cancel_request(pid, secret))
    await writer.drain()
    writer.close()


class _Drainer:
    """Stands in for the departed client while its connection is drained: discards the
    server's output and notes when the server has closed its end."""

    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def server_data(self, data: bytes) -> None:
        pass

    def server_lost(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_reading_client(self) -> None:
        pass

    def resume_reading_client(self) -> None:
        pass
