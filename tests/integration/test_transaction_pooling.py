"""Transaction pooling: identity per transaction, session state pinned or refused, local
answers for statement bookkeeping, and its timeouts."""

from __future__ import annotations

import time

import psycopg
import pytest

from pgproxy.protocol import messages as msg
from tests.support.ops import scrape, value
from tests.support.proxy import free_port
from tests.support.wire import login


def _alice(proxy, issuer, **options):
    return psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True,
                           **options)


def _bob(proxy, issuer, **options):
    return psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"]), autocommit=True, **options)


def _pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


@pytest.fixture
def one_connection(make_proxy, tmp_path):
    """Transaction pooling over a single backend connection: every client shares it."""
    return make_proxy(backend={"pool_mode": "transaction", "pool_size": 1})


def test_clients_take_turns_on_one_connection_each_as_themselves(one_connection, issuer):
    with _alice(one_connection, issuer) as alice, _bob(one_connection, issuer) as bob:
        assert _pid(alice) == _pid(bob)  # both logged in, one backend connection
        for i in range(5):
            assert alice.execute("SELECT current_user, current_setting('pgproxy.user'), %s::int",
                                 (i,)).fetchone() == ("emea_analyst", "alice", i)
            assert bob.execute("SELECT current_user, current_setting('pgproxy.user'), %s::int",
                               (i,)).fetchone() == ("amer_analyst", "bob", i)
        with alice.transaction():  # a transaction keeps the connection: bob waits for it
            alice.execute("INSERT INTO items VALUES (2001, 'alice in a transaction')")
            assert alice.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("alice",)
        assert bob.execute("SELECT name FROM items WHERE id = 2001").fetchone() == ("alice in a transaction",)
        bob.execute("DELETE FROM items WHERE id = 2001")


@pytest.mark.parametrize("statement, check", [
    ("CREATE TEMP TABLE scratch (x int)", "SELECT to_regclass('pg_temp.scratch') IS NOT NULL"),
    ("SET myapp.mark = 'alice-was-here'", "SELECT coalesce(current_setting('myapp.mark', true), '') = 'alice-was-here'"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
     "SELECT current_setting('default_transaction_isolation') = 'serializable'"),
    ("LISTEN alice_channel", "SELECT count(*) > 0 FROM pg_listening_channels()"),
    ("BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 1; COMMIT", "SELECT count(*) > 0 FROM pg_cursors"),
    ("SELECT set_config('app.custom', 'alice-was-here', false)",
     "SELECT coalesce(current_setting('app.custom', true), '') = 'alice-was-here'"),
    ("SELECT pg_advisory_lock(42)",
     "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"),
    ("PREPARE alice_stmt AS SELECT 1", "SELECT count(*) > 0 FROM pg_prepared_statements WHERE name = 'alice_stmt'"),
])
def test_session_state_pins_the_client_and_never_reaches_another(make_proxy, issuer, statement, check):
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": 2})
    with _alice(proxy, issuer) as alice:
        alice.execute(statement)
        pinned_pid = _pid(alice)
        assert alice.execute(check).fetchone() == (True,)  # alice keeps her state: she is pinned
        with _bob(proxy, issuer) as bob:
            for _ in range(5):
                assert _pid(bob) != pinned_pid  # the pinned connection is alice's alone
                assert bob.execute(check).fetchone() == (False,)
            assert _pid(alice) == pinned_pid
    pins = proxy.audit(lambda r: r.get("event") == "pin")
    assert [(p["user"], p["result"]) for p in pins if p.get("event") == "pin"] == [("alice", "pinned")]
    with _bob(proxy, issuer) as bob:  # alice left: her connection was reset before reuse
        for _ in range(4):
            assert bob.execute(check).fetchone() == (False,)


