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
    SYNTH      bytes the proxy made (ParseComplete for a skipped Parse); no server reply
    SWITCH     nothing; an error means the identity switch failed
    GUARD      nothing; its success confirms the switch, its error means it failed
    REPLACE    a statement the proxy sent to fail in the client's place (a refusal): the
               server's error is replaced by ``payload``, the proxy's own; what follows it
               (ReadyForQuery) is forwarded — so the transaction fails as PostgreSQL's would

Pure: ``server(chunk, found)`` takes a chunk and the scanner's wanted messages with
their end offsets, and returns the bytes for the client; events go to the owner
(``statement_done``, ``ready``, ``switch_confirmed``, ``switch_failed``, ``unprepared``,
``parameter``, ``described``). Bytes of an entry that is not forwarded are held until the entry ends,
so a decision never splits a message; such entries are the proxy's own small replies.
"""

from __future__ import annotations

from itertools import islice

PARSE, BIND, CLOSE, DESCRIBE, EXECUTE, SYNC, QUERY = range(7)
FORWARD, QUIET, SWALLOW, SYNTH, SWITCH, GUARD, REPLACE = range(7)

_ENDS = {PARSE: b"1", BIND: b"2", CLOSE: b"3", DESCRIBE: b"Tn", EXECUTE: b"CIs", SYNC: b"Z", QUERY: b"Z"}
_ENDS = {kind: frozenset(chars) for kind, chars in _ENDS.items()}
_EXTENDED = frozenset({PARSE, BIND, CLOSE, DESCRIBE, EXECUTE})
WANTED = b"CEZIsS123nTt"
_sC, _sE, _sZ, _sI, _ss, _sS, _st = (ord(c) for c in "CEZIsSt")


class Expected:
    __slots__ = ("kind", "action", "statement", "payload")

    def __init__(self, kind: int, action: int = FORWARD, statement=None, payload=None) -> None:
        self.kind, self.action, self.statement, self.payload = kind, action, statement, payload


class Pipeline:
    __slots__ = ("_owner", "_queue", "_head", "_special", "_held")

    def __init__(self, owner) -> None:
        self._owner = owner
        # A list read from _head on, emptied once all of it is read: a deque costs 760
        # bytes even when empty, and thousands of idle sessions each hold a Pipeline.
        self._queue: list[Expected] = []
        self._head = 0
        self._special = 0   # entries whose action is not FORWARD: the fast path needs none
        self._held = b""    # bytes of the head entry, kept until it ends

    def __len__(self) -> int:
        return len(self._queue) - self._head

    def expect(self, entry: Expected) -> None:
        self._queue.append(entry)
        if entry.action != FORWARD:
            self._special += 1

    def pending(self):
        return islice(self._queue, self._head, None)

    def clear(self) -> None:
        self._queue.clear()
        self._head = 0
        self._special = 0
        self._held = b""

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
        out = []
        queue = self._queue
        while queue and queue[self._head].action == SYNTH:
            out.append(self._pop().payload)
        return out

    def server(self, data: bytes, found) -> list[bytes]:
        queue = self._queue
        owner = self._owner
        if not self._special:
            # Fast path: everything is forwarded; only follow the entries for the audit.
            for kind, body, _ in found:
                if kind == _sS:
                    owner.parameter(body)
                elif queue:
                    self._account(kind, body, queue[self._head])
            return [data]
        out: list[bytes] = []
        pos = 0
        for kind, body, end in found:
            out += self.synthesized()
            head = queue[self._head] if queue else None
            if kind == _sS:
                owner.parameter(body)
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
                    out.append(head.payload)
                    self._held = b""
                    if head.kind == QUERY:  # the rest of its reply (ReadyForQuery) is the client's
                        head.action = FORWARD
                        self._special -= 1
                elif head.action in (SWITCH, GUARD):
                    owner.switch_failed(body)
                    return []  # the session ends; nothing more goes to the client
            ended = self._account(kind, body, head)
            if ended:
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
        owner = self._owner
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
            owner.failed(head, body, culprit)
            for entry in skipped:
                if entry.statement is not culprit or culprit is None:
                    owner.skipped(entry)
                else:
                    owner.skipped_quietly(entry)
            return True
        if kind == _sE:
            head.payload = body if head.payload is None else head.payload
            if head.statement is not None:
                owner.statement_error(head.statement, body)
            return False
        if kind == _sC and entry_kind in (QUERY, SYNC):
            if head.statement is not None:
                head.statement.tags.append(body)
            return False
        if kind == _st and entry_kind == DESCRIBE and head.payload is not None:
            owner.described(head.payload, body)  # the statement's parameter types, for the audit
            return False
        if kind not in _ENDS[entry_kind]:
            return False
        self._pop()
        if entry_kind == EXECUTE:
            if head.statement is not None:
                head.statement.tags.append(body if kind != _sI else b"EMPTY")
                owner.statement_done(head.statement, "suspended" if kind == _ss else "ok")
            if head.action == GUARD:
                owner.switch_confirmed()
        elif kind == _sZ:
            if head.statement is not None:
                owner.statement_done(head.statement, "error" if head.statement.sqlstate else "ok")
            owner.ready(body[:1], not self._queue)
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
