"""Time-boxed elevation, tried as a security administrator would: grant a role to one
person for a few seconds and watch her use it and lose it on every worker; the request /
approve flow with several identities and its refusals; the audit trail, the webhook, the
metrics; grants kept across a restart."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest

from pgproxy.pgcluster import free_port
from tests.support.ops import http_get, scrape, value
from tests.support.proxy import ProxyProcess, merge, on_every_worker
from tests.support.wire import error_fields, login

TOKEN = "grants-admin-token-0123456789"
ROLE = "dba_readonly"

DBA_ROLE = f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN CREATE ROLE {ROLE} NOLOGIN; END IF;
END $$;
GRANT {ROLE} TO pgproxy_pool;
\\c demo
GRANT SELECT ON orders, items TO {ROLE};
"""


@pytest.fixture(scope="module")
def dba_role(database):
    database.psql(DBA_ROLE)
    return ROLE


def grants_config(tmp_path: Path, workers: int = 1, **grants) -> dict:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    return {"server": {"workers": workers},
            "http": {"listen": f"127.0.0.1:{free_port()}", "admin_token_file": str(token_file)},
            "grants": {"roles": [ROLE], **grants}}


def http_port(proxy: ProxyProcess) -> int:
    return int(re.search(r'listen = "127\.0\.0\.1:(\d+)"', proxy.config_path.read_text().split("[http]")[1])[1])


def call(proxy: ProxyProcess, method: str, path: str, token: str | None = TOKEN, **query) -> tuple[int, dict]:
    target = path + ("?" + urllib.parse.urlencode(query) if query else "")
    status, body = http_get(http_port(proxy), target, method, token)
    return status, json.loads(body)


def admin_cli(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgproxy", "admin", "-c", str(proxy.config_path), *args],
                          capture_output=True, text=True, timeout=30)


def current_user(proxy: ProxyProcess, user: str, token: str) -> str:
    with psycopg.connect(proxy.dsn(user), password=token, autocommit=True) as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


def wire_current_user(wire) -> str:
    from pgproxy.protocol import messages as msg
    wire.send(msg.query("SELECT current_user"))
    rows = [body for kind, body in wire.read_until("ZE") if kind == "D"]
    assert len(rows) == 1, rows
    return rows[0][6:].decode()  # one column: int16 count, int32 length, the value


