"""Several pgproxy instances act as one through the control schema: three instances on
different loopback ports share a control database (a cluster of its own, so that it can be
stopped). Terminate on A ends alice's sessions on B and C within a second; a revocation made
on B refuses logins on A and C and still holds on a restarted C; a CancelRequest sent to
another instance's port cancels the query; with the control database stopped, known
revocations hold and new logins follow control.on_unavailable, and once it is back a
revocation written straight into the table, and one made on an instance meanwhile, apply
everywhere within the sync interval. Behind HAProxy (TCP, PROXY protocol v2, a random
instance per connection) a cancelled query is cancelled whether the CancelRequest lands on
its own instance or another; a shared audit table names each record's instance."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.pgcluster import PgCluster, free_port
from pgproxy.protocol import messages as msg
from tests.support.ops import http_get
from tests.support.proxy import ProxyProcess, merge, to_toml
from tests.support.wire import Wire, error_fields, login, login_error

TOKEN = "control-admin-token-0123456789"
CONTROL_ROLE = "pgproxy_ctl"


class ControlDatabase:
    """A cluster for the control schema that a test may stop and start again."""

    def __init__(self) -> None:
        self.cluster = PgCluster().start()
        self.password = secrets.token_urlsafe(12)
        self.cluster.psql(f"CREATE ROLE {CONTROL_ROLE} LOGIN PASSWORD '{self.password}'; "
                          f"CREATE DATABASE control OWNER {CONTROL_ROLE};")

    def psql(self, sql: str) -> str:
        return self.cluster.psql(sql, database="control")

    def pg_ctl(self, action: str) -> None:
        cluster = self.cluster
        cluster._run([str(cluster.bindir / "pg_ctl"), "-D", str(cluster.data), "-l", str(cluster.dir / "postgres.log"),
                      "-m", "fast", "-w", "-t", "60", action])

    def stop(self) -> None:
        self.cluster.stop()


def control_files(tmp_path: Path, db: ControlDatabase) -> dict:
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    (tmp_path / "control-password").write_text(db.password + "\n")
    (tmp_path / "peer-secret").write_text("peer-secret-" + "x" * 40 + "\n")
    return {"admin_token": str(tmp_path / "admin-token"), "password": str(tmp_path / "control-password"),
            "peer_secret": str(tmp_path / "peer-secret")}


def instance_config(files: dict, db: ControlDatabase, name: str, peer_id: int, workers: int = 1,
                    **control) -> dict:
    return {"server": {"workers": workers},
            "http": {"listen": f"127.0.0.1:{free_port()}", "admin_token_file": files["admin_token"]},
            "control": {"database": "control", "host": "127.0.0.1", "port": db.cluster.port, "user": CONTROL_ROLE,
                        "password_file": files["password"], "sync_interval_s": 1.0, "max_staleness_s": 3.0,
                        "instance": name, "peer_id": peer_id, "peer_listen": f"127.0.0.1:{free_port()}",
                        "peer_secret_file": files["peer_secret"], "connect_timeout_s": 2.0, **control}}


def http_port(proxy: ProxyProcess) -> int:
    return int(proxy.config_path.read_text().split("[http]")[1].split('listen = "127.0.0.1:')[1].split('"')[0])


def admin(proxy: ProxyProcess, path: str) -> tuple[int, dict]:
    status, body = http_get(http_port(proxy), path, "POST" if "revocations" not in path else "GET", TOKEN)
    return status, json.loads(body)


def admin_cli(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgproxy", "admin", "-c", str(proxy.config_path), *args],
                          capture_output=True, text=True, timeout=30)


def init_schema(base_config: dict, files: dict, db: ControlDatabase, tmp_path: Path) -> None:
    config = merge(base_config, merge(instance_config(files, db, "init", 1),
                                      {"audit": {"file": str(tmp_path / "init-audit.jsonl")}}))
    path = tmp_path / "init.toml"
    path.write_text(to_toml(config))
    for _ in range(2):  # idempotent
        done = subprocess.run([sys.executable, "-m", "pgproxy", "control", "init", "-c", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def logged_in(port: int, user: str, token: str) -> bool:
    wire, replies = login(port, user, token)
    wire.close()
    return replies[-1] is not None and replies[-1][0] == "Z"


def wait_until(predicate, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture(scope="module")
def control_db():
    db = ControlDatabase()
    yield db
    db.stop()


@pytest.fixture
def three(base_config, control_db, tmp_path):
    files = control_files(tmp_path, control_db)
    init_schema(base_config, files, control_db, tmp_path)
    control_db.psql("TRUNCATE pgproxy_control.revocations; TRUNCATE pgproxy_control.instances;")
    started = []

    def start(name: str, peer_id: int, workers: int = 1, extra: dict | None = None, port: int | None = None,
              **control) -> ProxyProcess:
        config = merge(instance_config(files, control_db, name, peer_id, workers, **control), extra or {})
        proxy = ProxyProcess(merge(base_config, config), port=port)
        started.append(proxy)
        return proxy

    yield start
    for wire in list(Wire.opened):
        wire.close()
    Wire.opened.clear()
    for proxy in started:
        proxy.stop()


def test_terminate_revoke_and_restart_across_three_instances(three, control_db, issuer):
    a, b, c = three("A", 1, workers=2), three("B", 2), three("C", 3)
    alice, bob = issuer.mint("alice", ["sales_emea"]), issuer.mint("bob", ["sales_amer"])
    # Each instance's heartbeat is in the control schema.
    assert wait_until(lambda: control_db.psql("SELECT string_agg(instance || '=' || peer_id, ',' ORDER BY instance) "
                                              "FROM pgproxy_control.instances") == "A=1,B=2,C=3", 5)

    # terminate on A ends alice's sessions on B and C within a second.
    wires = [login(p.port, "alice", alice)[0] for p in (b, b, c)]
    for wire in wires:
        wire.sock.settimeout(1.0)
    started = time.monotonic()
    status, answer = admin(a, "/admin/terminate?user=alice")
    assert status == 200 and answer["shared"] is True and answer["sessions_ended"] == 0  # none on A itself
    for wire in wires:
        kind, body = wire.read_message()
        assert kind == "E" and error_fields(body)["C"] == "57P01"
        assert wire.closed_by_server()
    assert time.monotonic() - started < 1.0
    assert "sessions terminated at another instance's request" in b.log()

    # revoke bob on B: his session on A ends, his logins on A and C are refused.
    bob_on_a = login(a.port, "bob", bob)[0]
    bob_on_a.sock.settimeout(2.0)
    done = admin_cli(b, "revoke", "bob", "--for", "1m", "--reason", "incident 42")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["shared"] is True
    kind, body = bob_on_a.read_message()
    assert kind == "E" and error_fields(body)["C"] == "57P01"
    for proxy in (a, c):  # within a second of the revoke (the CLI's own start-up aside)
        assert wait_until(lambda: not logged_in(proxy.port, "bob", bob), 1.0)
        assert login_error(proxy.port, "bob", bob)["C"] == "28000"
    assert control_db.psql("SELECT kind, value, reason, origin FROM pgproxy_control.revocations "
                           "WHERE lifted_at IS NULL") == "person|bob|incident 42|B"
    assert logged_in(a.port, "alice", alice)  # terminate without --block refuses nobody

    # A restarted C still holds it.
    c.stop()
    assert control_db.psql("SELECT count(*) FROM pgproxy_control.instances WHERE instance = 'C'") == "0"
    c = three("C", 3)
    assert login_error(c.port, "bob", bob)["C"] == "28000"
    status, listing = admin(c, "/admin/revocations")
    assert status == 200 and listing["connected"] and [r["value"] for r in listing["revocations"]] == ["bob"]

    # terminate --block on C blocks alice on A; unblock on A lifts it everywhere.
    status, answer = admin(c, "/admin/terminate?user=alice&block_s=60")
    assert status == 200
    assert wait_until(lambda: not logged_in(a.port, "alice", alice) and not logged_in(b.port, "alice", alice), 2)
    assert login_error(b.port, "alice", alice)["C"] == "28000"
    status, answer = admin(a, "/admin/unblock?user=alice")
    assert status == 200 and answer["unblocked"]
    assert wait_until(lambda: logged_in(b.port, "alice", alice) and logged_in(c.port, "alice", alice), 2)

    # unrevoke on A lifts bob's revocation on B and C.
    status, answer = admin(a, "/admin/unrevoke?person=bob")
    assert status == 200 and len(answer["lifted"]) == 1
    assert wait_until(lambda: all(logged_in(p.port, "bob", bob) for p in (a, b, c)), 2)
    events = [r["event"] for r in b.audit(lambda r: r.get("event") == "revoke")]
    assert "revoke" in events
    assert "unrevoke" in [r["event"] for r in a.audit(lambda r: r.get("event") == "unrevoke")]


def cancel_request(port: int, pid: int, key: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct_cancel(pid, key))


def struct_cancel(pid: int, key: bytes) -> bytes:
    import struct
    body = struct.pack("!ii", msg.CANCEL_REQUEST, pid) + key
    return struct.pack("!i", len(body) + 4) + body


def test_a_cancel_request_sent_to_another_instance_cancels_the_query(three, issuer):
    a, b, c = three("A", 1, workers=2), three("B", 2), three("C", 3)
    alice = issuer.mint("alice", ["sales_emea"])
    time.sleep(1.5)  # one sync interval: B and C learn A's peer address from its heartbeat
    for target in (b, c, a):
        wire, replies = login(a.port, "alice", alice)
        (key_data,) = [body for kind, body in replies if kind == "K"]
        pid, key = int.from_bytes(key_data[:4], "big"), key_data[4:]
        assert pid >> 24 == 1, "A's cancel keys name instance 1"
        wire.send(msg.query("SELECT pg_sleep(30)"))
        time.sleep(0.3)
        started = time.monotonic()
        cancel_request(target.port, pid, key)
        wire.sock.settimeout(10)
        replies = wire.read_until("Z")
        errors = [error_fields(body) for kind, body in replies if kind == "E"]
        assert [e["C"] for e in errors] == ["57014"], replies
        assert time.monotonic() - started < 3
        wire.close()
    assert "cancel request forwarded to its instance" in b.log()
    assert "cancel request forwarded to its instance" in c.log()
    assert "cancel request forwarded" not in a.log()  # its own key: straight to its worker

    # A forged frame on A's peer port is refused, and does nothing.
    port = int(a.config_path.read_text().split('peer_listen = "127.0.0.1:')[1].split('"')[0])
    from pgproxy.peering import encode_frame
    wire, replies = login(a.port, "alice", alice)
    (key_data,) = [body for kind, body in replies if kind == "K"]
    pid, key = int.from_bytes(key_data[:4], "big"), key_data[4:]
    wire.send(msg.query("SELECT pg_sleep(1.5)"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode_frame(b"not-the-peer-secret-" * 2, 1, pid, key))
    wire.sock.settimeout(10)
    replies = wire.read_until("Z")
    assert not [body for kind, body in replies if kind == "E"], "a frame with a wrong MAC must not cancel"
    assert "peer cancel frame refused" in a.log() and "bad MAC" in a.log()


def test_control_database_down_known_revocations_hold_and_it_catches_up(three, control_db, issuer):
    strict = three("A", 1, on_unavailable="refuse")
    lenient = three("B", 2, on_unavailable="allow")
    carol, dave, erin = (issuer.mint(u, ["sales_emea"]) for u in ("carol", "dave", "erin"))
    status, _ = admin(strict, "/admin/revoke?person=carol&for=10m")
    assert status == 200
    assert wait_until(lambda: not logged_in(lenient.port, "carol", carol), 2)

    control_db.pg_ctl("stop")
    try:
        # Known revocations hold on both; within max_staleness_s both still let dave in.
        for proxy in (strict, lenient):
            assert login_error(proxy.port, "carol", carol)["C"] == "28000"
        assert logged_in(strict.port, "dave", dave)
        # Past max_staleness_s (3 s): refuse (fail closed) on A, allow on B.
        time.sleep(3.5)
        refused = login_error(strict.port, "dave", dave)
        assert refused["C"] == "28000" and "unavailable" in refused["M"]
        assert "the control database has not answered" in strict.log()
        assert logged_in(lenient.port, "dave", dave)
        assert login_error(lenient.port, "carol", carol)["C"] == "28000"
        # A load balancer should stop sending logins to the instance that refuses them all.
        status, body = http_get(http_port(strict), "/readyz")
        assert status == 503 and b"control database is unreachable" in body
        assert http_get(http_port(lenient), "/readyz")[0] == 200
        # A revocation made on B meanwhile holds on B at once and waits to be shared.
        status, answer = admin(lenient, "/admin/revoke?person=dave&for=10m")
        assert status == 202 and answer["shared"] is False
        assert login_error(lenient.port, "dave", dave)["C"] == "28000"
        # Lifting needs the control database (it would come back): refused, nothing lifted.
        status, _ = admin(lenient, "/admin/unrevoke?person=carol")
        assert status == 503
        assert login_error(lenient.port, "carol", carol)["C"] == "28000"
    finally:
        control_db.pg_ctl("start")

    # Back: a revocation written straight into the table applies within the sync interval
    # (1 s, plus the reconnect backoff), and B's pending one reaches A.
    control_db.psql("INSERT INTO pgproxy_control.revocations (id, kind, value, expires_at, origin) "
                    "VALUES ('by-hand-1', 'person', 'erin', now() + interval '10 minutes', 'psql')")
    assert wait_until(lambda: not logged_in(strict.port, "erin", erin) and not logged_in(lenient.port, "erin", erin),
                      12, step=0.3)
    assert wait_until(lambda: control_db.psql("SELECT count(*) FROM pgproxy_control.revocations "
                                              "WHERE value = 'dave' AND lifted_at IS NULL") == "1", 5)
    assert wait_until(lambda: not logged_in(strict.port, "dave", dave), 3)
    assert logged_in(strict.port, "alice", issuer.mint("alice", ["sales_emea"]))  # not stale any more
    status, listing = admin(lenient, "/admin/revocations")
    assert listing["connected"] and listing["pending"] == 0
    assert sorted(r["value"] for r in listing["revocations"]) == ["carol", "dave", "erin"]


def test_a_shared_audit_table_names_each_instance(three, control_db, issuer, tmp_path):
    """The PostgreSQL audit sink as the central trail: every row names its instance, by
    default <host name>:<port>, so instances on one machine stay apart."""
    from pgproxy.audit_sinks import CREATE_TABLE
    control_db.psql(f"DROP TABLE IF EXISTS pgproxy_audit; {CREATE_TABLE} GRANT INSERT ON pgproxy_audit TO {CONTROL_ROLE};")
    sink = {"type": "postgresql", "host": "127.0.0.1", "port": control_db.cluster.port, "database": "control",
            "user": CONTROL_ROLE, "password_file": str(tmp_path / "control-password")}
    a = three("", 1, extra={"audit_sinks": [sink]})
    b = three("", 2, extra={"audit_sinks": [sink]})
    alice = issuer.mint("alice", ["sales_emea"])
    for proxy in (a, b):
        with psycopg.connect(proxy.dsn("alice"), password=alice) as conn:
            conn.execute("SELECT 1").fetchall()
    names = {f"{socket.gethostname()}:{a.port}", f"{socket.gethostname()}:{b.port}"}
    query = "SELECT string_agg(DISTINCT instance, ',') FROM pgproxy_audit WHERE event = 'statement'"
    assert wait_until(lambda: set(control_db.psql(query).split(",")) == names, 10), control_db.psql(query)
    heartbeats = control_db.psql("SELECT string_agg(instance, ',') FROM pgproxy_control.instances")
    assert set(heartbeats.split(",")) == names  # the same name in heartbeats and audit rows


BALANCER = "127.0.0.3"  # HAProxy's source address: the only one the instances trust with a PROXY header


def start_haproxy(directory: Path, ports: list[int]) -> tuple[subprocess.Popen, int]:
    """HAProxy in TCP mode, PROXY protocol v2, picking an instance at random per connection."""
    import shutil
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("haproxy is required: install Debian's haproxy (scripts/install-deps --test)")
    front = free_port()
    servers = "\n".join(f"    server p{i} 127.0.0.1:{port} source {BALANCER} send-proxy-v2"
                         for i, port in enumerate(ports))
    config = directory / "haproxy.cfg"
    config.write_text(f"""
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s

