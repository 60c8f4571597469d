"""pgproxy as a real process, with a config the test chooses."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pgproxy.pgcluster import free_port


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 15) -> None:
    """Until something accepts connections on loopback ``port``; fail if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def on_every_worker(open_one, proxy: "ProxyProcess", pattern: str = r'msg="session started".* worker=(\d)',
                    workers: int = 2, at_least: int = 8, most: int = 16) -> list:
    """``at_least`` connections from ``open_one()``, and more (up to ``most``) until the log
    shows sessions (``pattern``, its group the worker) on every worker. The kernel's
    SO_REUSEPORT hash decides where each lands: 8 miss one of two workers 1 time in 128."""
    opened = [open_one() for _ in range(at_least)]
    while len(opened) < most and {int(w) for w in re.findall(pattern, proxy.log())} != set(range(workers)):
        opened.append(open_one())
    return opened


def to_toml(table: dict, prefix: str = "") -> str:
    """Enough TOML for our configs: scalars, lists of scalars, tables, arrays of tables."""
    lines, tables = [], []
    for key, value in table.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            tables.extend((f"[{key}]", item) for item in value)
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + "\n"
    for key, value in tables:
        if key.startswith("["):
            name = f"{prefix}{key[1:-1]}"
            out += f"\n[[{name}]]\n" + to_toml(value, f"{name}.")
        else:
            name = f"{prefix}{key}"
            out += f"\n[{name}]\n" + to_toml(value, f"{name}.")
    return out


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class ProxyProcess:
    def __init__(self, config: dict, env: dict | None = None, port: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pgproxy-test-"))
        self.port = port or free_port()
        self.audit_path = self.dir / "audit.jsonl"
        config = merge({"server": {"listen": [f"127.0.0.1:{self.port}"]}, "audit": {"file": str(self.audit_path)},
                        "log": {"level": "debug"}}, config)
        self.config_path = self.dir / "pgproxy.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = self.dir / "pgproxy.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ if env is None else env)
        ready = None
        if "NOTIFY_SOCKET" not in env:  # else the test listens for READY=1 itself
            ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            ready.bind(str(self.dir / "notify.sock"))
            env["NOTIFY_SOCKET"] = str(self.dir / "notify.sock")
        self.process = subprocess.Popen([sys.executable, "-m", "pgproxy", "serve", "-c", str(self.config_path)],
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready(ready)
        finally:
            if ready is not None:
                ready.close()

    def _wait_ready(self, ready: socket.socket | None) -> None:
        """Until READY=1 (sent once every worker listens), or the port answers if a test
        listens for READY=1 itself."""
        try:
            if ready is None:
                wait_for_port(self.port, self.process)
                return
            ready.settimeout(0.1)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if b"READY=1" in ready.recv(4096):
                        return
                except socket.timeout:
                    pass
            raise RuntimeError("no READY=1" if self.process.poll() is None else f"exited with {self.process.returncode}")
        except RuntimeError as exc:
            raise RuntimeError(f"pgproxy did not start: {exc}: {self.log()}") from None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def audit(self, wait_for=None, timeout: float = 5.0, count: int = 1) -> list[dict]:
        """Audit records so far; with ``wait_for`` (a predicate), wait until ``count`` match
        (records are written in batches, and each worker writes its own)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.audit_path.read_text() if self.audit_path.exists() else ""
            # A read can overlap the writer's append and see half a batch: only lines
            # that have their newline are whole records yet.
            complete = text[:text.rfind("\n") + 1]
            records = [json.loads(line) for line in complete.splitlines() if line.strip()]
            if wait_for is None or sum(1 for r in records if wait_for(r)) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def dsn(self, user: str, database: str = "demo", **extra) -> str:
        parts = {"host": "127.0.0.1", "port": self.port, "user": user, "dbname": database, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def env(self, password: str, **extra) -> dict:
        return {**os.environ, "PGPASSWORD": password, **extra}
