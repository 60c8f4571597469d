"""sd_notify must never block or raise, even when systemd (or a test) stops reading."""

import socket
import threading

from pgproxy.notify import sd_notify


def test_notify_does_not_block_when_the_receivers_queue_is_full(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    results = []
    sender = threading.Thread(target=lambda: results.extend(sd_notify("WATCHDOG=1") for _ in range(200)))
    sender.start()
    sender.join(5)
    try:
        assert not sender.is_alive(), "sd_notify blocked on a full notify socket"
        assert results[0] is True and results[-1] is False  # delivered while there was room, then dropped
        assert inbox.recv(64) == b"WATCHDOG=1"
    finally:
        inbox.close()


def test_notify_is_a_no_op_without_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
