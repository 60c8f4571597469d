"""python -m bench.profile [--mode session|transaction] [--seconds N] — where pgproxy's CPU goes.

Starts the benchmark's throwaway setup (bench/targets.py: PostgreSQL, and pgproxy with
one worker process, so the worker is the process that serves), drives pgbench select-only
load through it — simple protocol, then prepared — and prints for each the functions of
that process with the most own time, the closest a sampling profiler gets to cProfile's
``tottime``.

How: py-spy (a test dependency) attaches to the running worker (`py-spy record --pid
--format raw --function --threads`: ptrace, so run as root or with CAP_SYS_PTRACE; the
proxy itself is not changed or restarted) and samples its stacks 100 times a second until
pgbench ends. Idle stacks (a thread waiting in epoll or a blocking read) are left out, so
percentages are of the samples where the thread was busy — or runnable but waiting for a
CPU, which on a shared machine is part of the picture. The table is the event loop's
thread (MainThread); other threads (the audit writer, ...) get one line each. A
function's "own" samples are those where it is the innermost Python frame: time in C code
it calls — uvloop's transport.write and its send(), ssl, hashlib — counts as its own
unless ``--native`` asks py-spy for native frames too; uvloop's own loop, written in
Cython, shows as ``Runner.run``. "≈CPU µs/txn" is a function's share of all the process's
samples times the process's CPU per transaction measured from /proc (bench/cpu.py) over
the same pgbench run.

cProfile was the other choice (running the worker under it in a subprocess); it was not
taken because its per-call overhead inflates exactly the small, hot functions this is
meant to find, and it needs the proxy started differently from production.

Sampling pauses the process briefly each time, so throughput under the profiler is a few
per cent lower than in `python -m bench`. The raw stacks are kept (paths printed at the
end) for flamegraph.pl or speedscope.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.__main__ import run_pgbench
from bench.targets import Bench

PROTOCOLS = ("simple", "prepared")


def py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"  # the venv's, when not on PATH
    found = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if not found:
        raise SystemExit("py-spy not found: scripts/install-deps --test (or pip install py-spy)")
    return found


@dataclass
class Samples:
    """One thread's samples: per function as the innermost frame (own) and anywhere on the
    stack (inclusive)."""
    own: Counter = field(default_factory=Counter)
    inclusive: Counter = field(default_factory=Counter)
    total: int = 0


def parse_raw(text: str) -> dict[str, Samples]:
    """py-spy's raw (collapsed) stacks with --threads, one ``thread (tid): name;frame;...;innermost
    count`` a line, per thread name."""
    threads: dict[str, Samples] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        if not frames:
            continue
        samples = threads.setdefault(thread.split(": ", 1)[-1], Samples())
        samples.total += int(count)
        samples.own[frames[-1]] += int(count)
        for frame in set(frames):
            samples.inclusive[frame] += int(count)
    return threads


def report(threads: dict[str, Samples], cpu_us: float, top: int) -> str:
    """The event loop's top functions by own samples. ≈CPU µs/txn: a function's share of
    all the process's samples times the CPU per transaction measured from /proc."""
    everything = sum(t.total for t in threads.values())
    loop = threads.get("MainThread") or max(threads.values(), key=lambda t: t.total)
    lines = [f"{'own %':>6s} {'incl %':>6s} {'≈CPU µs/txn':>11s}  function (file:first line)"]
    for frame, count in loop.own.most_common(top):
        lines.append(f"{100 * count / loop.total:6.1f} {100 * loop.inclusive[frame] / loop.total:6.1f} "
                     f"{count / everything * cpu_us:11.2f}  {frame}")
    others = [(name, t) for name, t in threads.items() if t is not loop]
    for name, t in sorted(others, key=lambda item: -item[1].total):
        busiest = ", ".join(f"{frame.split(' (')[0]} {n}" for frame, n in t.own.most_common(3))
        lines.append(f"thread {name}: {t.total} samples ({100 * t.total / everything:.0f} % of all; {busiest})")
    return "\n".join(lines)


def profile_once(target, pid: int, protocol: str, seconds: float, clients: int, rate: int, native: bool,
                 raw_path: Path, top: int) -> None:
    cmd = [py_spy(), "record", "--pid", str(pid), "--format", "raw", "--function", "--threads",
           "--rate", str(rate), "--output", str(raw_path)] + (["--native"] if native else [])
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # attached before the load starts
    if spy.poll() is not None:
        raise SystemExit(f"py-spy could not attach to {pid}: {spy.stderr.read().strip()[-500:]}")
    started = time.monotonic()
    try:
        result = run_pgbench(target, ["-S", "-M", protocol, "-c", str(clients), "-j", "2"], seconds)
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    elapsed = time.monotonic() - started
    if not raw_path.exists():
        raise SystemExit(f"py-spy wrote no samples: {err.strip()[-500:]}")
    threads = parse_raw(raw_path.read_text())
    print(f"\n== select-only, {protocol} protocol, {clients} clients, {seconds:g} s via {target.name}: "
          f"{result['tps']:.0f} tps; CPU of the process {result['cpu_user_us']:.1f} user + "
          f"{result['cpu_system_us']:.1f} system = {result['cpu_us']:.1f} µs/txn")
    if not threads:
        print("no busy samples")
        return
    loop = threads.get("MainThread") or max(threads.values(), key=lambda t: t.total)
    print(f"event loop: {loop.total} busy samples at {rate} Hz over {elapsed:.1f} s "
          f"({100 * loop.total / (rate * elapsed):.0f} % busy); top {top} by own samples:")
    print(report(threads, result["cpu_us"], top))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("session", "transaction"), default="session",
                        help="pgproxy's pooling mode for the bench identity (default session)")
    parser.add_argument("--seconds", type=float, default=10, help="pgbench -T per protocol (default 10)")
    parser.add_argument("--clients", type=int, default=16, help="pgbench -c (default 16)")
    parser.add_argument("--protocol", choices=PROTOCOLS, action="append",
                        help="only this protocol (repeatable); default simple, then prepared")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    parser.add_argument("--top", type=int, default=25, help="functions to list (default 25)")
    parser.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    args = parser.parse_args(argv)
    py_spy()  # fail before starting anything
    raw_dir = Path(tempfile.mkdtemp(prefix="pgproxy-profile-"))
    bench = Bench(1).start()
    try:
        target = bench.targets["pgproxy" if args.mode == "session" else "pgproxy_tx"]
        print(f"pgproxy (one worker) pid {target.pid}, {args.mode} pooling", flush=True)
        for protocol in args.protocol or PROTOCOLS:
            profile_once(target, target.pid, protocol, args.seconds, args.clients, args.rate, args.native,
                         raw_dir / f"{args.mode}-{protocol}.txt", args.top)
    finally:
        bench.stop()
    print(f"\nraw stacks: {' '.join(sorted(str(p) for p in raw_dir.iterdir()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
