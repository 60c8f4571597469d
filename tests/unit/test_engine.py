"""The engine's rules, one at a time, without sockets (pgproxy/frontend/engine.py).

Each test drives pure Engines over model connections (tests/support/engine_world.py and
fake_postgres.py) and asserts what the rule promises: what was written to the server and
when, what the client got, when the connection went back, what was audited.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pgproxy.frontend.engine import (CLOSE_CONNECTION, DRAIN, END, GIVE_BACK, HELD, IDLE, RESET, PoolMode,
                                     TransactionPooling)
from pgproxy.protocol import messages as msg
from tests.support.engine_world import World, frames_of, reply_kinds

Q, S, H = ord("Q"), ord("S"), ord("H")


def query(text: str) -> list[tuple[int, bytes]]:
    return [(Q, msg.query(text))]


def extended(text: str, name: str = "", end: bytes | None = b"S") -> list[tuple[int, bytes]]:
    out = [(ord("P"), msg.parse_message(name, text)), (ord("B"), msg.bind_message("", name)),
           (ord("E"), msg.execute_message())]
    if end == b"S":
        out.append((S, msg.SYNC))
    elif end == b"H":
        out.append((H, msg.message(b"H")))
    return out


def texts_written(data: bytes) -> list[str]:
    """The statement texts in a write to the server, in order (Parse and Query)."""
    out = []
    for kind, raw in frames_of(data):
        if kind == ord("P"):
            out.append(msg.parse_parse(raw[5:]).query)
        elif kind == Q:
            out.append(raw[5:-1].decode())
    return out


def settle_all(world: World) -> None:
    """Deliver every reply, including replies to what the deliveries made the engine send."""
    while any(conn.output for conn in world.connections):
        for conn in list(world.connections):
            world.deliver(conn)


def bind_execute_sync(name: str) -> list[tuple[int, bytes]]:
    """Run prepared statement ``name`` (no parameters) and sync."""
    return [(ord("B"), msg.bind_message("", name)), (ord("E"), msg.execute_message()), (S, msg.SYNC)]


def replies_as_direct(client) -> bytes:
    """The message types the client got through the proxy, after checking that a direct
    connection to the same model server got the same ones."""
    seen = reply_kinds(bytes(client.received))
    assert seen == reply_kinds(bytes(client.direct.output))
    return seen


def statuses(data: bytes) -> bytes:
    """The transaction status of each ReadyForQuery a client got, in order."""
    return bytes(raw[5] for kind, raw in frames_of(data) if kind == ord("Z"))


def sqlstates(data: bytes) -> list[str]:
    """The SQLSTATE of each ErrorResponse a client got, in order."""
    return [msg.parse_error_fields(raw[5:])["C"] for kind, raw in frames_of(data) if kind == ord("E")]


def alice_with_s1(text: str = "SELECT 1"):
    """Transaction pooling over one connection; alice has prepared s1. Returns the world,
    alice, and how much she had received by then."""
    world = World("transaction", connections=1)
    alice = world.login("alice")
    world.send(alice, extended(text, name="s1"))
    settle_all(world)
    return world, alice, len(alice.received)


def test_a_message_goes_out_behind_the_switch_to_its_identity_in_the_same_write():
    world = World("transaction", connections=1)
    alice, bob = world.login("alice"), world.login("bob")  # the connection now carries bob
    conn = world.connections[0]
    conn.writes.clear()
    world.send(alice, query("SELECT 1"))
    assert len(conn.writes) == 1
    written = texts_written(conn.writes[0])
    assert written[0] == "DISCARD ALL" and written[1].startswith("SELECT pg_catalog.set_config('role'")
    assert written[-1] == "SELECT 1" and "pgproxy.switch" in written[2]
    settle_all(world)
    assert conn.ran[-1] == ("SELECT 1", "alice")
    assert bob.engine.backend is None and world.violations == []


def test_the_same_client_back_on_its_connection_pays_nothing():
    world = World("transaction", connections=1)
    alice = world.login("alice")
    conn = world.connections[0]
    world.send(alice, query("SELECT 1"))
    settle_all(world)
    conn.writes.clear()
    world.send(alice, query("SELECT 2"))
    assert [texts_written(w) for w in conn.writes] == [["SELECT 2"]]


def test_the_same_person_with_other_settings_gets_reset_all_not_discard_all():
    world = World("transaction", connections=1)
    first = world.login("alice", search_path="one")
    second = world.login("alice", search_path="two")
    conn = world.connections[0]
    world.send(first, query("SELECT 1"))
    settle_all(world)
    conn.writes.clear()
    world.send(second, query("SELECT 2"))
    assert texts_written(conn.writes[0])[0] == "RESET ALL"
    settle_all(world)
    assert conn.settings["search_path"] == "two" and conn.ran[-1] == ("SELECT 2", "alice")


def test_messages_past_the_switchs_first_sync_wait_for_its_guard():
    world = World("transaction", connections=1)
    alice, _ = world.login("alice"), world.login("bob")
    conn = world.connections[0]
    conn.writes.clear()
    alice.engine.client(query("SELECT 1") + query("SELECT 2"))
    world.run()
    assert alice.engine.state == HELD and alice.paused  # the client is not read meanwhile
    assert texts_written(b"".join(conn.writes))[-1] == "SELECT 1"  # not SELECT 2 yet
    settle_all(world)
    assert [text for text, _ in conn.ran] == ["SELECT 1", "SELECT 2"]
    assert reply_kinds(bytes(alice.received)) == b"TCZTCZ"


def test_a_failed_switch_ends_the_session_and_runs_nothing_of_it():
    world = World("transaction", connections=1)
    alice, _ = world.login("alice"), world.login("bob")
    world.refused_roles.add("role_alice")
    world.send(alice, query("SELECT 1") + extended("SELECT 2"))
    settle_all(world)
    conn_ran = [text for conn in world.connections for text, _ in conn.ran]
    assert conn_ran == [] and alice.gone
    assert alice.ended.sqlstate == "28000" and alice.received == b""
    assert world.connections[0].pid != 100  # the connection was closed and replaced, never reused


def test_the_connection_goes_back_only_when_the_transaction_is_over():
    world = World("transaction", connections=1)
    alice = world.login("alice")
    world.send(alice, query("BEGIN"))
    settle_all(world)
    assert alice.engine.backend is not None  # a transaction is open
    world.send(alice, query("SELECT 1"))
    settle_all(world)
    assert alice.engine.backend is not None
    world.send(alice, query("COMMIT"))
    settle_all(world)
    assert alice.engine.backend is None and alice.engine.state == IDLE


def test_flush_without_sync_keeps_the_connection():
    world = World("transaction", connections=1)
    alice = world.login("alice")
    world.send(alice, extended("SELECT 1", end=b"H"))
    settle_all(world)
    assert alice.engine.backend is not None and alice.engine.sync_owed
    world.send(alice, [(S, msg.SYNC)])
    settle_all(world)
    assert alice.engine.backend is None


def test_after_an_error_without_sync_the_proxy_syncs_and_answers_the_clients_sync_later():
    world = World("transaction", connections=1)
    alice, bob = world.login("alice"), world.login("bob")
    world.send(alice, extended("SELECT fail 1", end=b"H") + extended("SELECT 2", end=None))
    settle_all(world)
    # The server was synced by the proxy: the connection is free for others already.
    assert alice.engine.backend is None and alice.engine.local_sync is not None
    world.send(bob, query("SELECT 3"))
    settle_all(world)
    assert world.connections[0].ran[-1] == ("SELECT 3", "bob")
    world.send(alice, [(S, msg.SYNC)])
    settle_all(world)
    assert reply_kinds(bytes(alice.received)) == b"12EZ"  # as PostgreSQL: error, then the Sync's Z
    assert ("SELECT 2", "alice") not in world.connections[0].ran  # skipped, as PostgreSQL would


def test_a_statement_prepared_in_a_skipped_batch_is_prepared_again_after_the_sync():
    # Hypothesis found it: the second Parse of s1 was answered locally, relying on the first,
    # which the server had skipped after the error; its Bind then failed.
    world = World("transaction", connections=1)
    alice = world.login("alice")
    again = extended("SELECT 7", name="s1")
    world.send(alice, extended("SELECT fail 1", end=b"H") + again + again)
    settle_all(world)
    assert replies_as_direct(alice) == b"12EZ12CZ"
    assert world.connections[0].ran[-1] == ("SELECT 7", "alice")
    # The second Parse made s1 (the first was skipped): the client has it.
    world.send(alice, bind_execute_sync("s1"))
    settle_all(world)
    assert replies_as_direct(alice) == b"12EZ12CZ2CZ"


def test_deallocate_in_an_aborted_transaction_is_refused_as_postgresql_would_and_keeps_the_statement():
    world = World("transaction", connections=1)
    alice = world.login("alice")
    world.send(alice, extended("SELECT 1", name="s1") + query("BEGIN") + query("SELECT fail 2"))
    settle_all(world)
    world.send(alice, query("DEALLOCATE s1"))
    settle_all(world)
    assert sqlstates(bytes(alice.received)) == ["42P01", "25P02"] and "s1" in alice.engine.statements
    world.send(alice, query("ROLLBACK") + query("DEALLOCATE s1"))
    settle_all(world)
    assert "s1" not in alice.engine.statements and alice.engine.backend is None


def test_deallocate_pipelined_behind_begin_is_answered_inside_the_transaction_block():
    # The proxy answers DEALLOCATE itself (the names are its own); pipelined behind BEGIN its
    # ReadyForQuery must say T, as PostgreSQL's would, not the I it was sent in.
    world, alice, before = alice_with_s1()
    world.send(alice, query("BEGIN") + query("DEALLOCATE s1"))
    settle_all(world)
    assert statuses(bytes(alice.received[before:])) == b"TT"
    assert "s1" not in alice.engine.statements
    assert alice.engine.backend is not None  # still in the block: the connection stays
    world.send(alice, query("COMMIT"))
    settle_all(world)
    assert alice.engine.backend is None


def test_deallocate_pipelined_behind_a_failure_in_a_block_is_refused_and_keeps_the_statement():
    world, alice, before = alice_with_s1()
    world.send(alice, query("BEGIN") + query("SELECT fail 2") + query("DEALLOCATE s1") + query("ROLLBACK"))
    settle_all(world)
    got = bytes(alice.received[before:])
    assert sqlstates(got) == ["42P01", "25P02"] and statuses(got) == b"TEEI"
    assert "s1" in alice.engine.statements and alice.engine.backend is None


def test_a_named_parse_the_server_skipped_leaves_the_client_without_the_statement():
    # Hypothesis found it: the proxy kept s1 after its Parse was skipped (an earlier message
    # failed), so DEALLOCATE s1 succeeded where PostgreSQL says it does not exist.
    world = World("transaction", connections=1)
    alice = world.login("alice")
    world.send(alice, extended("SELECT fail 1", end=b"H") + extended("SELECT 7", name="s1"))
    settle_all(world)
    assert "s1" not in alice.engine.statements
    world.send(alice, query("DEALLOCATE s1"))
    settle_all(world)
    assert sqlstates(bytes(alice.received)) == ["42P01", "26000"]
    assert replies_as_direct(alice) == b"12EZEZ"


def test_a_skipped_parse_of_a_name_the_client_has_keeps_its_statement():
    world, alice, _ = alice_with_s1("SELECT 7")
    again = [(ord("P"), msg.parse_message("s1", "SELECT 7")), (S, msg.SYNC)]  # skipped: s1 stays as it was
    world.send(alice, extended("SELECT fail 1", end=b"H") + again)
    settle_all(world)
    assert "s1" in alice.engine.statements
    world.send(alice, bind_execute_sync("s1"))
    settle_all(world)
    assert replies_as_direct(alice) == b"12CZ12EZ2CZ"


def test_a_statement_closed_while_its_parse_is_in_flight_stays_closed():
    world = World("transaction", connections=1)
    alice = world.login("alice")
    world.send(alice, extended("SELECT 7", name="s1") + [(ord("C"), msg.close_message("S", "s1")), (S, msg.SYNC)])
    settle_all(world)
    assert "s1" not in alice.engine.statements


def test_session_pooling_keeps_its_connection_between_transactions():
    world = World("session", connections=2)
    alice = world.login("alice")
    held = alice.engine.backend
    world.send(alice, query("SELECT 1"))
    settle_all(world)
    assert alice.engine.backend is held


def test_statements_are_refused_while_the_trail_is_unavailable_and_the_transaction_fails():
    world = World("transaction", connections=1)
    alice = world.login("alice")
    world.send(alice, query("BEGIN"))
    settle_all(world)
    world.trail.available = False
    world.send(alice, query("SELECT 1"))
    settle_all(world)
    world.trail.available = True
    world.send(alice, query("SELECT 2"))
    settle_all(world)
    received = frames_of(bytes(alice.received))
    errors = [msg.parse_error_fields(raw[5:])["C"] for kind, raw in received if kind == ord("E")]
    assert errors == ["58030", "25P02"]  # refused, then the transaction is aborted as in PostgreSQL
    assert world.connections[0].ran == []


def test_reset_all_re_applies_the_identity_before_anything_else():
    world = World("session", connections=1)
    alice = world.login("alice")
    conn = alice.engine.backend
    world.send(alice, query("RESET ALL") + query("SELECT 1"))
    settle_all(world)
    assert conn.settings.get("pgproxy.user") == "alice" and conn.ran[-1] == ("SELECT 1", "alice")
    assert reply_kinds(bytes(alice.received)) == b"CZTCZ"


def test_a_prepared_statement_is_answered_locally_where_it_exists_and_injected_elsewhere():
    world = World("transaction", connections=2)
    alice, bob = world.login("alice"), world.login("bob")
    world.send(alice, extended("SELECT 1", name="s1"))
    settle_all(world)
    first = next(conn for conn in world.connections if conn.identity.person and conn.identity.person[1] == "alice")
    first.writes.clear()
    world.send(alice, extended("SELECT 1", name="s1"))  # same connection: it has the statement
    assert not any(kind == ord("P") for w in first.writes for kind, _ in frames_of(w))
    settle_all(world)
    world.send(bob, query("BEGIN"))  # bob holds the connection that has alice's statement
    assert bob.engine.backend is first
    bind_only = [(ord("B"), msg.bind_message("", "s1")), (ord("E"), msg.execute_message()), (S, msg.SYNC)]
    world.send(alice, bind_only)
    other = alice.engine.backend
    assert other is not first
    injected = [msg.parse_parse(raw[5:]) for w in other.writes for kind, raw in frames_of(w) if kind == ord("P")]
    assert any(p.query == "SELECT 1" and p.statement.startswith("pgproxy_") for p in injected)
    settle_all(world)
    assert other.ran[-1] == ("SELECT 1", "alice") and world.violations == []


def test_a_setting_changed_inside_a_transaction_pins_the_session():
    world = World("transaction", connections=2)
    alice = world.login("alice")
    world.send(alice, query("BEGIN") + query("SET search_path = x") + query("COMMIT"))
    settle_all(world)
    assert alice.engine.pinned == "SET" and alice.engine.backend is not None


def test_leaving_mid_request_drains_a_clean_one_goes_back_and_session_pooling_resets():
    world = World("transaction", connections=1)
    alice = world.login("alice")
    world.send(alice, query("SELECT 1"))
    what, conn = alice.engine.leave()
    assert what == DRAIN
    world = World("transaction", connections=1)
    alice = world.login("alice")
    world.send(alice, query("BEGIN"))
    settle_all(world)
    assert alice.engine.leave()[0] == RESET  # a transaction open: reset before reuse
    world = World("transaction", connections=1)
    alice = world.login("alice")
    assert alice.engine.leave() == (None, None)  # between transactions it holds nothing
    world = World("session", connections=1)
    alice = world.login("alice")
    assert alice.engine.leave()[0] == RESET


def test_a_new_pool_mode_is_one_subclass():
    class StatementPooling(PoolMode):  # give back after every statement outside a transaction
        name, renames, pins, releases = "statement", True, True, True

        def may_give_back(self, engine):
            return engine.txn_status == b"I" and not engine.pinned

        def on_leave(self, engine):
            return GIVE_BACK

    assert issubclass(TransactionPooling, PoolMode)
    world = World("transaction", connections=1)
    alice = world.login("alice")
    alice.engine.mode = StatementPooling()
    world.send(alice, query("SELECT 1"))
    settle_all(world)
    assert alice.engine.backend is None and world.connections[0].ran == [("SELECT 1", "alice")]


def test_an_unreadable_server_stream_ends_the_session():
    world = World("session", connections=1)
    alice = world.login("alice")
    conn = alice.engine.backend
    alice.engine.server(b"Z\xff\xff\xff\xff")  # a length no message has
    codes = [action[0] for action in alice.engine.actions]
    assert CLOSE_CONNECTION in codes and END in codes
    end = next(action for action in alice.engine.actions if action[0] == END)
    assert end[1].sqlstate == "08006" and alice.engine.actions[codes.index(CLOSE_CONNECTION)][1] is conn


def test_the_engine_does_no_io():
    root = Path(__file__).resolve().parents[2] / "pgproxy"
    for module in ("frontend/engine.py", "protocol/pipeline.py", "backend/identity.py", "protocol/switch.py"):
        tree = ast.parse((root / module).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"asyncio", "socket", "ssl", "selectors", "uvloop"}, module