@pytest.mark.parametrize("statement, name, value", [
    ("SET statement_timeout = '4321s'", "statement_timeout", "4321s"),
    ("SET extra_float_digits = 3", "extra_float_digits", "3"),
    ("set DateStyle to 'SQL, DMY'", "DateStyle", "SQL, DMY"),
    ("SET search_path = \"$user\", public", "search_path", '"$user", public'),
    ("SET TIME ZONE 'Asia/Tokyo'", "TimeZone", "Asia/Tokyo"),
    ("SET application_name = 'report'", "application_name", "alice via report"),
])
def test_ordinary_settings_follow_the_client_instead_of_pinning_it(make_proxy, issuer, statement, name, value):
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": 2})
    with _alice(proxy, issuer) as alice, _bob(proxy, issuer) as bob:
        before = bob.execute(f"SELECT current_setting('{name}')").fetchone()[0]
        alice.execute(statement)
        seen = set()
        for _ in range(6):  # alice and bob alternate over both connections
            pid, setting = alice.execute(f"SELECT pg_backend_pid(), current_setting('{name}')").fetchone()
            seen.add(pid)
            assert setting == value if name != "application_name" else setting in (value, "report")
            assert bob.execute(f"SELECT current_setting('{name}')").fetchone()[0] == before
            with bob.transaction():  # bob holds one connection: alice must take the other
                bob.execute("SELECT 1")
                assert alice.execute(f"SELECT current_setting('{name}')").fetchone()[0] in (value, "report")
        alice.execute(f"RESET {name if name != 'TimeZone' else 'timezone'}")
        assert alice.execute(f"SELECT current_setting('{name}')").fetchone()[0] == before.replace("bob", "alice")
    assert not [r for r in proxy.audit() if r.get("event") == "pin"]


def test_refuse_mode_answers_0A000_and_the_session_carries_on(make_proxy, issuer):
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": 1, "session_state": "refuse"})
    with _alice(proxy, issuer) as alice:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="outlives the transaction"):
            alice.execute("CREATE TEMP TABLE scratch (x int)")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            alice.execute("SELECT set_config('myapp.tenant', %s, false)", ("emea",))  # extended protocol
        assert alice.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("alice",)
        with alice.transaction():
            alice.execute("SET LOCAL statement_timeout = '5s'")  # transaction-scoped: allowed
    refused = proxy.audit(lambda r: r.get("event") == "pin" and r.get("result") == "refused", count=2)
    assert len([r for r in refused if r.get("event") == "pin"]) == 2


def test_prepared_statements_survive_moves_and_deallocate_is_answered_locally(make_proxy, issuer):
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": 2, "prepared_statements": 3})
    with _alice(proxy, issuer, prepare_threshold=0) as alice, _bob(proxy, issuer, prepare_threshold=0) as bob:
        for i in range(30):  # more statements than the per-connection LRU holds, on two connections
            assert alice.execute(f"SELECT {i % 7} + %s::int", (i,)).fetchone() == (i % 7 + i,)
            assert bob.execute(f"SELECT current_setting('pgproxy.user') || %s::text || '{i % 5}'",
                               (i,)).fetchone() == (f"bob{i}{i % 5}",)
        alice.execute("DEALLOCATE ALL")  # psycopg forgets its statements; the proxy's stay usable
        assert alice.execute("SELECT 40 + %s::int", (2,)).fetchone() == (42,)
        # A person never sees another person's prepared statements on a shared connection.
        names = bob.execute("SELECT string_agg(statement, ' | ') FROM pg_prepared_statements").fetchone()[0]
        assert "pg_prepared_statements" in names and "+ $1::int" not in names
    local = proxy.audit(lambda r: r.get("outcome") == "answered_by_proxy")
    assert any(r.get("statement") == "DEALLOCATE ALL" for r in local)


