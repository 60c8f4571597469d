"""Several sessions' engines over a few model connections, and the invariants checked.

``World`` plays the part of the asyncio driver (frontend/relay.py) and of the pool for
pure Engines (frontend/engine.py) over FakeConnections (tests/support/fake_postgres.py):
it carries out every action at once and records what each client received and what the
audit got. While it runs it checks what must hold whatever the clients send:

* a client's message reaches only a connection that client holds, and a statement runs
  only while the connection carries that client's identity (person and role);
* a connection goes back to the pool only with nothing owed either way;
* every statement record is written once.

``check_settled`` adds what holds once everything has been answered: every statement
that ran has its record under the right person; every ok record is a statement that ran;
each client got the same replies, message for message, as it would have from a server of
its own; nothing is left buffered.
"""

from __future__ import annotations

import itertools
import struct
from collections import Counter

from pgproxy.frontend.engine import (ACQUIRE, AUDIT, CLOSE_CLIENT, CLOSE_CONNECTION, DRAIN, END, GIVE_BACK, PAUSE,
                                     POOL_MODES, RELEASE, RESUME, TO_CLIENT, TO_SERVER, Engine)
from pgproxy.protocol import messages as msg
from tests.support.fake_postgres import FakeConnection


class Trail:
    available = True


class Client:
    def __init__(self, name: str, engine: Engine) -> None:
        self.name, self.engine = name, engine
        self.role = engine.role
        self.received = bytearray()
        # The same client talking to a server of its own, straight: what it should see.
        self.direct = FakeConnection(0)
        self.cancelled = False
        self.paused = False
        self.gone = False      # left, or its session was ended
        self.ended = None      # the error that ended it
        self.audits: list[tuple] = []  # (text, outcome)
        self.ran: list[str] = []       # its statements the server ran


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("!i", data, pos + 1)
        out.append((data[pos], data[pos:pos + 1 + length]))
        pos += 1 + length
    assert pos == len(data), "a cut message"
    return out


def reply_kinds(data: bytes) -> bytes:
    """The message types a client got, ParameterStatus aside (the switch sends some)."""
    return bytes(kind for kind, _ in frames_of(data) if kind != ord("S"))


