"""The audit trail fails closed and keeps what clients saw succeed, tried as an operator would:
a full device, a filesystem that fills up and frees again, kill -9 under load with
durability = "before_result". The truth is read in the database: a table whose rows record
who inserted them, compared with the trail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from tests.support.proxy import ProxyProcess, merge

TABLE = "audit_truth"


@pytest.fixture(scope="module")
def truth(database):
    database.psql(f"""
        CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, who text DEFAULT current_user,
                                           person text DEFAULT current_setting('pgproxy.user', true));
        GRANT SELECT, INSERT ON {TABLE} TO emea_analyst, amer_analyst;""", database="demo")
    yield
    database.psql(f"DROP TABLE {TABLE}", database="demo")


def _rows(database, prefix: str) -> dict[str, tuple[str, str]]:
    out = database.psql(f"SELECT id, who, person FROM {TABLE} WHERE id LIKE '{prefix}%'", database="demo")
    return {line.split("|")[0]: tuple(line.split("|")[1:]) for line in out.splitlines() if line}


def _records(paths) -> list[dict]:
    records = []
    for path in paths:
        for line in open(path, encoding="utf-8", errors="replace"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a torn line (reported by audit verify)
    return records


def _audited_ids(records, prefix: str) -> set[str]:
    ids = set()
    for r in records:
        if r.get("event") == "statement" and r.get("outcome") == "ok":
            for value in (r.get("parameters") or []):
                if isinstance(value, str) and value.startswith(prefix):
                    ids.add(value)
    return ids


def test_a_full_device_refuses_statements_and_nothing_runs_unaudited(base_config, issuer, database, truth):
    prefix = f"full-{uuid.uuid4().hex[:6]}-"
    proxy = ProxyProcess(merge(base_config, {"audit": {"file": "/dev/full"}}))
    refused = 0
    try:
        for i in range(20):
            try:
                with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]),
                                     autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (f"{prefix}{i}",))
            except psycopg.Error as exc:  # a refused login carries no SQLSTATE in psycopg: the text then
                assert exc.sqlstate == "58030" or "audit trail unavailable" in str(exc), exc
                refused += 1
    finally:
        proxy.stop()
    assert refused == 20
    assert _rows(database, prefix) == {}  # nothing reached the database unaudited
    assert "audit trail unavailable" in proxy.log()


def test_a_filesystem_that_fills_up_refuses_then_resumes_with_a_gap_record(base_config, issuer, database, truth,
                                                                           tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    prefix = f"fill-{uuid.uuid4().hex[:6]}-"
    try:
        proxy = ProxyProcess(merge(base_config, {"audit": {"file": str(mount / "audit.jsonl")}}))
        filler = mount / "filler"
        try:
            conn = psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True)
            committed, refused = [], 0
            with open(filler, "wb") as f:  # leave the trail a few KB
                try:
                    f.write(b"x" * (512 * 1024))
                except OSError:
                    pass
            os.truncate(filler, max(0, os.path.getsize(filler) - 16 * 1024))
            for i in range(400):
                try:
                    conn.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (f"{prefix}{i}",))
                    committed.append(f"{prefix}{i}")
                except psycopg.Error as exc:
                    assert exc.sqlstate == "58030", exc
                    refused += 1
                    break
            assert refused, "the trail never filled up (the test proves nothing)"
            for _ in range(5):  # refused while full, the session stays usable
                with pytest.raises(psycopg.Error) as again:
                    conn.execute("SELECT 1")
                assert again.value.sqlstate == "58030"
            filler.unlink()  # space returns: auditing resumes by itself
            deadline = time.monotonic() + 10
            while True:
                try:
                    conn.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (f"{prefix}after",))
                    committed.append(f"{prefix}after")
                    break
                except psycopg.Error as exc:
                    assert exc.sqlstate == "58030"
                    assert time.monotonic() < deadline, "auditing did not resume"
                    time.sleep(0.2)
            conn.close()
        finally:
            proxy.stop()
        records = _records([mount / "audit.jsonl"])
        gaps = [r for r in records if r.get("event") == "audit_gap"]
        assert gaps and sum(g["refused_statements"] for g in gaps) >= 5, gaps  # what was refused meanwhile
        in_database = _rows(database, prefix)
        assert set(in_database) == set(committed)
        assert set(in_database) <= _audited_ids(records, prefix)  # every row that ran has its record
        assert all(v == ("emea_analyst", "alice") for v in in_database.values())
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_before_result_kill_9_leaves_no_acknowledged_statement_unaudited(base_config, issuer, database, truth):
    prefix = f"kill-{uuid.uuid4().hex[:6]}-"
    proxy = ProxyProcess(merge(base_config, {"server": {"workers": 2}, "backend": {"pool_size": 30},
                                             "audit": {"durability": "before_result"}}))
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(n: int) -> None:
        token = issuer.mint("alice", ["sales_emea"])
        try:
            with psycopg.connect(proxy.dsn("alice"), password=token, autocommit=True) as conn:
                i = 0
                while not stop.is_set():
                    ident = f"{prefix}{n}-{i}"
                    conn.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (ident,))
                    with lock:
                        acknowledged.append(ident)
                    i += 1
        except psycopg.Error:
            pass  # the proxy was killed under it

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(50)]
    for t in threads:
        t.start()
    time.sleep(3)
    children = subprocess.run(["pgrep", "-P", str(proxy.process.pid)], capture_output=True, text=True).stdout.split()
    for pid in [proxy.process.pid, *map(int, children)]:
        os.kill(int(pid), signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(10)
    proxy.process.wait(10)
    with lock:
        seen = list(acknowledged)
    assert len(seen) > 100, "too few statements to prove anything"
    records = _records([proxy.audit_path])
    missing = set(seen) - _audited_ids(records, prefix)
    assert not missing, f"{len(missing)} acknowledged statements have no record, e.g. {sorted(missing)[:3]}"
    assert set(seen) <= set(_rows(database, prefix))
