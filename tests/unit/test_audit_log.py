"""The AuditLog's writer: fail closed, gaps, torn lines, durability, reopen, rotation, sinks.

Faults are real: the trail's descriptor is pointed at /dev/full (every write fails with
ENOSPC, as on a full disk) and back, or a writer process runs under RLIMIT_FSIZE so that
a write stops partway, as it does when a filesystem fills up in the middle of a batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pgproxy.audit import AuditLog
from pgproxy.audit_verify import verify
from pgproxy.config import AuditSection

PREFIX = AuditLog.session_prefix({"session": "s1", "user": "alice", "role": "r", "auth_method": "jwt"})


def statement(log: AuditLog, text: str) -> int:
    return log.statement(PREFIX, text, None, None, [b"SELECT 1\0"], time.time(), 0.001, "ok", None, 42)


def records(*paths) -> list[dict]:
    out = []
    for path in paths:
        out += [json.loads(line) for line in open(path, "rb").read().split(b"\n") if line.strip()]
    return out


def texts(*paths) -> list[str]:
    return [r["statement"] for r in records(*paths) if r["event"] == "statement"]


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class FullDisk:
    """Points the trail's descriptor at /dev/full, and back at the file."""

    def __init__(self, log: AuditLog, path) -> None:
        self.log, self.path = log, path

    def __enter__(self):
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, self.log._fd)
        os.close(full)
        return self

    def __exit__(self, *exc):
        real = os.open(self.path, os.O_RDWR | os.O_APPEND)
        os.dup2(real, self.log._fd)
        os.close(real)


def test_every_record_is_chained_and_an_untouched_trail_verifies(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=5))
    for i in range(50):
        statement(log, f"SELECT {i}")
    log.close()
    lines = records(path)
    assert [r["seq"] for r in lines] == list(range(1, 53))
    assert lines[0]["event"] == "audit_open" and lines[-1]["event"] == "audit_close"
    assert len({r["writer"] for r in lines}) == 1
    assert texts(path) == [f"SELECT {i}" for i in range(50)]
    report = verify([str(path)])
    assert report.problems == [] and report.records == 52 and report.seals == 2
    assert (tmp_path / "audit.jsonl.pub").read_text().startswith("ed25519 ")


def test_a_failing_file_makes_the_trail_unavailable_until_it_recovers_then_a_gap_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=5))
    statement(log, "before")
    wait_until(lambda: "before" in texts(path))
    with FullDisk(log, path):
        statement(log, "during")  # ran already: must be recorded once the disk recovers
        wait_until(lambda: not log.available)
        assert "No space left on device" in log.unavailable_reason
        for _ in range(3):
            log.note_refused("statement")
        log.note_refused("login")
        time.sleep(0.5)
        assert not log.available
        # Backoff, not a busy loop: 10 ms doubling to 1 s is about 6 tries in half a second.
        assert 2 <= log.write_errors <= 12
    wait_until(lambda: log.available, timeout=3)
    log.close()
    assert texts(path) == ["before", "during"]
    gap = [r for r in records(path) if r["event"] == "audit_gap"]
    assert len(gap) == 1
    assert (gap[0]["refused_statements"], gap[0]["refused_logins"], gap[0]["dropped_records"]) == (3, 1, 0)
    assert "No space left on device" in gap[0]["reason"] and gap[0]["from"] < gap[0]["to"]
    assert verify([str(path)]).problems == []


def test_a_full_queue_refuses_new_work_without_blocking_and_keeps_every_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=5, queue_size=10))
    with FullDisk(log, path):
        wait_until(lambda: not log.available)  # the open seal cannot be written
        started = time.perf_counter()
        for i in range(200):
            statement(log, f"in flight {i}")
        assert time.perf_counter() - started < 0.05  # the loop never waits for the disk
        assert log.depth >= 200 and not log.available
    wait_until(lambda: log.available, timeout=3)
    log.close()
    assert texts(path) == [f"in flight {i}" for i in range(200)]
    assert verify([str(path)]).problems == []


