"""The engine under random interleavings: several people over few connections.

Hypothesis drives random client batches (simple and extended, pipelined, COPY, Flush
without Sync, Syncs alone, errors, resets, DEALLOCATE), random cuts of the server's replies,
clients leaving mid-request, cancels, and a role refused mid-session (its next switch fails), through pure
Engines over model connections (tests/support/engine_world.py). The invariants:

* no client message reaches a connection before it carries that client's identity;
* every statement that reaches the server has exactly one record, under its person;
* a connection is given back only at ReadyForQuery with nothing owed;
* once answered, nothing is left buffered and each client got its ReadyForQuery messages.

CI runs ``max_examples`` below per pool mode; for a longer hunt:
``PGPROXY_ENGINE_EXAMPLES=20000 .venv/bin/python -m pytest tests/unit/test_engine_properties.py``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgproxy.protocol import messages as msg
from tests.support.engine_world import World

EXAMPLES = int(os.environ.get("PGPROXY_ENGINE_EXAMPLES", "300"))
PEOPLE = ("alice", "bob", "carol")

simple = st.sampled_from(["SELECT", "SELECT", "SELECT fail", "BEGIN", "COMMIT", "ROLLBACK", "DISCARD ALL",
                          "RESET ALL", "SET search_path = s1", "DEALLOCATE s1", "DEALLOCATE ALL"]
                         ).map(lambda text: ("Q", text))
extended = st.tuples(st.just("X"), st.sampled_from(["", "s1", "s2"]),
                     st.sampled_from(["SELECT", "SELECT", "SELECT fail", "BEGIN", "COMMIT"]),
                     st.booleans(), st.sampled_from(["S", "S", "H", ""]))
message = st.one_of(simple, extended, st.just(("COPY",)), st.just(("S",)), st.just(("H",)))
batch = st.lists(message, min_size=1, max_size=6)
step = st.one_of(
    st.tuples(st.just("send"), st.integers(0, len(PEOPLE) - 1), batch),
    st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(1, 64)),
    st.tuples(st.just("deliver_all"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("leave"), st.integers(0, len(PEOPLE) - 1), st.just(0)),
    st.tuples(st.just("refuse_role"), st.integers(0, len(PEOPLE) - 1), st.just(0)),
    st.tuples(st.just("cancel"), st.integers(0, len(PEOPLE) - 1), st.just(0)),
)


def frames(world: World, spec: tuple) -> list[tuple[int, bytes]]:
    kind = spec[0]
    if kind == "Q":
        return [(ord("Q"), msg.query(world.text(spec[1])))]
    if kind == "COPY":
        return [(ord("Q"), msg.query("COPY t FROM STDIN")), (ord("d"), msg.message(b"d", b"1\n")),
                (ord("c"), msg.message(b"c"))]
    if kind == "S":
        return [(ord("S"), msg.SYNC)]
    if kind == "H":
        return [(ord("H"), msg.message(b"H"))]
    _, name, template, describe, end = spec
    out = [(ord("P"), msg.parse_message(name, world.text(template)))]
    if describe:
        out.append((ord("D"), msg.describe_message("S", name)))
    out += [(ord("B"), msg.bind_message("", name)), (ord("E"), msg.execute_message())]
    if end:
        out.append((ord(end), msg.SYNC if end == "S" else msg.message(b"H")))
    return out


def play(mode: str, connections: int, steps: list) -> None:
    world = World(mode, connections)
    clients = [world.login(name) for name in PEOPLE[:connections if mode == "session" else len(PEOPLE)]]
    for action, index, arg in steps:
        if action == "send":
            client = clients[index % len(clients)]
            world.send(client, [f for spec in arg for f in frames(world, spec)])
        elif action == "deliver":
            world.deliver(world.connections[index % len(world.connections)], arg)
        elif action == "deliver_all":
            world.deliver(world.connections[index % len(world.connections)])
        elif action == "leave":
            world.leave(clients[index % len(clients)])
        elif action == "refuse_role":
            world.refused_roles.add(clients[index % len(clients)].role)
        elif action == "cancel":
            world.cancel(clients[index % len(clients)])
        assert not world.violations, world.violations
    world.settle()
    world.check_settled()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
def test_transaction_pooling_keeps_every_invariant(steps):
    play("transaction", 2, steps)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
def test_session_pooling_keeps_every_invariant(steps):
    play("session", 3, steps)
