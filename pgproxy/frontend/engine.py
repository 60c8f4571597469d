"""The logged-in session as one pure engine: client and server bytes in, actions out.

One ``Engine`` per logged-in session, in every pool mode. It does no I/O: the asyncio
driver (frontend/relay.py) feeds it framed client messages (``client``), server bytes
(``server``), the connection the pool gave (``attached``), and carries out the actions it
appends to ``actions``, in order:

    (TO_SERVER, conn, bytes)            write to that connection (the one attached then)
    (TO_CLIENT, bytes)                  write to the client (after the trail, if durable)
    (ACQUIRE, key)                      take a connection (preferring one carrying ``key``);
                                        answer with ``attached`` or ``acquire_failed``
    (RELEASE, connection)               give it back to the pool as it is
    (AUDIT, statement, outcome, pid)    one statement record (invariant 4)
    (AUDIT_LOCAL, tag)                  a statement the proxy answered itself
    (DENIED, text, reason)              a statement refused; never reached the database
    (PIN, reason, refused)              the session was pinned (or refused a pin)
    (UNAUDITED, what)                   refused because the trail is unavailable
    (COUNT, series, label)              a metric
    (PAUSE,) / (RESUME,)                stop / go on reading the client
    (END, error)                        the session ends with this error
    (CLOSE_CONNECTION, conn, reason, abort)  close that connection, never reuse it
    (CLOSE_CLIENT, reason)              close the client without an error message

States (``state``) and the only transitions:

    state      meaning                                   on                       next
    IDLE       no connection (transaction pooling)       client message, taken    SWITCHING | ACTIVE
                                                         client message, none     WAITING
    WAITING    messages wait for a connection;           attached                 SWITCHING | ACTIVE
               the client is not read                    acquire_failed           CLOSED
    SWITCHING  a switch (or a reset's re-apply) went     its guard succeeds       ACTIVE
               out ahead of the client's messages; the   a message past the       HELD
               ones up to the first Sync go with it      guard's cover
    HELD       later messages wait for the guard         its guard succeeds       ACTIVE (sends them)
    ACTIVE     the connection carries this client's      needs a re-apply         SWITCHING
               identity; messages flow                   releasable (below)       IDLE
    any        switch failed, server lost, client left                            CLOSED

Sub-states of ACTIVE that the protocol needs: ``txn_status`` (the last ReadyForQuery),
``sync_owed`` (extended messages since the last Sync), ``skipping`` (a refused Parse: drop
up to Sync), ``local_sync`` (after an error with no client Sync, the proxy synced the
server itself and answers the client's Sync later), ``pinned``.

The rules:

* **Identity first.** No client message reaches a connection before it carries the
  client's identity: a connection that does not (``identity.carries(key)``) gets the switch
  of protocol/switch.py in the same write, ahead of the messages; if the switch failed,
  PostgreSQL skips the client's messages up to their Sync (the guard fails). Messages past
  that Sync wait (HELD) until the guard has answered. A failed switch ends the session and
  closes the connection.
* **Giving a connection back** (``_releasable``): the pool mode allows it (``PoolMode``:
  transaction pooling at ReadyForQuery 'I' with no pin; session pooling never), nothing
  is owed (no reply outstanding, no message waiting, no switch unanswered, nothing since
  the last Sync, not skipping unless the proxy's own Sync covers it), and the server's
  stream is at a message boundary.
* **Resets re-apply the identity at once.** RESET ALL, DISCARD ALL and SET SESSION
  AUTHORIZATION (a whole simple query, or an Execute directly followed by Sync) go out
  followed by the re-apply in the same write (SWITCHING, then HELD). Anywhere else they
  are refused (0A000).
* **Refusals abort like errors.** A statement the proxy refuses is replaced by one that
  fails in PostgreSQL (``REFUSED_SQL``) and its error by the proxy's, so the transaction
  fails exactly as if PostgreSQL had refused it.
* **Nothing runs unaudited.** While the trail is unavailable every Query and Execute is
  refused that way (58030); every statement that reaches the server yields one AUDIT.
* **Prepared statements** (transaction pooling): client names map to per-connection
  names (ConnectionIdentity's LRU); a Parse the connection has is answered locally; Bind
  or Describe on a connection without the statement gets a Parse injected first; Close of
  a statement is answered locally; the unnamed statement is re-sent where the client lands.
  DEALLOCATE is answered locally too, in the transaction state PostgreSQL would answer it
  in: behind replies still due it waits for them (with what follows it), and in a failed
  block it is refused (25P02) and deallocates nothing.
* **Session state.** A statement that outlives its transaction (policy/session_state.py)
  pins the client to its connection under transaction pooling (or is refused, 0A000, with
  ``backend.session_state = "refuse"``). Ordinary SETs follow the client instead: taken
  along once they succeed and re-applied wherever it lands.
"""

from __future__ import annotations

import time

from pgproxy.backend.identity import EMPTY
from pgproxy.errors import PgProxyError, ProxyFailure, protocol_violation
from pgproxy.policy.guard import classify
from pgproxy.policy.session_state import NOTHING, client_only_encoding, repeated_effects, session_effects
from pgproxy.protocol import messages as msg
from pgproxy.protocol import switch
from pgproxy.protocol.framing import ServerStreamScanner
from pgproxy.protocol.pipeline import (BIND, CLOSE, CONFIRMED, DESCRIBE, DESCRIBED, DONE, EXECUTE, FAILED, FORWARD,
                                       GUARD, PARAMETER, PARSE, PARSED, QUERY, QUIET, READY, REPLACE, SKIPPED,
                                       SKIPPED_QUIETLY,
                                       SWALLOW, SWITCH, SWITCH_FAILED, SYNC, SYNTH, WANTED, Expected, Pipeline)

