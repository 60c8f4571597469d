"""python -m bench.ab BEFORE [AFTER] — two builds of pgproxy side by side, one PostgreSQL.

BEFORE and AFTER are git revisions or directories holding a pgproxy tree; AFTER defaults
to this working tree. A revision is checked out into a temporary worktree (removed at the
end) and, if it has the compiled hot path (scripts/build-compiled), built as the CI builds
it, so each side runs as it would ship; ``--pure`` runs both as pure Python instead.

Both builds serve at once, each with one worker and the benchmark's configuration
(bench/targets.py), in front of the same PostgreSQL; pgbench alternates between them, round
after round (A B A B …), so that the machine's drift — ±20 % between rounds here — falls on
both alike. This is the comparison to trust for "within N % of before": the full benchmark
runs each build once, minutes apart. Reported per scenario: median TPS and CPU µs per
transaction of each build's process (bench/cpu.py), AFTER's change against BEFORE, and the
median of each round's own change (a round's A and B run seconds apart: the steadier figure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.__main__ import SCENARIOS, run_pgbench
from bench.targets import Bench, Target
from pgproxy.pgcluster import free_port
from tests.support.proxy import merge, to_toml, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCENARIOS = ("select_simple", "select_prepared", "select_prepared_tx")
TX_SCENARIOS = {"select_prepared_tx"}  # the transaction-pooled identity


def checkout(spec: str, into: Path, pure: bool) -> Path:
    """A directory with the tree ``spec`` names (a directory, or a revision of this repo)."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), spec], check=True,
                   capture_output=True, text=True)
    if not pure and (into / "scripts" / "build-compiled").exists():
        subprocess.run([str(into / "scripts" / "build-compiled"), "--if-possible"], cwd=into, check=True,
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    return into


def serve(tree: Path, bench: Bench, workdir: Path, pure: bool,
          audit_file: str = "") -> tuple[subprocess.Popen, int, Path]:
    """pgproxy from ``tree`` with the benchmark's configuration; (process, port, log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = merge(bench.pgproxy_config(), {"server": {"listen": [f"127.0.0.1:{port}"]},
                                            "audit": {"file": audit_file or str(workdir / "audit.jsonl")}})
    (workdir / "pgproxy.toml").write_text(to_toml(config))
    log = workdir / "log"
    process = subprocess.Popen([sys.executable, "-m", "pgproxy", "serve", "-c", str(workdir / "pgproxy.toml")],
                               cwd=tree, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=server_env(pure))
    wait_for_port(port, process)
    return process, port, log


def hot_path(tree: Path, env: dict) -> str:
    """Which hot-path modules ``tree``'s pgproxy runs compiled (pgproxy/compiled.py, where it has one)."""
    probe = ("import importlib, pgproxy.compiled as c\n"
             "for m in c.COMPILED_MODULES: importlib.import_module(m)\n"
             "print(','.join(c.loaded()))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=env, capture_output=True, text=True)
    compiled = out.stdout.strip() if out.returncode == 0 else ""
    return f"compiled: {compiled}" if compiled else "pure Python"


def server_env(pure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PYTHONPATH", "PGPROXY_PURE")}
    return {**env, "PGPROXY_PURE": "1"} if pure else env


def change(before: float, after: float) -> str:
    return f"{(after / before - 1) * 100:+.1f} %" if before else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("before", help="git revision or directory")
    parser.add_argument("after", nargs="?", default=str(ROOT), help="git revision or directory (default: this tree)")
    parser.add_argument("--only", default=",".join(DEFAULT_SCENARIOS), help="comma-separated scenario names")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--pure", action="store_true", help="both builds as pure Python (PGPROXY_PURE=1)")
    parser.add_argument("--audit-file", default="", help="both builds' audit file (e.g. /dev/null: the disk's "
                                                             "writeback out of the comparison); default: one each")
    parser.add_argument("--rounds-detail", action="store_true", help="also print each round's TPS and CPU per side")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the cleanup below runs
    scenarios = args.only.split(",")
    unknown = [s for s in scenarios if s not in SCENARIOS or SCENARIOS[s][1] is None]
    if unknown:
        parser.error(f"not a pgbench scenario: {', '.join(unknown)}")
    scratch = Path(tempfile.mkdtemp(prefix="pgproxy-ab-"))
    trees = [checkout(spec, scratch / f"tree-{i}", args.pure) for i, spec in enumerate((args.before, args.after))]
    bench = Bench(scale=10, workers=None).start()
    processes = []
    try:
        sides = []
        for i, tree in enumerate(trees):
            process, port, log = serve(tree, bench, scratch / f"run-{i}", args.pure, args.audit_file)
            processes.append(process)
            plain, tx = bench.targets["pgproxy"], bench.targets["pgproxy_tx"]
            sides.append((Target(f"side{i}", port, plain.user, plain.password, pid=process.pid),
                          Target(f"side{i}_tx", port, tx.user, tx.password, pid=process.pid), log))
        env = server_env(args.pure)
        print(f"before: {args.before} ({hot_path(trees[0], env)})\nafter:  {args.after} ({hot_path(trees[1], env)})")
        print(f"{args.rounds} rounds × {args.seconds} s per scenario, alternating; medians\n")
        print("| scenario | TPS before → after | change | CPU µs/txn before → after | change "
              "| user+system before → after | TPS change, median of rounds |")
        print("|---|---|---|---|---|---|---|")
        for name in scenarios:
            results: list[list[dict]] = [[], []]
            for _ in range(args.rounds):
                for i, (plain, tx, _log) in enumerate(sides):
                    target = tx if name in TX_SCENARIOS else plain
                    results[i].append(run_pgbench(target, SCENARIOS[name][1], args.seconds))
            if args.rounds_detail:
                for n, (a, b) in enumerate(zip(*results)):
                    print(f"  round {n + 1}: TPS {a['tps']:,.0f} / {b['tps']:,.0f} ({change(a['tps'], b['tps'])}), "
                          f"CPU µs {a['cpu_us']:.1f} / {b['cpu_us']:.1f} ({change(a['cpu_us'], b['cpu_us'])})")
            paired = statistics.median(b["tps"] / a["tps"] for a, b in zip(*results))
            tps = [statistics.median(r["tps"] for r in side) for side in results]
            cpu = [statistics.median(r["cpu_us"] for r in side) for side in results]
            split = [f'{statistics.median(r["cpu_user_us"] for r in side):.1f}'
                     f'+{statistics.median(r["cpu_system_us"] for r in side):.1f}' for side in results]
            print(f"| {SCENARIOS[name][0]} | {tps[0]:,.0f} → {tps[1]:,.0f} | {change(*tps)} "
                  f"| {cpu[0]:.1f} → {cpu[1]:.1f} | {change(*cpu)} | {split[0]} → {split[1]} "
                  f"| {change(1.0, paired)} |", flush=True)
    finally:
        for process in processes:
            process.terminate()
            process.wait(15)
        bench.stop()
        for tree in trees:
            if str(tree).startswith(str(scratch)):
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