def test_extended_protocol_close_and_pipelined_messages_get_their_replies_in_order(one_connection, issuer):
    wire, replies = login(one_connection.port, "alice", issuer.mint("alice", ["sales_emea"]))
    assert replies[-1][0] == "Z"
    with _bob(one_connection, issuer) as bob:
        bob.execute("SELECT 1")  # the connection now carries bob: alice's next write switches it
        wire.send(msg.parse_message("s1", "SELECT current_setting('pgproxy.user')") + msg.SYNC)
        assert [k for k, _ in wire.read_until("Z")] == ["1", "Z"]
        bob.execute("SELECT 1")
        wire.send(msg.parse_message("s1b", "SELECT 2") + msg.bind_message("", "s1") + msg.execute_message()
                  + msg.close_message("S", "s1b") + msg.SYNC)
        got = wire.read_until("Z")
        assert [k for k, _ in got] == ["1", "2", "D", "C", "3", "Z"]
        assert b"alice" in got[2][1]
        wire.send(msg.bind_message("", "s1b") + msg.execute_message() + msg.SYNC)  # closed: an error, then usable
        got = wire.read_until("Z")
        assert [k for k, _ in got] == ["E", "Z"]
        wire.send(msg.query("SELECT current_user"))
        assert [k for k, _ in wire.read_until("Z")] == ["T", "D", "C", "Z"]


def _statuses_and_errors(wire, queries: int) -> tuple[str, list[str]]:
    """The ReadyForQuery statuses and the SQLSTATEs of the replies to ``queries`` simple queries."""
    statuses, errors = "", []
    for _ in range(queries):
        for kind, body in wire.read_until("Z"):
            if kind == "E":
                errors.append(msg.parse_error_fields(body)["C"])
            elif kind == "Z":
                statuses += body.decode()
    return statuses, errors


def test_deallocate_pipelined_in_a_transaction_block_is_answered_as_postgresql_would(one_connection, issuer):
    # The proxy answers DEALLOCATE itself (the statement names are its own), so it must answer
    # in the state the queries pipelined before it leave: inside BEGIN's block (T), refused in
    # a failed block (25P02, and the statement stays), idle after ROLLBACK; and for a name
    # whose Parse the server skipped, "does not exist" (26000).
    wire, replies = login(one_connection.port, "alice", issuer.mint("alice", ["sales_emea"]))
    assert replies[-1][0] == "Z"
    wire.send(msg.parse_message("s1", "SELECT current_setting('pgproxy.user')") + msg.SYNC)
    assert [k for k, _ in wire.read_until("Z")] == ["1", "Z"]
    wire.send(msg.query("BEGIN") + msg.query("DEALLOCATE s1") + msg.query("ROLLBACK"))
    assert _statuses_and_errors(wire, 3) == ("TTI", [])
    wire.send(msg.parse_message("s1", "SELECT current_setting('pgproxy.user')") + msg.SYNC)
    assert [k for k, _ in wire.read_until("Z")] == ["1", "Z"]
    wire.send(msg.query("BEGIN") + msg.query("SELECT 1/0") + msg.query("DEALLOCATE s1") + msg.query("ROLLBACK"))
    assert _statuses_and_errors(wire, 4) == ("TEEI", ["22012", "25P02"])
    wire.send(msg.bind_message("", "s1") + msg.execute_message() + msg.SYNC)  # kept: it still runs
    got = wire.read_until("Z")
    assert [k for k, _ in got] == ["2", "D", "C", "Z"] and b"alice" in got[1][1]
    # A named Parse the server skipped (an earlier message failed) made no statement.
    wire.send(msg.parse_message("", "SELECT 1/0") + msg.bind_message("", "") + msg.execute_message()
              + msg.parse_message("s2", "SELECT 2") + msg.SYNC + msg.query("DEALLOCATE s2"))
    assert _statuses_and_errors(wire, 2) == ("II", ["22012", "26000"])


def test_idle_in_transaction_timeout_ends_the_client_and_frees_the_connection(make_proxy, issuer):
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": 1, "idle_in_transaction_timeout_s": 1.0})
    alice = psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]))
    alice.execute("SELECT 1")  # a transaction is open (psycopg's default), holding the only connection
    time.sleep(2.5)
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
        alice.execute("SELECT 1")
    with _bob(proxy, issuer) as bob:
        assert bob.execute("SELECT current_user").fetchone() == ("amer_analyst",)


def test_waiting_for_a_connection_times_out_with_53300(make_proxy, issuer):
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": 1, "acquire_timeout_s": 1.0})
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as holder, \
            _bob(proxy, issuer) as bob:
        holder.execute("SELECT 1")  # holds the only connection inside a transaction
        with pytest.raises(psycopg.OperationalError) as caught:
            bob.execute("SELECT 1")
        assert caught.value.sqlstate == "53300"


