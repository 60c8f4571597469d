"""check_startup's listen-address probe and its one-line reasons (loopback sockets only)."""

from __future__ import annotations

import errno
import socket

import pytest

from pgproxy.supervisor import StartupError, bind_failure, probe_listen_address


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.EADDRINUSE, "Address already in use"),
     "another process already listens on 127.0.0.1:6432; stop it or choose another server.listen address"),
    (OSError(errno.EACCES, "Permission denied"),
     "no permission to listen on 127.0.0.1:6432; choose another server.listen address"),
    (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"),
     "cannot listen on 127.0.0.1:6432: no network interface of this machine has that address; fix server.listen"),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
     "cannot listen on 127.0.0.1:6432: the host name does not resolve (Name or service not known); "
     "fix server.listen"),
    (OSError(errno.EINVAL, "Invalid argument"), "cannot listen on 127.0.0.1:6432: Invalid argument; fix server.listen"),
])
def test_bind_failures_name_the_address_and_the_option(error, expected):
    assert bind_failure("server.listen", "127.0.0.1:6432", error) == expected


def test_a_privileged_port_says_what_it_needs():
    assert bind_failure("http.listen", "0.0.0.0:443", OSError(errno.EACCES, "Permission denied")) == \
        "no permission to listen on 0.0.0.0:443 (ports below 1024 need root or CAP_NET_BIND_SERVICE); " \
        "choose another http.listen address"


def test_a_free_port_probes_fine_and_stays_free():
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
    assert probe_listen_address("server.listen", f"127.0.0.1:{port}") == [("127.0.0.1", port)]
    socket.create_server(("127.0.0.1", port)).close()  # the probe does not hold it


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_someone_listens_on_is_refused_even_with_so_reuseport(reuse_port):
    """A pgproxy with several workers listens with SO_REUSEPORT, which would let a second
    one bind beside it; the probe binds without it."""
    with socket.create_server(("127.0.0.1", 0), reuse_port=reuse_port) as other:
        port = other.getsockname()[1]
        with pytest.raises(StartupError, match=f"another process already listens on 127.0.0.1:{port};"):
            probe_listen_address("server.listen", f"127.0.0.1:{port}")


def test_time_wait_connections_of_a_stopped_run_do_not_block_the_probe():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # sets SO_REUSEADDR, as pgproxy's listeners do
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's end closes first: it waits in TIME_WAIT
        client.recv(1)
        client.close()
    with socket.socket() as plain, pytest.raises(OSError) as blocked:
        plain.bind(("127.0.0.1", port))
    assert blocked.value.errno == errno.EADDRINUSE  # what the probe did before it set SO_REUSEADDR
    assert probe_listen_address("server.listen", f"127.0.0.1:{port}") == [("127.0.0.1", port)]
