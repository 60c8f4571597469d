"""The operations port: metrics summed over workers, health and readiness, the admin API
and CLI (list, terminate a person across workers within a second, block), the watchdog."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.metrics import SERIES
from pgproxy.pgcluster import free_port
from tests.support.ops import http_get, scrape, value
from tests.support.proxy import ProxyProcess, merge, on_every_worker
from tests.support.wire import error_fields, login, login_error

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-admin-token-0123456789"


def ops_config(tmp_path: Path, workers: int, **extra) -> dict:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    http_port = free_port()
    return merge({"server": {"workers": workers},
                  "http": {"listen": f"127.0.0.1:{http_port}", "admin_token_file": str(token_file)}}, extra)


def http(proxy: ProxyProcess, path: str, method: str = "GET", token: str | None = TOKEN) -> tuple[int, bytes]:
    return http_get(proxy_http_port(proxy), path, method, token)


def proxy_http_port(proxy: ProxyProcess) -> int:
    return int(re.search(r'listen = "127\.0\.0\.1:(\d+)"', proxy.config_path.read_text().split("[http]")[1])[1])


def scrape_proxy(proxy: ProxyProcess) -> dict[tuple, float]:
    return scrape(proxy_http_port(proxy))


def admin_cli(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgproxy", "admin", "-c", str(proxy.config_path), *args],
                          capture_output=True, text=True, timeout=30)


def test_metrics_sum_both_workers_and_cover_every_declared_series(base_config, issuer, tmp_path):
    proxy = ProxyProcess(merge(base_config, ops_config(tmp_path, workers=2, backend={"pool_size": 16})))
    token = issuer.mint("alice", ["sales_emea"])
    conns = []
    try:
        assert http(proxy, "/healthz", token=None) == (200, b"ok\n")
        status, body = http(proxy, "/readyz", token=None)
        assert (status, json.loads(body)) == (200, {"ready": True, "problems": []})
        conns = on_every_worker(lambda: psycopg.connect(proxy.dsn("alice"), password=token, autocommit=True), proxy)
        n = len(conns)
        for i, conn in enumerate(conns):
            conn.execute("SELECT 1").fetchall()
            conn.execute("INSERT INTO items VALUES (%s, 'metric') ON CONFLICT DO NOTHING", (9000 + i,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conns[0].execute("SELECT * FROM no_such_table")
        assert login_error(proxy.port, "alice", issuer.mint("mallory", ["sales_emea"]))["C"] == "28P01"
        assert login_error(proxy.port, "alice", token, options="-c role=other_role")["C"] == "42501"
        assert login_error(proxy.port, "carol", issuer.mint("carol", ["nobody"]))["C"] == "28000"

        samples = scrape_proxy(proxy)
        workers_seen = {int(w) for w in re.findall(r'msg="session started".* worker=(\d)', proxy.log())}
        assert workers_seen == {0, 1}, "the kernel should spread the connections over both workers"
        assert value(samples, "pgproxy_workers") == 2
        # Counted in both workers, summed here.
        assert value(samples, "pgproxy_statements_total", **{"class": "READ", "outcome": "ok"}) >= n
        assert value(samples, "pgproxy_statements_total", **{"class": "WRITE", "outcome": "ok"}) == n
        assert value(samples, "pgproxy_statements_total", **{"class": "READ", "outcome": "error"}) == 1
        assert value(samples, "pgproxy_statement_duration_seconds_count", **{"class": "WRITE"}) == n
        assert value(samples, "pgproxy_client_connections", state="idle") == n
        assert value(samples, "pgproxy_backend_connections", database="demo", state="in_use") == n
        assert value(samples, "pgproxy_pool_wait_seconds_count", database="demo") >= 8
        # carol authenticates (ok) but no rule maps her to a role: a denial, not a failed login.
        # (n is 8, or more when the kernel put the first 8 on one worker: 1 time in 128)
        assert value(samples, "pgproxy_auth_attempts_total", method="jwt", result="ok") == n + 1
        assert value(samples, "pgproxy_auth_attempts_total", method="jwt", result="failed") == 1
        assert value(samples, "pgproxy_denials_total", reason="startup_parameter") == 1
        assert value(samples, "pgproxy_denials_total", reason="not_authorized") == 1
        assert value(samples, "pgproxy_jwks_refreshes_total", result="ok") == 2  # each worker loads the keys
        assert value(samples, "pgproxy_audit_records_total") > 0
        names = {name for name, _ in samples}
        for name, (kind, *_rest) in SERIES.items():
            if name == "pgproxy_directory_request_seconds":
                continue  # needs a directory: tests/integration/test_ldap.py checks it
            if name in ("pgproxy_pins", "pgproxy_identity_switches"):
                continue  # transaction pooling: test_transaction_pooling.py checks them
            expected = {"counter": f"{name}_total", "histogram": f"{name}_count"}.get(kind, name)
            assert expected in names, f"{expected} is declared but not exposed"
        assert token not in proxy.log()
    finally:
        for conn in conns:
            conn.close()
        assert proxy.stop() == 0


def test_readyz_names_what_is_missing_and_healthz_stays_up(base_config, tmp_path):
    dead = free_port()
    proxy = ProxyProcess(merge(base_config, ops_config(
        tmp_path, workers=1, backend={"port": dead, "connect_timeout_s": 1.0},
        auth={"jwt": {"issuer": f"http://127.0.0.1:{free_port()}", "http_timeout_s": 1.0}})))
    try:
        assert http(proxy, "/healthz", token=None)[0] == 200
        status, body = http(proxy, "/readyz", token=None)
        assert status == 503
        assert json.loads(body)["problems"] == ["the IdP's signing keys are not loaded", "cannot log in to PostgreSQL"]
        assert "readiness: cannot log in to PostgreSQL" in proxy.log()
    finally:
        assert proxy.stop() == 0


def test_terminate_ends_every_session_of_a_person_across_workers_within_a_second(base_config, issuer, tmp_path):
    proxy = ProxyProcess(merge(base_config, ops_config(tmp_path, workers=2, backend={"pool_size": 18})))
    alice, bob = issuer.mint("alice", ["sales_emea"]), issuer.mint("bob", ["sales_amer"])
    try:
        alice_wires = on_every_worker(lambda: login(proxy.port, "alice", alice, application_name="notebook")[0],
                                      proxy, r'msg="session started" .*user=alice.* worker=(\d)')
        n = len(alice_wires)
        bob_conn = psycopg.connect(proxy.dsn("bob"), password=bob, autocommit=True)
        assert {int(w) for w in re.findall(r'msg="session started" .*user=alice.* worker=(\d)', proxy.log())} \
            == {0, 1}, "alice's sessions should be on both workers"

        listing = admin_cli(proxy, "sessions", "alice")
        assert listing.returncode == 0, listing.stderr
        rows = [line.split() for line in listing.stdout.splitlines()[1:]]
        assert len(rows) == n and all(r[0] == "alice" and r[1] == "emea_analyst" and r[3] == "notebook"
                                      for r in rows), listing.stdout
        status, body = http(proxy, "/admin/sessions")
        assert status == 200 and sorted(s["user"] for s in json.loads(body)) == ["alice"] * n + ["bob"]

        for wire in alice_wires:
            wire.sock.settimeout(1.0)
        started = time.monotonic()
        done = admin_cli(proxy, "terminate", "alice", "--block", "60")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["sessions_ended"] == n
        for wire in alice_wires:
            kind, body = wire.read_message()
            assert kind == "E" and error_fields(body)["C"] == "57P01"
            assert wire.closed_by_server()
        assert time.monotonic() - started < 1.0 + 1.0  # one second, plus the CLI's own start-up
        assert bob_conn.execute("SELECT current_user").fetchone() == ("amer_analyst",)  # bob carries on

        refused = login_error(proxy.port, "alice", alice)
        assert refused["C"] == "28000"
        samples = scrape_proxy(proxy)
        assert value(samples, "pgproxy_auth_attempts_total", method="jwt", result="refused") == 1
        assert value(samples, "pgproxy_denials_total", reason="blocked") == 1
        assert value(samples, "pgproxy_admin_terminations_total") == n
        assert admin_cli(proxy, "unblock", "alice").returncode == 0
        with psycopg.connect(proxy.dsn("alice"), password=alice) as conn:
            assert conn.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("alice",)

        records = proxy.audit(lambda r: r.get("event") == "admin_unblock")
        action = [r for r in records if r.get("event") == "admin_terminate"]
        assert len(action) == 1 and action[0]["target_user"] == "alice" and action[0]["sessions_ended"] == n
        ended = [r for r in records if r.get("event") == "session_end" and r["user"] == "alice"]
        assert sum("terminated by an operator" in r["reason"] for r in ended) == n
        assert TOKEN not in proxy.log() and TOKEN not in proxy.audit_path.read_text()
        bob_conn.close()
    finally:
        assert proxy.stop() == 0


def test_admin_api_needs_the_token_and_is_off_without_one(base_config, tmp_path):
    proxy = ProxyProcess(merge(base_config, ops_config(tmp_path, workers=1)))
    try:
        assert http(proxy, "/admin/sessions", token=None)[0] == 401
        assert http(proxy, "/admin/sessions", token="wrong-token-wrong-token")[0] == 401
        assert http(proxy, "/admin/terminate?user=alice", method="GET")[0] == 405
        assert http(proxy, "/admin/terminate", method="POST")[0] == 400
        assert http(proxy, "/admin/sessions")[0] == 200
        assert "wrong-token" not in proxy.log()
    finally:
        assert proxy.stop() == 0
    config = ops_config(tmp_path, workers=1)
    del config["http"]["admin_token_file"]
    proxy = ProxyProcess(merge(base_config, config))
    try:
        status, body = http(proxy, "/admin/sessions")
        assert status == 403 and b"admin API is off" in body
        assert http(proxy, "/metrics", token=None)[0] == 200
    finally:
        assert proxy.stop() == 0


def test_watchdog_restarts_a_stuck_worker_and_keeps_telling_systemd(base_config, issuer, tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(notify_path)
    inbox.settimeout(10)
    proxy = ProxyProcess(merge(base_config, {"server": {"workers": 2}}),
                         env={**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000"})
    try:
        # The port answers as soon as one worker listens: wait until both are ready, or the
        # worker we stop may be one the supervisor is still waiting for.
        while b"READY=1" not in inbox.recv(4096):
            pass
        children = Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children").read_text().split()
        stuck = int(children[0])
        os.kill(stuck, signal.SIGSTOP)  # an event loop that no longer runs
        deadline = time.monotonic() + 10
        watchdog_pings = 0
        while time.monotonic() < deadline and "worker died; restarting it" not in proxy.log():
            watchdog_pings += inbox.recv(4096) == b"WATCHDOG=1"
        assert "worker does not answer; killing it" in proxy.log()
        assert "worker died; restarting it" in proxy.log()
        assert watchdog_pings >= 2
        time.sleep(1)
        for _ in range(6):  # both workers serve again
            with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"])) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        assert proxy.stop() == 0
        inbox.close()


def test_a_worker_that_cannot_stop_is_killed_after_the_shutdown_timeout(base_config, tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(notify_path)
    inbox.settimeout(10)
    proxy = ProxyProcess(merge(base_config, {"server": {"workers": 2, "shutdown_timeout_s": 1.0}}),
                         env={**os.environ, "NOTIFY_SOCKET": notify_path})
    try:
        while b"READY=1" not in inbox.recv(4096):
            pass
        children = Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGSTOP)
        started = time.monotonic()
        code = proxy.stop(timeout=30)
        assert time.monotonic() - started < 15
        assert code == 1  # the supervisor reports that a worker had to be killed
        assert "worker did not stop in time; killing it" in proxy.log()
    finally:
        inbox.close()
