"""A small model of one PostgreSQL backend connection, for the engine's unit tests.

Not a mock of PostgreSQL for the product's tests (those use a real server): it lets the
pure engine (pgproxy/frontend/engine.py) be driven without sockets, thousands of times,
and it *checks* what only the server side can see — which identity a connection carried
when each client statement ran. It speaks the frontend/backend protocol for what the
engine and the tests send:

* simple Query: BEGIN / COMMIT / ROLLBACK, DISCARD ALL / RESET ALL, SET name = value,
  DEALLOCATE name / ALL (26000 for a name it does not have), COPY … FROM STDIN (then
  CopyData/CopyDone/CopyFail), the proxy's refusal statement,
  and any other text, which "runs" (a text containing "fail" fails with 42P01; after
  ``cancel_due`` is set, the next one fails with 57014, as a cancelled query does);
* extended Parse / Bind / Describe / Execute / Close / Sync / Flush, skipping to Sync
  after an error as PostgreSQL does, with an explicit or implicit transaction;
* the identity switch of protocol/switch.py: the apply's set_config parameters are
  applied (unless the role is in ``refused_roles``), the guard succeeds only if its
  nonce is the one applied.

Every client statement that runs is recorded in ``ran`` with the ``pgproxy.user`` the
connection carried at that moment (and in ``ran_as``, the role).
"""

from __future__ import annotations

import struct

from pgproxy.backend.identity import ConnectionIdentity
from pgproxy.frontend.engine import REFUSED_SQL
from pgproxy.protocol import messages as msg
from pgproxy.protocol import switch

ROW_DESCRIPTION = msg.message(b"T", b"\0\0")
NO_DATA = msg.message(b"n")
PARAMETERS = msg.message(b"t", b"\0\0")
BIND_COMPLETE = msg.message(b"2")
COPY_IN = msg.message(b"G", b"\0\0\0")


