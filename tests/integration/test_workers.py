"""Several worker processes behave as one proxy: both serve, cancels find their worker,
SIGTERM stops them all cleanly, and the audit trail is one file."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import psycopg

from tests.support.proxy import ProxyProcess, merge


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


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_end_when_their_supervisor_is_killed(base_config, issuer):
    """kill -9 of the supervisor (an operator, the OOM killer) must not leave orphan
    workers serving on the port, holding backends and heartbeating as the instance."""
    proxy = ProxyProcess(merge(base_config, {"server": {"workers": 2}}))
    try:
        workers = children(proxy.process.pid)
        assert len(workers) == 2
        conn = psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True)
        conn.execute("SELECT 1").fetchall()
        os.kill(proxy.process.pid, signal.SIGKILL)
        proxy.process.wait(5)
        conn.close()
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), "a worker outlived its supervisor"
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            raise AssertionError("something still listens on the proxy's port")
        except ConnectionRefusedError:
            pass
        assert "shutting down" in proxy.log()  # the workers stopped as on SIGTERM, not cut off
    finally:
        proxy.stop()
