"""The benchmark's CPU accounting (bench/cpu.py) and its profile parser (bench/profile.py)."""

from __future__ import annotations

import subprocess
import sys

from bench.cpu import CLK_TCK, Ticks, descendants, per_transaction, tree_ticks
from bench.profile import parse_raw, report

# A parent that forks two children: one burns 0.3 s of CPU and exits (and is reaped),
# the other burns 0.3 s and stays; the parent burns 0.2 s itself, then says so.
TREE = """
import os, sys, time
def burn(seconds):
    start = time.process_time()
    while time.process_time() - start < seconds:  # a system call: few of them, mostly user time
        sum(range(20000))
for stays in (False, True):
    if os.fork() == 0:
        burn(0.3)
        if stays:
            time.sleep(60)
        os._exit(0)
first = os.wait()  # the child that exits
burn(0.2)
print("done", flush=True)
time.sleep(60)
"""


def test_tree_ticks_sums_the_process_its_live_children_and_its_reaped_ones():
    parent = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        before = tree_ticks(parent.pid)
        assert parent.stdout.readline().strip() == "done"
        spent = tree_ticks(parent.pid) - before
        assert len(descendants(parent.pid)) == 1  # the reaped child is gone, its CPU is not
        seconds = (spent.user + spent.system) / CLK_TCK
        assert 0.7 <= seconds <= 2.0, spent  # 0.8 s burnt in three processes, plus start-up
        assert spent.user > 2 * spent.system, spent  # and on the right side
    finally:
        for pid in descendants(parent.pid):
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait()


def test_a_gone_process_has_no_ticks_and_no_children():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert tree_ticks(gone.pid) == Ticks(0, 0)
    assert descendants(gone.pid) == []


def test_per_transaction_in_microseconds():
    assert per_transaction(Ticks(CLK_TCK, CLK_TCK // 2), 1000) == {
        "cpu_user_us": 1000.0, "cpu_system_us": round(1e6 * (CLK_TCK // 2) / CLK_TCK / 1000, 2),
        "cpu_us": round(1000.0 + 1e6 * (CLK_TCK // 2) / CLK_TCK / 1000, 2)}
    assert per_transaction(Ticks(5, 5), 0) == {}  # pgbench carried nothing: no figure


RAW = """\
thread (10): MainThread;Runner.run (asyncio/runners.py:86);Relay._send (pgproxy/frontend/relay.py:208);\
BackendConnection.write (pgproxy/backend/connection.py:345) 30
thread (10): MainThread;Runner.run (asyncio/runners.py:86);Relay._send (pgproxy/frontend/relay.py:208) 10
thread (10): MainThread;Runner.run (asyncio/runners.py:86) 20
thread (11): audit-writer;Thread.run (threading.py:971);_write_all (pgproxy/audit.py:725) 40
"""


def test_parse_raw_counts_own_and_inclusive_samples_per_thread():
    threads = parse_raw(RAW)
    loop = threads["MainThread"]
    assert loop.total == 60 and threads["audit-writer"].total == 40
    assert loop.own["BackendConnection.write (pgproxy/backend/connection.py:345)"] == 30
    assert loop.own["Relay._send (pgproxy/frontend/relay.py:208)"] == 10
    assert loop.inclusive["Relay._send (pgproxy/frontend/relay.py:208)"] == 40
    assert loop.inclusive["Runner.run (asyncio/runners.py:86)"] == 60
    text = report(threads, cpu_us=100.0, top=2)
    lines = text.splitlines()
    # the busiest own frame first: 30 of the loop's 60 samples; 30 of all 100 samples x 100 µs
    assert lines[1].split()[:3] == ["50.0", "50.0", "30.00"] and "BackendConnection.write" in lines[1]
    assert "Runner.run" in lines[2] and len(lines) == 4
    assert lines[3].startswith("thread audit-writer: 40 samples (40 % of all; _write_all 40)")