def test_continue_mode_stays_available_and_counts_what_it_dropped(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=5, on_failure="continue"))
    statement(log, "kept")
    wait_until(lambda: "kept" in texts(path))
    with FullDisk(log, path):
        statement(log, "lost")
        wait_until(lambda: log.dropped_records == 1)
        assert log.available
    statement(log, "after")
    log.close()
    assert texts(path) == ["kept", "after"]
    gap = [r for r in records(path) if r["event"] == "audit_gap"][0]
    assert gap["dropped_records"] == 1
    # What was dropped is missing from the chain, and verify says so, at its place.
    found = [text for _, _, text in verify([str(path)]).problems]
    assert len(found) == 1 and "1 record of writer" in found[0] and "missing" in found[0]


TORN_WRITER = textwrap.dedent("""
    import os, resource, signal, sys, time
    from pgproxy.audit import AuditLog
    from pgproxy.config import AuditSection
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    path = sys.argv[1]
    log = AuditLog(AuditSection(file=path, flush_interval_ms=5))
    prefix = AuditLog.session_prefix({"session": "s1", "user": "alice"})
    def put(i):
        log.statement(prefix, f"SELECT {i}", None, None, [b"SELECT 1\\0"], time.time(), 0.001, "ok", None, 1)
    put(0)
    while log.records_written < 2:
        time.sleep(0.005)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 1000, hard))  # the disk fills up
    for i in range(1, 20):
        put(i)
    while log.available:
        time.sleep(0.005)
    time.sleep(0.1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    while not log.available:
        time.sleep(0.005)
    log.close()
""")


def test_a_write_that_fails_partway_leaves_one_torn_line_and_everything_after_it_verifies(tmp_path):
    path = tmp_path / "audit.jsonl"
    subprocess.run([sys.executable, "-c", TORN_WRITER, str(path)], check=True, timeout=30)
    lines = path.read_bytes().split(b"\n")[:-1]
    torn = []
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except ValueError:
            torn.append(number)
    assert len(torn) == 1, "the failed write should leave exactly one torn line"
    good = [json.loads(line) for n, line in enumerate(lines, 1) if n not in torn]
    assert [r["statement"] for r in good if r["event"] == "statement"] == [f"SELECT {i}" for i in range(20)]
    report = verify([str(path)])
    assert [(n, "torn line" in text) for _, n, text in report.problems] == [(torn[0], True)]


def test_when_durable_runs_once_the_records_are_written_and_fsynced_one_batch_for_all(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), durability="before_result", flush_interval_ms=1000))
    fired = []

    async def main():
        syncs = log.fsyncs
        done = asyncio.Event()
        tickets = [statement(log, f"SELECT {i}") for i in range(100)]
        for ticket in tickets:
            log.when_durable(ticket, lambda t=ticket: (fired.append((t, log.fsyncs, texts(path))),
                                                      len(fired) == 100 and done.set()))
        await asyncio.wait_for(done.wait(), 2)  # long before flush_interval_ms: the callbacks woke it
        return syncs, tickets

    syncs_before, tickets = asyncio.run(main())
    log.close()
    assert tickets == list(range(2, 102))  # the records' seq (the open seal is seq 1)
    assert [t for t, _, _ in fired] == tickets
    assert all("SELECT 99" in seen for _, _, seen in fired)  # every record was in the file before any callback
    assert log.fsyncs - syncs_before <= 3  # group commit: not one fsync per record (the open seal's, ours, close)


DURABLE_WRITER = textwrap.dedent("""
    import asyncio, os, signal, sys, time
    from pgproxy.audit import AuditLog
    from pgproxy.config import AuditSection
    log = AuditLog(AuditSection(file=sys.argv[1], durability="before_result", flush_interval_ms=5000))
    prefix = AuditLog.session_prefix({"session": "s1", "user": "alice"})
    async def main():
        ticket = log.statement(prefix, "INSERT INTO acknowledged", None, None, [b"INSERT 0 1\\0"], time.time(),
                               0.001, "ok", None, 1)
        log.when_durable(ticket, lambda: os.kill(os.getpid(), signal.SIGKILL))  # the result goes out: crash
        await asyncio.sleep(10)
    asyncio.run(main())
""")