IDLE, WAITING, SWITCHING, HELD, ACTIVE, CLOSED = "idle", "waiting", "switching", "held", "active", "closed"
(TO_SERVER, TO_CLIENT, ACQUIRE, RELEASE, AUDIT, AUDIT_LOCAL, DENIED, PIN, UNAUDITED, COUNT, PAUSE, RESUME, END,
 CLOSE_CONNECTION, CLOSE_CLIENT) = range(15)
# What becomes of the connection when the session ends (``leave``):
GIVE_BACK, RESET, DRAIN = "give_back", "reset", "drain"

MAX_CLIENT_STATEMENTS = 10_000
SERVER_MESSAGE_LIMIT = 1 << 20  # what the scanner buffers of one server message it must read
# Sent in a refused statement's place: PostgreSQL fails it (a syntax error) without running
# anything, so the transaction and the pipeline fail as they would have.
REFUSED_SQL = "pgproxy_refused_this_statement"
_REFUSED_QUERY = msg.query(REFUSED_SQL)
_REFUSED_PARSE = msg.parse_message("", REFUSED_SQL)
_RESET_TAGS = {"DISCARD ALL": "DISCARD ALL", "RESET ALL": "RESET", "SESSION AUTHORIZATION": "SET"}
_Q, _P, _B, _E, _S, _C, _D, _H, _F = (ord(c) for c in "QPBESCDHF")
_FORWARD_ONLY = frozenset(b"dcfH")  # CopyData, CopyDone, CopyFail, Flush: no reply of their own
_PAUSE, _RESUME = (PAUSE,), (RESUME,)
_DEALLOCATES = frozenset({"deallocate", "deallocate_all"})
_NOTHING_WAITING = ()


class Statement:
    """One statement on its way through the database, for its audit record."""

    __slots__ = ("text", "params", "formats", "started", "t0", "tags", "sqlstate", "verdict", "changes")

    def __init__(self, text: str, params=None, formats=None, verdict=None) -> None:
        self.text, self.params, self.formats, self.verdict = text, params, formats, verdict
        self.started, self.t0 = time.time(), time.perf_counter()
        self.tags: list[bytes] = []  # raw CommandComplete bodies; the audit writer parses them
        self.sqlstate: str | None = None
        self.changes = ()  # settings the client takes along once this succeeds (session_state.py)


class PoolMode:
    """When a session takes a connection and when it gives it back. A new mode is a new
    subclass; the engine asks only these."""

    name = ""
    renames = False  # client statement names are mapped per connection (it is shared)
    pins = False     # state that outlives a transaction must pin the session to its connection
    releases = False  # gives its connection back during the session at all (may_give_back is asked)

    def may_give_back(self, engine: "Engine") -> bool:
        """At a point where nothing is owed (see Engine._releasable): give the connection back?"""
        return False

    def on_leave(self, engine: "Engine") -> str:
        """The session ended with nothing in flight: GIVE_BACK as it is, or RESET first."""
        return RESET


class SessionPooling(PoolMode):
    """The connection taken at login is the client's until it leaves."""

    name = "session"


class TransactionPooling(PoolMode):
    """A connection per transaction, given back at ReadyForQuery 'I' unless pinned."""

    name = "transaction"
    renames = True
    pins = True
    releases = True

    def may_give_back(self, engine: "Engine") -> bool:
        return engine.txn_status == b"I" and not engine.pinned

    def on_leave(self, engine: "Engine") -> str:
        return RESET if engine.pinned or engine.txn_status != b"I" else GIVE_BACK


POOL_MODES = {mode.name: mode() for mode in (SessionPooling, TransactionPooling)}

# The (name, value) pairs of settings keys, and the person tuples, one object per distinct
# value: the sessions of one person repeat their person and every pair but the session id,
# and each session holds them while it lives (memory per idle client). They are immutable and
# only compared by value, so sharing an equal one changes nothing. Bounded: emptied when full
# (a miss only costs the sharing).
_PAIRS: dict[tuple[str, str], tuple[str, str]] = {}
_PEOPLE: dict[tuple, tuple] = {}
_PAIRS_MAX = 4096


def one_copy(person: tuple) -> tuple:
    """``person``, or an equal tuple another session holds already."""
    people = _PEOPLE
    if len(people) >= _PAIRS_MAX:
        people.clear()
    return people.setdefault(person, person)


def settings_key(settings: dict[str, str]) -> tuple:
    """The settings as the sorted pairs an Engine's key holds (the pool matches on it)."""
    pairs = _PAIRS
    if len(pairs) >= _PAIRS_MAX:
        pairs.clear()
    return tuple([pairs.setdefault(pair, pair) for pair in sorted(settings.items())])


