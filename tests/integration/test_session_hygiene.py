"""A returned backend connection carries nothing of the session that used it."""

from __future__ import annotations

import socket
import time

import psycopg
import pytest

from tests.support.wire import login


@pytest.fixture
def single_backend_proxy(make_proxy):
    # One backend connection: every session lands on the same one.
    return make_proxy(backend={"pool_size": 1})


def _pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_disconnect_mid_transaction_after_settings_leaves_nothing_behind(single_backend_proxy, issuer):
    proxy = single_backend_proxy
    alice = psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]))
    first_pid = _pid(alice)
    alice.execute("SET statement_timeout = '1234s'")
    alice.execute("SELECT set_config('app.custom', 'alice-was-here', false)")
    alice.execute("CREATE TEMP TABLE alice_scratch (x int)")
    alice.execute("PREPARE alice_stmt AS SELECT 1")
    alice.execute("LISTEN alice_channel")
    alice.execute("SELECT pg_advisory_lock(42)")
    alice.execute("INSERT INTO items VALUES (1001, 'uncommitted')")  # a transaction is open
    alice.pgconn.finish()  # vanish without COMMIT or Terminate's courtesy

    with psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"]), autocommit=True) as bob:
        assert _pid(bob) == first_pid, "the test needs the same backend connection"
        # alice's transaction is gone: in autocommit, bob is outside any transaction.
        assert bob.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert bob.execute("SELECT current_user, current_setting('pgproxy.user')").fetchone() == ("amer_analyst", "bob")
        assert bob.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert bob.execute("SELECT current_setting('app.custom', true)").fetchone()[0] in (None, "")
        assert bob.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
        assert bob.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)
        assert bob.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)
        assert bob.execute("SELECT to_regclass('pg_temp.alice_scratch')").fetchone() == (None,)
        assert bob.execute("SELECT count(*) FROM items WHERE id = 1001").fetchone() == (0,)
        assert bob.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_client_gone_while_a_query_runs_means_the_connection_is_not_reused(single_backend_proxy, issuer, database):
    proxy = single_backend_proxy
    wire, replies = login(proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
    assert replies[-1][0] == "Z"
    from pgproxy.protocol import messages as msg
    wire.send(msg.query("SELECT pg_sleep(30)"))
    time.sleep(0.3)
    busy_pid = int(database.psql("SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"))
    wire.sock.shutdown(socket.SHUT_RDWR)
    wire.close()
    with psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"])) as bob:
        assert _pid(bob) != busy_pid
        assert bob.execute("SELECT current_user").fetchone() == ("amer_analyst",)
    assert "client left mid-request" in proxy.log()
    # The abandoned backend was cancelled and closed, so its sleep does not hold a slot.
    assert database.backend_gone(busy_pid), "abandoned backend is still running"


def test_pool_exhaustion_gives_53300_after_the_wait_timeout(make_proxy, issuer):
    from tests.support.wire import login_error
    proxy = make_proxy(backend={"pool_size": 1, "acquire_timeout_s": 0.5})
    holder = psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]))
    try:
        error = login_error(proxy.port, "bob", issuer.mint("bob", ["sales_amer"]))
        assert error["C"] == "53300"
    finally:
        holder.close()
    with psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"])) as bob:
        assert bob.execute("SELECT 1").fetchone() == (1,)


def test_waiting_client_gets_the_connection_when_it_is_returned(make_proxy, issuer):
    import threading
    proxy = make_proxy(backend={"pool_size": 1, "acquire_timeout_s": 10})
    holder = psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]))
    threading.Timer(0.5, holder.close).start()
    started = time.monotonic()
    with psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"])) as bob:
        assert bob.execute("SELECT current_user").fetchone() == ("amer_analyst",)
    assert time.monotonic() - started >= 0.4


def test_broken_idle_backend_is_discarded_not_reused(make_proxy, issuer, database):
    proxy = make_proxy(backend={"pool_size": 2, "health_check_after_s": 0})
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as conn:
        pid = _pid(conn)
    time.sleep(0.2)
    database.psql(f"SELECT pg_terminate_backend({pid})")
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as conn:
        assert _pid(conn) != pid
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_backend_killed_mid_query_ends_only_that_session_with_a_reason(make_proxy, issuer, database):
    proxy = make_proxy(backend={"pool_size": 3})
    bystander = psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"]), autocommit=True)
    victim = psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True)
    victim_pid = _pid(victim)
    import threading
    threading.Timer(0.5, lambda: database.psql(f"SELECT pg_terminate_backend({victim_pid})")).start()
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT pg_sleep(20)")
    victim.close()
    # The statement that was running is audited under alice with the way it ended.
    records = proxy.audit(lambda r: r.get("statement") == "SELECT pg_sleep(20)")
    record = [r for r in records if r.get("statement") == "SELECT pg_sleep(20)"][-1]
    assert record["user"] == "alice" and record["outcome"] in ("error", "connection_lost")
    assert "server connection lost" in proxy.log() or "backend connection lost" in proxy.log()
    # Everyone else carries on, and the pool replaces the dead connection.
    assert bystander.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("bob",)
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as again:
        assert _pid(again) != victim_pid
    bystander.close()