def test_a_grant_lets_her_use_the_role_on_every_worker_then_her_sessions_end(base_config, issuer, dba_role,
                                                                             tmp_path):
    proxy = ProxyProcess(merge(base_config, merge(grants_config(tmp_path, workers=2), {"backend": {"pool_size": 18}})))
    alice, bob = issuer.mint("alice", ["sales_emea"]), issuer.mint("bob", ["sales_emea"])
    try:
        assert current_user(proxy, "alice", alice) == "emea_analyst"
        done = admin_cli(proxy, "grant", "alice", "--role", ROLE, "--for", "3s", "--reason", "incident 42",
                         "--approver", "carol")
        assert done.returncode == 0, done.stderr
        grant = json.loads(done.stdout)["grant"]
        assert (grant["user"], grant["role"], grant["approver"], grant["in_force"]) == ("alice", ROLE, "carol", True)
        granted_at = time.time()

        # She can: on both workers, and only she (bob in the same group keeps his mapping).
        wires = on_every_worker(lambda: login(proxy.port, "alice", alice)[0], proxy,
                                r'msg="session started" .*user=alice.*role=dba_readonly.* worker=(\d)')
        n = len(wires)
        assert [wire_current_user(w) for w in wires] == [ROLE] * n
        workers = {int(w) for w in re.findall(r'msg="session started" .*user=alice.*role=dba_readonly.* worker=(\d)',
                                              proxy.log())}
        assert workers == {0, 1}, "alice's granted sessions should be on both workers"
        assert current_user(proxy, "bob", bob) == "emea_analyst"
        status, sessions = call(proxy, "GET", "/admin/sessions", user="alice")
        assert status == 200 and len(sessions) == n and all(s["grant"] == grant["id"] for s in sessions)
        status, view = call(proxy, "GET", "/admin/grants")
        assert status == 200 and [x["id"] for x in view["grants"]] == [grant["id"]]
        samples = scrape(http_port(proxy))
        assert value(samples, "pgproxy_grants_active") == 1
        assert value(samples, "pgproxy_grant_sessions") == n

        # Then she can't: each session ends with 28000 within a second of the end.
        in_transaction = wires[0]
        from pgproxy.protocol import messages as msg
        in_transaction.send(msg.query("BEGIN; SELECT count(*) FROM items"))  # what the role may read
        assert in_transaction.read_until("ZE")[-1] == ("Z", b"T")
        print(f"in force for {time.time() - granted_at:.2f} s of 3 when checked")
        for wire in wires:
            wire.sock.settimeout(5)
            kind, body = wire.read_message()
            fields = error_fields(body)
            assert kind == "E" and fields["C"] == "28000" and fields["S"] == "FATAL"
            assert fields["M"] == 'your temporary access to role "dba_readonly" has ended'
            assert wire.closed_by_server()
        assert time.time() - granted_at < 3 + 1.5
        assert current_user(proxy, "alice", alice) == "emea_analyst"  # a new login maps as before
        status, view = call(proxy, "GET", "/admin/grants")
        assert view["grants"] == []

        proxy.audit(lambda r: r.get("event") == "grant" and r.get("action") == "expired")
        records = proxy.audit(lambda r: r.get("event") == "session_end" and r.get("role") == ROLE, count=8)
        granted = [r for r in records if r.get("event") == "grant" and r["action"] == "granted"]
        expired = [r for r in records if r.get("event") == "grant" and r["action"] == "expired"]
        assert len(granted) == 1 and len(expired) == 1
        for record in granted + expired:
            assert (record["user"], record["role"], record["reason"], record["approver"], record["requester"]) == \
                ("alice", ROLE, "incident 42", "carol", "admin")
            assert record["start"] == grant["start"] and record["end"] == grant["end"]
        assert granted[0]["client"] == "127.0.0.1"
        ended = [r for r in records if r.get("event") == "session_end" and r["role"] == ROLE]
        assert len(ended) == n and all(f"grant {grant['id']}" in r["reason"] for r in ended)
        samples = scrape(http_port(proxy))
        assert value(samples, "pgproxy_grants_total", event="granted") == 1
        assert value(samples, "pgproxy_grants_total", event="expired") == 1
        assert value(samples, "pgproxy_grant_sessions_ended_total") == n
        assert value(samples, "pgproxy_grants_active") == 0
        assert TOKEN not in proxy.log() and alice not in proxy.log()
    finally:
        assert proxy.stop() == 0


