"""The relay: carries out what a logged-in session's engine decides.

All decisions live in the pure engine (frontend/engine.py). ``Relay`` is the asyncio side:
it feeds the engine the client's framed messages and the server's bytes, and performs the
engine's actions in order — writes to the connection and to the client, taking and giving
back pool connections, audit records, metrics, pausing the client, ending the session.

Two things here are about time, not decisions:

* **Durability** (``audit.durability = "before_result"``): replies that follow a statement
  record are held until the trail says the record is on disk (``audit.when_durable``).
* **Waiting for a connection**: when the pool has none idle, the client is not read while
  a coroutine waits for one (``pool.acquire``, bounded by ``acquire_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter

from pgproxy.errors import PgProxyError, ProxyFailure
from pgproxy.frontend.engine import (ACQUIRE, AUDIT, AUDIT_LOCAL, CLOSE_CLIENT, CLOSE_CONNECTION, COUNT, DENIED,
                                     DRAIN, END, GIVE_BACK, PAUSE, PIN, RELEASE, RESUME, TO_CLIENT, TO_SERVER,
                                     UNAUDITED, Engine)

log = logging.getLogger("pgproxy.session")


class Relay:
    __slots__ = ("session", "pool", "engine", "audit", "metrics", "acquiring", "durable_due", "held",
                 "client_paused", "_running")

    def __init__(self, session, pool, engine: Engine) -> None:
        self.session = session
        self.pool = pool
        self.engine = engine
        self.audit = session.server.audit
        self.metrics = session.server.metrics
        self.acquiring: asyncio.Task | None = None
        # audit.durability = "before_result": the seq of the last statement record, and the
        # replies held for the client until that record is on disk.
        self.durable_due = 0
        self.held: list[bytes] | None = None
        self.client_paused = False
        self._running = False

    # What the session and the operators' views read.

    @property
    def active(self) -> bool:
        return self.engine.active

    @property
    def pinned(self) -> str:
        return self.engine.pinned

    @property
    def backend(self):
        return self.engine.backend

    # --- input -------------------------------------------------------------------------

    def client_frames(self, frames: list[tuple[int, bytes]]) -> None:
        try:
            self.engine.client(frames)
        finally:
            self._run()

    def server_data(self, data: bytes) -> None:
        """Bytes from the attached connection (BackendConnection calls this)."""
        if self.session.transport is None:
            return
        self.engine.server(data)
        self._run()

    def server_lost(self, reason: str) -> None:
        self.engine.server_lost(reason)
        self._run()

    def hold(self, backend) -> None:
        """Session pooling: the connection taken at login stays this session's."""
        self._attach(backend)
        self._run()

    # --- carrying out the engine's actions ---------------------------------------------

    def _run(self) -> None:
        if self._running:  # an action fed the engine again: the loop below takes what it adds
            return
        self._running = True
        actions = self.engine.actions
        session = self.session
        try:
            for action in actions:  # a list's iterator also yields what is appended meanwhile
                code = action[0]
                if code == TO_SERVER:
                    action[1].write(action[2])
                elif code == TO_CLIENT:
                    self._deliver(action[1])
                elif code == AUDIT:
                    self._audit(action[1], action[2], action[3])
                elif code == RELEASE:
                    self.pool.give_back(action[1])
                elif code == ACQUIRE:
                    self._take(action[1])
                elif code == PAUSE:
                    self.pause_reading_client()
                elif code == RESUME:
                    self.resume_reading_client()
                elif code == DENIED:
                    session.record_denial(action[1], action[2])
                elif code == AUDIT_LOCAL:
                    session.audit_local(action[1])
                elif code == PIN:
                    session.record_pin(action[1], action[2])
                elif code == UNAUDITED:
                    self.audit.note_refused(action[1])
                elif code == COUNT:
                    session.server.metrics.count(action[1], action[2])
                elif code == CLOSE_CONNECTION:
                    if action[1] is not None:
                        action[1].close(action[2], abort=action[3])
                elif code == END:
                    session.end(action[1])
                elif code == CLOSE_CLIENT:
                    session.close_client(action[1])
        finally:
            actions.clear()
            self._running = False

    def _audit(self, statement, outcome: str, backend_pid) -> None:
        """A statement's record (and its count and duration in the metrics)."""
        seconds = perf_counter() - statement.t0
        text, verdict = statement.text, statement.verdict
        seq = self.audit.statement(self.session.audit_prefix, text, statement.params, statement.formats,
                                   statement.tags, statement.started, seconds, outcome, statement.sqlstate,
                                   backend_pid, verdict)
        self.metrics.statement(text, seconds, outcome, verdict)
        if self.audit.before_result:
            self.durable_due = seq  # its result reaches the client once this is on disk

    def _take(self, key) -> None:
        backend = self.pool.try_take(key)  # the common case: an idle connection, at once
        if backend is not None:
            self._attach(backend)
            return
        self.pause_reading_client()
        if self.acquiring is None:
            self.acquiring = asyncio.get_running_loop().create_task(self._acquire())

    async def _acquire(self) -> None:
        try:
            backend = await self.pool.acquire()
        except PgProxyError as exc:
            if exc.sqlstate == "53300":
                exc = self._explain_exhaustion(exc)
            self.engine.acquire_failed(exc)
            self._run()
            return
        except Exception as exc:  # a bug must cost one session, never hang it
            log.exception("taking a backend connection failed", extra={"session": self.session.session_id})
            self.engine.acquire_failed(ProxyFailure("internal error", sqlstate="XX000", severity="FATAL",
                                                    log_detail=repr(exc)))
            self._run()
            return
        finally:
            self.acquiring = None
        if self.session.transport is None:  # the client left while waiting
            self.pool.give_back(backend)
            return
        try:
            self._attach(backend)
        except PgProxyError as exc:
            self.session.end(exc)
        finally:
            self._run()

    def _attach(self, backend) -> None:
        self.engine.attached(backend, backend.attach(self))

    def _explain_exhaustion(self, exc: PgProxyError) -> PgProxyError:
        """53300 says why: how many of the pool's connections pinned sessions hold (who, in the log)."""
        holders = [(s.user, s.relay.pinned) for s in self.session.server.sessions()
                   if s.relay is not None and s.relay.pool is self.pool and s.relay.pinned
                   and s.relay.backend is not None]
        if not holders:
            return exc
        reasons = sorted({reason for _, reason in holders})
        return ProxyFailure(f"{exc.message}: {len(holders)} of its connections are held by pinned sessions "
                            f"({', '.join(reasons)})", sqlstate="53300", severity="FATAL",
                            log_detail=f"{exc.log_detail}; pinned: "
                                       + ", ".join(f"{user} ({reason})" for user, reason in holders))

    def _deliver(self, data: bytes) -> None:
        if self.held is not None:  # earlier replies wait for the trail: these go after them
            self.held.append(data)
            return
        if self.durable_due:
            if not self.audit.durable(self.durable_due):
                # durability = "before_result": a result the client sees has its record on disk.
                self.held = [data]
                self.audit.when_durable(self.durable_due, self._release_held)
                return
            self.durable_due = 0
        transport = self.session.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _release_held(self) -> None:
        held, self.held = self.held, None
        if held is None:
            return
        if self.durable_due and not self.audit.durable(self.durable_due):
            self.held = held  # records of later statements came meanwhile
            self.audit.when_durable(self.durable_due, self._release_held)
            return
        self.durable_due = 0
        self._deliver(b"".join(held))

    # --- flow control (the connection's and the client's transports) --------------------

    def pause_reading_client(self) -> None:
        self.client_paused = True
        self.session.pause_reading_client()

    def resume_reading_client(self) -> None:
        if self.client_paused and not self.engine.waiting:
            self.client_paused = False
            self.session.resume_reading_client()

    # --- leaving -----------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """The session ends: give the connection back in whatever state allows it."""
        if self.acquiring is not None:
            self.acquiring.cancel()
        what, backend = self.engine.leave()
        self._run()  # the audit records of what was in flight
        if backend is None:
            return
        if what == DRAIN:
            self.pool.drain(backend, reason=f"client left mid-request ({reason})")
        elif what == GIVE_BACK:
            self.pool.give_back(backend)
        else:
            self.pool.release(backend, True, reason=reason)  # reset: the session's own state goes
