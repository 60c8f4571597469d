"""Several worker processes behave as one proxy: both serve, cancels find their worker,
SIGTERM stops them all cleanly, and the audit trail is one file."""

from __future__ import annotations

import re
import threading
import time

import psycopg


def test_two_workers_serve_cancel_across_workers_and_stop_cleanly(make_proxy, issuer):
    proxy = make_proxy(server={"workers": 2}, backend={"pool_size": 12})  # pools are per worker
    conns = [psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True)
             for _ in range(12)]
    try:
        for conn in conns:
            assert conn.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("alice",)
        workers = set(re.findall(r'msg="session started".* worker=(\d)', proxy.log()))
        assert workers == {"0", "1"}, "the kernel should spread 12 connections over both workers"
        # libpq sends each cancel on a new connection, which may land on either worker.
        for conn in conns:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            started = time.monotonic()
            try:
                conn.execute("SELECT pg_sleep(15)")
                raise AssertionError("the query was not cancelled")
            except psycopg.errors.QueryCanceled:
                pass
            assert time.monotonic() - started < 5
        assert "cancel request passed to its worker" in proxy.log()
    finally:
        for conn in conns:
            conn.close()
    # make_proxy's teardown sends SIGTERM and asserts exit status 0 for the whole group.
    sessions = {r["session"] for r in proxy.audit(lambda r: False, timeout=0.5) if r.get("event") == "session_start"}
    assert len(sessions) == 12
