"""Behind a TCP load balancer: a real HAProxy (TCP mode, PROXY v2 and v1, health checks on
/readyz) in front of pgproxy, which must see and record the real client's address and
refuse any connection on its PROXY port that does not bring a header from a trusted balancer.

Addresses make the difference visible: clients connect from 127.0.0.1, HAProxy connects to
pgproxy from 127.0.0.2 (the only trusted proxy), and plaintext logins are allowed from
127.0.0.1 only — so a plaintext login through HAProxy succeeds only if pgproxy judged the
client by the header's address, not by the balancer's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request

import psycopg
import pytest

from pgproxy.pgcluster import free_port
from pgproxy.protocol import messages as msg
from pgproxy.protocol.proxy_header import V2_SIGNATURE, v1_header, v2_header
from tests.support import certs
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import Wire, error_fields

pytestmark = pytest.mark.integration

BALANCER = "127.0.0.2"  # HAProxy's source address towards pgproxy; a loopback address of its own
ADMIN_TOKEN = "proxy-protocol-admin-token"


def _haproxy() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if found is None:
        pytest.fail("haproxy is required: install Debian's haproxy (scripts/install-deps --test)")
    return found


class FromWire(Wire):
    """A raw client connecting from a chosen loopback address (a balancer, or not)."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        Wire.opened.append(self)


