"""What idle sessions share to be small: one read-only copy of equal ParameterStatus values, one
object per settings pair of the engines' keys and per person, one read-only empty mapping for
statements, portals and startup settings not had yet. Shared must never mean one session's
change shows in another."""

from __future__ import annotations

import pytest

from pgproxy.backend import connection
from pgproxy.backend.connection import BackendConnection, shared_params
from pgproxy.backend.identity import ConnectionIdentity
from pgproxy.frontend import engine
from pgproxy.frontend.startup import client_settings
from pgproxy.protocol import messages as msg
from tests.support.engine_world import World
from tests.unit.test_engine import extended, settle_all


def _logged_in(values: dict[str, str]) -> BackendConnection:
    conn = BackendConnection("demo")
    conn.params = shared_params(values)  # as login does at ReadyForQuery
    return conn


def test_equal_values_are_one_read_only_mapping():
    values = {"DateStyle": "ISO, MDY", "TimeZone": "UTC", "server_version": "15.8"}
    first, second = shared_params(dict(values)), shared_params(dict(values))
    assert first is second and dict(first) == values
    with pytest.raises(TypeError):
        first["DateStyle"] = "SQL, DMY"  # type: ignore[index]


def test_a_parameter_change_replaces_only_that_connections_mapping():
    values = {"DateStyle": "ISO, MDY", "application_name": "alice via psql"}
    a, b = _logged_in(values), _logged_in(values)
    assert a.params is b.params
    a.set_param("DateStyle", "SQL, DMY")
    assert a.params["DateStyle"] == "SQL, DMY"
    assert b.params["DateStyle"] == "ISO, MDY" and dict(b.params) == values
    unchanged = b.params
    b.set_param("DateStyle", "ISO, MDY")  # the same value again: nothing to replace
    assert b.params is unchanged
    b.set_param("DateStyle", "SQL, DMY")  # now equal to a's: shared again
    assert b.params is a.params


def test_the_shared_copies_are_bounded():
    for i in range(connection._SHARED_PARAMS_MAX + 50):
        shared_params({"application_name": f"user{i} via psql"})
        assert len(connection._SHARED_PARAMS) <= connection._SHARED_PARAMS_MAX
    assert dict(shared_params({"application_name": "x"})) == {"application_name": "x"}


def test_engine_keys_share_their_pairs_and_stay_equal_by_value():
    one = engine.settings_key({"pgproxy.user": "alice", "pgproxy.session_id": "s1", "search_path": "public"})
    two = engine.settings_key({"search_path": "public", "pgproxy.session_id": "s2", "pgproxy.user": "alice"})
    assert [pair[0] for pair in one] == sorted(["pgproxy.user", "pgproxy.session_id", "search_path"])
    shared = [x is y for x, y in zip(one, two)]
    assert shared == [False, True, True]  # the session ids differ; the rest are the same objects
    assert engine.settings_key({"a": "1", "b": "2"}) == (("a", "1"), ("b", "2"))
    for i in range(engine._PAIRS_MAX + 50):
        engine.settings_key({"pgproxy.session_id": str(i)})
        assert len(engine._PAIRS) <= engine._PAIRS_MAX
    assert one == engine.settings_key({"pgproxy.user": "alice", "pgproxy.session_id": "s1", "search_path": "public"})


class _Receiver:
    """Stands in for the session a connection is attached to: keeps what it is given."""

    def __init__(self) -> None:
        self.received = b""

    def server_data(self, data: bytes) -> None:
        self.received += data


def test_attaching_hands_over_a_message_cut_in_two_and_keeps_no_reader():
    """A message the server sent across the attach (a NOTIFY, a ParameterStatus) reaches the
    session whole, first part from the control framing, rest straight; while attached the
    connection holds no framing of its own; back in control mode it frames again."""
    conn = BackendConnection("demo")
    status = msg.message(b"S", b"DateStyle\0ISO, MDY\0")
    notify = msg.message(b"A", b"\0\0\0\x07channel\0payload\0")
    conn.data_received(status + notify[:9])  # one whole message and the start of the next
    receiver = _Receiver()
    leftover = conn.attach(receiver)
    assert leftover == status + notify[:9]
    assert conn._reader is None
    conn.data_received(notify[9:])
    assert leftover + receiver.received == status + notify  # the session's stream starts on a boundary
    conn.detach()
    conn.data_received(msg.ready_for_query(b"I")[:3])
    conn.data_received(msg.ready_for_query(b"I")[3:])
    assert conn._inbox == [(ord("Z"), msg.ready_for_query(b"I"))]