class World:
    def __init__(self, mode: str, connections: int = 2) -> None:
        self.mode = mode
        self.refused_roles: set[str] = set()
        self.connections = [FakeConnection(100 + i, self.refused_roles) for i in range(connections)]
        self.idle = list(self.connections)
        self.holder: dict[FakeConnection, Client] = {}
        self.waiters: list[Client] = []
        self.clients: list[Client] = []
        self.trail = Trail()
        self.violations: list[str] = []
        self.audited: dict[int, object] = {}  # id -> the statement (kept, so ids stay unique)
        self.ids = itertools.count(1)

    # --- sessions ------------------------------------------------------------------------

    def login(self, name: str, role: str | None = None, **settings: str) -> Client | None:
        """A session as frontend/session.py starts one: a connection, the login switch,
        then held (session pooling) or given back (transaction pooling)."""
        role = role or f"role_{name}"
        person = (role, name, (), "jwt", name)
        engine = Engine(POOL_MODES[self.mode], role, person,
                        {"pgproxy.user": name, "application_name": f"{name} via test", **settings},
                        trail=self.trail, startup={})
        if not self.idle:
            return None
        conn = self.idle.pop()
        batch = engine.login_switch(conn)
        ok = True
        if batch is not None:
            conn.receive(batch + msg.SYNC)
            ok = b"E" not in bytes(kind for kind, _ in frames_of(conn.take_output()))
            engine.login_switched(conn, ok)
        if not ok:
            self.idle.append(conn)
            return None
        client = Client(name, engine)
        self.clients.append(client)
        if self.mode == "transaction":
            self.idle.append(conn)
        else:
            self.holder[conn] = client
            engine.hold(conn)
            self.run()
        return client

    def send(self, client: Client, frames: list[tuple[int, bytes]]) -> None:
        if client.gone or client.paused:
            return
        client.direct.receive(b"".join(raw for _, raw in frames))
        client.engine.client(frames)
        self.run()

    def deliver(self, conn: FakeConnection, size: int | None = None) -> None:
        """Server bytes (``size`` of them, or all) to the session holding the connection."""
        if not conn.output:
            return
        client = self.holder.get(conn)
        if client is None:
            if not conn.closed:
                self.violations.append(f"connection {conn.pid} has replies but nobody holds it")
            conn.take_output()
            return
        client.engine.server(conn.take_output(size))
        self.run()

    def cancel(self, client: Client) -> None:
        """A CancelRequest for the client's session: the server cancels what it runs next on
        the connection the session holds (nothing, if it holds none). Its replies then
        differ from a server of its own, which gets no cancel: not compared."""
        conn = client.engine.backend
        if conn is not None and not client.gone:
            conn.cancel_due = True
            client.cancelled = True

    def leave(self, client: Client) -> None:
        if client.gone:
            return
        client.gone = True
        if client in self.waiters:
            self.waiters.remove(client)
        what, conn = client.engine.leave()
        self.run()
        if conn is None:
            return
        self.holder.pop(conn, None)
        if conn.closed or what == DRAIN:
            self._discard(conn)  # cancelled, drained and closed: never reused
        elif what == GIVE_BACK:
            self._give_back(conn)
        else:
            conn.reset()
            self._give_back(conn)

    # --- the driver ----------------------------------------------------------------------

    def run(self) -> None:
        busy = True
        while busy:
            busy = False
            for client in self.clients:
                if client.engine.actions:
                    busy = True
                    self._actions(client)

    def _actions(self, client: Client) -> None:
        actions = client.engine.actions
        i = 0
        while i < len(actions):
            action = actions[i]
            i += 1
            code = action[0]
            if code == TO_SERVER:
                self._to_server(client, action[1], action[2])
            elif code == TO_CLIENT:
                client.received += action[1]
            elif code == AUDIT:
                statement, outcome = action[1], action[2]
                if id(statement) in self.audited:
                    self.violations.append(f"{client.name}: statement {statement.text!r} audited twice")
                self.audited[id(statement)] = statement
                client.audits.append((statement.text, outcome))
            elif code == ACQUIRE:
                self._acquire(client, action[1])
            elif code == RELEASE:
                conn = action[1]
                if self.holder.get(conn) is not client:
                    self.violations.append(f"{client.name} released connection {conn.pid} it does not hold")
                if not conn.quiet:
                    self.violations.append(f"{client.name} released connection {conn.pid} with something owed")
                self.holder.pop(conn, None)
                conn.cancel_due = False  # a cancel reaches only the session it was sent for
                self._give_back(conn)
            elif code == PAUSE:
                client.paused = True
            elif code == RESUME:
                client.paused = False
            elif code in (END, CLOSE_CLIENT):
                client.ended = action[1]
                client.gone = True
            elif code == CLOSE_CONNECTION:
                conn = action[1]
                conn.closed = True
        actions.clear()
        if client.gone and client.engine.backend is not None:
            # Its session ended: as ClientSession.connection_lost does, the relay lets go.
            what, conn = client.engine.leave()
            self._actions(client)
            self.holder.pop(conn, None)
            if conn.closed or what == DRAIN:
                self._discard(conn)
            else:
                conn.reset()
                self._give_back(conn)

    def _to_server(self, client: Client, conn: FakeConnection, data: bytes) -> None:
        if self.holder.get(conn) is not client:
            self.violations.append(f"{client.name} wrote to connection {conn.pid} it does not hold")
        before = len(conn.ran)
        conn.receive(data)
        for (text, person), role in zip(conn.ran[before:], conn.ran_as[before:]):
            if person != client.name or role != client.role:
                self.violations.append(f"{text!r} of {client.name} ran as {person} / role {role}")
            client.ran.append(text)

    def _acquire(self, client: Client, key) -> None:
        if not self.idle:
            self.waiters.append(client)
            client.paused = True
            return
        conn = next((c for c in reversed(self.idle) if c.identity.carries(key)), self.idle[-1])
        self.idle.remove(conn)
        self._attach(client, conn)

    def _attach(self, client: Client, conn: FakeConnection) -> None:
        self.holder[conn] = client
        client.paused = False
        client.engine.attached(conn)

    def _give_back(self, conn: FakeConnection) -> None:
        while self.waiters:
            client = self.waiters.pop(0)
            if not client.gone:
                self._attach(client, conn)
                return
        self.idle.append(conn)

    def _discard(self, conn: FakeConnection) -> None:
        conn.closed = True
        if conn in self.idle:
            self.idle.remove(conn)
        replacement = FakeConnection(conn.pid + 1000, self.refused_roles)  # the pool opens a new one
        self.connections[self.connections.index(conn)] = replacement
        self._give_back(replacement)

    # --- settling and the checks ---------------------------------------------------------

    def settle(self, rounds: int = 200) -> None:
        """Let everything be answered, as clients eventually would: deliver every reply;
        then Sync what is unsynced and end open transactions; as a last resort, sessions
        that hold a connection others wait for leave (the pool's acquire timeout)."""
        for _ in range(rounds):
            if any(conn.output for conn in self.connections if conn in self.holder):
                for conn in list(self.connections):
                    if conn in self.holder:
                        self.deliver(conn)
                continue
            moved = False
            for client in self.clients:
                engine = client.engine
                if client.gone or client.paused or engine.pipeline:
                    continue
                if engine.sync_owed or engine.local_sync is not None:
                    self.send(client, [(ord("S"), msg.SYNC)])
                    moved = True
                elif engine.txn_status != b"I":
                    self.send(client, [(ord("Q"), msg.query("ROLLBACK"))])
                    moved = True
            if moved:
                continue
            if self.waiters:
                holders = [c for c in self.holder.values() if not c.gone]
                if holders:
                    self.leave(holders[0])
                    continue
            return
        self.violations.append("did not settle")

    def check_settled(self) -> None:
        assert not self.violations, self.violations
        for client in self.clients:
            audited = Counter(text for text, _ in client.audits)
            ran = Counter(client.ran)
            missing = ran - audited
            assert not missing, f"{client.name}: ran without a record: {missing}"
            ok = Counter(text for text, outcome in client.audits if outcome == "ok"
                         and text.startswith(("SELECT", "COPY")))
            assert not ok - ran, f"{client.name}: recorded as ok but never ran: {ok - ran}"
            if client.gone:
                continue
            engine = client.engine
            assert not engine.pipeline and not engine.waiting and engine.scanner.at_boundary, client.name
            if client.cancelled:
                continue
            assert not engine.pipeline and not engine.waiting and engine.scanner.at_boundary, client.name
            seen, due = reply_kinds(bytes(client.received)), reply_kinds(bytes(client.direct.output))
            assert seen == due, f"{client.name} got {seen!r} through the proxy, {due!r} straight"
        holders = list(self.holder)
        assert len(holders) == len(set(holders))
        assert not set(self.idle) & set(holders), "a connection both idle and held"

    # --- what clients send -----------------------------------------------------------------

    def text(self, template: str) -> str:
        """A statement text that names itself (SELECT 7, SELECT fail 8) so records can be matched."""
        if template in ("SELECT", "SELECT fail"):
            return f"{template} {next(self.ids)}"
        return template
