"""Timeouts and limits: idle backend recycling, the auth timeout, the client limit."""

from __future__ import annotations

import time

import psycopg

from tests.support.wire import Wire, error_fields, login_error


def test_idle_backend_connections_are_closed_after_idle_timeout(make_proxy, issuer, database):
    proxy = make_proxy(backend={"idle_timeout_s": 1})
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    deadline = time.monotonic() + 10
    while database.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") != "0":
        assert time.monotonic() < deadline, "idle backend connection was not closed"
        time.sleep(0.2)
    assert "idle timeout" in proxy.log()


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