def test_a_record_reported_durable_survives_kill_9(tmp_path):
    path = tmp_path / "audit.jsonl"
    result = subprocess.run([sys.executable, "-c", DURABLE_WRITER, str(path)], timeout=30)
    assert result.returncode == -signal.SIGKILL
    assert texts(path) == ["INSERT INTO acknowledged"]
    problems = [text for _, _, text in verify([str(path)]).problems]
    assert len(problems) == 1 and "ends without its closing seal" in problems[0]  # killed: said so


def test_reopen_after_a_move_continues_the_chain_in_a_new_file(tmp_path):
    path, moved = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=5))
    statement(log, "one")
    wait_until(lambda: path.exists() and "one" in texts(path))
    log.reopen()  # not moved: nothing happens
    time.sleep(0.05)
    os.rename(path, moved)
    statement(log, "two")  # may land in either file: both are the trail
    log.reopen()
    wait_until(lambda: path.exists())
    statement(log, "three")
    log.close()
    assert texts(moved, path) == ["one", "two", "three"]
    assert records(moved)[-1]["event"] == "audit_close" and records(path)[0]["event"] == "audit_reopen"
    assert [r["event"] for r in records(moved)].count("audit_reopen") == 0
    assert verify([str(moved), str(path)]).problems == []


def test_reconfigure_moves_the_trail_and_says_so_in_both_files(tmp_path):
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    log = AuditLog(AuditSection(file=str(old), flush_interval_ms=5))
    statement(log, "one")
    assert log.check_reconfigure(AuditSection(file=str(tmp_path / "missing-dir" / "x.jsonl"))).startswith(
        "audit.file: cannot open")
    log.reconfigure(AuditSection(file=str(new), flush_interval_ms=5, parameters="redacted"))
    wait_until(lambda: new.exists())
    statement(log, "two")
    log.close()
    assert texts(old) == ["one"] and texts(new) == ["two"]
    closing, opening = records(old)[-1], records(new)[0]
    assert (closing["event"], closing["seal"], closing["to"]) == ("audit_file_changed", "close", str(new))
    assert (opening["event"], opening["seal"], opening["from"]) == ("audit_file_changed", "open", str(old))
    assert verify([str(old), str(new)]).problems == []


def test_built_in_rotation_by_size_loses_nothing(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=5, rotate_size_mb=0.002))  # about 2 KB
    for i in range(60):
        statement(log, f"SELECT {i}")
        if i % 10 == 9:
            time.sleep(0.03)
    log.close()
    rotated = sorted(p for p in tmp_path.glob("audit.jsonl.*") if not p.name.endswith(".pub"))
    assert len(rotated) >= 2
    files = [str(p) for p in rotated] + [str(path)]
    assert texts(*files) == [f"SELECT {i}" for i in range(60)]
    assert verify(files).problems == []


def test_a_checkpoint_follows_every_checkpoint_records_records_never_sooner(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=2, checkpoint_records=100))
    for i in range(1500):  # bursts of varying size, so checkpoints fall inside batches and at their ends
        statement(log, f"SELECT {i}")
        if i % 37 == 0:
            time.sleep(0.003)
    log.close()
    events = [r["event"] for r in records(path)]
    assert events.count("statement") == 1500 and events[0] == "audit_open" and events[-1] == "audit_close"
    seals = [i for i, event in enumerate(events) if event.startswith("audit_")]
    gaps = [b - a - 1 for a, b in zip(seals, seals[1:-1])]  # statements between seals, the last close aside
    assert gaps and min(gaps) >= 100, gaps
    assert len(gaps) >= 1500 // 300  # each due checkpoint came, within a batch or two
    assert verify([str(path)]).problems == []


def _wakes(log: AuditLog) -> int:
    with open(f"/proc/self/task/{log._thread.native_id}/status") as fh:
        return int(next(line for line in fh if line.startswith("voluntary_ctxt_switches")).split()[1])