class HAProxy:
    """haproxy as a child process in the foreground, with its config and stats socket in ``directory``."""

    def __init__(self, directory, pgproxy_port: int, http_port: int) -> None:
        self.v2_port, self.v1_port = free_port(), free_port()
        self.stats = directory / "haproxy.sock"
        config = directory / "haproxy.cfg"
        config.write_text(f"""
global
    maxconn 200
    stats socket {self.stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s

frontend postgres_v2
    bind 127.0.0.1:{self.v2_port}
    default_backend pgproxy_v2

frontend postgres_v1
    bind 127.0.0.1:{self.v1_port}
    default_backend pgproxy_v1

backend pgproxy_v2
    option httpchk GET /readyz
    http-check expect status 200
    server pgproxy1 127.0.0.1:{pgproxy_port} source {BALANCER} send-proxy-v2 check port {http_port} inter 300ms

backend pgproxy_v1
    server pgproxy1 127.0.0.1:{pgproxy_port} source {BALANCER} send-proxy
""")
        binary = _haproxy()
        checked = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=10)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.log_path = directory / "haproxy.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=self._log, stderr=subprocess.STDOUT)
        self._wait(lambda: self._accepts(self.v2_port) and self._accepts(self.v1_port), "HAProxy to listen")

    def _wait(self, condition, what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}: {self.log_path.read_text()}")
            if condition():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}: {self.server_state()}")

    @staticmethod
    def _accepts(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def server_state(self, backend: str = "pgproxy_v2") -> dict[str, str]:
        """The stats row of the backend's server: status (UP/DOWN), check_status (L7OK...), check_code."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                out = b""
                while chunk := sock.recv(65536):
                    out += chunk
        except OSError:
            return {}
        lines = out.decode().splitlines()
        columns = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(columns, line.split(",")))
            if row.get("pxname") == backend and row.get("svname") == "pgproxy1":
                return row
        return {}

    def wait_healthy(self) -> dict[str, str]:
        self._wait(lambda: self.server_state().get("check_status") == "L7OK", "a passing /readyz check")
        return self.server_state()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    authority = certs.TestCA(tmp_path_factory.mktemp("proxy-protocol-tls"))
    authority.server = authority.issue("localhost", ["localhost", "127.0.0.1"], stem="proxy")
    return authority


@pytest.fixture(scope="module")
def balanced(base_config, ca, tmp_path_factory):
    """One pgproxy with a plain port and a PROXY port, and HAProxy in front of the PROXY port."""
    for address in ("127.0.0.1", BALANCER):  # can this machine use a second loopback address?
        with socket.socket() as probe:
            probe.bind((address, 0))
    directory = tmp_path_factory.mktemp("proxy-protocol")
    token_file = directory / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    direct, proxied, http = free_port(), free_port(), free_port()
    cert, key = ca.server
    process = ProxyProcess(merge(base_config, {
        "server": {"listen": [f"127.0.0.1:{direct}", f"127.0.0.1:{proxied}"],
                   "proxy_protocol_listeners": [str(proxied)], "trusted_proxies": [f"{BALANCER}/32"],
                   "plaintext_networks": ["127.0.0.1/32"],
                   "tls_cert_file": str(cert), "tls_key_file": str(key)},
        "http": {"listen": f"127.0.0.1:{http}", "admin_token_file": str(token_file)}}), port=direct)
    process.proxied_port, process.http_port = proxied, http
    haproxy = HAProxy(directory, proxied, http)
    process.haproxy = haproxy
    yield process
    haproxy.stop()
    assert process.stop() == 0, process.log()[-2000:]


def _dsn(port: int, **params) -> str:
    options = {"host": "127.0.0.1", "port": port, "dbname": "demo", "user": "alice", **params}
    return " ".join(f"{k}={v}" for k, v in options.items())


def _local_port(conn: psycopg.Connection) -> int:
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return sock.getsockname()[1]


def _session_start(proxy: ProxyProcess, application: str) -> dict:
    records = proxy.audit(lambda r: r.get("event") == "session_start" and r.get("application_name") == application)
    found = [r for r in records if r.get("event") == "session_start" and r.get("application_name") == application]
    assert found, f"no session_start for {application}: {records[-5:]}"
    return found[-1]


def _admin_sessions(proxy: ProxyProcess) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{proxy.http_port}/admin/sessions",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


# --- through HAProxy ---------------------------------------------------------------

def test_haproxy_checks_readyz_and_psycopg_logs_in_with_its_own_address(balanced, issuer):
    state = balanced.haproxy.wait_healthy()
    assert state["status"] == "UP" and state["check_code"] == "200"  # /readyz answered HAProxy's check
    token = issuer.mint("alice", ["sales_emea"])
    dsn = _dsn(balanced.haproxy.v2_port, application_name="via-haproxy-v2", sslmode="disable")
    with psycopg.connect(dsn, password=token) as conn:
        assert not conn.pgconn.ssl_in_use  # plaintext: allowed for 127.0.0.1, not for the balancer
        assert conn.execute("SELECT current_user, current_setting('pgproxy.user')").fetchone() == \
            ("emea_analyst", "alice")
        client = f"127.0.0.1:{_local_port(conn)}"
        listed = [s for s in _admin_sessions(balanced) if s["application"] == "via-haproxy-v2"]
        assert [s["client"] for s in listed] == [client]
    start = _session_start(balanced, "via-haproxy-v2")
    assert start["client"] == client and start["user"] == "alice"
    assert "PROXY header accepted" in balanced.log()


def test_psql_through_haproxy_with_proxy_v1(balanced, issuer):
    token = issuer.mint("alice", ["sales_emea"])
    done = subprocess.run(["psql", "-X", "-A", "-t", "-c", "SELECT current_user",
                           _dsn(balanced.haproxy.v1_port, application_name="via-haproxy-v1", sslmode="disable")],
                          capture_output=True, text=True, env=balanced.env(token), timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "emea_analyst"
    client = _session_start(balanced, "via-haproxy-v1")["client"]
    assert client.startswith("127.0.0.1:") and not client.startswith(BALANCER)


def test_tls_and_cancel_through_haproxy(balanced, issuer, ca):
    token = issuer.mint("alice", ["sales_emea"])
    dsn = _dsn(balanced.haproxy.v2_port, application_name="via-haproxy-tls", sslmode="verify-ca",
               sslrootcert=ca.path)
    with psycopg.connect(dsn, password=token) as conn:
        assert conn.pgconn.ssl_in_use
        client = f"127.0.0.1:{_local_port(conn)}"
        # A cancel request is a connection of its own: through the balancer, with its own header.
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
        finally:
            timer.cancel()
    assert _session_start(balanced, "via-haproxy-tls")["client"] == client


# --- what the PROXY port refuses ---------------------------------------------------

def _log_after(proxy: ProxyProcess, mark: int) -> str:
    """What pgproxy logged since ``len(proxy.log())`` was ``mark`` (it logs a refusal before closing)."""
    return proxy.log()[mark:]


def _refusal(wire: Wire) -> dict[str, str]:
    reply = wire.read_message()
    assert reply is not None and reply[0] == "E", reply
    assert wire.closed_by_server()
    return error_fields(reply[1])


def test_a_header_from_an_untrusted_address_is_refused(balanced):
    mark = len(balanced.log())
    wire = FromWire(balanced.proxied_port, "127.0.0.1")  # the client itself, pretending to be a balancer
    wire.send(v2_header(("198.51.100.66", 40000), ("127.0.0.1", balanced.proxied_port))
              + msg.startup_message({"user": "alice", "database": "demo"}))
    fields = _refusal(wire)
    assert fields["C"] == "08P01" and fields["S"] == "FATAL"
    assert "trusted_proxies" not in fields["M"] and BALANCER not in fields["M"]  # vague to the client ...
    logged = _log_after(balanced, mark)
    assert "is not in server.trusted_proxies" in logged  # ... precise in the log
    assert "198.51.100.66" not in logged  # the header was never read


@pytest.mark.parametrize("first", [msg.startup_message({"user": "alice", "database": "demo"}),
                                   msg.SSL_REQUEST_PACKET, b"PROXY TCP4 198.51.100.7 127.0.0.1 40000\r\n",
                                   V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12)],  # v2 signature, version 1
                         ids=["startup", "ssl-request", "v1-short", "v2-version-1"])
def test_a_trusted_connection_without_a_valid_header_is_refused(balanced, first):
    mark = len(balanced.log())
    wire = FromWire(balanced.proxied_port, BALANCER)
    wire.send(first)
    fields = _refusal(wire)  # SSLRequest included: an ErrorResponse, not 'N'
    assert fields["C"] == "08P01"
    assert f"invalid PROXY header from {BALANCER}:" in _log_after(balanced, mark)


def test_the_plain_port_takes_no_header(balanced):
    wire = FromWire(balanced.port, BALANCER)
    wire.send(v2_header(("198.51.100.7", 40000), ("127.0.0.1", balanced.port)))
    assert _refusal(wire)["C"] == "08P01"  # a PROXY header is no startup packet


# --- what a trusted balancer's header decides --------------------------------------

def _password_prompt(stream) -> None:
    reply = stream.recv(9)
    assert reply == msg.AUTH_CLEARTEXT_PASSWORD, reply


def test_the_header_may_arrive_byte_by_byte_then_tls_and_login(balanced, issuer, ca):
    """A fabricated address from the trusted balancer is believed: it is what it says.
    Split reads, SSLRequest, TLS, login; the audit records the header's client."""
    wire = FromWire(balanced.proxied_port, BALANCER)
    for byte in v2_header(("198.51.100.7", 40000), ("127.0.0.1", balanced.proxied_port),
                          tlvs=((0x01, b"postgresql"),), checksum=True):
        wire.send(bytes([byte]))
        time.sleep(0.002)
    wire.send(msg.SSL_REQUEST_PACKET)
    assert wire.sock.recv(1) == b"S"
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = False
    with context.wrap_socket(wire.sock, server_hostname="localhost") as tls:
        tls.sendall(msg.startup_message({"user": "alice", "database": "demo",
                                         "application_name": "split-header"}))
        _password_prompt(tls)
        tls.sendall(msg.password_message(issuer.mint("alice", ["sales_emea"]).encode() + b"\0"))
        data = b""
        while b"Z\x00\x00\x00\x05" not in data:
            chunk = tls.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(msg.AUTH_OK)
    assert _session_start(balanced, "split-header")["client"] == "198.51.100.7:40000"


def test_direct_tls_right_behind_a_v1_header(balanced, ca):
    """PostgreSQL 17's direct TLS: the ClientHello follows the header in the same segment."""
    raw = socket.create_connection(("127.0.0.1", balanced.proxied_port), timeout=10, source_address=(BALANCER, 0))
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = False
    context.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    raw.sendall(v1_header(("198.51.100.8", 40001), ("127.0.0.1", balanced.proxied_port)) + outgoing.read())
    with raw:
        while True:  # finish the handshake over the raw socket
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out := outgoing.read():
                    raw.sendall(out)
                chunk = raw.recv(65536)
                assert chunk, "closed during the handshake"
                incoming.write(chunk)
        if out := outgoing.read():
            raw.sendall(out)
        assert tls.selected_alpn_protocol() == "postgresql"
        tls.write(msg.startup_message({"user": "alice", "database": "demo"}))
        raw.sendall(outgoing.read())
        reply = b""
        while len(reply) < 9:
            try:
                reply += tls.read(9 - len(reply))
            except ssl.SSLWantReadError:
                incoming.write(raw.recv(65536))
        assert reply == msg.AUTH_CLEARTEXT_PASSWORD


@pytest.mark.parametrize("header", [v2_header(local=True), b"PROXY UNKNOWN\r\n", v2_header()],
                         ids=["v2-local", "v1-unknown", "v2-unspec"])
def test_a_header_naming_no_client_keeps_the_balancers_address(balanced, header):
    """LOCAL (health checks), UNKNOWN, UNSPEC: the connection is the balancer's own — which
    plaintext_networks (127.0.0.1 only) does not allow a password from."""
    mark = len(balanced.log())
    wire = FromWire(balanced.proxied_port, BALANCER)
    wire.send(header + msg.startup_message({"user": "alice", "database": "demo"}))
    fields = _refusal(wire)
    assert fields["C"] == "28000" and "not encrypted" in fields["M"]
    assert f"plaintext login from {BALANCER}," in _log_after(balanced, mark)


def test_a_header_naming_a_client_outside_plaintext_networks(balanced):
    wire = FromWire(balanced.proxied_port, BALANCER)
    wire.send(v1_header(("198.51.100.9", 40002), ("127.0.0.1", balanced.proxied_port))
              + msg.startup_message({"user": "alice", "database": "demo"}))
    assert _refusal(wire)["C"] == "28000"
    assert "plaintext login from 198.51.100.9" in balanced.log()


def test_a_good_header_from_the_balancer_then_a_plaintext_login(balanced, issuer):
    wire = FromWire(balanced.proxied_port, BALANCER)
    wire.send(v2_header(("127.0.0.1", 40003), ("127.0.0.1", balanced.proxied_port))
              + msg.startup_message({"user": "alice", "database": "demo", "application_name": "forged-local"}))
    assert wire.read_message() == ("R", struct.pack("!i", 3))
    wire.send(msg.password_message(issuer.mint("alice", ["sales_emea"]).encode() + b"\0"))
    assert wire.read_until("ZE")[-1][0] == "Z"
    assert _session_start(balanced, "forged-local")["client"] == "127.0.0.1:40003"


def test_the_example_haproxy_config_is_valid():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    example = os.path.join(root, "conf", "haproxy.cfg")
    checked = subprocess.run([_haproxy(), "-c", "-f", example], capture_output=True, text=True, timeout=10)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = open(example).read()
    assert "send-proxy-v2" in text and "option httpchk GET /readyz" in text and text.count("\n    server ") == 3
