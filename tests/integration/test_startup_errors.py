"""One address, one pgproxy; a start that cannot work says why in one line.

A second pgproxy on a port the first serves is refused (with several workers the
listeners use SO_REUSEPORT, which would otherwise let it take half the logins); a start
right after a busy run is not delayed by its TIME_WAIT connections; startup errors are
one log line and exit status 1, never a traceback.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import psycopg
import pytest

from pgproxy.pgcluster import free_port
from tests.support.proxy import ProxyProcess, merge, to_toml


def serve_expecting_failure(config: dict, tmp_path) -> tuple[int, list[str]]:
    """Run ``pgproxy serve`` with ``config``; its exit status and output lines."""
    path = tmp_path / "pgproxy.toml"
    path.write_text(to_toml(merge({"audit": {"file": str(tmp_path / "audit.jsonl")}, "log": {"level": "info"}},
                                  config)))
    done = subprocess.run([sys.executable, "-m", "pgproxy", "serve", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)
    return done.returncode, (done.stdout + done.stderr).splitlines()


def one_error_line(lines: list[str]) -> str:
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert len(lines) == 1 and "level=error" in lines[0], "\n".join(lines)
    return lines[0]


def logins_work(proxy: ProxyProcess, issuer, n: int = 8) -> None:
    """``n`` fresh logins through ``proxy`` (with two workers, the kernel spreads them)."""
    for _ in range(n):
        with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]),
                             autocommit=True) as conn:
            assert conn.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("alice",)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_proxy_on_a_port_in_use_is_refused_and_the_first_keeps_serving(
        make_proxy, base_config, issuer, tmp_path, workers):
    first = make_proxy(server={"workers": workers})
    code, lines = serve_expecting_failure(
        merge(base_config, {"server": {"workers": workers, "listen": [f"127.0.0.1:{first.port}"],
                                       "max_clients": 7}}),  # a different configuration
        tmp_path)
    assert code == 1
    assert (f'msg="another process already listens on 127.0.0.1:{first.port}; stop it or choose another '
            'server.listen address"') in one_error_line(lines)
    logins_work(first, issuer)
    assert "session started" in first.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_proxy_on_a_live_unix_socket_is_refused_and_a_stale_one_is_replaced(
        base_config, issuer, tmp_path, workers):
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    port = free_port()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # as a killed process leaves it
    stale.bind(str(sockets / f".s.PGSQL.{port}"))
    stale.close()
    first = ProxyProcess(merge(base_config, {"server": {"workers": workers, "unix_socket_dir": str(sockets)}}),
                         port=port)
    try:
        # Another loopback address: the TCP port is free there, the socket file is the same.
        code, lines = serve_expecting_failure(
            merge(base_config, {"server": {"workers": workers, "listen": [f"127.0.0.2:{port}"],
                                           "unix_socket_dir": str(sockets)}}),
            tmp_path)
        assert code == 1
        assert (f"another process already listens on {sockets}/.s.PGSQL.{port}; stop it or choose another "
                "server.unix_socket_dir") in one_error_line(lines)
        with psycopg.connect(host=str(sockets), port=port, user="alice", dbname="demo",
                             password=issuer.mint("alice", ["sales_emea"]), autocommit=True) as conn:
            assert conn.execute("SELECT current_setting('pgproxy.user')").fetchone() == ("alice",)
    finally:
        assert first.stop() == 0, first.log()[-2000:]


def time_wait_sockets(port: int) -> int:
    """TIME_WAIT connections whose local end is ``port``: the ones that block a plain bind."""
    out = subprocess.run(["ss", "-Htan", "state", "time-wait", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def test_two_workers_start_right_after_a_busy_single_process_stops(base_config, issuer):
    port = free_port()
    token = issuer.mint("alice", ["sales_emea"])
    first = ProxyProcess(merge(base_config, {"server": {"workers": 1}, "log": {"level": "info"}}), port=port)
    try:
        for _ in range(300):
            with psycopg.connect(first.dsn("alice"), password=token, autocommit=True) as conn:
                conn.execute("SELECT 1")
            # The proxy closes first after refusing a login: its end of the connection waits.
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(first.dsn("alice"), password="not a token", connect_timeout=5).close()
    finally:
        assert first.stop() == 0
    assert time_wait_sockets(port) > 0, "the test needs connections in TIME_WAIT on the proxy's port"
    second = ProxyProcess(merge(base_config, {"server": {"workers": 2}}), port=port)
    try:
        logins_work(second, issuer)
    finally:
        assert second.stop() == 0, second.log()[-2000:]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("override, expected", [
    ({"server": {"listen": ["192.0.2.1:6432"]}},  # TEST-NET-1: no interface here has it
     "cannot listen on 192.0.2.1:6432: no network interface of this machine has that address; fix server.listen"),
    ({"server": {"listen": ["no-such-host.invalid:6432"]}},
     "cannot listen on no-such-host.invalid:6432: the host name does not resolve"),
    ({"audit": {"file": "/nonexistent/audit.jsonl"}},
     "cannot open the audit file /nonexistent/audit.jsonl for appending: No such file or directory"),
    ({"server": {"unix_socket_dir": "/nonexistent"}},
     "cannot listen on /nonexistent/.s.PGSQL."),
    ({"server": {"tls_cert_file": "/nonexistent/cert.pem", "tls_key_file": "/nonexistent/key.pem"}},
     "server.tls_cert_file: cannot load certificate and key"),
], ids=["address-not-here", "unresolvable", "audit-file", "unix-socket-dir", "tls-files"])
def test_startup_errors_are_one_line_and_exit_1(base_config, tmp_path, workers, override, expected):
    config = merge(base_config, {"server": {"workers": workers, "listen": [f"127.0.0.1:{free_port()}"]}})
    code, lines = serve_expecting_failure(merge(config, override), tmp_path)
    assert code == 1
    if expected.startswith("server.tls"):  # a configuration error, reported as check-config does
        assert lines == [f"error: {expected}: [Errno 2] No such file or directory"]
    else:
        assert expected in one_error_line(lines)


def test_an_http_port_in_use_by_another_program_is_refused(base_config, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as other:
        address = f"127.0.0.1:{other.getsockname()[1]}"
        code, lines = serve_expecting_failure(
            merge(base_config, {"server": {"listen": [f"127.0.0.1:{free_port()}"]}, "http": {"listen": address}}),
            tmp_path)
    assert code == 1
    assert f"another process already listens on {address}; stop it or choose another http.listen address" \
        in one_error_line(lines)
