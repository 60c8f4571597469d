"""Timeouts and limits: idle backend recycling, the auth timeout, the client limit."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.support.wire import Wire, error_fields, login_error


@pytest.mark.parametrize("setting, log_reason", [("idle_timeout_s", "idle timeout"),
                                                 ("lifetime_s", "lifetime reached")])
def test_backend_connections_are_recycled(make_proxy, issuer, database, setting, log_reason):
    proxy = make_proxy(backend={setting: 1})
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert database.backend_gone(pid), f"backend connection outlived {setting}"
    assert log_reason in proxy.log()


def test_silent_client_is_dropped_after_the_auth_timeout(make_proxy):
    proxy = make_proxy(server={"auth_timeout_s": 0.5})
    wire = Wire(proxy.port)
    kind, body = wire.read_message()
    assert kind == "E" and error_fields(body)["C"] == "08006"
    assert wire.closed_by_server()
    wire.close()


def test_clients_over_max_clients_get_53300(make_proxy, issuer):
    proxy = make_proxy(server={"max_clients": 1})
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])):
        assert login_error(proxy.port, "bob", issuer.mint("bob", ["sales_amer"]))["C"] == "53300"


def test_unresponsive_idle_backend_fails_its_health_check_and_is_replaced(make_proxy, issuer, database):
    import os
    import signal

    if not database.local_processes:
        pytest.skip("needs PostgreSQL backends running on this machine, to stop one with SIGSTOP")
    proxy = make_proxy(backend={"health_check_after_s": 0, "connect_timeout_s": 1})
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as conn:
        stuck = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    time.sleep(0.3)  # returned and reset
    os.kill(stuck, signal.SIGSTOP)  # its socket stays open: only a health check can tell
    try:
        started = time.monotonic()
        with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as conn:
            assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != stuck
        assert time.monotonic() - started < 10
        assert "health check failed" in proxy.log()
    finally:
        os.kill(stuck, signal.SIGCONT)