frontend postgres
    bind 127.0.0.1:{front}
    default_backend pgproxy

backend pgproxy
    balance random
{servers}
""")
    log = open(directory / "haproxy.log", "wb")
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    assert wait_until(lambda: _accepts(front), 10), (directory / "haproxy.log").read_text()
    return process, front


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_a_query_cancelled_through_haproxy_is_cancelled_wherever_the_cancel_lands(three, issuer, tmp_path):
    ports = [free_port() for _ in range(3)]
    proxies = [three(name, i + 1, port=ports[i], extra={"server": {
        "listen": [f"127.0.0.1:{ports[i]}"], "proxy_protocol_listeners": [str(ports[i])],
        "trusted_proxies": [f"{BALANCER}/32"]}}) for i, name in enumerate("ABC")]
    haproxy, front = start_haproxy(tmp_path, ports)
    try:
        time.sleep(1.5)  # one sync interval: every instance knows the others' peer addresses
        alice = issuer.mint("alice", ["sales_emea"])
        cases = {"same": 0, "other": 0}
        owners = set()
        for _ in range(40):
            wire, replies = login(front, "alice", alice)
            assert replies[-1][0] == "Z", replies
            (key_data,) = [body for kind, body in replies if kind == "K"]
            pid, key = int.from_bytes(key_data[:4], "big"), key_data[4:]
            owner = proxies[(pid >> 24) - 1]
            owners.add(owner.port)
            before = [p.log().count("cancel request forwarded to its instance") for p in proxies]
            wire.send(msg.query("SELECT pg_sleep(30)"))
            time.sleep(0.2)
            started = time.monotonic()
            cancel_request(front, pid, key)
            wire.sock.settimeout(10)
            errors = [error_fields(body)["C"] for kind, body in wire.read_until("Z") if kind == "E"]
            assert errors == ["57014"] and time.monotonic() - started < 3
            wire.close()

            def forwarders_now() -> list:  # the instance the cancel landed on, when not the owner
                return [p for p, n in zip(proxies, before)
                        if p.log().count("cancel request forwarded to its instance") > n]

            wait_until(forwarders_now, 0.5)  # its log line may come just after the cancel itself
            forwarders = forwarders_now()
            assert owner not in forwarders
            cases["other" if forwarders else "same"] += 1
            if all(cases.values()) and len(owners) == 3:
                break
        assert all(cases.values()), cases  # both cases occurred, and both were cancelled
        assert len(owners) == 3, "logins through HAProxy should land on all three instances"
        start = [r for p in proxies for r in p.audit() if r.get("event") == "session_start"]
        assert start and all(r["client"].startswith("127.0.0.1:") for r in start)  # the client, not HAProxy
        assert all(r["balancer"].startswith(f"{BALANCER}:") for r in start)
        assert {r["instance"] for r in start} == set("ABC")  # each record names the instance it landed on
    finally:
        haproxy.terminate()
        haproxy.wait(10)