def test_an_idle_writer_sleeps_and_the_next_record_wakes_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=10, checkpoint_interval_s=0.4))
    statement(log, "first")
    wait_until(lambda: "first" in texts(path))
    time.sleep(0.1)
    before = _wakes(log)
    time.sleep(1.0)  # 100 rounds at 10 ms; idle, the writer only looks for duties (the checkpoint)
    assert _wakes(log) - before <= 10
    assert [r["event"] for r in records(path)][-1] == "audit_checkpoint"  # interval checkpoints still come
    statement(log, "second")
    wait_until(lambda: "second" in texts(path), timeout=0.5)
    log.close()
    assert verify([str(path)]).problems == []


def test_two_writers_sharing_a_file_interleave_and_each_chain_verifies(tmp_path):
    path = tmp_path / "audit.jsonl"
    a = AuditLog(AuditSection(file=str(path), flush_interval_ms=3), worker=0)
    b = AuditLog(AuditSection(file=str(path), flush_interval_ms=3), worker=1)
    for i in range(300):
        statement(a if i % 2 else b, f"SELECT {i}")
        if i % 50 == 0:
            time.sleep(0.01)
    a.close()
    b.close()
    assert sorted(texts(path)) == sorted(f"SELECT {i}" for i in range(300))
    report = verify([str(path)])
    assert report.problems == [] and report.writers == 2


class ListSink:
    def __init__(self, name="test", on_failure="refuse"):
        self.name, self.on_failure, self.healthy = name, on_failure, True
        self.lines: list[str] = []
        self.closed = False

    def submit(self, lines):
        self.lines += lines

    def close(self):
        self.closed = True


def test_sinks_get_exactly_the_file_s_lines_and_an_unhealthy_refusing_sink_closes_the_trail(tmp_path):
    path = tmp_path / "audit.jsonl"
    strict, lenient = ListSink("strict"), ListSink("lenient", on_failure="continue")
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=5), sinks=[strict, lenient])
    statement(log, "one")
    lenient.healthy = False
    time.sleep(0.05)
    assert log.available  # on_failure = continue: only the sink suffers
    strict.healthy = False
    wait_until(lambda: not log.available)
    assert log.unavailable_reason == "audit sink strict unhealthy; audit sink lenient unhealthy"
    strict.healthy = lenient.healthy = True
    wait_until(lambda: log.available)
    log.close()
    assert strict.closed and lenient.closed
    assert strict.lines == path.read_text().splitlines() == lenient.lines
    assert [r["event"] for r in records(path)].count("audit_gap") == 1


def test_with_a_sink_the_writer_never_idles_so_its_health_is_followed_at_once(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = ListSink("strict")
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=10), sinks=[sink])
    statement(log, "one")
    time.sleep(0.3)  # nothing to write: without a sink the writer would be asleep by now
    sink.healthy = False  # as a sink's own thread does when deliveries fail
    wait_until(lambda: not log.available, timeout=0.25)
    log.close()


def test_a_signing_key_file_is_created_private_and_reused(tmp_path):
    key_file = tmp_path / "keys" / "audit.key"
    key_file.parent.mkdir()
    cfg = AuditSection(file=str(tmp_path / "audit.jsonl"), signing_key_file=str(key_file))
    first = AuditLog(cfg)
    first.close()
    assert key_file.stat().st_mode & 0o777 == 0o600
    second = AuditLog(cfg)
    second.close()
    assert len((tmp_path / "audit.jsonl.pub").read_text().splitlines()) == 1  # one key, published once
    assert verify([str(tmp_path / "audit.jsonl")]).problems == []
    key_file.chmod(0o644)
    from pgproxy.audit_chain import AuditKeyError
    with pytest.raises(AuditKeyError, match="chmod 600"):
        AuditLog(cfg)