class Webhook:
    """A chat tool's incoming webhook: records what pgproxy POSTs."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, event: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.received if m["event"] == event]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no {event} webhook: {self.received}")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_person_requests_and_another_approves_with_their_own_tokens(base_config, issuer, dba_role, tmp_path):
    hook = Webhook()
    dead_hook = f"http://127.0.0.1:{free_port()}/nothing-listens"
    proxy = ProxyProcess(merge(base_config, grants_config(tmp_path, approver_groups=["dba_approvers"],
                                                          webhook_url=hook.url, webhook_timeout_s=2)))
    alice = issuer.mint("alice", ["sales_emea"])
    bob = issuer.mint("bob", ["sales_amer", "dba_approvers"])     # an approver
    carol = issuer.mint("carol", ["sales_emea", "dba_approvers"])  # an approver too
    mallory = issuer.mint("mallory", ["sales_amer"])               # not one
    try:
        # People use their own IdP token, not the admin token.
        assert call(proxy, "POST", "/access/requests", token=None, role=ROLE, reason="x", **{"for": "60"})[0] == 401
        assert call(proxy, "POST", "/access/requests", token="not-a-token", role=ROLE, reason="x",
                    **{"for": "60"})[0] == 401
        assert call(proxy, "POST", "/access/requests", token=issuer.mint("alice", ["sales_emea"], ttl_s=-120),
                    role=ROLE, reason="x", **{"for": "60"})[0] == 401  # expired
        assert call(proxy, "POST", "/access/requests", token=TOKEN, role=ROLE, reason="x", **{"for": "60"})[0] == 401
        assert call(proxy, "POST", "/admin/grants", token=alice, user="alice", role=ROLE, reason="x",
                    **{"for": "60"})[0] == 401  # nor can a person use the admin API
        status, bad = call(proxy, "POST", "/access/requests", token=alice, role="postgres", reason="x",
                           **{"for": "60"})
        assert status == 400 and "grants.roles" in bad["error"]
        assert call(proxy, "POST", "/access/requests", token=alice, role=ROLE, reason="x",
                    **{"for": "soon"})[0] == 400

        status, filed = call(proxy, "POST", "/access/requests", token=alice, role=ROLE,
                             reason="INC-7: read the orders", **{"for": "10m"})
        assert status == 200, filed
        request = filed["request"]
        assert (request["requester"], request["role"], request["state"], request["duration_s"]) == \
            ("alice", ROLE, "pending", 600)
        message = hook.wait_for("access_request.filed")
        assert message["request"]["id"] == request["id"] and "alice asks for role dba_readonly" in message["text"]
        status, own = call(proxy, "POST", "/access/requests", token=carol, role=ROLE, reason="mine",
                           **{"for": "1m"})
        assert status == 200

        # Refused: a non-approver, the requester herself (an approver), the wrong method.
        status, refused = call(proxy, "POST", "/access/requests/approve", token=mallory, id=request["id"])
        assert status == 403 and "not an approver" in refused["error"]
        status, refused = call(proxy, "POST", "/access/requests/approve", token=carol, id=own["request"]["id"])
        assert status == 403 and "your own" in refused["error"]
        assert call(proxy, "GET", "/access/requests/approve", token=bob, id=request["id"])[0] == 405
        assert call(proxy, "POST", "/access/requests/approve", token=bob, id="r-000000000000")[0] == 404
        assert current_user(proxy, "alice", alice) == "emea_analyst"  # nothing granted yet

        # What each sees: alice her own request, an approver every waiting one.
        status, mine = call(proxy, "GET", "/access/requests", token=alice)
        assert status == 200 and [r["id"] for r in mine["requests"]] == [request["id"]]
        status, waiting = call(proxy, "GET", "/access/requests", token=bob)
        assert {r["id"] for r in waiting["requests"]} == {request["id"], own["request"]["id"]}

        status, approved = call(proxy, "POST", "/access/requests/approve", token=bob, id=request["id"],
                                reason="ok for INC-7")
        assert status == 200, approved
        assert approved["request"]["state"] == "approved" and approved["grant"]["approver"] == "bob"
        assert current_user(proxy, "alice", alice) == ROLE
        assert current_user(proxy, "mallory", mallory) == "amer_analyst"
        status, again = call(proxy, "POST", "/access/requests/approve", token=carol, id=request["id"])
        assert status == 409
        status, denied = call(proxy, "POST", "/access/requests/deny", token=bob, id=own["request"]["id"],
                              reason="not today")
        assert status == 200 and denied["request"]["state"] == "denied" and "grant" not in denied
        assert current_user(proxy, "carol", carol) == "emea_analyst"
        message = hook.wait_for("access_request.approved")
        assert message["grant"]["user"] == "alice" and "bob approved alice's request" in message["text"]
        hook.wait_for("access_request.denied")

        status, view = call(proxy, "GET", "/admin/grants")
        assert status == 200 and [(x["user"], x["requester"], x["approver"]) for x in view["grants"]] == \
            [("alice", "alice", "bob")]
        assert view["requests"] == []  # none waiting
        listing = admin_cli(proxy, "grants")
        assert listing.returncode == 0 and "alice" in listing.stdout and "INC-7" in listing.stdout

        # The trail names requester, approver, reason and times; refusals too.
        records = proxy.audit(lambda r: r.get("event") == "access_request" and r.get("action") == "denied")
        trail = [r for r in records if r.get("event") in ("access_request", "grant")]
        by_action = {}
        for r in trail:
            by_action.setdefault((r["event"], r["action"]), []).append(r)
        (filed_rec,) = [r for r in by_action[("access_request", "filed")] if r["request"] == request["id"]]
        assert (filed_rec["requester"], filed_rec["reason"], filed_rec["role"]) == ("alice", "INC-7: read the orders",
                                                                                   ROLE)
        (approved_rec,) = by_action[("access_request", "approved")]
        assert (approved_rec["requester"], approved_rec["approver"], approved_rec["decision_reason"]) == \
            ("alice", "bob", "ok for INC-7")
        assert approved_rec["start"] == approved["grant"]["start"] and approved_rec["end"] == approved["grant"]["end"]
        (granted_rec,) = by_action[("grant", "granted")]
        assert (granted_rec["user"], granted_rec["requester"], granted_rec["approver"], granted_rec["source"],
                granted_rec["reason"]) == ("alice", "alice", "bob", "request", "INC-7: read the orders")
        refusals = {(r["actor"], r["attempted"]) for r in by_action[("access_request", "refused")]}
        assert {("mallory", "approve"), ("carol", "approve")} <= refusals
        log = proxy.log() + proxy.audit_path.read_text()
        assert not any(t in log for t in (alice, bob, carol, mallory, TOKEN))
        samples = scrape(http_port(proxy))
        assert value(samples, "pgproxy_access_requests_total", result="filed") == 2
        assert value(samples, "pgproxy_access_requests_total", result="approved") == 1
        assert value(samples, "pgproxy_access_requests_total", result="denied") == 1
        assert value(samples, "pgproxy_access_requests_total", result="refused") >= 3
        assert value(samples, "pgproxy_access_requests_pending") == 0
    finally:
        assert proxy.stop() == 0
        hook.stop()

    # A webhook that does not answer delays nothing and is only logged.
    proxy = ProxyProcess(merge(base_config, grants_config(tmp_path, approver_groups=["dba_approvers"],
                                                          webhook_url=dead_hook, webhook_timeout_s=1)))
    try:
        started = time.monotonic()
        assert call(proxy, "POST", "/access/requests", token=mallory, role=ROLE, reason="x", **{"for": "1m"})[0] == 200
        assert time.monotonic() - started < 1
        deadline = time.monotonic() + 5
        while "grants webhook failed" not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "grants webhook failed" in proxy.log()
    finally:
        assert proxy.stop() == 0


def test_grants_survive_a_restart_and_end_early_on_request(base_config, issuer, dba_role, tmp_path):
    state_file = tmp_path / "grants-state.json"
    config = merge(base_config, grants_config(tmp_path, state_file=str(state_file)))
    alice = issuer.mint("alice", ["sales_emea"])
    proxy = ProxyProcess(config)
    try:
        status, made = call(proxy, "POST", "/admin/grants", user="alice", role=ROLE, reason="restart test",
                            **{"for": "5m"})
        assert status == 200
    finally:
        assert proxy.stop() == 0
    proxy = ProxyProcess(config)
    try:
        assert current_user(proxy, "alice", alice) == ROLE
        status, view = call(proxy, "GET", "/admin/grants")
        assert [x["id"] for x in view["grants"]] == [made["grant"]["id"]]
        wire = login(proxy.port, "alice", alice)[0]
        assert wire_current_user(wire) == ROLE
        done = admin_cli(proxy, "end-grant", made["grant"]["id"])
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["sessions_ended"] == 1
        kind, body = wire.read_message()
        assert kind == "E" and error_fields(body)["C"] == "28000"
        assert current_user(proxy, "alice", alice) == "emea_analyst"
        assert call(proxy, "POST", "/admin/grants/end", id=made["grant"]["id"])[0] == 409
        records = proxy.audit(lambda r: r.get("event") == "grant" and r.get("action") == "ended")
        (ended,) = [r for r in records if r.get("event") == "grant" and r["action"] == "ended"]
        assert ended["ended_by"] == "admin" and ended["sessions_ended"] == 1 and ended["reason"] == "restart test"
        session_end = [r for r in records if r.get("event") == "session_end" and r["role"] == ROLE]
        assert session_end and "ended by an operator" in session_end[-1]["reason"]
    finally:
        assert proxy.stop() == 0

    # A state file that cannot be read stops the start, naming it.
    state_file.write_text("{garbage")
    failed = subprocess.run([sys.executable, "-m", "pgproxy", "serve", "-c", str(proxy.config_path)],
                            capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1
    assert "grants.state_file" in failed.stderr and str(state_file) in failed.stderr
