"""Revocation on one instance (no control database): `pgproxy admin revoke` ends a person's
sessions on every worker within a second and refuses their logins with 28000; the state
file keeps it across a restart; it ends by itself when its time is up, or when lifted;
by subject and by token id too; every revoke and its expiry is audited."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.pgcluster import free_port
from tests.support.ops import http_get, scrape, value
from tests.support.proxy import ProxyProcess, merge, on_every_worker
from tests.support.wire import error_fields, login, login_error

TOKEN = "revoke-admin-token-0123456789"


def revoke_config(tmp_path: Path, workers: int = 2) -> tuple[dict, int]:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    return {"server": {"workers": workers},
            "http": {"listen": f"127.0.0.1:{port}", "admin_token_file": str(token_file)},
            "control": {"state_file": str(tmp_path / "state.json")}}, port


def admin(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgproxy", "admin", "-c", str(proxy.config_path), *args],
                          capture_output=True, text=True, timeout=30)


def test_revoke_ends_sessions_on_every_worker_refuses_logins_survives_a_restart_and_expires(
        base_config, issuer, tmp_path):
    config, http_port = revoke_config(tmp_path)
    proxy = ProxyProcess(merge(base_config, merge(config, {"backend": {"pool_size": 10}})))
    alice, bob = issuer.mint("alice", ["sales_emea"]), issuer.mint("bob", ["sales_amer"])
    try:
        def alice_workers() -> set:
            return {int(w) for w in re.findall(r'msg="session started" .*user=alice.* worker=(\d)', proxy.log())}

        # The kernel spreads connections over the workers at random: at least 6 sessions, and
        # more until both workers have some (9 at most, within pool_size with bob's).
        wires = on_every_worker(lambda: login(proxy.port, "alice", alice)[0], proxy,
                                r'msg="session started" .*user=alice.* worker=(\d)', at_least=6, most=9)
        bob_conn = psycopg.connect(proxy.dsn("bob"), password=bob, autocommit=True)
        assert alice_workers() == {0, 1}, "alice's sessions should be on both workers"
        for wire in wires:
            wire.sock.settimeout(1.0)
        started = time.monotonic()
        done = admin(proxy, "revoke", "alice", "--for", "10s", "--reason", "laptop stolen")
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["sessions_ended"] == len(wires) and answer["workers"] == 2 and answer["shared"] is None
        for wire in wires:
            kind, body = wire.read_message()
            assert kind == "E" and error_fields(body)["C"] == "57P01"
            assert wire.closed_by_server()
        assert time.monotonic() - started < 1.0 + 1.5  # one second, plus the CLI's own start-up
        assert bob_conn.execute("SELECT current_user").fetchone() == ("amer_analyst",)  # bob carries on

        for _ in range(4):  # whichever worker takes the login
            assert login_error(proxy.port, "alice", alice)["C"] == "28000"
        assert "revoked by an operator: person 'alice'" in proxy.log()
        listing = json.loads(admin(proxy, "revocations").stdout)
        (entry,) = listing["revocations"]
        assert (entry["kind"], entry["value"], entry["reason"]) == ("person", "alice", "laptop stolen")
        samples = scrape(http_port)
        assert value(samples, "pgproxy_denials_total", reason="revoked") == 4
        assert value(samples, "pgproxy_revocations_active", kind="person") == 1  # once, not once per worker
        assert value(samples, "pgproxy_revocations_active", kind="jti") == 0
        bob_conn.close()
    finally:
        assert proxy.stop() == 0

    # A restart (same state file): still refused, until the time is up.
    proxy = ProxyProcess(merge(base_config, config))
    try:
        assert login_error(proxy.port, "alice", alice)["C"] == "28000"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            wire, replies = login(proxy.port, "alice", alice)
            wire.close()
            if replies[-1][0] == "Z":
                break
            time.sleep(0.3)
        else:
            pytest.fail("alice still refused after her revocation expired")
        records = proxy.audit(lambda r: r.get("event") == "revoke_expired")
        expired = [r for r in records if r.get("event") == "revoke_expired"]
        assert len(expired) == 1 and expired[0]["target"] == "alice" and expired[0]["kind"] == "person"
    finally:
        assert proxy.stop() == 0


def test_revoke_by_subject_and_token_id_and_lifting_it(make_proxy, issuer, tmp_path):
    config, http_port = revoke_config(tmp_path, workers=1)
    proxy = make_proxy(**config)
    stolen = issuer.mint("carol", ["sales_emea"], jti="token-1234")
    fresh = issuer.mint("carol", ["sales_emea"], jti="token-5678")
    with psycopg.connect(proxy.dsn("carol"), password=stolen, autocommit=True) as conn:
        status, body = http_get(http_port, "/admin/revoke?jti=token-1234&for=10m", "POST", TOKEN)
        assert status == 200 and json.loads(body)["sessions_ended"] == 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert login_error(proxy.port, "carol", stolen)["C"] == "28000"
    with psycopg.connect(proxy.dsn("carol"), password=fresh) as conn:  # another token of hers: fine
        assert conn.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("carol",)

    status, body = http_get(http_port, "/admin/revoke?subject=dev%7Ccarol&for=1h&reason=left", "POST", TOKEN)
    assert status == 200
    assert login_error(proxy.port, "carol", fresh)["C"] == "28000"
    rev_id = json.loads(body)["revocation"]["id"]
    done = admin(proxy, "unrevoke", "--id", rev_id)
    assert done.returncode == 0 and json.loads(done.stdout)["lifted"] == [rev_id], done.stderr
    with psycopg.connect(proxy.dsn("carol"), password=fresh) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert login_error(proxy.port, "carol", stolen)["C"] == "28000"  # the jti revocation stays

    records = proxy.audit(lambda r: r.get("event") == "unrevoke")
    revokes = [r for r in records if r.get("event") == "revoke"]
    assert [(r["kind"], r["target"]) for r in revokes] == [("jti", "token-1234"), ("subject", "dev|carol")]
    assert all(r["instance"].endswith(f":{proxy.port}") for r in revokes)
    assert [r["lifted"] for r in records if r.get("event") == "unrevoke"] == [[rev_id]]
    assert TOKEN not in proxy.audit_path.read_text() and stolen not in proxy.log()


BAD_REQUESTS = [
    "/admin/revoke?for=10m",                         # no target
    "/admin/revoke?person=a&subject=b&for=10m",      # two targets
    "/admin/revoke?person=alice",                    # no duration
    "/admin/revoke?person=alice&for=ten",
    "/admin/revoke?person=alice&for=999d",           # too long
    "/admin/revoke?person=alice&for=0",
    "/admin/revoke?person=al%0Aice&for=1m",          # not printable
    "/admin/unrevoke",
    "/admin/unrevoke?id=x&person=alice",
]


def test_bad_revoke_requests_are_refused(make_proxy, tmp_path):
    config, http_port = revoke_config(tmp_path, workers=1)
    make_proxy(**config)
    for path in BAD_REQUESTS:
        status, body = http_get(http_port, path, "POST", TOKEN)
        assert status == 400 and json.loads(body)["error"], path
    assert http_get(http_port, "/admin/revoke?person=alice&for=1m", "GET", TOKEN)[0] == 405
    assert http_get(http_port, "/admin/revoke?person=alice&for=1m", "POST", None)[0] == 401
    assert json.loads(http_get(http_port, "/admin/revocations", "GET", TOKEN)[1])["revocations"] == []
