"""The replies a backend connection owes, in order, and what to do with each.

Transaction pooling rewrites the client's message stream: it skips a Parse the backend
connection already has (the client still expects ParseComplete), answers Close locally,
injects a Parse before a Bind on a connection that lacks the statement, and prepends an
identity switch. So the server's reply stream no longer matches what the client expects.

``Pipeline`` keeps one ``Expected`` per message that earns a reply, in the order sent:

    kind       the server's reply ends with         notes
    PARSE      ParseComplete '1'
    BIND       BindComplete '2'
    CLOSE      CloseComplete '3'
    DESCRIBE   RowDescription 'T' or NoData 'n'   a statement Describe sends 't' first
    EXECUTE    CommandComplete 'C', EmptyQuery 'I', PortalSuspended 's'
    SYNC       ReadyForQuery 'Z'
    QUERY      ReadyForQuery 'Z'                  simple Query and FunctionCall

An ErrorResponse ends a PARSE … EXECUTE entry, and the server then skips every message
up to the next Sync: those entries are dropped unanswered. Each entry's ``action`` says
what reaches the client:

    FORWARD    the server's bytes, untouched
    QUIET      nothing on success; the error if it fails (a Parse the proxy injected)
    SWALLOW    nothing at all (a Close the proxy injected to evict a statement)
    SYNTH      ``reply``, bytes the proxy made (ParseComplete for a skipped Parse); no server reply
    SWITCH     nothing; an error means the identity switch failed
    GUARD      nothing; its success confirms the switch, its error means it failed
    REPLACE    a statement the proxy sent to fail in the client's place (a refusal): the
               server's error is replaced by ``reply``, the proxy's own; what follows it
               (ReadyForQuery) is forwarded — so the transaction fails as PostgreSQL's would

Pure: ``server(chunk, found)`` takes a chunk and the scanner's wanted messages with
their end offsets, and returns the bytes for the client. What happened on the way is
appended to ``events`` as tuples, in order, for the owner to act on afterwards (the
pipeline never calls out):

    (PARAMETER, body)                          ParameterStatus
    (READY, status)                            ReadyForQuery ended an entry
    (DESCRIBED, name, body)                    ParameterDescription of statement ``name``
    (DONE, statement, outcome)                 a statement ended: ok, suspended or error
    (FAILED, entry, body, culprit, sync)       an extended message failed; ``sync``: the
                                               Sync entry that ends the skip, None if none
                                               (swallowed if it was the proxy's own, ``own``,
                                               and the batch it ends was skipped whole)
    (SKIPPED, entry) / (SKIPPED_QUIETLY, entry)  dropped by the server after an error
    (CONFIRMED,)                               a switch's guard succeeded
    (SWITCH_FAILED, body)                      the switch failed: nothing more is read
    (PARSED, entry)                            a Parse the connection's LRU names, or a named
                                               Parse of the client's, succeeded

Bytes of an entry that is not forwarded are held until the entry ends, so a decision
never splits a message; such entries are the proxy's own small replies.
"""

from __future__ import annotations

from itertools import islice

from pgproxy.protocol.messages import parse_error_fields

PARSE, BIND, CLOSE, DESCRIBE, EXECUTE, SYNC, QUERY = range(7)
FORWARD, QUIET, SWALLOW, SYNTH, SWITCH, GUARD, REPLACE = range(7)
PARAMETER, READY, DESCRIBED, DONE, FAILED, SKIPPED, SKIPPED_QUIETLY, CONFIRMED, SWITCH_FAILED, PARSED = range(10)

_ENDS = {PARSE: b"1", BIND: b"2", CLOSE: b"3", DESCRIBE: b"Tn", EXECUTE: b"CIs", SYNC: b"Z", QUERY: b"Z"}
_ENDS = {kind: frozenset(chars) for kind, chars in _ENDS.items()}
_EXTENDED = frozenset({PARSE, BIND, CLOSE, DESCRIBE, EXECUTE})
WANTED = b"CEZIsS123nTt"
_sC, _sE, _sZ, _sI, _ss, _sS, _st = (ord(c) for c in "CEZIsSt")
_CONFIRMED = (CONFIRMED,)


