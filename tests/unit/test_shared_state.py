"""What idle sessions share to be small: one read-only copy of equal ParameterStatus values, one
object per settings pair of the engines' keys. Shared must never mean one session's change
shows in another."""

from __future__ import annotations

import pytest

from pgproxy.backend import connection
from pgproxy.backend.connection import BackendConnection, shared_params
from pgproxy.frontend import engine
from pgproxy.protocol import messages as msg


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
