"""A pool of backend connections for one database, all logged in as one role.

With ``backend.login = pool_role`` that is the pool role (one pool per database; sessions
SET ROLE to their mapped role). With ``per_role`` it is the mapped role itself (one pool per
database and role), so SQL that gets past the guard cannot SET ROLE anywhere the role could
not go on its own. Every connection records whom it logged in as (``login_role``) and a
pool hands out only its own role's connections: one that is not is closed, never lent.

Clients take a connection for their whole session (session pooling). The pool keeps at
most ``pool_size`` connections, opening, resetting and connecting ones included; a
client that finds none free waits in a FIFO queue up to ``acquire_timeout_s``
(then 53300). A returned connection is reset (ROLLBACK if needed, DISCARD ALL) before
anyone else sees it; one that cannot be reset, or comes back mid-request, is closed.
Idle connections are reused newest-first, health-checked when they have been idle a
while, and closed by the janitor past ``idle_timeout_s`` or ``lifetime_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from pgproxy.backend.connection import BackendConnection, BackendState, open_connection, send_cancel
from pgproxy.config import BackendSection
from pgproxy.errors import PgProxyError, backend_unavailable, pool_timeout
from pgproxy.metrics import WAIT_BUCKETS, Histogram

log = logging.getLogger("pgproxy.pool")

DRAIN_CANCEL_WAIT_S = 0.1  # then 0.2, 0.4, ... up to 1 s: how long each cancel waits for the logout


@dataclass
class PoolStats:
    connections_opened: int = 0
    connections_closed: int = 0
    acquires: int = 0
    acquire_timeouts: int = 0
    resets: int = 0
    reset_failures: int = 0
    wait_seconds_total: float = 0.0


class Pool:
    def __init__(self, cfg: BackendSection, database: str, password: str | None, tls=None,
                 role: str | None = None) -> None:
        self._cfg = cfg
        self._tls = tls  # ssl.SSLContext when backend.sslmode is not disable
        self.database = database
        self.role = role  # per_role: the mapped role every connection logs in as; None: the pool role
        self.login_role = role or cfg.user
        self._password = password
        self._idle: deque[BackendConnection] = deque()
        self._waiters: deque[asyncio.Future] = deque()
        self._tasks: set[asyncio.Task] = set()
        self.size = 0  # every connection this pool owns, in any state but CLOSED
        self.stats = PoolStats()
        self.wait_histogram = Histogram(WAIT_BUCKETS)
        self.closed = False

    def statistics(self) -> dict:
        return {"database": self.database, "login_role": self.login_role, "size": self.size, "idle": len(self._idle),
                "waiting": len(self._waiters), **vars(self.stats)}

    async def acquire(self) -> BackendConnection:
        cfg = self._cfg
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + cfg.acquire_timeout_s
        try:
            while True:
                conn = await self._take_idle()
                if conn is not None:
                    return conn
                if self.size < cfg.pool_size:
                    return await self._open()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.stats.acquire_timeouts += 1
                    raise pool_timeout(self.database)
                waiter = loop.create_future()
                self._waiters.append(waiter)
                try:
                    conn = await asyncio.wait_for(waiter, remaining)
                except asyncio.TimeoutError:
                    self.stats.acquire_timeouts += 1
                    raise pool_timeout(self.database) from None
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                if conn is not None and not conn.broken and not self._foreign(conn):
                    return conn
                if conn is not None:
                    self._forget(conn, "broken while handed over")
        finally:
            waited = loop.time() - started
            self.stats.acquires += 1
            self.stats.wait_seconds_total += waited
            self.wait_histogram.observe(waited)

    def try_take(self, state_key=None) -> BackendConnection | None:
        """An idle connection at once, without waiting or a health check; else None.

        Transaction pooling takes a connection for every transaction: the common case must
        not cost a coroutine. One that already carries ``state_key`` (the client's role and
        settings) is preferred: it needs no identity switch. Old idle connections are left
        to ``acquire`` (health check).
        """
        if self._waiters:  # first come, first served
            return None
        idle = self._idle
        while idle and idle[-1].broken:
            conn = idle.pop()
            self._forget(conn, conn.close_reason or "closed while idle")
        if not idle:
            return None
        index = len(idle) - 1
        if state_key is not None and idle[index].identity.key != state_key:
            for i in range(index - 1, -1, -1):
                if idle[i].identity.key == state_key and not idle[i].broken:
                    index = i
                    break
        conn = idle[index]
        if time.monotonic() - conn.idle_since > self._cfg.health_check_after_s:
            return None
        del idle[index]
        if self._foreign(conn):
            return None
        self.stats.acquires += 1
        self.wait_histogram.observe(0.0)
        return conn

    def give_back(self, conn: BackendConnection) -> None:
        """Transaction pooling: a connection at ReadyForQuery 'I' with nothing in flight goes
        back as it is, still carrying its last client's role and settings (the next client of
        the same identity pays nothing; another one switches it)."""
        conn.detach()
        if conn.broken or self.closed or conn.txn_status != b"I":
            self._forget(conn, conn.close_reason or "returned in a transaction or closed")
            return
        if time.monotonic() - conn.created_at > self._cfg.lifetime_s:
            self._forget(conn, "lifetime reached")
            return
        self._hand_over(conn)

    async def _take_idle(self) -> BackendConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.broken:
                self._forget(conn, conn.close_reason or "closed while idle")
                continue
            if time.monotonic() - conn.idle_since > self._cfg.health_check_after_s:
                if not await conn.health_check(self._cfg.connect_timeout_s):
                    self._forget(conn, "health check failed")
                    continue
            if self._foreign(conn):
                continue
            return conn
        return None

    def _foreign(self, conn: BackendConnection) -> bool:
        """A connection logged in as another role than this pool's: closed, never handed out.
        (Cannot happen unless a connection is given back to the wrong pool: fail closed.)"""
        if conn.login_role == self.login_role:
            return False
        log.error("a backend connection of another role reached a pool; closing it",
                  extra={"database": self.database, "pool_role": self.login_role, "connection_role": conn.login_role,
                         "backend_pid": conn.pid})
        self._forget(conn, f'logged in as "{conn.login_role}", not "{self.login_role}"')
        return True

    async def _open(self) -> BackendConnection:
        self.size += 1
        try:
            conn = await open_connection(self._cfg.host, self._cfg.port, self.database, self.login_role,
                                         self._password, self._cfg.connect_timeout_s, self._tls,
                                         self._cfg.channel_binding)
        except BaseException as exc:
            self.size -= 1
            self._hand_over(None)  # capacity freed: let a waiter try
            if self.role is not None and isinstance(exc, PgProxyError):
                # Most likely pg_hba.conf, pg_ident.conf or the role (LOGIN?) is not set up for
                # this role yet: say which role and how we tried.
                how = ("with its password from backend.role_secrets_file" if self._password is not None
                       else "without a password (backend.role_secrets_file has none for it)")
                raise backend_unavailable(f'cannot log in to PostgreSQL as mapped role "{self.role}" '
                                          f"(backend.login = per_role) {how}: {exc.log_detail}") from None
            raise
        self.stats.connections_opened += 1
        if self._foreign(conn):  # open_connection did not record the login: a bug, fail closed
            raise backend_unavailable(f'connection did not record logging in as "{self.login_role}"')
        log.debug("opened backend connection", extra={"database": self.database, "role": self.login_role,
                                                      "backend_pid": conn.pid})
        return conn

    def release(self, conn: BackendConnection, reusable: bool, reason: str = "") -> None:
        """Take a connection back from a session at a message boundary with nothing owed
        (one mid-request goes to ``drain``). Not reusable means: close it."""
        conn.detach()
        if not reusable or conn.broken or self.closed:
            self._forget(conn, reason or conn.close_reason or "not reusable")
            return
        self._spawn(self._reset_and_return(conn))

    def drain(self, conn: BackendConnection, reason: str) -> None:
        """A client left mid-request: log out, cancel what runs, discard what the server still
        sends; the slot is free only once the server has closed its end (see
        BackendConnection.start_drain). Never reused: a late cancel could hit the next query."""
        if conn.broken or self.closed:
            conn.detach()
            self._forget(conn, reason)
            return
        conn.start_drain(reason)
        self._spawn(self._drain(conn, reason))

    async def _drain(self, conn: BackendConnection, reason: str) -> None:
        """Cancel until the server has logged out. One cancel is not enough: PostgreSQL
        ignores a cancel that arrives while its backend waits for a command, so a query still
        on its way (the client left just after sending it) would run to its end, maybe sending
        gigabytes to discard while the slot stays taken; and queries pipelined behind a
        cancelled one run next. Re-sent with backoff for up to connect_timeout_s; a server
        still there then is cut off."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._cfg.connect_timeout_s
        left = False
        try:
            wait, attempt = DRAIN_CANCEL_WAIT_S, 1
            while True:
                try:
                    await asyncio.wait_for(send_cancel(self._cfg.host, self._cfg.port, conn.pid, conn.secret),
                                           max(0.0, deadline - loop.time()))
                except (OSError, asyncio.TimeoutError) as exc:
                    log.info("cancel for a departed client failed", extra={"backend_pid": conn.pid,
                                                                           "reason": repr(exc)})
                    break
                left = await conn.gone(min(wait, max(0.0, deadline - loop.time())))
                if left or loop.time() >= deadline:
                    break
                attempt += 1
                log.debug("cancel sent again while draining", extra={"backend_pid": conn.pid, "attempt": attempt})
                wait = min(wait * 2, 1.0)
            if not left:
                left = await conn.gone(max(0.0, deadline - loop.time()))
        finally:
            conn.end_drain(reason, left)
            self._forget(conn, reason)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("pool task failed", extra={"database": self.database, "reason": repr(task.exception())})

    async def _reset_and_return(self, conn: BackendConnection) -> None:
        self.stats.resets += 1
        try:
            await asyncio.wait_for(conn.reset(), self._cfg.connect_timeout_s)
        except Exception as exc:  # whatever went wrong, the slot is given back: never leaked
            if not isinstance(exc, (PgProxyError, asyncio.TimeoutError)):
                log.warning("reset failed unexpectedly", extra={"database": self.database, "reason": repr(exc)})
            self.stats.reset_failures += 1
            conn.close(f"reset failed: {getattr(exc, 'log_detail', None) or type(exc).__name__}")
            self._forget(conn, "reset failed")
            return
        if time.monotonic() - conn.created_at > self._cfg.lifetime_s:
            conn.close("lifetime reached")
            self._forget(conn, "lifetime reached")
            return
        self._hand_over(conn)

    def _hand_over(self, conn: BackendConnection | None) -> None:
        """Give a connection (or, with None, freed capacity) to the first waiter alive."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is not None:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)

    def _forget(self, conn: BackendConnection, reason: str) -> None:
        if conn.forgotten:
            return
        conn.forgotten = True
        self.size -= 1
        self.stats.connections_closed += 1
        if conn.state is not BackendState.CLOSED:
            conn.close(reason)
        self._hand_over(None)

    def janitor_tick(self) -> None:
        """Close idle connections that are too old or idle too long (called every second)."""
        now = time.monotonic()
        keep: deque[BackendConnection] = deque()
        for conn in self._idle:
            if conn.broken:
                self._forget(conn, conn.close_reason or "closed while idle")
            elif now - conn.idle_since > self._cfg.idle_timeout_s:
                self._forget(conn, "idle timeout")
            elif now - conn.created_at > self._cfg.lifetime_s:
                self._forget(conn, "lifetime reached")
            else:
                keep.append(conn)
        self._idle = keep

    def retire(self) -> None:
        """The configuration changed: close idle connections now, the rest when returned."""
        self.closed = True
        while self._idle:
            self._forget(self._idle.pop(), "configuration reloaded")

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        while self._idle:
            self._forget(self._idle.pop(), "proxy shutting down")
