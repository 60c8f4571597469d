"""The relay: one logged-in client's messages to PostgreSQL and the replies back.

One ``Relay`` per logged-in session, in both pool modes. In session pooling it holds its
backend connection from login to the end (``pooled`` is False); in transaction pooling
(``pool_mode = "transaction"``) it takes one per transaction. Its rules:

* **Taking a connection.** Client messages that arrive with no backend connection wait
  (the client is not read meanwhile) until the pool gives one — at once when one is idle.
* **Giving it back.** At ReadyForQuery 'I' with no reply outstanding, no message waiting
  and no pin. Never with a transaction open, inside COPY, or between a Parse/Bind and
  its Sync (replies still owed keep it).
* **Giving it back** also needs nothing pending: no Parse/Bind/Execute/Describe/Close
  or Flush since the last Sync (PostgreSQL may be skipping to a Sync after an error, or
  holding an implicit transaction open), no refused message being skipped.
* **Identity.** A connection remembers whose role and settings it carries
  (``state_key``). A different client gets, in the same write as its first message, the
  switch of protocol/switch.py (DISCARD ALL for another person — temporary objects,
  sequences, locks, LISTEN, prepared statements all go — or RESET ALL; then its role and
  settings as bound parameters; Sync; a guard that fails unless the switch's random nonce
  is in place) — so if the switch failed, PostgreSQL skips the client's messages up to
  their Sync. Messages after that first Sync wait until the guard has answered. A failed
  switch ends the session and discards the connection. The same client back on the same
  connection pays nothing.
* **Resets re-apply the identity at once.** RESET ALL, DISCARD ALL and SET SESSION
  AUTHORIZATION (a whole simple query, or an Execute directly followed by Sync) go out
  followed by the re-apply in the same write; the client's later messages wait until it
  has answered. Anywhere else (inside a multi-statement query, or not followed by Sync)
  they are refused.
* **Refusals abort like errors.** A statement the proxy refuses is replaced by one that
  fails in PostgreSQL (``REFUSED_SQL``), and its error by the proxy's: the transaction
  then fails exactly as if PostgreSQL had refused it (later statements get 25P02, COMMIT
  rolls back; in a pipeline the server skips to Sync).
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
from pgproxy.policy.guard import classify
from pgproxy.policy.session_state import NOTHING, client_only_encoding, session_effects
from pgproxy.protocol import messages as msg
from pgproxy.protocol import switch
from pgproxy.protocol.framing import ServerStreamScanner
from pgproxy.protocol.pipeline import (BIND, CLOSE, DESCRIBE, EXECUTE, FORWARD, GUARD, PARSE, QUERY, QUIET,
                                       REPLACE, SWALLOW, SWITCH, SYNC, SYNTH, WANTED, Expected, Pipeline)

log = logging.getLogger("pgproxy.session")

MAX_CLIENT_STATEMENTS = 10_000
# Sent in a refused statement's place: PostgreSQL fails it (a syntax error) without running
# anything, so the transaction and the pipeline fail as they would have.
REFUSED_SQL = "pgproxy_refused_this_statement"
_REFUSED_QUERY = msg.query(REFUSED_SQL)
_REFUSED_PARSE = msg.parse_message("", REFUSED_SQL)
_RESET_TAGS = {"DISCARD ALL": "DISCARD ALL", "RESET ALL": "RESET", "SESSION AUTHORIZATION": "SET"}
_Q, _P, _B, _E, _S, _C, _D, _H, _F = (ord(c) for c in "QPBESCDHF")
_FORWARD_ONLY = frozenset(b"dcfH")  # CopyData, CopyDone, CopyFail, Flush: no reply of their own


class Relay:
    __slots__ = ("pooled", "policy", "session", "pool", "key", "person", "role", "backend", "pipeline", "scanner",
                 "statements", "portals", "unnamed", "unnamed_gen", "pinned", "waiting", "switch_pending",
                 "acquiring", "txn_status", "refuse_state", "prepared_limit", "idle_since", "skipping",
                 "past_guard", "attaching", "sync_owed", "signer", "changes_due", "local_sync", "described_types", "audit", "durable_due", "held")

    def __init__(self, session, pool, role: str, person: tuple, settings: dict[str, str], cfg,
                 pooled: bool, policy=None, signer=None) -> None:
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
        self.sync_owed = False  # extended-protocol messages went out since the last Sync
        self.signer = signer    # backend pid -> the signed-identity settings for it, or None
        self.changes_due: tuple = ()  # settings changes that succeeded, taken at the next ReadyForQuery
        # After an error with no Sync from the client yet, the proxy sent the server a Sync of its
        # own (the connection need not wait for the client); this is that Sync's entry, until the
        # client's Sync, which it answers. Messages up to that Sync are dropped, as PostgreSQL would.
        self.local_sync: Expected | None = None
        self.described_types: dict[str, tuple] | None = None  # statement -> parameter types the server described
        self.audit = session.server.audit
        # audit.durability = "before_result": the seq of the last statement record, and the
        # replies held for the client until that record is on disk.
        self.durable_due = 0
        self.held: list[bytes] | None = None

    @property
    def active(self) -> bool:
        return bool(self.pipeline) or bool(self.waiting)

    # --- client -> server --------------------------------------------------------------

    def client_frames(self, frames: list[tuple[int, bytes]]) -> None:
        if self.local_sync is not None:
            frames = self._skip_to_sync(frames)
            if not frames:
                return
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
            if exc.sqlstate == "53300":
                exc = self._explain_exhaustion(exc)
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

    def _skip_to_sync(self, frames: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """Drop what the server would have skipped after the error; answer the client's Sync
        with the ReadyForQuery of the proxy's own (forwarded if it is still due)."""
        for i, (kind, _) in enumerate(frames):
            if kind != _S:
                continue
            entry, self.local_sync = self.local_sync, None
            self.skipping = False
            if self.pipeline.forward(entry):
                return frames[i + 1:]
            ready = msg.ready_for_query(self.txn_status)
            if self.pipeline:
                self.pipeline.expect(Expected(SYNC, SYNTH, payload=ready))
            else:
                self._deliver([ready])
            return frames[i + 1:]
        return []

    def _send(self, frames: list[tuple[int, bytes]]) -> None:
        if self.local_sync is not None:
            frames = self._skip_to_sync(frames)
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
                self.past_guard, self.sync_owed = True, False
            else:
                sync_after_first = first_kind in (_Q, _F)
        for i, (kind, raw) in enumerate(frames):
            if self.skipping and kind != _S and kind != _H:
                continue  # the server skips these too (a Flush still gets it to send its error)
            if self.past_guard:
                self.waiting = frames[i:]  # past the guard's protection: wait for its answer
                self.session.pause_reading_client()
                break
            if self.switch_pending and kind in (_Q, _F, _S):
                self.past_guard = True  # the guard covers messages up to this one
            if kind == _Q:
                if not self.audit.available:
                    self._audit_unavailable(QUERY, out)
                    continue
                self._query(raw, out)
            elif kind == _P:
                self.sync_owed = True
                self._parse(raw, out)
            elif kind == _B:
                self.sync_owed = True
                self._bind(raw, out)
            elif kind == _E:
                self.sync_owed = True
                if not self.audit.available:
                    self._audit_unavailable(EXECUTE, out)
                    continue
                self._execute(raw, out, frames[i + 1][0] if i + 1 < len(frames) else None)
            elif kind == _S:
                self.skipping = self.sync_owed = False
                out.append(raw)
                expect(Expected(SYNC))
            elif kind == _D:
                self.sync_owed = True
                self._describe(raw, out)
            elif kind == _C:
                self.sync_owed = True
                self._close(raw, out)
            elif kind == _F:
                if self.policy is not None:
                    self._refuse("<FunctionCall message>", "the FunctionCall message is not allowed", "42501",
                                 QUERY, out)
                else:
                    out.append(raw)
                    expect(Expected(QUERY, statement=self.session.new_statement("<FunctionCall message>")))
            elif kind in _FORWARD_ONLY:
                if kind == _H:
                    self.sync_owed = True
                out.append(raw)
            else:
                raise protocol_violation(f"unexpected message type {bytes([kind])!r}")
            if sync_after_first and kind in (_Q, _F):
                out.append(msg.SYNC)  # ends the guard's skip-until-Sync for a simple query
                expect(Expected(SYNC, SWALLOW))
                sync_after_first = self.sync_owed = False
        if out:
            backend.write(b"".join(out))
        self._deliver(self.pipeline.synthesized())
        if self._releasable():  # everything was answered locally
            self._release()

    def settings_for(self, backend) -> dict[str, str]:
        """The settings a connection must carry for this client, its signed identity included."""
        settings = dict(self.key[1])
        if self.signer is not None:
            settings.update(self.signer(backend.pid))
        return settings

    def _switch(self, backend, out: list[bytes]) -> None:
        """Make the connection this client's (protocol/switch.py), in front of its messages."""
        backend.switches += 1
        nonce = switch.new_nonce()
        new_person = backend.person != self.person
        expect = self.pipeline.expect
        out.append(switch.reset_messages(switch.DISCARD if new_person else switch.RESET))
        out.append(switch.apply_messages(self.role, self.settings_for(backend), nonce))
        out.append(msg.SYNC)
        out.append(switch.guard_messages(nonce))
        for kind in (PARSE, BIND, EXECUTE, PARSE, BIND, EXECUTE):
            expect(Expected(kind, SWITCH))
        expect(Expected(SYNC, SWALLOW))
        expect(Expected(PARSE, SWITCH))
        expect(Expected(BIND, SWITCH))
        expect(Expected(EXECUTE, GUARD))
        if new_person:
            backend.prepared.clear()
        backend.person, backend.state_key, backend.unnamed_owner = self.person, self.key, None
        self.switch_pending, self.past_guard, self.sync_owed = True, False, True
        self.session.server.metrics.count("pgproxy_identity_switches", "person" if new_person else "settings")

    def _reapply(self, reset: str, out: list[bytes]) -> None:
        """Right after a client's reset (already in ``out``): its identity again, before any
        later message. Its success lets the messages held meanwhile go; if the reset failed,
        the server skips the re-apply and nothing changed."""
        backend = self.backend
        expect = self.pipeline.expect
        out.append(switch.apply_messages(self.role, self.settings_for(backend), switch.new_nonce()))
        expect(Expected(PARSE, SWITCH))
        expect(Expected(BIND, SWITCH))
        expect(Expected(EXECUTE, GUARD))
        expect(Expected(EXECUTE, SYNTH, payload=msg.command_complete(_RESET_TAGS[reset])))
        backend.unnamed_owner = None
        if reset == switch.DISCARD:
            backend.prepared.clear()
            self.statements.clear()
            self.unnamed = None
        self.switch_pending, self.past_guard = True, False
        self.session.server.metrics.count("pgproxy_identity_switches", "reset")

    def _verdict(self, text: str, kind: int, out: list[bytes]):
        """The guard's verdict, or None after queueing the refusal (42501), or the syntax
        error (42601, PostgreSQL's own text and position). Without the guard: no verdict."""
        if self.policy is None:
            return None, True
        verdict = classify(text)
        reason = self.policy.refusal(verdict)
        if not reason:
            return verdict, True
        if verdict.sqlstate == "42601":  # a typo, not a denial: PostgreSQL's error, audited as one
            statement = self.session.new_statement(text, verdict=verdict)
            self._answer_error(verdict.refusal, "42601", kind, out, getattr(verdict, "position", None), statement)
        else:
            self._refuse(text, reason, verdict.sqlstate, kind, out)
        return verdict, False

    def _refuse(self, text: str, reason: str, sqlstate: str, kind: int, out: list[bytes]) -> None:
        self._answer_error(f"statement refused by pgproxy: {reason}", sqlstate, kind, out)
        self.session.record_denial(text, reason)

    def _answer_error(self, message: str, sqlstate: str, kind: int, out: list[bytes], position: int | None = None,
                      statement=None) -> None:
        """The proxy's error in the statement's place, and PostgreSQL's semantics with it: a
        statement that fails is sent instead (REFUSED_SQL), so an open transaction fails
        and, in the extended protocol, the server skips to Sync (the client's messages up
        to Sync are dropped here too). The session carries on."""
        error = msg.statement_error(sqlstate, message, position)
        if kind == QUERY:
            out.append(_REFUSED_QUERY)
            self.pipeline.expect(Expected(QUERY, REPLACE, statement=statement, payload=error))
        else:
            out.append(_REFUSED_PARSE)
            self.pipeline.expect(Expected(PARSE, REPLACE, statement=statement, payload=error))
            self.skipping = self.sync_owed = True
        self.backend.unnamed_owner = None

    def _audit_unavailable(self, kind: int, out: list[bytes]) -> None:
        """Nothing runs that the trail cannot record (invariant 4): refused like any statement,
        counted for the audit_gap record written once the trail is back."""
        self.audit.note_refused("statement")
        self._answer_error("audit trail unavailable: statements are refused until it can be written again",
                           "58030", kind, out)

    def _refused_effects(self, effects, kind: int, text: str, out: list[bytes]) -> bool:
        """Refuse what no role may do to the session's identity machinery; True if refused."""
        if effects.refusal:
            self._answer_error(effects.refusal, "0A000", kind, out)
        elif effects.reset and not effects.alone:
            self._answer_error(f"{effects.reset} must be sent as a statement of its own through pgproxy",
                               "0A000", kind, out)
        else:
            return False
        self.session.record_denial(text, effects.refusal or "reset inside a multi-statement query")
        return True

    def _query(self, raw: bytes, out: list[bytes]) -> None:
        text = raw[5:-1].decode("utf-8", "replace")
        verdict, allowed = self._verdict(text, QUERY, out)
        if not allowed:
            return
        effects = session_effects(text)
        if effects is not NOTHING and self._refused_effects(effects, QUERY, text, out):
            return
        backend = self.backend
        if effects.local and self._answer_locally(effects):
            return
        if effects.pin and self.pooled and not self._pin(effects.pin, QUERY, out):
            return
        statement = self.session.new_statement(text, verdict=verdict)
        if effects.settings and not self._carry(effects, statement, QUERY, out):
            return
        backend.unnamed_owner = None  # a simple query replaces the unnamed statement
        if effects.reset and self.txn_status != b"E":
            # The reset and the re-apply as one extended batch, answered as a simple query.
            out.append(msg.parse_message("", text) + msg.bind_message("", "") + msg.execute_message())
            self.pipeline.expect(Expected(PARSE, QUIET))
            self.pipeline.expect(Expected(BIND, QUIET))
            self.pipeline.expect(Expected(EXECUTE, QUIET, statement=statement))
            self._reapply(effects.reset, out)
            out.append(msg.SYNC)
            self.pipeline.expect(Expected(SYNC))
            self.past_guard = True  # nothing guards what follows: it waits for the re-apply's answer
            return
        out.append(raw)
        self.pipeline.expect(Expected(QUERY, statement=statement))
        if effects.deallocates:
            self._deallocated()

    def _execute(self, raw: bytes, out: list[bytes], next_kind: int | None) -> None:
        portal = msg.parse_execute_portal(raw[5:])
        text, params, formats = self.portals.get(portal, ("", None, None))
        verdict = classify(text) if self.policy is not None and text else None
        statement = self.session.new_statement(text, params, formats, verdict)
        effects = session_effects(text) if text else NOTHING
        if effects.reset and self.txn_status != b"E":
            if next_kind != _S:
                self._answer_error(f"{effects.reset} must be followed by Sync through pgproxy", "0A000",
                                   EXECUTE, out)
                self.session.record_denial(text, "reset not followed by Sync")
                return
            out.append(raw)
            self.pipeline.expect(Expected(EXECUTE, QUIET, statement=statement))
            self._reapply(effects.reset, out)
            return
        if effects.settings and not self._carry(effects, statement, EXECUTE, out):
            return
        out.append(raw)
        self.pipeline.expect(Expected(EXECUTE, statement=statement))

    def _carry(self, effects, statement, kind: int, out: list[bytes]) -> bool:
        """Ordinary settings follow the client: taken along once the statement succeeds.
        Inside a transaction block they could be rolled back with it: pin instead. False
        if that pin was refused (the error is queued)."""
        if self.txn_status == b"I":
            statement.changes = effects.settings
            return True
        return not self.pooled or self._pin("SET", kind, out)

    def _follow(self, changes) -> None:
        """A SET/RESET of ordinary settings succeeded: they are the client's from now on,
        re-applied wherever it lands, like its startup parameters."""
        settings = dict(self.key[1])
        exact = True  # the connection now carries exactly the new values
        for name, value in changes:
            for key in [k for k in settings if k.lower() == name]:
                del settings[key]
            if value is None:  # RESET / DEFAULT: back to what the client gave at startup
                value, exact = self.session.startup_value(name), False
            if name == "application_name":  # the identity's form, as at login
                value, exact = f"{self.person[1]} via {value or 'unknown'}", False
            if value is not None:
                settings[name] = value
        old, self.key = self.key, (self.person, tuple(sorted(settings.items())))
        backend = self.backend
        if backend is not None and backend.state_key == old:
            backend.state_key = self.key if exact else None

    def _deallocated(self) -> None:
        """DEALLOCATE ALL reached the server: the connection's prepared statements are gone."""
        self.backend.prepared.clear()
        self.backend.unnamed_owner = None

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

    def _pin(self, reason: str, kind: int, out: list[bytes]) -> bool:
        """Pin the client to its connection; False if refused (the error is queued)."""
        if self.pinned:
            return True
        if self.refuse_state:
            self._answer_error(f"{reason} outlives the transaction; not allowed with transaction pooling",
                               "0A000", kind, out)
            self.session.record_pin(reason, refused=True)
            return False
        self.pinned = reason
        self.session.record_pin(reason, refused=False)
        return True

    def _parse(self, raw: bytes, out: list[bytes]) -> None:
        parse = msg.parse_parse(raw[5:])
        if self.described_types is not None:
            self.described_types.pop(parse.statement, None)  # a new statement under that name
        verdict, allowed = self._verdict(parse.query, PARSE, out)
        if not allowed:
            return
        effects = session_effects(parse.query)
        if effects is not NOTHING and self._refused_effects(effects, PARSE, parse.query, out):
            return
        if effects.pin and self.pooled and not self._pin(effects.pin, PARSE, out):
            return
        if effects.deallocates:
            self._deallocated()
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
        if self.described_types is not None and bind.statement in self.described_types:
            types = self.described_types[bind.statement]  # asyncpg & co. leave the types to the server
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
        self.pipeline.expect(Expected(DESCRIBE, payload=("S", name) if what == "S" else None))

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
        if self.held is not None:  # earlier replies wait for the trail: these go after them
            self.held += pieces
            return
        if self.durable_due and pieces:
            if not self.audit.durable(self.durable_due):
                # durability = "before_result": a result the client sees has its record on disk.
                self.held = list(pieces)
                self.audit.when_durable(self.durable_due, self._release_held)
                return
            self.durable_due = 0
        transport = self.session.transport
        if pieces and transport is not None and not transport.is_closing():
            transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _release_held(self) -> None:
        held, self.held = self.held, None
        if held is None:
            return
        if self.durable_due and not self.audit.durable(self.durable_due):
            self.held = held  # records of later statements came meanwhile
            self.audit.when_durable(self.durable_due, self._release_held)
            return
        self.durable_due = 0
        self._deliver(held)

    def hold(self, backend) -> None:
        """Session pooling: the connection (switched to this client at login) is its own
        until it leaves."""
        self._attach(backend)

    def _releasable(self) -> bool:
        return (self.pooled and self.txn_status == b"I" and not self.pipeline and not self.waiting and not self.pinned
                and self.backend is not None and not self.switch_pending and not self.attaching
                and not self.sync_owed and (not self.skipping or self.local_sync is not None)
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
        if name == "client_encoding" and client_only_encoding(value):
            # Every way to choose one is refused; reaching here means one was missed: end it.
            if self.backend is not None:
                self.backend.close("client-only client_encoding reached the connection", abort=True)
            self.session.end(ProxyFailure("client-only encodings are not supported through pgproxy",
                                          sqlstate="0A000", severity="FATAL",
                                          log_detail=f"server reported client_encoding {value}"))

    def ready(self, status: bytes, idle: bool) -> None:
        if self.changes_due:
            changes, self.changes_due = self.changes_due, ()
            self._follow(changes)
        self.txn_status = status
        self.idle_since = time.monotonic()
        if self.backend is not None:
            self.backend.txn_status = status

    def described(self, payload: tuple, body: bytes) -> None:
        """ParameterDescription for a statement the client described: remembered (bounded by
        the statements it has) so binary parameters are audited readably."""
        count = int.from_bytes(body[:2], "big")
        types = tuple(int.from_bytes(body[2 + 4 * i:6 + 4 * i], "big") for i in range(min(count, (len(body) - 2) // 4)))
        name = payload[1]
        if self.described_types is None:
            self.described_types = {}
        known = self.described_types
        if name in self.statements or not name:
            known[name] = types
            if len(known) > len(self.statements) + 1:  # closed statements: forget them
                self.described_types = {k: v for k, v in known.items() if not k or k in self.statements}

    def statement_done(self, statement, outcome: str) -> None:
        self.session.audit_statement(statement, outcome)
        if statement.changes and outcome == "ok":
            self.changes_due += statement.changes  # taken at ReadyForQuery: an error first undoes them

    def statement_error(self, statement, body: bytes) -> None:
        statement.sqlstate = msg.parse_error_fields(body).get("C", "XX000")

    def failed(self, entry: Expected, body: bytes, statement) -> None:
        """An extended-protocol message failed; the server skips the rest up to Sync.
        ``statement``: the Execute it belongs to, if the batch has one."""
        self.changes_due = ()  # the implicit transaction failed: the settings it made are undone
        if not self.pipeline and self.backend is not None and self.local_sync is None:
            # No Sync of the client's is due: sync the server now, so the connection is not held
            # until the client sends one (it may never).
            self.backend.write(msg.SYNC)
            self.local_sync = Expected(SYNC, SWALLOW)
            self.pipeline.expect(self.local_sync)
            self.skipping, self.sync_owed = True, False
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
        if entry.action == GUARD:  # a re-apply skipped after its reset failed: nothing changed
            self.switch_confirmed()

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
        busy = bool(self.pipeline) or self.sync_owed or not self.scanner.at_boundary
        if busy:
            # The server still owes a ReadyForQuery per Sync and Query sent (its replies to
            # what the proxy synthesized excepted). An unsynced batch gets no Sync: that would
            # commit it; logging out rolls it back.
            owed = sum(1 for e in self.pipeline.pending() if e.kind in (SYNC, QUERY) and e.action != SYNTH)
            self.pipeline.clear()
            self.pool.drain(backend, self.scanner, owed, reason=f"client left mid-request ({reason})")
            return
        if not self.pooled or self.pinned or self.txn_status != b"I":
            self.pool.release(backend, True, reason=reason)  # reset: the session's own state goes
        else:
            self.pool.give_back(backend)