def test_a_failed_identity_switch_ends_the_session_before_any_statement_runs(make_proxy, issuer, database):
    database.psql("CREATE ROLE doomed_role NOLOGIN; GRANT doomed_role TO pgproxy_pool;"
                  "GRANT SELECT ON items TO doomed_role;", database="demo")
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": 1},
                       roles=[{"group": "doomed", "role": "doomed_role"}, {"group": "sales_amer", "role": "amer_analyst"}])
    try:
        carol = psycopg.connect(proxy.dsn("carol"), password=issuer.mint("carol", ["doomed"]), autocommit=True)
        assert carol.execute("SELECT current_user").fetchone() == ("doomed_role",)
        with _bob(proxy, issuer) as bob:
            bob.execute("SELECT 1")  # the connection now carries bob
            database.psql("REVOKE doomed_role FROM pgproxy_pool", database="demo")
            with pytest.raises(psycopg.OperationalError, match="could not switch to your role"):
                carol.execute("INSERT INTO items VALUES (3001, 'as the wrong person')")
            assert bob.execute("SELECT current_user, current_setting('pgproxy.user')").fetchone() == (
                "amer_analyst", "bob")
            assert bob.execute("SELECT count(*) FROM items WHERE id = 3001").fetchone() == (0,)
        assert "identity switch to role" in proxy.log()
    finally:
        database.psql("DROP OWNED BY doomed_role; DROP ROLE doomed_role;", database="demo")


def test_pins_and_switches_are_counted_in_metrics(make_proxy, issuer):
    http_port = free_port()
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": 1}, http={"listen": f"127.0.0.1:{http_port}"})
    with _alice(proxy, issuer) as alice, _bob(proxy, issuer) as bob:
        alice.execute("SELECT 1")
        bob.execute("SELECT 1")
        alice.execute("LISTEN somewhere")
    text = scrape(http_port)
    assert value(text, "pgproxy_pins_total", reason="LISTEN", result="pinned") == 1
    assert value(text, "pgproxy_identity_switches_total", kind="person") >= 2


def test_startup_settings_follow_each_client_across_a_shared_connection(one_connection, issuer):
    alice = psycopg.connect(one_connection.dsn("alice", options="'-c TimeZone=UTC -c search_path=public'"),
                            password=issuer.mint("alice", ["sales_emea"]), autocommit=True)
    bob = psycopg.connect(one_connection.dsn("bob", options="'-c TimeZone=Asia/Tokyo -c DateStyle=German'"),
                          password=issuer.mint("bob", ["sales_amer"]), autocommit=True)
    with alice, bob:
        assert _pid(alice) == _pid(bob)
        assert alice.info.parameter_status("TimeZone") == "UTC"  # ParameterStatus at login: their own
        assert bob.info.parameter_status("TimeZone") == "Asia/Tokyo"
        for _ in range(3):
            assert alice.execute("SELECT current_setting('TimeZone'), current_setting('DateStyle')").fetchone() == (
                "UTC", "ISO, MDY")
            assert bob.execute("SELECT current_setting('TimeZone'), current_setting('DateStyle')").fetchone() == (
                "Asia/Tokyo", "German, DMY")
        assert alice.info.parameter_status("TimeZone") == "UTC"  # the switches' reports never reach them
        assert bob.info.parameter_status("DateStyle") == "German, DMY"


def test_an_exhausted_pool_says_that_pinned_sessions_hold_it(make_proxy, issuer):
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": 1, "acquire_timeout_s": 1})
    with _alice(proxy, issuer) as alice, _bob(proxy, issuer) as bob:
        alice.execute("LISTEN alice_channel")  # pins alice to the only connection
        with pytest.raises(psycopg.OperationalError) as timed_out:
            bob.execute("SELECT 1")
        assert "1 of its connections are held by pinned sessions (LISTEN)" in str(timed_out.value)
        assert "alice" not in str(timed_out.value)  # who holds it is in the log, not told to bob
    assert "pinned: alice (LISTEN)" in proxy.log()
