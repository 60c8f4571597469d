"""The relay: one logged-in client's messages to PostgreSQL and the replies back.

One ``Relay`` per logged-in session, in both pool modes. In session pooling it holds its
backend connection from login to the end (``pooled`` is False); in transaction pooling
(``pool_mode = "transaction"``) it takes one per transaction. Its rules:

* **Taking a connection.** Client messages that arrive with no backend connection wait
  (the client is not read meanwhile) until the pool gives one — at once when one is idle.
* **Giving it back.** At ReadyForQuery 'I' with no reply outstanding, no message waiting
  and no pin. Never with a transaction open, inside COPY, or between a Parse/Bind and
  its Sync (replies still owed keep it).
* **Identity.** A connection remembers whose role and settings it carries
  (``state_key``). A different client gets, in the same write as its first message: a
  switch query (SET ROLE, RESET ALL, its settings, a nonce; DEALLOCATE ALL when the
  person changes) and a guard statement, sent without Sync, that fails unless the nonce
  is in place — so if the switch failed, PostgreSQL skips the client's messages up to
  their Sync. Messages after that first Sync wait until the guard has answered. A failed
  switch ends the session and discards the connection. The same client back on the same
  connection pays nothing.
* **Prepared statements.** Client names map to per-connection names (``pgproxy_N``,
  an LRU of ``backend.prepared_statements``), keyed by (text, parameter types). A Parse
  the connection already has is answered locally; a Bind or Describe on a connection
  without the statement gets a Parse injected first; Close of a statement is answered
  locally. The unnamed statement is re-sent when the client lands elsewhere. Every
  synthesized reply takes its place in ``Pipeline``.
* **Session state.** A statement that outlives its transaction (``session_effects``)
  pins the client to its connection for the rest of the session, or is refused with
  0A000 when ``backend.session_state = "refuse"``. ``DEALLOCATE`` and ``DISCARD ALL``
  alone in a simple query are answered locally.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pgproxy.errors import PgProxyError, ProxyFailure, protocol_violation
from pgproxy.frontend.startup import guard_sql, switch_sql
from pgproxy.policy.guard import classify
from pgproxy.policy.session_state import session_effects
from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import ServerStreamScanner
from pgproxy.protocol.pipeline import (BIND, CLOSE, DESCRIBE, EXECUTE, FORWARD, GUARD, PARSE, QUERY, QUIET,
                                       SWALLOW, SWITCH, SYNC, SYNTH, WANTED, Expected, Pipeline)

log = logging.getLogger("pgproxy.session")

MAX_CLIENT_STATEMENTS = 10_000
_Q, _P, _B, _E, _S, _C, _D, _H, _F = (ord(c) for c in "QPBESCDHF")
_FORWARD_ONLY = frozenset(b"dcfH")  # CopyData, CopyDone, CopyFail, Flush: no reply of their own


class Relay:
    __slots__ = ("pooled", "policy", "session", "pool", "key", "person", "role", "backend", "pipeline", "scanner",
                 "statements", "portals", "unnamed", "unnamed_gen", "pinned", "waiting", "switch_pending",
                 "acquiring", "txn_status", "refuse_state", "prepared_limit", "idle_since", "skipping",
                 "past_guard", "attaching")

    def __init__(self, session, pool, role: str, person: tuple, settings: dict[str, str], cfg,
                 pooled: bool, policy=None) -> None:
        self.pooled = pooled  # transaction pooling: a connection per transaction
        self.policy = policy  # the statement guard's rules for this role; None: the guard is off
        self.session = session
        self.pool = pool
        self.role, self.person = role, person
        # Whose role and settings a connection must carry for this client (the settings are
        # read back from it for a switch; no second copy is kept).
        self.key = (person, tuple(sorted(settings.items())))
        self.backend = None
        self.pipeline = Pipeline(self)
        self.scanner = ServerStreamScanner(WANTED, 1 << 20)
        self.statements: dict[str, tuple] = {}  # client statement name -> (text, parameter types)
        self.portals: dict[str, tuple] = {}     # portal -> (text, params, formats), until the transaction ends
        self.unnamed: tuple | None = None
        self.unnamed_gen = 0
        self.pinned = ""
        self.waiting: list[tuple[int, bytes]] = []  # client messages not sent yet
        self.switch_pending = False  # a switch was sent and its guard has not answered
        self.past_guard = False      # ... and a message the guard does not cover is due
        self.acquiring: asyncio.Task | None = None
        self.txn_status = b"I"
        self.refuse_state = cfg.session_state == "refuse"
        self.prepared_limit = cfg.prepared_statements
        self.idle_since = time.monotonic()
        self.skipping = False  # a refused Parse: drop messages up to Sync
        self.attaching = False

    @property
    def active(self) -> bool:
        return bool(self.pipeline) or bool(self.waiting)

    # --- client -> server --------------------------------------------------------------

    def client_frames(self, frames: list[tuple[int, bytes]]) -> None:
        if self.backend is None and not self.waiting:
            backend = self.pool.try_take(self.key)  # the common case: an idle connection, at once
            if backend is not None:
                self._attach(backend)
        if self.waiting or self.backend is None or self.past_guard:
            self.waiting += frames
            self.session.pause_reading_client()
            if self.backend is None and self.acquiring is None:
                self.acquiring = asyncio.get_running_loop().create_task(self._acquire())
            return
        self._send(frames)

    async def _acquire(self) -> None:
        try:
            backend = await self.pool.acquire()
        except PgProxyError as exc:
            self.session.end(exc)
            return
        except Exception as exc:  # a bug must cost one session, never hang it
            log.exception("taking a backend connection failed", extra={"session": self.session.session_id})
            self.session.end(ProxyFailure("internal error", sqlstate="XX000", severity="FATAL", log_detail=repr(exc)))
            return
        finally:
            self.acquiring = None
        if self.session.transport is None:  # the client left while waiting
            self.pool.give_back(backend)
            return
        self._attach(backend)
        self._send_waiting()

    def _attach(self, backend) -> None:
        self.backend = backend
        self.session.backend = backend
        self.attaching = True  # bytes the connection kept while idle arrive now; not a reason to release
        backend.attach(self)
        self.attaching = False

    def _send_waiting(self) -> None:
        frames, self.waiting = self.waiting, []
        self._send(frames)
        if not self.waiting:
            self.session.resume_reading_client()

    def _send(self, frames: list[tuple[int, bytes]]) -> None:
        backend = self.backend
        out: list[bytes] = []
        expect = self.pipeline.expect
        sync_after_first = False
        if frames and backend.state_key != self.key:
            self._switch(backend, out)
            first_kind, first_raw = frames[0]
            if first_kind == _Q and session_effects(first_raw[5:-1].decode("utf-8", "replace")).copy_in:
                # COPY FROM STDIN ignores Sync: the guard could not be ended after it. The
                # COPY follows when the guard has answered (one round trip).
                out.append(msg.SYNC)
                expect(Expected(SYNC, SWALLOW))
                self.past_guard = True
            else:
                sync_after_first = first_kind in (_Q, _F)
        for i, (kind, raw) in enumerate(frames):
            if self.skipping and kind != _S:
                continue
            if self.past_guard:
                self.waiting = frames[i:]  # past the guard's protection: wait for its answer
                self.session.pause_reading_client()
                break
            if self.switch_pending and kind in (_Q, _F, _S):
                self.past_guard = True  # the guard covers messages up to this one
            if kind == _Q:
                self._query(raw, out)
            elif kind == _P:
                self._parse(raw, out)
            elif kind == _B:
                self._bind(raw, out)
            elif kind == _E:
                portal = msg.parse_execute_portal(raw[5:])
                text, params, formats = self.portals.get(portal, ("", None, None))
                out.append(raw)
                verdict = classify(text) if self.policy is not None and text else None
                expect(Expected(EXECUTE, statement=self.session.new_statement(text, params, formats, verdict)))
            elif kind == _S:
                self.skipping = False
                out.append(raw)
                expect(Expected(SYNC))
            elif kind == _D:
                self._describe(raw, out)
            elif kind == _C:
                self._close(raw, out)
            elif kind == _F:
                if self.policy is not None:
                    self._refuse("<FunctionCall message>", "the FunctionCall message is not allowed", "42501", QUERY)
                else:
                    out.append(raw)
                    expect(Expected(QUERY, statement=self.session.new_statement("<FunctionCall message>")))
            elif kind in _FORWARD_ONLY:
                out.append(raw)
            else:
                raise protocol_violation(f"unexpected message type {bytes([kind])!r}")
            if sync_after_first and kind in (_Q, _F):
                out.append(msg.SYNC)  # ends the guard's skip-until-Sync for a simple query
                expect(Expected(SYNC, SWALLOW))
                sync_after_first = False
        if out:
            backend.write(b"".join(out))
        self._deliver(self.pipeline.synthesized())
        if self._releasable():  # everything was answered locally
            self._release()

    def _switch(self, backend, out: list[bytes]) -> None:
        backend.switches += 1
        nonce = backend.switches
        new_person = backend.person != self.person
        out.append(msg.query(switch_sql(self.role, dict(self.key[1]), deallocate=new_person, nonce=nonce)))
        self.pipeline.expect(Expected(QUERY, SWITCH))
        out += [msg.parse_message("", guard_sql(nonce)), msg.bind_message("", ""), msg.execute_message()]
        self.pipeline.expect(Expected(PARSE, SWITCH))
        self.pipeline.expect(Expected(BIND, SWITCH))
        self.pipeline.expect(Expected(EXECUTE, GUARD))
        if new_person:
            backend.prepared.clear()
        backend.person, backend.state_key, backend.unnamed_owner = self.person, self.key, None
        self.switch_pending, self.past_guard = True, False
        self.session.server.metrics.count("pgproxy_identity_switches", "person" if new_person else "settings")

    def _verdict(self, text: str, kind: int):
        """The guard's verdict, or None after queueing the refusal (42501, or 42601 when
        the text cannot be parsed). Without the guard: an empty verdict."""
        if self.policy is None:
            return None, True
        verdict = classify(text)
        reason = self.policy.refusal(verdict)
        if reason:
            self._refuse(text, reason, verdict.sqlstate, kind)
            return verdict, False
        return verdict, True

    def _refuse(self, text: str, reason: str, sqlstate: str, kind: int) -> None:
        self._answer_error(f"statement refused by pgproxy: {reason}", sqlstate, kind)
        self.session.record_denial(text, reason)

    def _answer_error(self, message: str, sqlstate: str, kind: int) -> None:
        """An ErrorResponse in the statement's place; the session carries on. A simple
        query gets its ReadyForQuery; in the extended protocol the messages up to Sync
        are dropped, as PostgreSQL does after an error."""
        error = msg.error_response(ProxyFailure(message, sqlstate=sqlstate, severity="ERROR"))
        if kind == QUERY:
            error += msg.ready_for_query(self.txn_status)
        else:
            self.skipping = True
        self.pipeline.expect(Expected(kind, SYNTH, payload=error))

    def _query(self, raw: bytes, out: list[bytes]) -> None:
        text = raw[5:-1].decode("utf-8", "replace")
        verdict, allowed = self._verdict(text, QUERY)
        if not allowed:
            return
        effects = session_effects(text)
        backend = self.backend
        if effects.local and self._answer_locally(effects):
            return
        if effects.pin and self.pooled and not self._pin(effects.pin, QUERY):
            return
        if effects.local == "discard_all":  # forwarded (session pooling, or pinned): it drops them all
            self.statements.clear()
            self.unnamed = None
        out.append(raw)
        self.pipeline.expect(Expected(QUERY, statement=self.session.new_statement(text, verdict=verdict)))
        backend.unnamed_owner = None  # a simple query replaces the unnamed statement
        if effects.stale or effects.deallocates:
            self._mark_stale(effects.deallocates)

    def _mark_stale(self, deallocates: bool) -> None:
        """The statement may undo the settings we applied (RESET ALL, DISCARD): switch again
        before the next message. DEALLOCATE ALL / DISCARD ALL also drop prepared statements."""
        backend = self.backend
        backend.state_key = None
        if deallocates:
            backend.prepared.clear()
            backend.person = None
            backend.unnamed_owner = None

    def _answer_locally(self, effects) -> bool:
        if not self.pooled:  # session pooling keeps the client's own statement names: PostgreSQL answers
            if effects.local == "deallocate_all":
                self.statements.clear()
            elif effects.local == "deallocate":
                self.statements.pop(effects.name, None)
            return False
        if effects.local == "deallocate":
            if effects.name not in self.statements:
                return False  # not ours (an SQL PREPARE of a pinned session): the server decides
            del self.statements[effects.name]
            tag = "DEALLOCATE"
        elif effects.local == "deallocate_all":
            self.statements.clear()
            tag = "DEALLOCATE ALL"
        else:
            if self.pinned or not self.pooled:
                return False  # DISCARD ALL must really drop the session's state; the identity is re-applied
            self.statements.clear()
            self.unnamed = None
            tag = "DISCARD ALL"
        self.session.audit_local(tag)
        reply = msg.command_complete(tag) + msg.ready_for_query(self.txn_status)
        self.pipeline.expect(Expected(QUERY, SYNTH, payload=reply))
        return True

    def _pin(self, reason: str, kind: int) -> bool:
        """Pin the client to its connection; False if refused (the error is queued)."""
        if self.pinned:
            return True
        if self.refuse_state:
            self._answer_error(f"{reason} outlives the transaction; not allowed with transaction pooling",
                               "0A000", kind)
            self.session.record_pin(reason, refused=True)
            return False
        self.pinned = reason
        self.session.record_pin(reason, refused=False)
        return True

    def _parse(self, raw: bytes, out: list[bytes]) -> None:
        parse = msg.parse_parse(raw[5:])
        verdict, allowed = self._verdict(parse.query, PARSE)
        if not allowed:
            return
        effects = session_effects(parse.query)
        if effects.pin and self.pooled and not self._pin(effects.pin, PARSE):
            return
        if effects.stale or effects.deallocates:
            self._mark_stale(effects.deallocates)
        key = (parse.query, parse.param_types)
        if not self.pooled:  # session pooling: the connection is the client's, names pass unchanged
            if parse.statement:
                self._remember_statement(parse.statement, key)
            else:
                self.unnamed = key
            out.append(raw)
            self.pipeline.expect(Expected(PARSE, payload=(None, key)))
            return
        if not parse.statement:
            self.unnamed = key
            self.unnamed_gen += 1
            self.backend.unnamed_owner, self.backend.unnamed_gen = self, self.unnamed_gen
            out.append(raw)
            self.pipeline.expect(Expected(PARSE, payload=(None, key)))
            return
        self._remember_statement(parse.statement, key)
        prepared = self.backend.prepared
        if key in prepared:
            prepared.move_to_end(key)
            self.pipeline.expect(Expected(PARSE, SYNTH, payload=msg.PARSE_COMPLETE))
            return
        self._prepare(key, out, quiet=False)

    def _remember_statement(self, name: str, key: tuple) -> None:
        if name not in self.statements and len(self.statements) >= MAX_CLIENT_STATEMENTS:
            raise ProxyFailure(f"more than {MAX_CLIENT_STATEMENTS} prepared statements in one session",
                               sqlstate="54000", severity="FATAL")
        self.statements[name] = key

    def _prepare(self, key: tuple, out: list[bytes], quiet: bool) -> str:
        """Send a Parse for ``key`` under a new name on this connection, evicting the oldest."""
        backend = self.backend
        prepared = backend.prepared
        while len(prepared) >= self.prepared_limit:
            _, old = prepared.popitem(last=False)
            out.append(msg.close_message("S", old))
            self.pipeline.expect(Expected(CLOSE, SWALLOW))
        name = backend.statement_name()
        prepared[key] = name
        out.append(msg.parse_message(name, key[0], key[1]))
        self.pipeline.expect(Expected(PARSE, QUIET if quiet else FORWARD, payload=(backend, key)))
        return name

    def _statement_on_backend(self, name: str, out: list[bytes]) -> str | None:
        """The connection's name for the client's statement, prepared there first if needed."""
        backend = self.backend
        if not name:
            if self.unnamed is not None and not (backend.unnamed_owner is self
                                                 and backend.unnamed_gen == self.unnamed_gen):
                out.append(msg.parse_message("", *self.unnamed))
                self.pipeline.expect(Expected(PARSE, QUIET, payload=(None, self.unnamed)))
                backend.unnamed_owner, backend.unnamed_gen = self, self.unnamed_gen
            return ""
        key = self.statements.get(name)
        if key is None:
            return None  # unknown to us: the server answers "does not exist"
        ours = backend.prepared.get(key)
        if ours is None:
            return self._prepare(key, out, quiet=True)
        backend.prepared.move_to_end(key)
        return ours

    def _bind(self, raw: bytes, out: list[bytes]) -> None:
        body = raw[5:]
        bind = msg.parse_bind(body)
        text, types = self.statements.get(bind.statement, self.unnamed if not bind.statement else None) or ("", ())
        self.portals[bind.portal] = (text, bind.params, (bind.param_formats, types))
        if not self.pooled:
            out.append(raw)
            self.pipeline.expect(Expected(BIND, payload=text))
            return
        ours = self._statement_on_backend(bind.statement, out)
        if ours is None:
            ours = "pgproxy_unknown_" + bind.statement  # never one of ours, whatever the client names
        if ours != bind.statement:
            raw = msg.message(b"B", body[:body.index(0) + 1] + msg.cstr(ours) + body[bind.tail:])
        out.append(raw)
        self.pipeline.expect(Expected(BIND, payload=text))

    def _describe(self, raw: bytes, out: list[bytes]) -> None:
        what, name = msg.parse_close(raw[5:])
        if what == "S" and self.pooled:
            ours = self._statement_on_backend(name, out)
            if ours is None:
                ours = "pgproxy_unknown_" + name
            if ours != name:
                raw = msg.describe_message("S", ours)
        out.append(raw)
        self.pipeline.expect(Expected(DESCRIBE))

    def _close(self, raw: bytes, out: list[bytes]) -> None:
        what, name = msg.parse_close(raw[5:])
        if what == "S" and name and self.pooled:
            self.statements.pop(name, None)  # the connection keeps it for reuse (LRU)
            self.pipeline.expect(Expected(CLOSE, SYNTH, payload=msg.CLOSE_COMPLETE))
            return
        if what == "P":
            self.portals.pop(name, None)
        elif name:
            self.statements.pop(name, None)
        else:
            self.unnamed = None
        out.append(raw)
        self.pipeline.expect(Expected(CLOSE))

    # --- server -> client --------------------------------------------------------------

    def server_data(self, data: bytes) -> None:
        session = self.session
        if session.transport is None:
            return
        try:
            found = self.scanner.feed(data)
        except PgProxyError as exc:
            self.backend.close(f"unreadable server stream: {exc.log_detail}")
            session.end(ProxyFailure("server connection broken", sqlstate="08006", severity="FATAL"))
            return
        self._deliver(self.pipeline.server(data, found))
        if self._releasable():
            self._release()

    def _deliver(self, pieces: list[bytes]) -> None:
        transport = self.session.transport
        if pieces and transport is not None and not transport.is_closing():
            transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def hold(self, backend) -> None:
        """Session pooling: the connection (switched to this client at login) is its own
        until it leaves."""
        self._attach(backend)

    def _releasable(self) -> bool:
        return (self.pooled and self.txn_status == b"I" and not self.pipeline and not self.waiting and not self.pinned
                and self.backend is not None and not self.switch_pending and not self.attaching
                and self.scanner.at_boundary)

    def _release(self) -> None:
        backend, self.backend = self.backend, None
        self.session.backend = None
        self.portals.clear()
        self.idle_since = time.monotonic()
        self.pool.give_back(backend)

    # Pipeline events

    def parameter(self, body: bytes) -> None:
        name, value = msg.parse_parameter_status(body)
        if self.backend is not None:
            self.backend.params[name] = value

    def ready(self, status: bytes, idle: bool) -> None:
        self.txn_status = status
        self.idle_since = time.monotonic()
        if self.backend is not None:
            self.backend.txn_status = status

    def statement_done(self, statement, outcome: str) -> None:
        self.session.audit_statement(statement, outcome)

    def statement_error(self, statement, body: bytes) -> None:
        statement.sqlstate = msg.parse_error_fields(body).get("C", "XX000")

    def failed(self, entry: Expected, body: bytes, statement) -> None:
        """An extended-protocol message failed; the server skips the rest up to Sync.
        ``statement``: the Execute it belongs to, if the batch has one."""
        text = self._unprepare(entry)
        if statement is None and entry.action in (FORWARD, QUIET) and entry.kind in (PARSE, BIND):
            statement = self.session.new_statement(text or "")
        if statement is not None:
            self.statement_error(statement, body)
            self.session.audit_statement(statement, "error")

    @staticmethod
    def _unprepare(entry: Expected) -> str | None:
        """A Parse that failed or was skipped: the connection does not have the statement."""
        if entry.kind == PARSE and isinstance(entry.payload, tuple):
            backend, key = entry.payload
            if backend is not None:
                backend.prepared.pop(key, None)
            return key[0]
        return entry.payload if isinstance(entry.payload, str) else None

    def skipped_quietly(self, entry: Expected) -> None:
        self._unprepare(entry)  # its statement was audited with the error

    def skipped(self, entry: Expected) -> None:
        self._unprepare(entry)
        if entry.statement is not None:
            self.session.audit_statement(entry.statement, "skipped")

    def switch_confirmed(self) -> None:
        self.switch_pending = self.past_guard = False
        if self.waiting and self.backend is not None:
            asyncio.get_running_loop().call_soon(self._send_waiting_if_attached)

    def _send_waiting_if_attached(self) -> None:
        if self.waiting and self.backend is not None and not self.switch_pending:
            try:
                self._send_waiting()
            except PgProxyError as exc:
                self.session.end(exc)

    def switch_failed(self, body: bytes) -> None:
        fields = msg.parse_error_fields(body)
        backend = self.backend
        if backend is not None:
            backend.close(f"identity switch failed: {fields.get('C')} {fields.get('M')}")
        self.pipeline.clear()
        self.session.end(ProxyFailure("could not switch to your role", sqlstate="28000", severity="FATAL",
                                      log_detail=f'identity switch to role "{self.role}" failed: '
                                                 f"{fields.get('C')} {fields.get('M')}"))

    # --- backend connection callbacks (as the session gives them in session pooling) ---

    def server_lost(self, reason: str) -> None:
        self.session.server_lost(reason)

    def pause_reading_client(self) -> None:
        self.session.pause_reading_client()

    def resume_reading_client(self) -> None:
        if not self.waiting:
            self.session.resume_reading_client()

    def pending_statements(self):
        for entry in self.pipeline.pending():
            if entry.statement is not None:
                yield entry.statement

    # --- leaving -----------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """The session ends: give the connection back in whatever state allows it."""
        if self.acquiring is not None:
            self.acquiring.cancel()
        backend, self.backend = self.backend, None
        if backend is None:
            return
        for statement in self.pending_statements():
            self.session.audit_statement(statement, "client_gone", backend)
        busy = bool(self.pipeline) or not self.scanner.at_boundary
        self.pipeline.clear()
        if busy:
            self.pool.release(backend, False, reason=f"client left mid-request ({reason})", busy=True)
        elif not self.pooled or self.pinned or self.txn_status != b"I":
            self.pool.release(backend, True, reason=reason)  # reset: the session's own state goes
        else:
            self.pool.give_back(backend)