def test_idle_sessions_hold_one_read_only_empty_mapping_and_a_statement_makes_a_sessions_own():
    world = World("transaction", connections=2)
    alice, bob = world.login("alice"), world.login("bob")
    assert alice.engine.statements is bob.engine.statements  # neither has prepared anything
    with pytest.raises(TypeError):
        alice.engine.statements["s1"] = ("SELECT 1", ())  # a write that forgot its own dict fails
    world.send(alice, extended("SELECT 1", name="s1"))
    settle_all(world)
    world.send(bob, extended("SELECT 2", name="s1"))
    settle_all(world)
    assert alice.engine.statements["s1"][0] == "SELECT 1" and bob.engine.statements["s1"][0] == "SELECT 2"
    ran = [entry for conn in world.connections for entry in conn.ran]
    assert ("SELECT 1", "alice") in ran and ("SELECT 2", "bob") in ran and world.violations == []
    carol = world.login("carol")
    assert dict(carol.engine.statements) == {} and dict(carol.engine.portals) == {}


def test_a_connections_statements_are_its_own_lru_and_forgetting_them_frees_them():
    a, b = ConnectionIdentity(), ConnectionIdentity()
    keys = [(f"SELECT {i}", ()) for i in range(4)]
    names = []
    for key in keys[:3]:
        name, evicted = a.prepare(key, 3)
        a.prepared_ok(name)
        names.append(name)
        assert evicted == []
    assert a.lookup(keys[0]) == names[0]  # used: now the most recent
    fourth, evicted = a.prepare(keys[3], 3)
    assert evicted == [names[1]]  # the least recently used goes, not the oldest prepared
    assert a.lookup(keys[1]) is None and a.lookup(keys[0]) == names[0] and a.lookup(keys[3]) == fourth
    assert b.lookup(keys[0]) is None and len(b.prepared) == 0  # nothing of a's shows in b
    a.synced()
    assert a.lookup(keys[3]) is None  # unanswered at the Sync: its Parse may have been skipped
    assert a.lookup(keys[0]) == names[0]  # answered: still there
    a.forget()
    assert all(a.lookup(key) is None for key in keys) and a.prepared is b.prepared
    name, _ = a.prepare(keys[2], 3)
    assert a.lookup(keys[2]) == name and b.lookup(keys[2]) is None


def test_sessions_of_one_person_share_the_person_and_nothing_set_at_startup_is_one_mapping():
    first = engine.one_copy(("role_alice", "alice", ("analysts",), "jwt", "alice"))
    again = engine.one_copy(("role_alice", "alice", ("analysts",), "jwt", "alice"))
    other = engine.one_copy(("role_alice", "alice", ("admins",), "jwt", "alice"))
    assert first is again and other is not first and other[2] == ("admins",)
    for i in range(engine._PAIRS_MAX + 50):
        engine.one_copy(("role", f"user{i}", (), "jwt", str(i)))
        assert len(engine._PEOPLE) <= engine._PAIRS_MAX
    plain, _ = client_settings({"user": "alice", "database": "app"})
    also_plain, _ = client_settings({"user": "bob"})
    assert plain is also_plain and dict(plain) == {}
    with pytest.raises(TypeError):
        plain["search_path"] = "evil"  # type: ignore[index]
    own, _ = client_settings({"user": "carol", "application_name": "psql"})
    assert own == {"application_name": "psql"} and dict(plain) == {}


def test_closing_and_deallocating_names_a_session_never_made_leaves_the_shared_mapping_empty():
    """A client's Close and DEALLOCATE of names it never prepared (nor anyone, or another
    session's) touch nothing shared: the server or the proxy answers as PostgreSQL would."""
    world = World("transaction", connections=2)
    alice, bob = world.login("alice"), world.login("bob")
    world.send(bob, extended("SELECT 2", name="s1"))
    settle_all(world)
    close = [(ord("C"), msg.close_message("S", "s1")), (ord("C"), msg.close_message("P", "p9")),
             (ord("S"), msg.SYNC)]
    world.send(alice, close)
    settle_all(world)
    world.send(alice, [(ord("Q"), msg.query("DEALLOCATE s1"))])
    settle_all(world)
    world.send(alice, [(ord("Q"), msg.query("DEALLOCATE ALL"))])
    settle_all(world)
    assert alice.engine.statements is engine.EMPTY and dict(engine.EMPTY) == {}
    assert bob.engine.statements["s1"][0] == "SELECT 2" and world.violations == []
    world.send(bob, extended("SELECT 2", name="s1")[1:])  # bob's s1 still binds and runs as bob
    settle_all(world)
    assert [entry for conn in world.connections for entry in conn.ran][-1] == ("SELECT 2", "bob")