class Engine:
    __slots__ = ("mode", "policy", "trail", "role", "person", "key", "startup", "signer", "refuse_state",
                 "prepared_limit", "state", "backend", "pipeline", "scanner", "actions", "statements", "portals",
                 "unnamed", "unnamed_gen", "pinned", "waiting", "txn_status", "idle_since", "skipping", "attaching",
                 "sync_owed", "changes_due", "local_sync", "described_types")

    def __init__(self, mode: PoolMode, role: str, person: tuple, settings: dict[str, str], *, policy=None,
                 trail=None, startup: dict[str, str] | None = None, signer=None, refuse_state: bool = False,
                 prepared_limit: int = 100) -> None:
        self.mode = mode
        self.policy = policy  # the statement guard's rules for this role; None: the guard is off
        self.trail = trail    # the audit trail; read for ``available`` only
        person = one_copy(person)
        self.role, self.person = role, person
        # Whose role and settings a connection must carry for this client.
        self.key = (person, settings_key(settings))
        self.startup = startup if startup is not None else EMPTY  # the client's startup parameters (RESET goes back to them)
        self.signer = signer  # backend pid -> the signed-identity settings for it, or None
        self.refuse_state = refuse_state
        self.prepared_limit = prepared_limit
        self.state = IDLE
        self.backend = None
        self.pipeline = Pipeline()
        self.scanner = ServerStreamScanner(WANTED, SERVER_MESSAGE_LIMIT)
        self.actions: list[tuple] = []
        self.statements: dict[str, tuple] = EMPTY  # client statement name -> (text, parameter types)
        self.portals: dict[str, tuple] = EMPTY     # portal -> (text, params, formats), until the transaction ends
        self.unnamed: tuple | None = None
        self.unnamed_gen = 0
        self.pinned = ""
        self.waiting: list[tuple[int, bytes]] = _NOTHING_WAITING  # client messages not sent yet (a list of our own)
        self.txn_status = b"I"
        self.idle_since = time.monotonic()
        self.skipping = False  # a refused Parse: drop messages up to Sync
        self.attaching = False
        self.sync_owed = False  # extended-protocol messages went out since the last Sync
        self.changes_due: tuple = ()  # settings changes that succeeded, taken at the next ReadyForQuery
        # After an error with no Sync from the client yet, the proxy sent the server a Sync of its
        # own; this is that Sync's entry, until the client's Sync, which it answers.
        self.local_sync: Expected | None = None
        self.described_types: dict[str, tuple] | None = None  # statement -> parameter types the server described

    @property
    def active(self) -> bool:
        return bool(self.pipeline) or bool(self.waiting)

    # --- the identity switch -------------------------------------------------------------

    def settings_for(self, backend) -> dict[str, str]:
        """The settings a connection must carry for this client, its signed identity included."""
        settings = dict(self.key[1])
        if self.signer is not None:
            settings.update(self.signer(backend.pid))
        return settings

    def login_switch(self, backend) -> bytes | None:
        """At login: the switch to wait for before the client is told it is in (ending in
        Sync; one ReadyForQuery), or None if the connection already carries the client."""
        if backend.identity.carries(self.key):
            return None
        return switch.switch_messages(switch.DISCARD, self.role, self.settings_for(backend), switch.new_nonce())

    def login_switched(self, backend, ok: bool) -> None:
        """The login switch answered: on success the connection is the client's; on error
        nothing of it was applied, but what it carries is unknown."""
        identity = backend.identity
        identity.forget()
        if ok:
            identity.became(self.person, self.key)

    def _switch(self, backend, out: list[bytes]) -> None:
        """Make the connection this client's (protocol/switch.py), in front of its messages."""
        new_person = backend.identity.person != self.person
        reset = switch.DISCARD if new_person else switch.RESET
        out.append(switch.switch_messages(reset, self.role, self.settings_for(backend), switch.new_nonce()))
        expect = self.pipeline.expect
        for kind in switch.SWITCH_REPLIES:
            expect(Expected(kind, SWITCH))
        expect(Expected(SYNC, SWALLOW))
        for kind in switch.GUARD_REPLIES:
            expect(Expected(kind, SWITCH))
        expect(Expected(EXECUTE, GUARD))
        backend.identity.became(self.person, self.key)
        self.state = SWITCHING
        self.sync_owed = True
        self.actions.append((COUNT, "pgproxy_identity_switches", "person" if new_person else "settings"))

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
        expect(Expected(EXECUTE, SYNTH, reply=msg.command_complete(_RESET_TAGS[reset])))
        backend.identity.drop_unnamed()
        if reset == switch.DISCARD:
            backend.identity.deallocated()
            self.statements = EMPTY
            self.unnamed = None
        self.state = SWITCHING
        self.actions.append((COUNT, "pgproxy_identity_switches", "reset"))

    def _switch_confirmed(self) -> None:
        self.state = ACTIVE  # what waited is sent once this chunk's replies are out (``server``)

    def _switch_failed(self, body: bytes) -> None:
        fields = msg.parse_error_fields(body)
        backend = self.backend
        self.pipeline.clear()
        self.state = CLOSED
        if backend is not None:
            self.actions.append((CLOSE_CONNECTION, backend,
                                 f"identity switch failed: {fields.get('C')} {fields.get('M')}", False))
        self.actions.append((END, ProxyFailure("could not switch to your role", sqlstate="28000", severity="FATAL",
                                               log_detail=f'identity switch to role "{self.role}" failed: '
                                                          f"{fields.get('C')} {fields.get('M')}")))

    # --- taking and giving back a connection ---------------------------------------------

    def hold(self, backend) -> None:
        """Session pooling: the connection (switched to this client at login) is its own
        until it leaves."""
        self.attached(backend)

    def attached(self, backend, leftover: bytes = b"") -> None:
        """The pool gave a connection (``leftover``: bytes it received while idle)."""
        self.backend = backend
        self.state = ACTIVE
        if leftover:
            self.attaching = True  # not a reason to release, nor to send what waits
            self.server(leftover)
            self.attaching = False
        if self.waiting and self.state == ACTIVE:
            self._send_waiting()

    def acquire_failed(self, error) -> None:
        self.state = CLOSED
        self.actions.append((END, error))

    def _releasable(self) -> bool:
        return (self.mode.releases and self.state == ACTIVE and self.backend is not None and not self.pipeline
                and not self.waiting
                and not self.attaching and not self.sync_owed and (not self.skipping or self.local_sync is not None)
                and self.scanner.at_boundary and self.mode.may_give_back(self))

    def _release(self) -> None:
        backend, self.backend = self.backend, None
        self.state = IDLE
        self.portals = EMPTY
        self.idle_since = time.monotonic()
        self.actions.append((RELEASE, backend))

    # --- client -> server ----------------------------------------------------------------

    def client(self, frames: list[tuple[int, bytes]]) -> None:
        """Framed client messages (Terminate and unknown types are the driver's)."""
        if self.local_sync is not None:
            frames = self._skip_to_sync(frames)
            if not frames:
                return
        state = self.state
        if state == ACTIVE or state == SWITCHING:
            if not self.waiting:
                self._send(frames)
                return
        elif state == IDLE:
            self._wait(frames)
            self.state = WAITING
            # The driver answers at once when one is idle; else it stops reading the client.
            self.actions.append((ACQUIRE, self.key))
            return
        elif state == CLOSED:
            return
        self._wait(frames)
        self.actions.append(_PAUSE)

    def _wait(self, frames: list[tuple[int, bytes]]) -> None:
        if self.waiting:
            self.waiting += frames
        else:
            self.waiting = list(frames)  # our own list: the caller's is not kept

    def _send_waiting(self) -> None:
        frames, self.waiting = self.waiting, _NOTHING_WAITING
        self._send(frames)
        if not self.waiting:
            self.actions.append(_RESUME)

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
                self.pipeline.expect(Expected(SYNC, SYNTH, reply=ready))
            else:
                self.actions.append((TO_CLIENT, ready))
            return frames[i + 1:]
        return []

    def _send(self, frames: list[tuple[int, bytes]]) -> None:
        if self.local_sync is not None:
            frames = self._skip_to_sync(frames)
        backend = self.backend
        out: list[bytes] = []
        expect = self.pipeline.expect
        sync_after_first = False
        if frames and not backend.identity.carries(self.key):
            self._switch(backend, out)
            first_kind, first_raw = frames[0]
            if first_kind == _Q and session_effects(first_raw[5:-1].decode("utf-8", "replace")).copy_in:
                # COPY FROM STDIN ignores Sync: the guard could not be ended after it. The
                # COPY follows when the guard has answered (one round trip).
                out.append(msg.SYNC)
                backend.identity.synced()
                expect(Expected(SYNC, SWALLOW))
                self.state, self.sync_owed = HELD, False
            else:
                sync_after_first = first_kind in (_Q, _F)
        trail = self.trail
        for i, (kind, raw) in enumerate(frames):
            if self.skipping and kind != _S and kind != _H:
                continue  # the server skips these too (a Flush still gets it to send its error)
            if self.state == HELD:
                self.waiting = frames[i:]  # past the guard's protection: wait for its answer
                self.actions.append(_PAUSE)
                break
            if self.state == SWITCHING and kind in (_Q, _F, _S):
                self.state = HELD  # the guard covers messages up to this one
            if kind == _Q:
                if not trail.available:
                    self._audit_unavailable(QUERY, out)
                    continue
                if self._query(raw, out):  # answered by the proxy once the replies before it are in
                    self.waiting = frames[i:]
                    self.actions.append(_PAUSE)
                    break
            elif kind == _P:
                self.sync_owed = True
                self._parse(raw, out)
            elif kind == _B:
                self.sync_owed = True
                self._bind(raw, out)
            elif kind == _E:
                self.sync_owed = True
                if not trail.available:
                    self._audit_unavailable(EXECUTE, out)
                    continue
                self._execute(raw, out, frames[i + 1][0] if i + 1 < len(frames) else None)
            elif kind == _S:
                self.skipping = self.sync_owed = False
                backend.identity.synced()
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
                    expect(Expected(QUERY, statement=Statement("<FunctionCall message>")))
            elif kind in _FORWARD_ONLY:
                if kind == _H:
                    self.sync_owed = True
                out.append(raw)
            else:
                raise protocol_violation(f"unexpected message type {bytes([kind])!r}")
            if sync_after_first and kind in (_Q, _F):
                out.append(msg.SYNC)  # ends the guard's skip-until-Sync for a simple query
                backend.identity.synced()
                expect(Expected(SYNC, SWALLOW))
                sync_after_first = self.sync_owed = False
        actions = self.actions
        if out:
            actions.append((TO_SERVER, backend, out[0] if len(out) == 1 else b"".join(out)))
        replies = self.pipeline.synthesized()
        if self.pipeline.events:  # (a local ParseComplete's PARSED)
            self._events()
        if replies:
            actions.append((TO_CLIENT, replies[0] if len(replies) == 1 else b"".join(replies)))
        if self._releasable():  # everything was answered locally
            self._release()

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
            self._answer_error(verdict.refusal, "42601", kind, out, getattr(verdict, "position", None),
                               Statement(text, verdict=verdict))
        else:
            self._refuse(text, reason, verdict.sqlstate, kind, out)
        return verdict, False

    def _refuse(self, text: str, reason: str, sqlstate: str, kind: int, out: list[bytes]) -> None:
        self._answer_error(f"statement refused by pgproxy: {reason}", sqlstate, kind, out)
        self.actions.append((DENIED, text, reason))

    def _answer_error(self, message: str, sqlstate: str, kind: int, out: list[bytes], position: int | None = None,
                      statement=None) -> None:
        """The proxy's error in the statement's place, and PostgreSQL's semantics with it: a
        statement that fails is sent instead (REFUSED_SQL), so an open transaction fails
        and, in the extended protocol, the server skips to Sync (the client's messages up
        to Sync are dropped here too). The session carries on."""
        error = msg.statement_error(sqlstate, message, position)
        if kind == QUERY:
            out.append(_REFUSED_QUERY)
            self.pipeline.expect(Expected(QUERY, REPLACE, statement=statement, reply=error))
        else:
            out.append(_REFUSED_PARSE)
            self.pipeline.expect(Expected(PARSE, REPLACE, statement=statement, reply=error))
            self.skipping = self.sync_owed = True
        self.backend.identity.drop_unnamed()

    def _audit_unavailable(self, kind: int, out: list[bytes]) -> None:
        """Nothing runs that the trail cannot record (invariant 4): refused like any statement,
        counted for the audit_gap record written once the trail is back."""
        self.actions.append((UNAUDITED, "statement"))
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
        self.actions.append((DENIED, text, effects.refusal or "reset inside a multi-statement query"))
        return True

    def _query(self, raw: bytes, out: list[bytes]) -> bool:
        """True: not taken yet, it waits (with what follows it) for the replies before it."""
        text = raw[5:-1].decode("utf-8", "replace")
        verdict, allowed = self._verdict(text, QUERY, out)
        if not allowed:
            return False
        effects = session_effects(text)
        if effects is not NOTHING and self._refused_effects(effects, QUERY, text, out):
            return False
        if effects.local in _DEALLOCATES and self.mode.renames:
            # The names are the proxy's to answer for, in the state PostgreSQL would answer
            # in: the one the replies before it leave (a pipelined BEGIN makes it T, a failure
            # in a block E; a failed unsynced batch has the server skip it, and so does the
            # proxy: _skip_to_sync). So it waits for them — with a Flush behind an unsynced
            # batch, whose replies the server would otherwise keep until a Sync. Not while a
            # switch is unconfirmed: its Sync goes out after this first message.
            owed = self.pipeline.awaits_server()
            if owed and self.state == ACTIVE:
                if self.sync_owed:
                    out.append(msg.FLUSH)
                return True
            if self.txn_status == b"E" and not owed:
                # PostgreSQL refuses it in an aborted transaction: so does the proxy, and
                # nothing is deallocated.
                self._answer_error("current transaction is aborted, commands ignored until end of transaction "
                                   "block", "25P02", QUERY, out)
                return False
        if effects.local and self._answer_locally(effects):
            return False
        if effects.pin and self.mode.pins and not self._pin(effects.pin, QUERY, out):
            return False
        statement = Statement(text, verdict=verdict)
        if effects.settings and not self._carry(effects, statement, QUERY, out):
            return False
        self.backend.identity.drop_unnamed()  # a simple query replaces the unnamed statement
        if effects.reset and self.txn_status != b"E":
            # The reset and the re-apply as one extended batch, answered as a simple query.
            out.append(msg.parse_message("", text) + msg.bind_message("", "") + msg.execute_message())
            self.pipeline.expect(Expected(PARSE, QUIET, own=True))
            self.pipeline.expect(Expected(BIND, QUIET))
            self.pipeline.expect(Expected(EXECUTE, QUIET, statement=statement))
            self._reapply(effects.reset, out)
            out.append(msg.SYNC)
            self.backend.identity.synced()
            self.pipeline.expect(Expected(SYNC, own=True))  # its ReadyForQuery answers the client's Query
            self.state = HELD  # nothing guards what follows: it waits for the re-apply's answer
            return False
        out.append(raw)
        self.pipeline.expect(Expected(QUERY, statement=statement))
        if effects.deallocates:
            self.backend.identity.deallocated()
        return False

    def _execute(self, raw: bytes, out: list[bytes], next_kind: int | None) -> None:
        portal = msg.parse_execute_portal(raw[5:])
        text, params, formats = self.portals.get(portal, ("", None, None))
        verdict = classify(text) if self.policy is not None and text else None
        statement = Statement(text, params, formats, verdict)
        effects = repeated_effects(text) if text else NOTHING  # a prepared text: its answer is kept
        if effects.reset and self.txn_status != b"E":
            if next_kind != _S:
                self._answer_error(f"{effects.reset} must be followed by Sync through pgproxy", "0A000",
                                   EXECUTE, out)
                self.actions.append((DENIED, text, "reset not followed by Sync"))
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
        return not self.mode.pins or self._pin("SET", kind, out)

    def _follow(self, changes) -> None:
        """A SET/RESET of ordinary settings succeeded: they are the client's from now on,
        re-applied wherever it lands, like its startup parameters."""
        settings = dict(self.key[1])
        exact = True  # the connection now carries exactly the new values
        for name, value in changes:
            for key in [k for k in settings if k.lower() == name]:
                del settings[key]
            if value is None:  # RESET / DEFAULT: back to what the client gave at startup
                value, exact = self._startup_value(name), False
            if name == "application_name":  # the identity's form, as at login
                value, exact = f"{self.person[1]} via {value or 'unknown'}", False
            if value is not None:
                settings[name] = value
        old, self.key = self.key, (self.person, settings_key(settings))
        if self.backend is not None:
            self.backend.identity.settings_changed(old, self.key, exact)

    def _startup_value(self, name: str) -> str | None:
        """The value the client gave a setting at startup (names are case-insensitive)."""
        return next((v for k, v in self.startup.items() if k.lower() == name), None)

    def _answer_locally(self, effects) -> bool:
        if not self.mode.renames:  # the client's own statement names: PostgreSQL answers
            if effects.local == "deallocate_all":
                self.statements = EMPTY
            elif effects.local == "deallocate":
                self._forget_statement(effects.name)
            return False
        if effects.local == "deallocate":
            if effects.name not in self.statements:
                return False  # not ours (an SQL PREPARE of a pinned session): the server decides
            self._forget_statement(effects.name)
            tag = "DEALLOCATE"
        elif effects.local == "deallocate_all":
            self.statements = EMPTY
            tag = "DEALLOCATE ALL"
        else:
            if self.pinned or self.txn_status != b"I" or self.pipeline:
                # DISCARD ALL must really drop a pinned session's state (the identity is
                # re-applied); in a transaction block, or behind replies still due, the server
                # decides (it refuses DISCARD ALL in a transaction, as the client would expect).
                return False
            self.statements = EMPTY
            self.unnamed = None
            tag = "DISCARD ALL"
        self.actions.append((AUDIT_LOCAL, tag))
        reply = msg.command_complete(tag) + msg.ready_for_query(self.txn_status)
        self.pipeline.expect(Expected(QUERY, SYNTH, reply=reply))
        return True

    def _pin(self, reason: str, kind: int, out: list[bytes]) -> bool:
        """Pin the client to its connection; False if refused (the error is queued)."""
        if self.pinned:
            return True
        if self.refuse_state:
            self._answer_error(f"{reason} outlives the transaction; not allowed with transaction pooling",
                               "0A000", kind, out)
            self.actions.append((PIN, reason, True))
            return False
        self.pinned = reason
        self.actions.append((PIN, reason, False))
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
        if effects.pin and self.mode.pins and not self._pin(effects.pin, PARSE, out):
            return
        identity = self.backend.identity
        if effects.deallocates:
            identity.deallocated()
        key = (parse.query, parse.param_types)
        # A named Parse that fails or is skipped makes no statement (_unprepare).
        client = (parse.statement, parse.statement not in self.statements) if parse.statement else None
        if not self.mode.renames:  # the connection is the client's: names pass unchanged
            if parse.statement:
                self._remember_statement(parse.statement, key)
            else:
                self.unnamed = key
            out.append(raw)
            self.pipeline.expect(Expected(PARSE, key=key, client_statement=client))
            return
        if not parse.statement:
            self.unnamed = key
            self.unnamed_gen += 1
            identity.claim_unnamed(self, self.unnamed_gen)
            out.append(raw)
            self.pipeline.expect(Expected(PARSE, key=key))
            return
        self._remember_statement(parse.statement, key)
        if identity.lookup(key) is not None:
            self.pipeline.expect(Expected(PARSE, SYNTH, reply=msg.PARSE_COMPLETE, key=key, client_statement=client))
            return
        self._prepare(key, out, quiet=False, client_statement=client)

    def _remember_statement(self, name: str, key: tuple) -> None:
        if name not in self.statements and len(self.statements) >= MAX_CLIENT_STATEMENTS:
            raise ProxyFailure(f"more than {MAX_CLIENT_STATEMENTS} prepared statements in one session",
                               sqlstate="54000", severity="FATAL")
        if self.statements is EMPTY:
            self.statements = {}
        self.statements[name] = key

    def _forget_statement(self, name: str) -> None:
        if name in self.statements:  # then it is the session's own dict
            del self.statements[name]

    def _prepare(self, key: tuple, out: list[bytes], quiet: bool, client_statement: tuple | None = None) -> str:
        """Send a Parse for ``key`` under a new name on this connection, evicting the oldest."""
        identity = self.backend.identity
        name, evicted = identity.prepare(key, self.prepared_limit)
        for old in evicted:
            out.append(msg.close_message("S", old))
            self.pipeline.expect(Expected(CLOSE, SWALLOW))
        out.append(msg.parse_message(name, key[0], key[1]))
        self.pipeline.expect(Expected(PARSE, QUIET if quiet else FORWARD, key=key, holder=identity, name=name,
                                      client_statement=client_statement))
        return name

    def _statement_on_backend(self, name: str, out: list[bytes]) -> str | None:
        """The connection's name for the client's statement, prepared there first if needed."""
        identity = self.backend.identity
        if not name:
            if self.unnamed is not None and not identity.holds_unnamed(self, self.unnamed_gen):
                out.append(msg.parse_message("", *self.unnamed))
                self.pipeline.expect(Expected(PARSE, QUIET, key=self.unnamed))
                identity.claim_unnamed(self, self.unnamed_gen)
            return ""
        key = self.statements.get(name)
        if key is None:
            return None  # unknown to us: the server answers "does not exist"
        ours = identity.lookup(key)
        if ours is None:
            return self._prepare(key, out, quiet=True)
        return ours

    def _bind(self, raw: bytes, out: list[bytes]) -> None:
        body = raw[5:]
        bind = msg.parse_bind(body)
        text, types = self.statements.get(bind.statement, self.unnamed if not bind.statement else None) or ("", ())
        if self.described_types is not None and bind.statement in self.described_types:
            types = self.described_types[bind.statement]  # asyncpg & co. leave the types to the server
        if self.portals is EMPTY:
            self.portals = {}
        self.portals[bind.portal] = (text, bind.params, (bind.param_formats, types))
        if self.mode.renames:
            ours = self._statement_on_backend(bind.statement, out)
            if ours is None:
                ours = "pgproxy_unknown_" + bind.statement  # never one of ours, whatever the client names
            if ours != bind.statement:
                raw = msg.message(b"B", body[:body.index(0) + 1] + msg.cstr(ours) + body[bind.tail:])
        out.append(raw)
        self.pipeline.expect(Expected(BIND, text=text))

    def _describe(self, raw: bytes, out: list[bytes]) -> None:
        what, name = msg.parse_close(raw[5:])
        if what == "S" and self.mode.renames:
            ours = self._statement_on_backend(name, out)
            if ours is None:
                ours = "pgproxy_unknown_" + name
            if ours != name:
                raw = msg.describe_message("S", ours)
        out.append(raw)
        self.pipeline.expect(Expected(DESCRIBE, name=name if what == "S" else None))

    def _close(self, raw: bytes, out: list[bytes]) -> None:
        what, name = msg.parse_close(raw[5:])
        if what == "S" and name and self.mode.renames:
            self._forget_statement(name)  # the connection keeps it for reuse (LRU)
            self.pipeline.expect(Expected(CLOSE, SYNTH, reply=msg.CLOSE_COMPLETE))
            return
        if what == "P":
            if name in self.portals:
                del self.portals[name]
        elif name:
            self._forget_statement(name)
        else:
            self.unnamed = None
        out.append(raw)
        self.pipeline.expect(Expected(CLOSE))

    # --- server -> client ----------------------------------------------------------------

    def server(self, data: bytes) -> None:
        """Bytes from the attached connection."""
        if self.state == CLOSED:
            return
        actions = self.actions
        try:
            found = self.scanner.feed(data)
        except PgProxyError as exc:
            self.state = CLOSED
            actions.append((CLOSE_CONNECTION, self.backend, f"unreadable server stream: {exc.log_detail}", False))
            actions.append((END, ProxyFailure("server connection broken", sqlstate="08006", severity="FATAL")))
            return
        pipeline = self.pipeline
        out = pipeline.server(data, found)
        if pipeline.events:
            self._events()
        if self.state == CLOSED:
            return
        if out:
            actions.append((TO_CLIENT, out[0] if len(out) == 1 else b"".join(out)))
        if self.waiting and self.state == ACTIVE and not self.attaching:
            self._send_waiting()  # the guard answered: what waited goes, after the replies before it
        elif self._releasable():
            self._release()

    def _events(self) -> None:
        events = self.pipeline.events
        self.pipeline.events = []
        actions = self.actions
        pid = self.backend.pid if self.backend is not None else None
        for event in events:
            code = event[0]
            if code == DONE:
                statement, outcome = event[1], event[2]
                actions.append((AUDIT, statement, outcome, pid))
                if statement.changes and outcome == "ok":
                    self.changes_due += statement.changes  # taken at ReadyForQuery: an error first undoes them
            elif code == READY:
                if self.changes_due:
                    changes, self.changes_due = self.changes_due, ()
                    if event[1] == b"I" or not self.mode.pins:
                        self._follow(changes)
                    elif not self.pinned:
                        # Sent before the BEGIN's answer, so inside a transaction block after all:
                        # a ROLLBACK could still undo them. Pinned, as _carry would have.
                        self.pinned = "SET"
                        actions.append((PIN, "SET", False))
                self.txn_status = event[1]
                self.idle_since = time.monotonic()
                if self.backend is not None:
                    self.backend.txn_status = event[1]
            elif code == PARAMETER:
                self._parameter(event[1])
            elif code == FAILED:
                self._failed(event[1], event[2], event[3], event[4], pid)
            elif code == SKIPPED:
                entry = event[1]
                self._unprepare(entry)
                if entry.statement is not None:
                    actions.append((AUDIT, entry.statement, "skipped", pid))
                if entry.action == GUARD:  # a re-apply skipped after its reset failed: nothing changed
                    self._switch_confirmed()
            elif code == SKIPPED_QUIETLY:
                self._unprepare(event[1])  # its statement was audited with the error
            elif code == CONFIRMED:
                self._switch_confirmed()
            elif code == PARSED:
                self._parsed(event[1])
            elif code == DESCRIBED:
                self._described(event[1], event[2])
            elif code == SWITCH_FAILED:
                self._switch_failed(event[1])
                return

    def _parameter(self, body: bytes) -> None:
        name, value = msg.parse_parameter_status(body)
        backend = self.backend
        if backend is not None:
            backend.set_param(name, value)
        if name == "client_encoding" and client_only_encoding(value):
            # Every way to choose one is refused; reaching here means one was missed: end it.
            self.state = CLOSED
            if backend is not None:
                self.actions.append((CLOSE_CONNECTION, backend, "client-only client_encoding reached the connection",
                                     True))
            self.actions.append((END, ProxyFailure("client-only encodings are not supported through pgproxy",
                                                   sqlstate="0A000", severity="FATAL",
                                                   log_detail=f"server reported client_encoding {value}")))

    def _described(self, name: str, body: bytes) -> None:
        """ParameterDescription for a statement the client described: remembered (bounded by
        the statements it has) so binary parameters are audited readably."""
        count = int.from_bytes(body[:2], "big")
        types = tuple(int.from_bytes(body[2 + 4 * i:6 + 4 * i], "big") for i in range(min(count, (len(body) - 2) // 4)))
        if self.described_types is None:
            self.described_types = {}
        known = self.described_types
        if name in self.statements or not name:
            known[name] = types
            if len(known) > len(self.statements) + 1:  # closed statements: forget them
                self.described_types = {k: v for k, v in known.items() if not k or k in self.statements}

    def _failed(self, entry: Expected, body: bytes, statement, sync_entry: Expected | None, pid) -> None:
        """An extended-protocol message failed; the server skips the rest up to Sync
        (``sync_entry``'s, if one was sent). ``statement``: the Execute it belongs to, if the
        batch has one."""
        self.changes_due = ()  # the implicit transaction failed: the settings it made are undone
        if self.local_sync is not None or self.backend is None:
            pass
        elif sync_entry is None:
            # No Sync of the client's is due: sync the server now, so the connection is not held
            # until the client sends one (it may never).
            self.actions.append((TO_SERVER, self.backend, msg.SYNC))
            self.backend.identity.synced()
            self.local_sync = Expected(SYNC, SWALLOW)
            self.pipeline.expect(self.local_sync)
            self.skipping, self.sync_owed = True, False
        elif sync_entry.own and sync_entry.action == SWALLOW:
            # The Sync that ends the server's skip is the proxy's (a reset sent as a simple query
            # after unsynced messages; the pipeline swallows its reply): PostgreSQL would have
            # skipped that query too, and gone on skipping up to the client's Sync.
            self.local_sync = sync_entry
            self.skipping, self.sync_owed = True, False
        text = self._unprepare(entry)
        if statement is None and entry.action in (FORWARD, QUIET) and entry.kind in (PARSE, BIND):
            statement = Statement(text or "")
        if statement is not None:
            statement.sqlstate = msg.parse_error_fields(body).get("C", "XX000")
            self.actions.append((AUDIT, statement, "error", pid))

    def _parsed(self, entry: Expected) -> None:
        """A Parse succeeded: the connection has the statement; a client's named one whose
        name an earlier Parse had made (queued before it, then skipped: ``_unprepare`` took
        the name away) is the client's again. (A name closed or deallocated since stays gone.)"""
        if entry.holder is not None:
            entry.holder.prepared_ok(entry.name)
        client = entry.client_statement
        if client is not None and not client[1] and client[0] not in self.statements:
            if self.statements is EMPTY:
                self.statements = {}
            self.statements[client[0]] = entry.key  # (it had its place under the limit when parsed)

    def _unprepare(self, entry: Expected) -> str | None:
        """A Parse that failed or was skipped: the connection does not have the statement,
        nor, for a named Parse of the client's that made the name, does the client (as in
        PostgreSQL: a later Bind or DEALLOCATE of it fails with 26000). A later Parse of the
        name that succeeds makes it again (``_parsed``)."""
        if entry.kind == PARSE and entry.key is not None:
            if entry.holder is not None:
                entry.holder.unprepare(entry.key, entry.name)
            client = entry.client_statement
            if client is not None and client[1] and self.statements.get(client[0]) == entry.key:
                self._forget_statement(client[0])
            return entry.key[0]
        return entry.text

    # --- the end -------------------------------------------------------------------------

    def server_lost(self, reason: str) -> None:
        """The attached connection closed under us: what was in flight is audited as lost."""
        pid = self.backend.pid if self.backend is not None else None
        for statement in self.pending_statements():
            statement.sqlstate = statement.sqlstate or "08006"
            self.actions.append((AUDIT, statement, "connection_lost", pid))
        self.pipeline.clear()
        self.state = CLOSED
        self.actions.append((CLOSE_CLIENT, f"server connection lost: {reason}"))

    def pending_statements(self):
        for entry in self.pipeline.pending():
            if entry.statement is not None:
                yield entry.statement

    def leave(self) -> tuple:
        """The client has gone: (what to do with the connection, the connection).
        Statements in flight are audited as client_gone."""
        backend, self.backend = self.backend, None
        self.state = CLOSED
        if backend is None:
            return None, None
        for statement in self.pending_statements():
            self.actions.append((AUDIT, statement, "client_gone", backend.pid))
        if self.pipeline or self.sync_owed or not self.scanner.at_boundary:
            # Replies still owed (or a batch without its Sync, which must not get one: that
            # would commit it; logging out rolls it back): the pool cancels and logs out.
            self.pipeline.clear()
            return DRAIN, backend
        return self.mode.on_leave(self), backend
