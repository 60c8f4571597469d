"""Audit sinks deliver to real receivers: rsyslog (UDP, TCP, TLS, a Unix socket) parsing
RFC 5424 with its own parser, and a PostgreSQL table filled by COPY."""

from __future__ import annotations

import inspect
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.audit import AuditLog
from pgproxy.audit_sinks import CREATE_TABLE, build_sinks
from pgproxy.config import AuditSection, ConfigError, parse_config
from pgproxy.pgcluster import free_port, run_as, unprivileged_user
from tests.support import certs
from tests.support.proxy import wait_for_port
from tests.unit.test_audit_formats import ocsf_problems, parse_cef

BOM = "\ufeff"
# Quotes, a bracket, backslashes, a pipe, equals signs, a tab, a newline and non-ASCII: every
# escaping rule of every format at once.
HOSTILE = 'SELECT \'a"b]c\\d\' AS "x=y|z", E\'\\t\' -- café\n  FROM orders WHERE note = $1'
MALLORY = 'mal"lo]ry\\'


# --- a real rsyslog, unprivileged, on loopback ports ------------------------------------------

class Rsyslog:
    """rsyslogd with UDP, TCP, TLS and Unix-socket inputs; every message it parses is written
    as one JSON object of its RFC 5424 fields (structured data parsed by mmpstrucdata)."""

    def __init__(self, ca: certs.TestCA | None = None, tcp_port: int | None = None) -> None:
        binary = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        if not os.path.exists(binary):
            pytest.fail("rsyslogd is required: install Debian's rsyslog and rsyslog-openssl "
                        "(scripts/install-deps --test)")
        # Its own directory outside pytest's (which only we may enter): rsyslogd runs unprivileged.
        self.dir = directory = Path(tempfile.mkdtemp(prefix="pgproxy-rsyslog-"))
        self.udp_port, self.tcp_port = free_port(), tcp_port or free_port()
        self.tls_port = free_port()
        self.unix_path = directory / "log.sock"
        self.out = directory / "out.jsonl"
        tls_global, tls_input = "", ""
        if ca is not None:
            cert, key, ca_file = (Path(shutil.copy(path, directory)) for path in
                                  (*ca.issue("localhost", ["127.0.0.1", "localhost"], stem="rsyslog"), ca.path))
            tls_global = (f'global(DefaultNetstreamDriverCAFile="{ca_file}" '
                          f'DefaultNetstreamDriverCertFile="{cert}" DefaultNetstreamDriverKeyFile="{key}")')
            tls_input = (f'input(type="imtcp" address="127.0.0.1" port="{self.tls_port}" ruleset="out" '
                         'streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="anon")')
        fields = ["pri", "syslogfacility:facility", "syslogseverity:severity", "protocol-version:version",
                  "timereported:timestamp", "hostname", "app-name", "procid", "msgid", "structured-data",
                  "$!rfc5424-sd:sd", "msg", "inputname"]
        template = "\n".join(
            f'  property(outname="{f.split(":")[-1]}" name="{f.split(":")[0]}" format="jsonf"'
            + (' dateFormat="rfc3339"' if f.startswith("timereported") else "") + ")" for f in fields)
        (directory / "rsyslog.conf").write_text(f"""
global(workDirectory="{directory}" maxMessageSize="256k" net.enableDNS="off")
{tls_global}
module(load="imudp")
module(load="imtcp")
module(load="imuxsock" SysSock.Use="off")
module(load="mmpstrucdata")
template(name="fields" type="list" option.jsonf="on") {{
{template}
}}
ruleset(name="out") {{
  action(type="mmpstrucdata")
  action(type="omfile" file="{self.out}" template="fields")
}}
input(type="imudp" address="127.0.0.1" port="{self.udp_port}" ruleset="out")
input(type="imtcp" address="127.0.0.1" port="{self.tcp_port}" ruleset="out")
input(type="imuxsock" socket="{self.unix_path}" useSpecialParser="off" parseHostname="on" ignoreTimestamp="off" ruleset="out")
{tls_input}
""")
        user = unprivileged_user()
        if user is not None:
            for path in [directory, *directory.iterdir()]:
                os.chown(path, user.pw_uid, user.pw_gid)
        self._log = open(directory / "rsyslogd.log", "wb")
        self.process = subprocess.Popen([binary, "-n", "-f", str(directory / "rsyslog.conf"),
                                         "-i", str(directory / "rsyslogd.pid")],
                                        stdout=self._log, stderr=subprocess.STDOUT, **run_as(user))
        try:
            wait_for_port(self.tcp_port, self.process)
            if ca is not None:
                wait_for_port(self.tls_port, self.process)
        except RuntimeError as exc:
            raise RuntimeError(f"rsyslogd did not start: {exc}: {(directory / 'rsyslogd.log').read_text()}")

    def records(self, wait_for=lambda records: True, timeout: float = 10.0) -> list[dict]:
        """What rsyslog parsed so far; waits until ``wait_for(records)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            records = []
            if self.out.exists():
                # Only whole lines: rsyslog may be writing the last one as this reads the file.
                for line in self.out.read_text(encoding="utf-8").split("\n")[:-1]:
                    record = json.loads(line)
                    record["sd"] = json.loads(record["sd"]) if record.get("sd") else {}
                    records.append(record)
            if wait_for(records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return certs.TestCA(tmp_path_factory.mktemp("syslog-ca"))


@pytest.fixture(scope="module")
def rsyslog(ca):
    receiver = Rsyslog(ca)
    yield receiver
    receiver.stop()


def _mine(instance: str):
    return lambda r: r["sd"].get("pgproxy@32473", {}).get("instance") == instance


# --- records exactly as pgproxy writes them -------------------------------------------------

def audit_lines(tmp_path: Path, statement: str = HOSTILE) -> tuple[str, list[str]]:
    """A session's records rendered by the real AuditLog: start, a statement, its end, and an
    authentication failure of someone else. Returns (session id, lines)."""
    path = tmp_path / f"audit-{secrets.token_hex(3)}.jsonl"
    log = AuditLog(AuditSection(file=str(path)))
    session = secrets.token_hex(6)
    log.event("session_start", session=session, user="alice", role="emea_analyst", subject="sub-alice",
              issuer="https://idp.example", groups=["sales_emea"], auth_method="jwt", client="127.0.0.1:50001",
              database="demo", application_name="psql", backend_pid=77, pool_mode="session")
    log.statement(AuditLog.session_prefix({"session": session, "user": "alice", "role": "emea_analyst",
                                           "auth_method": "jwt"}),
                  statement, [b"caf\xc3\xa9", b"nul\x00byte"], ((0,), (25, 25)), [b"SELECT 3\0"],
                  time.time(), 0.0012, "ok", None, 77)
    log.event("auth_failure", session=secrets.token_hex(6), user=MALLORY, database="demo",
              client="127.0.0.1:50002", reason="token expired")
    log.event("session_end", session=session, user="alice", role="emea_analyst", reason="client sent Terminate",
              duration_s=1.5)
    log.close()
    # The writer's own seals (audit_open, audit_close) frame these four records.
    return session, [line for line in path.read_text(encoding="utf-8").splitlines() if '"event": "audit_' not in line]


MINIMAL = {"backend": {"user": "pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "pgproxy"}},
           "audit": {"file": "/dev/null"}}


def make_sinks(*rules: dict) -> list:
    """Sinks built the way pgproxy builds them: parsed and checked config, then build_sinks."""
    return build_sinks(parse_config({**MINIMAL, "audit_sinks": list(rules)}))


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- syslog ----------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["udp", "tcp", "unix"])
def test_syslog_records_reach_rsyslog_as_rfc5424(rsyslog, tmp_path, transport):
    instance = f"pgproxy-{transport}-{secrets.token_hex(2)}"
    address = str(rsyslog.unix_path) if transport == "unix" else \
        f"127.0.0.1:{rsyslog.udp_port if transport == 'udp' else rsyslog.tcp_port}"
    (sink,) = make_sinks({"type": "syslog", "transport": transport, "address": address, "instance": instance})
    session, lines = audit_lines(tmp_path)
    sink.submit(lines)
    sink.close()
    assert sink.healthy and sink.statistics()["delivered"] == 4
    got = [r for r in rsyslog.records(lambda rs: len(list(filter(_mine(instance), rs))) >= 4)
           if _mine(instance)(r)]
    assert [r["msgid"] for r in got] == ["session_start", "statement", "auth_failure", "session_end"]
    originals = [json.loads(line) for line in lines]
    for record, original, line in zip(got, originals, lines):
        assert (record["version"], record["facility"], record["app-name"], record["procid"]) == \
            ("1", "16", "pgproxy", str(os.getpid()))
        assert record["hostname"] == socket.gethostname()
        assert record["timestamp"] == original["ts"]
        message = record["msg"]
        assert message.startswith(BOM) == (not line.isascii())  # a BOM exactly when MSG is not ASCII
        assert message.removeprefix(BOM) == line  # MSG is the audit file's line, byte for byte
    start, statement, failure, _ = got
    assert (statement["severity"], failure["severity"]) == ("6", "4")  # info; warning for a refused login
    sd = statement["sd"]["pgproxy@32473"]
    assert (sd["instance"], sd["event"], sd["session"], sd["user"], sd["role"], sd["outcome"]) == \
        (instance, "statement", session, "alice", "emea_analyst", "ok")
    assert (sd["client"], sd["database"]) == ("127.0.0.1:50001", "demo")  # from the session's start
    assert failure["sd"]["pgproxy@32473"]["user"] == MALLORY  # '"', ']' and '\' escaped, then read back
    assert json.loads(statement["msg"].removeprefix(BOM))["statement"] == HOSTILE


def test_syslog_carries_ocsf_and_cef(rsyslog, tmp_path):
    instance = f"pgproxy-formats-{secrets.token_hex(2)}"
    address = f"127.0.0.1:{rsyslog.tcp_port}"
    sinks = make_sinks({"type": "syslog", "name": "ocsf", "address": address, "format": "ocsf",
                        "instance": instance},
                       {"type": "syslog", "name": "cef", "address": address, "format": "cef", "instance": instance,
                        "facility": "authpriv", "severity": "notice"})
    _, lines = audit_lines(tmp_path)
    for sink in sinks:
        sink.submit(lines)
        sink.close()
    got = [r for r in rsyslog.records(lambda rs: len(list(filter(_mine(instance), rs))) >= 8) if _mine(instance)(r)]
    ocsf = [json.loads(r["msg"].removeprefix(BOM)) for r in got if r["facility"] == "16"]
    cef = [parse_cef(r["msg"].removeprefix(BOM)) for r in got if r["facility"] == "10"]
    assert len(ocsf) == len(cef) == 4
    assert all(ocsf_problems(event) == [] for event in ocsf)
    assert [e["class_uid"] for e in ocsf] == [3002, 6005, 3002, 3002]
    statement = ocsf[1]
    assert statement["query_info"]["query_string"] == HOSTILE
    assert statement["src_endpoint"] == {"ip": "127.0.0.1", "port": 50001}
    assert statement["dst_endpoint"]["hostname"] == instance
    header, ext = cef[1]
    assert header[4] == "statement" and ext["cs1"] == HOSTILE and ext["suser"] == "alice"
    assert (ext["src"], ext["spt"], ext["dvchost"]) == ("127.0.0.1", "50001", instance)
    assert cef[2][1]["suser"] == MALLORY and cef[2][0][6] == "5"
    assert [r["severity"] for r in got if r["facility"] == "10"] == ["5", "5", "4", "5"]


def test_syslog_over_tls_verifies_the_receiver(rsyslog, ca, tmp_path):
    instance = f"pgproxy-tls-{secrets.token_hex(2)}"
    address = f"127.0.0.1:{rsyslog.tls_port}"
    stranger = certs.TestCA(tmp_path, name="some other CA")
    trusting, doubting = make_sinks(
        {"type": "syslog", "name": "tls", "transport": "tls", "address": address, "ca_file": str(ca.path),
         "instance": instance},
        {"type": "syslog", "name": "tls-wrong-ca", "transport": "tls", "address": address,
         "ca_file": str(stranger.path), "instance": instance + "-x", "timeout_s": 1.0, "on_failure": "continue"})
    _, lines = audit_lines(tmp_path)
    trusting.submit(lines)
    doubting.submit(lines)
    trusting.close()
    assert wait_until(lambda: not doubting.healthy), "a receiver we cannot verify must make the sink unhealthy"
    doubting.close()
    got = [r for r in rsyslog.records(lambda rs: len(list(filter(_mine(instance), rs))) >= 4) if _mine(instance)(r)]
    assert [r["msgid"] for r in got] == ["session_start", "statement", "auth_failure", "session_end"]
    assert all(r["inputname"] == "imtcp" for r in got)
    assert not [r for r in rsyslog.records() if _mine(instance + "-x")(r)]
    assert doubting.statistics()["delivered"] == 0 and doubting.statistics()["failures"] >= 2


def test_a_sink_is_unhealthy_while_its_receiver_is_down_and_catches_up(tmp_path):
    port = free_port()  # nothing listens here yet
    instance = f"pgproxy-outage-{secrets.token_hex(2)}"
    (sink,) = make_sinks({"type": "syslog", "address": f"127.0.0.1:{port}", "instance": instance})
    _, lines = audit_lines(tmp_path)
    sink.submit(lines)
    assert wait_until(lambda: not sink.healthy, 5)
    assert sink.statistics()["queued"] == 4 and sink.statistics()["delivered"] == 0
    receiver = Rsyslog(tcp_port=port)
    try:
        assert wait_until(lambda: sink.healthy, 15), "the sink must recover once the receiver is back"
        sink.close()
        got = receiver.records(lambda rs: len(list(filter(_mine(instance), rs))) >= 4)
        assert [r["msgid"] for r in got if _mine(instance)(r)] == \
            ["session_start", "statement", "auth_failure", "session_end"]  # nothing lost meanwhile
    finally:
        receiver.stop()


def test_a_full_queue_drops_for_that_sink_only_and_marks_it_unhealthy(tmp_path):
    (sink,) = make_sinks({"type": "syslog", "address": f"127.0.0.1:{free_port()}", "queue_size": 5,
                          "timeout_s": 0.5, "on_failure": "continue"})
    _, lines = audit_lines(tmp_path)
    started = time.monotonic()
    for _ in range(5):
        sink.submit(lines)  # 20 records for a queue of 5, receiver down
    assert time.monotonic() - started < 0.5, "submit must never wait for the receiver"
    assert not sink.healthy and sink.on_failure == "continue"
    stats = sink.statistics()
    assert stats["queued"] == 5 and stats["dropped"] == 15
    sink.close()


def test_build_sinks_names_the_key_it_cannot_load(tmp_path):
    with pytest.raises(ConfigError) as info:
        make_sinks({"type": "postgresql", "host": "127.0.0.1", "database": "a", "user": "w",
                    "password_file": str(tmp_path / "missing")},
                   {"type": "syslog", "transport": "tls", "address": "127.0.0.1:6514",
                    "ca_file": str(tmp_path / "no-ca.pem")})
    problems = info.value.problems
    assert problems[0].startswith("audit_sinks[0].password_file: cannot read") and len(problems) == 2
    assert problems[1].startswith("audit_sinks[1].ca_file:")


# --- PostgreSQL --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def audit_store(database, tmp_path_factory):
    """A central audit database with the documented table and a role that may only INSERT."""
    password = secrets.token_urlsafe(12)
    database.psql("CREATE DATABASE audit_central")
    database.psql(f"CREATE ROLE audit_writer LOGIN PASSWORD '{password}'")
    database.psql(CREATE_TABLE + "GRANT INSERT ON pgproxy_audit TO audit_writer;\n"
                  "REVOKE ALL ON SCHEMA public FROM PUBLIC; GRANT USAGE ON SCHEMA public TO audit_writer;",
                  database="audit_central")
    secret = tmp_path_factory.mktemp("audit-secret") / "password"
    secret.write_text(password + "\n")
    return {"type": "postgresql", "host": database.host, "port": database.port, "database": "audit_central",
            "user": "audit_writer", "password_file": str(secret)}


def rows(database, where: str) -> list[dict]:
    out = database.psql("SELECT json_build_object('ts', ts, 'instance', instance, 'event', event, 'user', \"user\", "
                        f"'session', session, 'record', record) FROM pgproxy_audit WHERE {where} "
                        "ORDER BY ts, (record->>'event')", database="audit_central")
    return [json.loads(line) for line in out.splitlines() if line]


def test_postgresql_sink_copies_records_from_many_instances(audit_store, database, tmp_path):
    tag = secrets.token_hex(3)
    sinks = make_sinks({**audit_store, "name": "a", "instance": f"pgproxy-a-{tag}"},
                       {**audit_store, "name": "b", "instance": f"pgproxy-b-{tag}", "format": "ocsf"})
    session, lines = audit_lines(tmp_path)
    for sink in sinks:
        sink.submit(lines)
        sink.close()
        assert sink.healthy and sink.statistics()["delivered"] == 4
    a = rows(database, f"instance = 'pgproxy-a-{tag}'")
    b = rows(database, f"instance = 'pgproxy-b-{tag}'")
    assert [r["event"] for r in a] == ["session_start", "statement", "auth_failure", "session_end"]
    originals = {json.loads(line)["event"]: json.loads(line) for line in lines}
    for row in a:
        original = originals[row["event"]]
        assert row["record"] == {**original, "instance": f"pgproxy-a-{tag}",
                                 **({"parameters": ["café", "nul\ufffdbyte"]} if row["event"] == "statement" else {})}
        assert row["user"] == original["user"] and row["session"] == original["session"]
    statement = a[1]
    assert statement["record"]["statement"] == HOSTILE and statement["session"] == session
    assert statement["ts"].replace("T", " ")[:19] == originals["statement"]["ts"].replace("T", " ")[:19]
    assert a[2]["user"] == MALLORY
    assert [r["record"]["class_uid"] for r in b] == [3002, 6005, 3002, 3002]  # format = ocsf: OCSF events
    assert all(ocsf_problems(r["record"]) == [] for r in b)
    assert b[1]["record"]["query_info"]["query_string"] == HOSTILE and b[1]["user"] == "alice"


def test_the_writer_role_cannot_read_or_change_the_trail(audit_store, database):
    with psycopg.connect(host=database.host, port=database.port, dbname="audit_central", user="audit_writer",
                         password=Path(audit_store["password_file"]).read_text().strip()) as conn:
        for sql in ("SELECT count(*) FROM pgproxy_audit", "DELETE FROM pgproxy_audit", "TRUNCATE pgproxy_audit"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
            conn.rollback()


def test_postgresql_sink_reconnects_after_its_connection_is_killed(audit_store, database, tmp_path):
    instance = f"pgproxy-reconnect-{secrets.token_hex(3)}"
    (sink,) = make_sinks({**audit_store, "instance": instance})
    _, first = audit_lines(tmp_path)
    sink.submit(first)
    assert wait_until(lambda: sink.statistics()["delivered"] == 4)
    killed = database.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE usename = 'audit_writer'")
    assert killed == "1"
    _, second = audit_lines(tmp_path)
    sink.submit(second)
    sink.close()
    assert sink.statistics()["delivered"] == 8 and sink.statistics()["failures"] >= 1
    assert len(rows(database, f"instance = '{instance}'")) == 8


def test_postgresql_sink_drops_only_a_record_the_table_refuses(audit_store, database, tmp_path):
    instance = f"pgproxy-poison-{secrets.token_hex(3)}"
    (sink,) = make_sinks({**audit_store, "instance": instance})
    _, lines = audit_lines(tmp_path)
    poison = json.dumps({"ts": "the day after tomorrow", "event": "statement", "statement": "SELECT 1"})
    sink.submit(lines[:2] + [poison] + lines[2:])
    sink.close()
    assert sink.statistics()["rejected"] == 1 and sink.statistics()["delivered"] == 5 and sink.healthy
    assert [r["event"] for r in rows(database, f"instance = '{instance}'")] == \
        ["session_start", "statement", "auth_failure", "session_end"]


def test_postgresql_sink_with_a_wrong_password_is_unhealthy(audit_store, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    (sink,) = make_sinks({**audit_store, "password_file": str(wrong), "timeout_s": 2.0})
    _, lines = audit_lines(tmp_path)
    sink.submit(lines)
    assert wait_until(lambda: not sink.healthy, 10)
    assert sink.statistics()["delivered"] == 0
    sink.close()


# --- end to end: a real pgproxy ---------------------------------------------------------

def test_a_proxy_sends_its_trail_to_syslog_and_postgresql(make_proxy, issuer, rsyslog, audit_store, database):
    if "sinks" not in inspect.signature(AuditLog).parameters:
        pytest.skip("AuditLog takes no sinks yet: ProxyServer must pass build_sinks(cfg) to it")
    instance = f"pgproxy-e2e-{secrets.token_hex(3)}"
    proxy = make_proxy(audit_sinks=[
        {"type": "syslog", "address": f"127.0.0.1:{rsyslog.tcp_port}", "instance": instance, "format": "ocsf"},
        {**audit_store, "instance": instance}])
    token = issuer.mint("alice", ["sales_emea"])
    marker = f"SELECT count(*) AS n_{secrets.token_hex(4)} FROM orders"
    done = subprocess.run(["psql", "-X", "-c", marker, proxy.dsn("alice")], capture_output=True, text=True,
                          env=proxy.env(token), timeout=30)
    assert done.returncode == 0, done.stderr
    assert proxy.stop() == 0
    events = [json.loads(r["msg"].removeprefix(BOM))
              for r in rsyslog.records(lambda rs: any(_mine(instance)(r) and r["msgid"] == "session_end"
                                                      for r in rs)) if _mine(instance)(r)]
    statement = [e for e in events if e.get("query_info", {}).get("query_string") == marker]
    assert len(statement) == 1 and ocsf_problems(statement[0]) == []
    assert statement[0]["actor"]["user"]["name"] == "alice"
    assert statement[0]["src_endpoint"]["ip"] == "127.0.0.1" and statement[0]["database"]["name"] == "demo"
    stored = rows(database, f"instance = '{instance}'")
    assert [r["record"]["statement"] for r in stored if r["event"] == "statement"] == [marker]
    assert {r["event"] for r in stored} >= {"session_start", "statement", "session_end"}
    assert token not in json.dumps(stored) and token not in json.dumps(events)
