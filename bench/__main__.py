"""python -m bench [--quick | --smoke] — run every scenario against direct, PgBouncer, pgproxy.

Targets alternate within each scenario (A B C A B C …) because absolute numbers drift on
shared machines; the report gives medians and the ratios pgproxy ÷ PgBouncer and
pgproxy ÷ direct. Results: a table on stdout, bench/results/latest.json (machine
description and every raw figure) and bench/results/latest.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.targets import Bench, Target, pgbench

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("direct", "pgbouncer", "pgproxy")

# name -> (title, pgbench arguments); every target gets exactly these.
SCENARIOS = {
    "select_simple": ("1 select-only, simple protocol, 16 clients", ["-S", "-M", "simple", "-c", "16", "-j", "2"]),
    "select_prepared": ("2 select-only, prepared, 16 clients", ["-S", "-M", "prepared", "-c", "16", "-j", "2"]),
    "select_prepared_tx": ("2t select-only, prepared, transaction pooling", ["-S", "-M", "prepared", "-c", "16",
                                                                           "-j", "2"]),
    "tpcb": ("3 read/write (pgbench default), 16 clients", ["-M", "simple", "-c", "16", "-j", "2"]),
    "many_clients": ("4 500 clients over a pool of 20 (transaction)", ["-S", "-M", "simple", "-c", "500", "-j", "2"]),
    "connect_rate": ("5 new authenticated connection per transaction", ["-C", "-S", "-M", "simple", "-c", "4", "-j", "2"]),
    "select_guard_off": ("1g select-only, simple, statement guard OFF", ["-S", "-M", "simple", "-c", "16", "-j", "2"]),
    "select_tls": ("1s select-only, simple, TLS (sslmode=require)", ["-S", "-M", "simple", "-c", "16", "-j", "2"]),
    "connect_tls": ("5s new connection per transaction, TLS", ["-C", "-S", "-M", "simple", "-c", "4", "-j", "2"]),
    "latency": ("6 single-client latency (added over direct)", ["-S", "-M", "simple", "-c", "1", "-j", "1"]),
    "memory": ("7 memory per idle client", None),  # needs transaction pooling
    "ldap_connect": ("8 new LDAP-authenticated connections/s (pgproxy only)", None),
}
CHART_LABELS = {"select_simple": "1 select, simple", "select_prepared": "2 select, prepared",
                "select_prepared_tx": "2t prepared, txn pool", "tpcb": "3 read/write", "many_clients": "4 500 clients",
                "connect_rate": "5 new connections/s", "latency": "6 one client", "select_tls": "1s select, TLS",
                "connect_tls": "5s new conn/s, TLS", "select_guard_off": "1g guard off"}
# Scenarios measured with transaction pooling: which target stands for each pooler.
# PgBouncer 1.18 has no prepared statements in transaction mode (1.21 added them), so
# scenario 2t compares with its session pooling.
TRANSACTION_TARGETS = {"select_prepared_tx": {"pgbouncer": "pgbouncer", "pgproxy": "pgproxy_tx"},
                       "many_clients": {"pgbouncer": "pgbouncer_tx", "pgproxy": "pgproxy_tx"}}
# Scenarios measured over TLS: every target with sslmode=require (PgBouncer and pgproxy
# terminate TLS; PostgreSQL does for direct).
GUARD_TARGETS = {"select_guard_off": {"pgproxy": "pgproxy_noguard"}}
TLS_TARGETS = {name: {t: f"{t}_tls" for t in ("direct", "pgbouncer", "pgproxy")} for name in ("select_tls",
                                                                                           "connect_tls")}
MEMORY_CLIENTS = 1000  # session pooling, so each idle client holds a backend connection


def run_pgbench(target: Target, args: list[str], seconds: float, log_dir: Path | None = None) -> dict:
    cmd = [pgbench(), "-n", "-T", str(int(seconds)), *args]
    if log_dir is not None:
        cmd += ["-l", f"--log-prefix={log_dir}/{target.name}"]
    out = subprocess.run(cmd + target.pgbench_args(), env=target.env(), capture_output=True, text=True,
                         cwd=log_dir or tempfile.gettempdir(), timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench against {target.name} failed: {out.stderr.strip()[-500:]}")
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))
    result = {"tps": tps}
    if log_dir is not None:
        latencies = sorted(int(line.split()[2]) for f in log_dir.glob(f"{target.name}.*")
                           for line in f.read_text().splitlines() if line.strip())
        for f in log_dir.glob(f"{target.name}.*"):
            f.unlink()
        result["p50_us"] = latencies[len(latencies) // 2]
        result["p99_us"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return result


def machine() -> dict:
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "?")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_kib": int(mem), "kernel": platform.release(),
            "python": platform.python_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 round of 5 s per scenario (under 3 minutes)")
    mode.add_argument("--smoke", action="store_true", help="seconds-long check that the harness works")
    parser.add_argument("--rounds", type=int, help="rounds per scenario")
    parser.add_argument("--seconds", type=float, help="pgbench -T per run")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--out", default=str(RESULTS), help="directory for latest.json and latest.png")
    parser.add_argument("--workers", type=int, default=1, help="pgproxy worker processes (server.workers)")
    args = parser.parse_args(argv)

    rounds = args.rounds or (1 if args.quick or args.smoke else 3)
    seconds = args.seconds or (1 if args.smoke else 5 if args.quick else 10)
    scale = 1 if args.smoke else 10
    chosen = [s for s in (args.only.split(",") if args.only else SCENARIOS) if s]
    if args.smoke and not args.only:
        chosen = ["select_simple", "select_prepared_tx", "latency"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    bench = Bench(scale, pgproxy_overrides={"server": {"workers": args.workers}}).start()
    raw: list[dict] = []
    try:
        log_dir = Path(tempfile.mkdtemp(prefix="pgproxy-bench-log-"))
        for name in chosen:
            title, pgargs = SCENARIOS[name]
            if pgargs is None:
                continue
            print(f"-- {title}", file=sys.stderr, flush=True)
            for round_no in range(rounds):
                for target_name in ORDER:
                    chosen_target = {**TRANSACTION_TARGETS, **TLS_TARGETS, **GUARD_TARGETS}.get(name, {}).get(target_name, target_name)
                    target = bench.targets[chosen_target]
                    result = run_pgbench(target, pgargs, seconds, log_dir if name == "latency" else None)
                    raw.append({"scenario": name, "target": target_name, "round": round_no, **result})
                    print(f"   {target_name:9s} round {round_no}: {result}", file=sys.stderr, flush=True)
        if "ldap_connect" in chosen:
            print(f"-- {SCENARIOS['ldap_connect'][0]}", file=sys.stderr, flush=True)
            from bench.ldap import measure_ldap
            ldap_rates = measure_ldap(bench, seconds, run_pgbench)
        versions = bench.versions()
    finally:
        bench.stop()
    memory = measure_memory(MEMORY_CLIENTS) if "memory" in chosen else None

    summary = summarize(raw, chosen)
    if "select_simple" in summary and "select_guard_off" in summary:
        on = summary["select_simple"]["median"]["pgproxy"]["tps"]
        off = summary["select_guard_off"]["median"]["pgproxy"]["tps"]
        summary["select_guard_off"]["guard_on_vs_off"] = round(on / off, 3)
    if memory:
        summary["memory"] = memory
    if "ldap_connect" in chosen:
        summary["ldap_connect"] = ldap_rates
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "duration_s": round(time.time() - started, 1), "command": "python -m bench " + " ".join(argv or sys.argv[1:]),
              "settings": {"rounds": rounds, "seconds": seconds, "scale": scale, "pool_size": 20,
                           "pgproxy_workers": args.workers},
              "machine": machine(), "versions": versions, "summary": summary, "raw": raw}
    (out_dir / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(summary))
    try:
        chart(summary, out_dir / "latest.png")
    except ImportError:
        print("(matplotlib not installed: no chart)", file=sys.stderr)
    return 0


def measure_memory(clients: int) -> dict:
    """Scenario 7, in its own setup: session pooling needs a pool as large as the clients."""
    from bench.memory import measure
    print(f"-- {SCENARIOS['memory'][0]}: {clients} idle clients", file=sys.stderr, flush=True)
    bench = Bench(1, pool_size=clients).start()
    try:
        result = {"clients": clients, "note": "session pooling, a backend connection each"}
        for name, pid in bench.pids().items():
            result[name] = measure(bench.targets[name], pid, clients)
            print(f"   {name:9s}: {result[name]}", file=sys.stderr, flush=True)
        return result
    finally:
        bench.stop()


def summarize(raw: list[dict], chosen: list[str]) -> dict:
    summary = {}
    for name in chosen:
        if name in ("memory", "ldap_connect"):
            continue  # measured in their own phases
        medians = {}
        for target in ORDER:
            runs = [r for r in raw if r["scenario"] == name and r["target"] == target]
            medians[target] = {key: statistics.median(r[key] for r in runs) for key in ("tps", "p50_us", "p99_us")
                               if runs and key in runs[0]}
        entry = {"median": medians}
        tps = {t: m.get("tps") for t, m in medians.items()}
        if tps.get("pgproxy") and tps.get("pgbouncer") and tps.get("direct"):
            entry["pgproxy_vs_pgbouncer"] = round(tps["pgproxy"] / tps["pgbouncer"], 3)
            entry["pgproxy_vs_direct"] = round(tps["pgproxy"] / tps["direct"], 3)
            entry["pgbouncer_vs_direct"] = round(tps["pgbouncer"] / tps["direct"], 3)
        if name == "latency":
            for target in ("pgbouncer", "pgproxy"):
                entry[f"{target}_added_p50_us"] = medians[target]["p50_us"] - medians["direct"]["p50_us"]
                entry[f"{target}_added_p99_us"] = medians[target]["p99_us"] - medians["direct"]["p99_us"]
        summary[name] = entry
    return summary


def table(summary: dict) -> str:
    lines = [f"{'scenario':42s} {'direct':>10s} {'pgbouncer':>10s} {'pgproxy':>10s} {'÷bouncer':>9s} {'÷direct':>8s}"]
    for name, entry in summary.items():
        title = SCENARIOS[name][0]
        if name == "memory":
            lines.append(f"{title:42s} {'-':>10s} {entry['pgbouncer']['bytes_per_client']:10d} "
                         f"{entry['pgproxy']['bytes_per_client']:10d} {entry['pgproxy']['bytes_per_client'] / max(1, entry['pgbouncer']['bytes_per_client']):9.2f}"
                         f"  bytes per idle client ({entry['clients']} clients; {entry['note']})")
            continue
        if name == "ldap_connect":
            lines.append(f"{title:42s} {'-':>10s} {'-':>10s} {entry['cache_off']:10.0f}  every login binds "
                         f"(cache off); {entry['cache_on']:.0f}/s with the 30 s login cache")
            continue
        if "note" in entry:
            lines.append(f"{title:42s} {entry['note']}")
            continue
        m = entry["median"]
        lines.append(f"{title:42s} " + " ".join(f"{m[t]['tps']:10.0f}" for t in ORDER)
                     + f" {entry['pgproxy_vs_pgbouncer']:9.2f} {entry['pgproxy_vs_direct']:8.2f}")
        if "guard_on_vs_off" in entry:
            lines.append(f"{'   guard on ÷ guard off (pgproxy, scenario 1)':42s} {entry['guard_on_vs_off']:.3f}")
        if name == "latency":
            lines.append(f"{'   p50 / p99 µs':42s} " + " ".join(f"{m[t]['p50_us']:>4.0f}/{m[t]['p99_us']:<5.0f}" for t in ORDER)
                         + f"  added p50 {entry['pgproxy_added_p50_us']:.0f} µs (PgBouncer {entry['pgbouncer_added_p50_us']:.0f})")
    lines.append("(tps; connection rate = connections/s; medians over rounds)")
    return "\n".join(lines)


def chart(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n, e in summary.items() if "median" in e]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    for i, target in enumerate(ORDER):
        values = [summary[n]["median"][target]["tps"] for n in names]
        ax.bar([x + (i - 1) * width for x in range(len(names))], values, width, label=target)
    ax.set_xticks(range(len(names)), [CHART_LABELS.get(n, n) for n in names], fontsize=9)
    ax.set_ylabel("transactions (or connections) per second")
    ax.set_title("pgproxy vs PgBouncer vs direct PostgreSQL (medians)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