def test_two_writers_rotating_the_same_file_rotate_it_once_and_lose_nothing(tmp_path):
    path = tmp_path / "audit.jsonl"
    cfg = AuditSection(file=str(path), flush_interval_ms=5, rotate_size_mb=0.004)
    a, b = AuditLog(cfg, worker=0), AuditLog(cfg, worker=1)
    for i in range(120):
        statement(a if i % 2 else b, f"SELECT {i}")
        if i % 20 == 19:
            time.sleep(0.05)
    time.sleep(1.2)  # the follower notices a rotation within a second
    statement(a, "last a")
    statement(b, "last b")
    a.close()
    b.close()
    rotated = sorted(p for p in tmp_path.glob("audit.jsonl.*") if not p.name.endswith(".pub"))
    assert rotated
    files = [str(p) for p in rotated] + [str(path)]
    assert sorted(texts(*files)) == sorted([f"SELECT {i}" for i in range(120)] + ["last a", "last b"])
    report = verify(files)
    assert report.problems == [] and report.writers == 2


# --- statement records on an event loop: rendered in batches, in order ------------------

def test_statements_on_a_loop_are_written_in_order_around_events(tmp_path):
    """Batch durability renders statement records together, a moment after they come: an
    event queued meanwhile still follows the statements before it, and the chain holds."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=20))

    async def main():
        assert statement(log, "one") == 0 and statement(log, "two") == 0  # no seq: nobody waits on it
        log.event("denied", session="s1", user="alice", statement="three", reason="read_only")
        statement(log, "four")
        await asyncio.sleep(0)
        await asyncio.to_thread(wait_until, lambda: "four" in texts(path), 5.0)  # written without close()

    asyncio.run(main())
    log.close()
    own = [r for r in records(path) if not r["event"].startswith("audit_")]
    assert [(r["event"], r.get("statement")) for r in own] == [("statement", "one"), ("statement", "two"),
                                                               ("denied", "three"), ("statement", "four")]
    seqs = [r["seq"] for r in records(path)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert verify([str(path)]).problems == []


def test_records_of_a_loop_that_ended_before_their_render_are_not_stranded(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=1000))  # renders 0.5 s after

    async def first():
        statement(log, "on the first loop")  # the loop ends long before its render is due

    async def second():
        statement(log, "on the second loop")
        await asyncio.to_thread(wait_until, lambda: "on the second loop" in texts(path), 5.0)

    asyncio.run(first())
    assert "on the first loop" not in texts(path)
    asyncio.run(second())
    assert texts(path) == ["on the first loop", "on the second loop"]  # before close()
    statement(log, "off any loop")  # rendered at once, after what was due
    log.close()
    assert texts(path) == ["on the first loop", "on the second loop", "off any loop"]


def test_close_and_reload_render_what_is_due_as_configured_when_it_ran(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=10_000))

    async def main():
        statement(log, "x" * 50)
        log.reconfigure(AuditSection(file=str(path), flush_interval_ms=10_000, max_statement_length=10))
        statement(log, "y" * 50)  # due when the trail closes

    asyncio.run(main())
    log.close()
    assert texts(path) == ["x" * 50, "y" * 10 + "…"]
    assert verify([str(path)]).problems == []


def test_before_result_durability_renders_at_once_and_returns_the_seq(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), durability="before_result"))

    async def main():
        return statement(log, "acknowledged")

    seq = asyncio.run(main())  # the loop ends at once: a record left due would wait for close()
    wait_until(lambda: "acknowledged" in texts(path))
    log.close()
    assert seq == 2  # the open seal is 1
    assert [r["seq"] for r in records(path) if r["event"] == "statement"] == [seq]


def test_a_batch_of_records_asks_for_the_running_loop_once(tmp_path, monkeypatch):
    # CPython 3.11's asyncio._get_running_loop() makes a getpid() system call: asked once
    # per statement it was one system call per transaction.
    import pgproxy.audit as audit_module
    asked = []
    real = audit_module._running_loop
    monkeypatch.setattr(audit_module, "_running_loop", lambda: asked.append(1) or real())
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=20))

    async def main():
        for i in range(50):
            statement(log, f"first batch {i}")
        await asyncio.to_thread(wait_until, lambda: len(texts(path)) == 50, 5.0)
        statement(log, "second batch")  # the first batch was rendered: asked again

    asyncio.run(main())
    log.close()
    assert len(asked) == 2
    assert texts(path) == [f"first batch {i}" for i in range(50)] + ["second batch"]
