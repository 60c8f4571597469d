"""The audit trail across rotations: SIGUSR1 and SIGHUP reopen it, logrotate (the real
binary, with conf/logrotate) rotates it, a reload moves it — and no record is lost: every
statement sent is in exactly one file, and ``pgproxy audit verify`` passes on all of them."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.support.proxy import merge, to_toml

REPO = Path(__file__).resolve().parents[2]


def fh_lines(path) -> list[bytes]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    # A live file may be read mid-append: the part after the last newline is not a record yet.
    return [line for line in data[:data.rfind(b"\n") + 1].split(b"\n") if line.strip()]


def sent_statements(*paths, marker: str) -> list[str]:
    found = []
    for path in paths:
        for line in fh_lines(path):
            record = json.loads(line)
            if record.get("event") == "statement" and marker in record.get("statement", ""):
                found.append(record["statement"])
    return found


def verify(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgproxy", "audit", "verify", *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def wait_for(predicate, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def run(conn, marker: str, start: int, count: int) -> list[str]:
    texts = [f"SELECT {i} AS {marker}" for i in range(start, start + count)]
    for text in texts:
        conn.execute(text)
    return texts


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_reopens_a_moved_file_and_never_kills(make_proxy, issuer, workers):
    proxy = make_proxy(server={"workers": workers})
    moved = proxy.dir / "audit.jsonl.1"
    sent = []
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True) as conn:
        sent += run(conn, "usr1", 0, 20)
        wait_for(lambda: len(sent_statements(proxy.audit_path, marker="usr1")) == 20, what="the first records")
        proxy.audit_path.rename(moved)
        sent += run(conn, "usr1", 20, 10)  # still written to the moved file: it is open
        proxy.process.send_signal(signal.SIGUSR1)
        wait_for(lambda: proxy.audit_path.exists() and sum(
            json.loads(line)["event"] == "audit_reopen" for line in fh_lines(proxy.audit_path)) == workers,
            what="every worker to reopen")
        sent += run(conn, "usr1", 30, 20)
        proxy.process.send_signal(signal.SIGUSR1)  # not moved again: nothing to do, and still alive
        sent += run(conn, "usr1", 50, 5)
    assert proxy.process.poll() is None, "SIGUSR1 killed pgproxy"
    assert proxy.stop() == 0
    assert sorted(sent_statements(moved, proxy.audit_path, marker="usr1")) == sorted(sent)
    last = {}
    for line in fh_lines(moved):
        record = json.loads(line)
        last[record["writer"]] = record["event"]
    assert list(last.values()) == ["audit_close"] * workers  # each worker sealed its part of the old file
    result = verify(moved, proxy.audit_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from {workers} writer" in result.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_logrotate_with_create_compress_and_postrotate_loses_no_record(make_proxy, issuer, workers):
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not Path(logrotate).exists():
        pytest.fail("logrotate is required: scripts/install-deps --test installs it")
    proxy = make_proxy(server={"workers": workers})
    shipped = (REPO / "conf" / "logrotate").read_text()
    assert "/var/lib/pgproxy/audit.jsonl {" in shipped and "systemctl kill --signal=USR1" in shipped
    config = proxy.dir / "logrotate.conf"
    config.write_text(shipped.replace("/var/lib/pgproxy/audit.jsonl", str(proxy.audit_path)).replace(
        "systemctl kill --signal=USR1 --kill-whom=main pgproxy.service", f"kill -USR1 {proxy.process.pid}"))
    sent = []
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True) as conn:
        for rotation in range(3):
            sent += run(conn, "rotated", rotation * 100, 50)
            subprocess.run([logrotate, "--force", "--state", str(proxy.dir / "logrotate.state"), str(config)],
                           check=True, timeout=60, capture_output=True)
            sent += run(conn, "rotated", rotation * 100 + 50, 50)  # while and after the workers reopen
            wait_for(lambda: proxy.audit_path.exists() and sum(
                json.loads(line)["event"] == "audit_reopen" for line in fh_lines(proxy.audit_path)) == workers,
                what="every worker to reopen")
    assert proxy.process.poll() is None
    assert proxy.stop() == 0
    rotated = [proxy.dir / "audit.jsonl.3.gz", proxy.dir / "audit.jsonl.2.gz", proxy.dir / "audit.jsonl.1"]
    assert all(p.exists() for p in rotated), sorted(p.name for p in proxy.dir.iterdir())
    files = rotated + [proxy.audit_path]
    found = sent_statements(*files, marker="rotated")
    assert len(found) == len(sent) == 300 and sorted(found) == sorted(sent)  # none lost, none twice
    result = verify(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sighup_with_a_new_audit_file_moves_the_trail(make_proxy, base_config, issuer):
    proxy = make_proxy()
    new_file = proxy.dir / "moved" / "trail.jsonl"
    new_file.parent.mkdir()
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True) as conn:
        run(conn, "moving", 0, 5)
        config = merge(base_config, {"server": {"listen": [f"127.0.0.1:{proxy.port}"]},
                                     "audit": {"file": str(new_file)}, "log": {"level": "debug"}})
        proxy.config_path.write_text(to_toml(config))
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in proxy.log(), what="the reload")
        wait_for(lambda: new_file.exists(), what="the new file")
        run(conn, "moving", 5, 5)
    assert proxy.stop() == 0
    old_events = [json.loads(line) for line in fh_lines(proxy.audit_path)]
    new_events = [json.loads(line) for line in fh_lines(new_file)]
    assert old_events[-1]["event"] == "audit_file_changed" and old_events[-1]["to"] == str(new_file)
    assert new_events[0]["event"] == "audit_file_changed" and new_events[0]["from"] == str(proxy.audit_path)
    assert sorted(sent_statements(proxy.audit_path, new_file, marker="moving")) == sorted(
        f"SELECT {i} AS moving" for i in range(10))
    result = subprocess.run([sys.executable, "-m", "pgproxy", "audit", "verify", str(proxy.audit_path),
                             str(new_file), "--public-key", str(proxy.audit_path) + ".pub"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_reload_to_an_audit_file_that_cannot_be_opened_is_rejected(make_proxy, base_config, issuer):
    proxy = make_proxy()
    config = merge(base_config, {"server": {"listen": [f"127.0.0.1:{proxy.port}"]},
                                 "audit": {"file": str(proxy.dir / "missing-dir" / "a.jsonl")}})
    proxy.config_path.write_text(to_toml(config))
    proxy.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reload rejected" in proxy.log(), what="the rejection")
    assert "audit.file: cannot open" in proxy.log()
    with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True) as conn:
        run(conn, "stays", 0, 3)
    assert proxy.stop() == 0
    assert len(sent_statements(proxy.audit_path, marker="stays")) == 3
