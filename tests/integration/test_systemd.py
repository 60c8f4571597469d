"""systemd integration: READY=1 only once connections are accepted; the unit file verifies."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pgproxy.pgcluster import free_port
from tests.support.proxy import ProxyProcess, merge

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_is_sent_only_after_the_port_accepts_connections(base_config, tmp_path, workers):
    notify_path = str(tmp_path / "notify.sock")
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(notify_path)
    inbox.settimeout(20)
    port = free_port()
    seen: dict = {}

    def listen_for_ready() -> None:
        messages = []
        while "READY=1" not in (message := inbox.recv(4096).decode()):
            messages.append(message)
        messages.append(message)
        try:  # at the moment READY=1 arrives, the proxy must already accept connections
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            seen["accepting"] = True
        except OSError:
            seen["accepting"] = False
        seen["ready_at"] = time.time()
        seen["messages"] = messages

    thread = threading.Thread(target=listen_for_ready, daemon=True)
    thread.start()
    proxy = ProxyProcess(merge(base_config, {"server": {"workers": workers}}),
                         env={**os.environ, "NOTIFY_SOCKET": notify_path}, port=port)
    try:
        thread.join(20)
        assert seen.get("accepting") is True, seen
        listening = [datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
                     for ts in re.findall(r"ts=(\S+) level=info logger=pgproxy.server msg=listening", proxy.log())]
        assert len(listening) == workers
        assert all(t <= seen["ready_at"] for t in listening)  # every worker listened before READY
        assert any("STATUS=" in m for m in seen["messages"])
    finally:
        assert proxy.stop() == 0
        inbox.close()


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is required (Debian's systemd package)")
    unit = (ROOT / "systemd/pgproxy.service").read_text()
    assert "Type=notify" in unit and "ExecReload=" in unit and "NoNewPrivileges=yes" in unit
    # Verify the unit as shipped, with its binary path pointed at this checkout's installation.
    installed = Path(sys.executable).parent / "pgproxy"
    (tmp_path / "pgproxy.service").write_text(unit.replace("/opt/pgproxy/bin/pgproxy", str(installed)))
    result = subprocess.run([analyze, "verify", str(tmp_path / "pgproxy.service")], capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if "pgproxy.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