class FakeConnection:
    """Stands in for pgproxy.backend.connection.BackendConnection in the engine's eyes
    (``identity``, ``pid``, ``params``, ``txn_status``) and is the server at the same time."""

    def __init__(self, pid: int, refused_roles: set | None = None) -> None:
        self.identity = ConnectionIdentity()
        self.pid = pid
        self.params: dict[str, str] = {}
        self.txn_status = b"I"
        self.refused_roles = refused_roles if refused_roles is not None else set()
        self.output = bytearray()  # sent by the server, not yet delivered to the engine
        self.settings: dict[str, str] = {}  # what set_config applied (role included)
        self.status = "I"        # I, T (block), E (failed block)
        self.skipping = False    # an extended message failed: skip to Sync
        self.in_copy = False
        self.statements: dict[str, str] = {}
        self.portals: dict[str, tuple[str, list]] = {}
        self.ran: list[tuple[str, str | None]] = []  # (client statement text, pgproxy.user then)
        self.ran_as: list[str | None] = []  # the role each of them ran as
        self.closed = False
        self.partial = b""       # a client message cut across writes
        self.writes: list[bytes] = []  # every write received, as written
        self.cancel_due = False  # a CancelRequest came: the next client statement is cancelled
        self.failure = "42P01"   # the SQLSTATE of the last statement that failed

    # --- what the engine sees ----------------------------------------------------------

    def set_param(self, name: str, value: str) -> None:  # as BackendConnection.set_param
        self.params = {**self.params, name: value}

    @property
    def quiet(self) -> bool:
        """Nothing owed in either direction: a connection the pool may hand to anyone."""
        return (not self.output and not self.skipping and not self.in_copy and self.status == "I"
                and not self.partial)

    def person(self) -> str | None:
        return self.settings.get("pgproxy.user")

    def reset(self) -> None:
        """The pool's reset (ROLLBACK, DISCARD ALL) and ConnectionIdentity.forget()."""
        self.identity.forget()
        self.settings.clear()
        self.statements.clear()
        self.portals.clear()
        self.status, self.skipping, self.in_copy, self.cancel_due = "I", False, False, False

    # --- the server ----------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        self.writes.append(data)
        buf = self.partial + data
        pos = 0
        while len(buf) - pos >= 5:
            kind = buf[pos:pos + 1]
            (length,) = struct.unpack_from("!i", buf, pos + 1)
            if len(buf) - pos < 1 + length:
                break
            self._message(kind, buf[pos + 5:pos + 1 + length])
            pos += 1 + length
        self.partial = buf[pos:]

    def _send(self, *messages: bytes) -> None:
        self.output += b"".join(messages)

    def _ready(self) -> None:
        self._send(msg.ready_for_query(self.status.encode()))

    def _error(self, sqlstate: str, text: str = "failed") -> None:
        self._send(msg.statement_error(sqlstate, text))
        if self.status == "T":
            self.status = "E"

    def _message(self, kind: bytes, body: bytes) -> None:
        if self.in_copy:
            if kind == b"d":
                return
            if kind == b"c":
                self.in_copy = False
                self._send(msg.command_complete("COPY 1"))
                self._ready()
            elif kind == b"f":
                self.in_copy = False
                self._error("57014", "COPY from stdin failed")
                self._ready()
            return  # Sync and Flush are ignored during COPY
        if kind == b"S":
            self.skipping = False
            self._ready()
        elif kind in (b"d", b"c", b"f", b"H") or self.skipping:
            # Skipping to Sync after an error skips every message, a simple Query too (as
            # PostgreSQL's SocketBackend does); CopyData & co. after a failed COPY are ignored.
            return
        elif kind == b"Q":
            self._query(body[:-1].decode())
        elif kind == b"P":
            parse = msg.parse_parse(body)
            if parse.query == REFUSED_SQL:
                self._extended_error("42601", "syntax error")
                return
            self.statements[parse.statement] = parse.query
            self._send(msg.PARSE_COMPLETE)
        elif kind == b"B":
            bind = msg.parse_bind(body)
            if bind.statement not in self.statements:
                self._extended_error("26000", f"prepared statement {bind.statement} does not exist")
                return
            self.portals[bind.portal] = (self.statements[bind.statement], bind.params)
            self._send(BIND_COMPLETE)
        elif kind == b"D":
            what, name = msg.parse_close(body)
            if what == "S" and name not in self.statements:
                self._extended_error("26000", "no such statement")
                return
            self._send(PARAMETERS, NO_DATA) if what == "S" else self._send(NO_DATA)
        elif kind == b"E":
            portal = msg.parse_execute_portal(body)
            if portal not in self.portals:
                self._extended_error("34000", "no such portal")
                return
            text, params = self.portals[portal]
            self._execute(text, params)
        elif kind == b"C":
            what, name = msg.parse_close(body)
            (self.statements if what == "S" else self.portals).pop(name, None)
            self._send(msg.CLOSE_COMPLETE)
        elif kind == b"X":
            self.closed = True
        else:
            raise AssertionError(f"the fake server does not know message {kind!r}")

    def _extended_error(self, sqlstate: str, text: str) -> None:
        self._error(sqlstate, text)
        self.skipping = True

    def _query(self, text: str) -> None:
        if text == REFUSED_SQL:
            self._error("42601", "syntax error")
        elif self.status == "E" and text not in ("COMMIT", "ROLLBACK"):
            self._error("25P02", "current transaction is aborted")
        elif text.startswith("COPY"):
            self._ran(text)
            self.in_copy = True
            self._send(COPY_IN)
            return
        else:
            tag = self._statement(text)
            if tag is None:
                self._error(self.failure, "statement failed")
            else:
                self._send(ROW_DESCRIPTION, msg.command_complete(tag)) if tag == "SELECT 1" \
                    else self._send(msg.command_complete(tag))
        self._ready()

    def _execute(self, text: str, params: list) -> None:
        values = [p.decode() if p is not None else None for p in params]
        if text.startswith("SELECT pg_catalog.set_config('role'"):
            if values[0] in self.refused_roles:
                self._extended_error("22023", f'role "{values[0]}" does not exist')
                return
            self.settings["role"] = values[0]
            for i in range(1, len(values) - 1, 2):
                self.settings[values[i]] = values[i + 1]
            self._send(msg.command_complete("SELECT 1"))
        elif text == switch.GUARD_SQL:
            if self.settings.get(switch.NONCE_SETTING) != values[0]:
                self._extended_error("22012", "division by zero")
                return
            self._send(msg.command_complete("SELECT 1"))
        elif self.status == "E" and text not in ("COMMIT", "ROLLBACK"):
            self._extended_error("25P02", "current transaction is aborted")
        else:
            tag = self._statement(text)
            if tag is None:
                self._extended_error(self.failure, "statement failed")
                return
            self._send(msg.command_complete(tag))

    def _statement(self, text: str) -> str | None:
        """Run one statement; its CommandComplete tag, or None if it fails."""
        upper = text.upper()
        if upper == "BEGIN":
            self.status = "T" if self.status == "I" else self.status
            return "BEGIN"
        if upper in ("COMMIT", "ROLLBACK"):
            self.status = "I"
            return "ROLLBACK" if upper == "ROLLBACK" else "COMMIT"
        if upper in ("DISCARD ALL", "RESET ALL"):
            self.settings.clear()
            if upper == "DISCARD ALL":
                self.statements.clear()
                self.portals = {k: v for k, v in self.portals.items() if not k}
            return "DISCARD ALL" if upper == "DISCARD ALL" else "RESET"
        if upper.startswith("DEALLOCATE "):
            self._ran(text)
            name = text[len("DEALLOCATE "):].strip()
            if name.upper() == "ALL":
                self.statements.clear()
                return "DEALLOCATE ALL"
            if self.statements.pop(name, None) is None:
                self.failure = "26000"  # prepared statement does not exist
                return None
            return "DEALLOCATE"
        if upper.startswith("SET "):
            name, _, value = text[4:].partition("=")
            self.settings[name.strip().lower()] = value.strip()
            return "SET"
        self._ran(text)
        if self.cancel_due:
            self.cancel_due, self.failure = False, "57014"  # canceling statement due to user request
            return None
        if "fail" in text:
            self.failure = "42P01"
            return None
        return "SELECT 1"

    def _ran(self, text: str) -> None:
        self.ran.append((text, self.person()))
        self.ran_as.append(self.settings.get("role"))

    def take_output(self, size: int | None = None) -> bytes:
        size = len(self.output) if size is None else size
        chunk = bytes(self.output[:size])
        del self.output[:size]
        return chunk