class Expected:
    """One reply owed. Besides kind and action: ``statement`` (the audit's record-to-be),
    ``reply`` (SYNTH's bytes, REPLACE's error), ``key`` and ``holder`` (a Parse's
    (text, types) and the ConnectionIdentity whose LRU names it; holder None: not
    cached), ``text`` (a Bind's statement text), ``name`` (a statement Describe's
    client name; a cached Parse's name on the connection) and ``client_statement`` (a named
    Parse of the client's: (its name, whether the client had no statement of that name
    before it) — if it fails or is skipped, the client has none, as in PostgreSQL)."""

    __slots__ = ("kind", "action", "statement", "reply", "key", "holder", "text", "name", "own", "client_statement")

    def __init__(self, kind: int, action: int = FORWARD, statement=None, reply: bytes | None = None,
                 key: tuple | None = None, holder=None, text: str | None = None, name: str | None = None,
                 own: bool = False, client_statement: tuple | None = None) -> None:
        self.kind, self.action, self.statement, self.reply = kind, action, statement, reply
        self.key, self.holder, self.text, self.name = key, holder, text, name
        self.own = own  # the first message and the Sync of a batch sent in a client Query's place
        self.client_statement = client_statement


class Pipeline:
    __slots__ = ("_queue", "_head", "_special", "_held", "events")

    def __init__(self) -> None:
        # A list read from _head on, emptied once all of it is read: a deque costs 760
        # bytes even when empty, and thousands of idle sessions each hold a Pipeline.
        self._queue: list[Expected] = []
        self._head = 0
        self._special = 0   # entries whose action is not FORWARD: the fast path needs none
        self._held = b""    # bytes of the head entry, kept until it ends
        self.events: list[tuple] = []

    def __len__(self) -> int:
        return len(self._queue) - self._head

    def expect(self, entry: Expected) -> None:
        self._queue.append(entry)
        if entry.action != FORWARD:
            self._special += 1

    def pending(self):
        return islice(self._queue, self._head, None)

    def awaits_server(self) -> bool:
        """Whether the server still owes a reply (entries the proxy answers itself aside)."""
        queue = self._queue
        for i in range(self._head, len(queue)):
            if queue[i].action != SYNTH:
                return True
        return False

    def clear(self) -> None:
        self._queue.clear()
        self._head = 0
        self._special = 0
        self._held = b""

    def swallow(self, entry: Expected) -> None:
        """Drop ``entry``'s reply after all (it was to be forwarded)."""
        if entry.action == FORWARD:
            entry.action = SWALLOW
            self._special += 1

    def forward(self, entry: Expected) -> bool:
        """Forward ``entry``'s reply after all (it was to be swallowed); False if it has ended."""
        if entry not in self.pending():
            return False
        if entry.action != FORWARD:
            entry.action = FORWARD
            self._special -= 1
        return True

    def synthesized(self) -> list[bytes]:
        """Replies the proxy makes that are due now (their turn has come)."""
        if not self._special:
            return ()  # the common case: nothing of the proxy's own
        out = []
        queue = self._queue
        while queue and queue[self._head].action == SYNTH:
            entry = self._pop()
            if entry.kind == PARSE and entry.client_statement is not None:
                self.events.append((PARSED, entry))
            out.append(entry.reply)
        return out

    def server(self, data: bytes, found) -> list[bytes]:
        queue = self._queue
        if not self._special:
            # Fast path: everything is forwarded; only follow the entries for the audit.
            for kind, body, _ in found:
                if kind == _sS:
                    self.events.append((PARAMETER, body))
                elif queue:
                    self._account(kind, body, queue[self._head])
            return [data]
        out: list[bytes] = []
        pos = 0
        for kind, body, end in found:
            out += self.synthesized()
            head = queue[self._head] if queue else None
            if kind == _sS:
                self.events.append((PARAMETER, body))
            if head is None or head.action == FORWARD:
                out.append(data[pos:end])
                pos = end
                if head is not None:
                    self._account(kind, body, head)
                continue
            self._held += data[pos:end]
            pos = end
            if kind == _sE:
                if head.action == QUIET:
                    out.append(self._held)
                elif head.action == REPLACE:
                    out.append(head.reply)
                    self._held = b""
                    if head.kind == QUERY:  # the rest of its reply (ReadyForQuery) is the client's
                        head.action = FORWARD
                        self._special -= 1
                elif head.action in (SWITCH, GUARD):
                    self.events.append((SWITCH_FAILED, body))
                    return []  # the session ends; nothing more goes to the client
            if self._account(kind, body, head):
                self._held = b""
        out += self.synthesized()
        if pos < len(data):
            head = queue[self._head] if queue else None
            if head is None or head.action == FORWARD:
                out.append(data[pos:] if pos else data)
            else:
                self._held += data[pos:]
        return out

    def _account(self, kind: int, body: bytes, head: Expected) -> bool:
        """Apply one server message to the head entry; True when the entry ended."""
        entry_kind = head.kind
        if kind == _sE and entry_kind in _EXTENDED:
            self._pop()
            # The server now skips every message up to the next Sync. The error belongs to
            # the statement the client ran: the failed Execute, or the first one skipped.
            queue = self._queue
            skipped = []
            while queue and queue[self._head].kind != SYNC:
                skipped.append(self._pop())
            culprit = head.statement or next((e.statement for e in skipped if e.statement is not None), None)
            sync_entry = queue[self._head] if queue else None
            if sync_entry is not None and sync_entry.own and any(e.own for e in skipped):
                # The batch sent for a client's Query was skipped whole (an earlier message
                # failed): its Sync's ReadyForQuery is not the client's, as the Query got none.
                self.swallow(sync_entry)
            events = self.events
            events.append((FAILED, head, body, culprit, sync_entry))
            for entry in skipped:
                events.append((SKIPPED_QUIETLY if entry.statement is culprit and culprit is not None else SKIPPED,
                               entry))
            return True
        if kind == _sE:
            if head.statement is not None:
                head.statement.sqlstate = parse_error_fields(body).get("C", "XX000")
            return False
        if kind == _sC and entry_kind >= SYNC:  # SYNC or QUERY: a simple query's statements
            if head.statement is not None:
                head.statement.tags.append(body)
            return False
        if kind == _st and entry_kind == DESCRIBE and head.name is not None:
            self.events.append((DESCRIBED, head.name, body))  # the parameter types, for the audit
            return False
        if kind not in _ENDS[entry_kind]:
            return False
        self._pop()
        if entry_kind == PARSE:
            if head.holder is not None or head.client_statement is not None:
                self.events.append((PARSED, head))
        elif entry_kind == EXECUTE:
            if head.statement is not None:
                head.statement.tags.append(body if kind != _sI else b"EMPTY")
                self.events.append((DONE, head.statement, "suspended" if kind == _ss else "ok"))
            if head.action == GUARD:
                self.events.append(_CONFIRMED)
        elif kind == _sZ:
            if head.statement is not None:
                self.events.append((DONE, head.statement, "error" if head.statement.sqlstate else "ok"))
            self.events.append((READY, body[:1]))
        return True

    def _pop(self) -> Expected:
        queue = self._queue
        entry = queue[self._head]
        self._head += 1
        if self._head == len(queue):  # all read: an empty queue is falsy again
            queue.clear()
            self._head = 0
        if entry.action != FORWARD:
            self._special -= 1
        return entry
