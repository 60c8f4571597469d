"""python -m bench [--quick | --smoke] — run every scenario against direct, PgBouncer, pgproxy.

pgproxy runs twice: with one worker process ("pgproxy") and with ``--workers`` (default 0,
one per CPU: "pgproxy_workers"). Targets alternate within each scenario (A B C D A B C D …)
because absolute numbers drift on shared machines; the report gives medians and the
ratios pgproxy ÷ PgBouncer and pgproxy ÷ direct.

Each pooler's run also records the CPU its own processes spent (user and system, from
/proc, the whole process tree: PgBouncer's process, pgproxy's supervisor and workers),
divided by the transactions pgbench reported for that run — µs per transaction, and
pgproxy's ÷ PgBouncer's. PostgreSQL's own CPU is not counted, so direct has none. The
interval is the whole pgbench run, its clients' logins included.

Results: tables on stdout, bench/results/latest.json (machine description and every raw
figure), bench/results/latest.md (the tables in Markdown) and bench/results/latest.png.
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

from bench.cpu import per_transaction, tree_ticks
from bench.targets import Bench, Target, pgbench

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("direct", "pgbouncer", "pgproxy", "pgproxy_workers")
POOLERS = ORDER[1:]  # whose CPU is measured
PROXIES = ("pgproxy", "pgproxy_workers")
CPU_KEYS = ("cpu_user_us", "cpu_system_us", "cpu_us")

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
    "memory": ("7 memory per idle client", None),  # session pooling, then transaction pooling
    "ldap_connect": ("8 new LDAP-authenticated connections/s (pgproxy only)", None),
}
CHART_LABELS = {"select_simple": "1 select, simple", "select_prepared": "2 select, prepared",
                "select_prepared_tx": "2t prepared, txn pool", "tpcb": "3 read/write", "many_clients": "4 500 clients",
                "connect_rate": "5 new connections/s", "latency": "6 one client", "select_tls": "1s select, TLS",
                "connect_tls": "5s new conn/s, TLS", "select_guard_off": "1g guard off"}
# Scenarios measured with transaction pooling: which target stands for each pooler.
# PgBouncer 1.18 has no prepared statements in transaction mode (1.21 added them), so
# scenario 2t compares with its session pooling.
TRANSACTION_TARGETS = {"select_prepared_tx": {"pgbouncer": "pgbouncer", "pgproxy": "pgproxy_tx",
                                              "pgproxy_workers": "pgproxy_workers_tx"},
                       "many_clients": {"pgbouncer": "pgbouncer_tx", "pgproxy": "pgproxy_tx",
                                        "pgproxy_workers": "pgproxy_workers_tx"}}
# Scenarios measured over TLS: every target with sslmode=require (PgBouncer and pgproxy
# terminate TLS; PostgreSQL does for direct).
GUARD_TARGETS = {"select_guard_off": {"pgproxy": "pgproxy_noguard",
                                      "pgproxy_workers": "pgproxy_workers_noguard"}}
TLS_TARGETS = {name: {t: f"{t}_tls" for t in ORDER} for name in ("select_tls", "connect_tls")}
MEMORY_CLIENTS = 1000  # session pooling, so each idle client holds a backend connection


def run_pgbench(target: Target, args: list[str], seconds: float, log_dir: Path | None = None) -> dict:
    """tps (and p50/p99 with ``log_dir``); for a target with a pid, also the CPU per
    transaction of its processes over the run (bench/cpu.py)."""
    cmd = [pgbench(), "-n", "-T", str(int(seconds)), *args]
    if log_dir is not None:
        cmd += ["-l", f"--log-prefix={log_dir}/{target.name}"]
    before = tree_ticks(target.pid) if target.pid else None
    out = subprocess.run(cmd + target.pgbench_args(), env=target.env(), capture_output=True, text=True,
                         cwd=log_dir or tempfile.gettempdir(), timeout=seconds + 120)
    spent = tree_ticks(target.pid) - before if before is not None else None
    if out.returncode != 0:
        raise RuntimeError(f"pgbench against {target.name} failed: {out.stderr.strip()[-500:]}")
    transactions = int(re.search(r"number of transactions actually processed: (\d+)", out.stdout).group(1))
    # no tps line when nothing ran: e.g. 500 clients still logging in when -T ran out on a busy machine
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1)) if transactions else 0.0
    result = {"tps": tps, "transactions": transactions}
    if spent is not None:
        result.update(per_transaction(spent, transactions))
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
    mode.add_argument("--quick", action="store_true",
                      help="1 round of 5 s per scenario and target (about 4 minutes)")
    mode.add_argument("--smoke", action="store_true", help="seconds-long check that the harness works")
    parser.add_argument("--rounds", type=int, help="rounds per scenario")
    parser.add_argument("--seconds", type=float, help="pgbench -T per run")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--out", default=str(RESULTS), help="directory for latest.json, .md and .png")
    parser.add_argument("--workers", type=int, default=0,
                        help="worker processes of the second pgproxy target (server.workers; 0 = one per CPU); "
                             "the first always has one")
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
    bench = Bench(scale, workers=args.workers).start()
    labels = target_labels(bench.workers_started)
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
                    print(f"   {labels[target_name]:10s} round {round_no}: {result}", file=sys.stderr, flush=True)
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
                           "pgproxy_workers": bench.workers_started, "target_labels": labels},
              "machine": machine(), "versions": versions, "summary": summary, "raw": raw}
    (out_dir / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "latest.md").write_text(markdown(report))
    print(table(summary, labels))
    print()
    print(cpu_table(summary, labels))
    try:
        chart(summary, out_dir / "latest.png", labels)
    except ImportError:
        print("(matplotlib not installed: no chart)", file=sys.stderr)
    return 0


def measure_memory(clients: int) -> dict:
    """Scenario 7, in its own setup: session pooling needs a pool as large as the clients.
    Transaction pooling (idle clients hold no connection) is measured too, in a fresh setup
    of its own: memory the first run freed would hide what the second one takes."""
    from bench.memory import measure
    print(f"-- {SCENARIOS['memory'][0]}: {clients} idle clients", file=sys.stderr, flush=True)
    result = {"clients": clients, "note": "session pooling, a backend connection each", "transaction": {}}
    for mode, suffix, into in (("session", "", result), ("transaction", "_tx", result["transaction"])):
        bench = Bench(1, pool_size=clients).start()
        try:
            for name, pid in bench.pids().items():
                into[name] = measure(bench.targets[name + suffix], pid, clients)
                print(f"   {name:9s} ({mode} pooling): {into[name]}", file=sys.stderr, flush=True)
        finally:
            bench.stop()
    return result


def target_labels(workers: int) -> dict[str, str]:
    return {"direct": "direct", "pgbouncer": "pgbouncer", "pgproxy": "pgproxy 1w",
            "pgproxy_workers": f"pgproxy {workers}w"}


def summarize(raw: list[dict], chosen: list[str]) -> dict:
    summary = {}
    for name in chosen:
        if name in ("memory", "ldap_connect"):
            continue  # measured in their own phases
        medians = {}
        for target in ORDER:
            runs = [r for r in raw if r["scenario"] == name and r["target"] == target]
            medians[target] = {key: statistics.median(r[key] for r in runs)
                               for key in ("tps", "p50_us", "p99_us", *CPU_KEYS) if runs and key in runs[0]}
        entry = {"median": medians}
        tps = {t: m.get("tps") for t, m in medians.items()}
        for target, base in [(p, "pgbouncer") for p in PROXIES] + [(p, "direct") for p in POOLERS]:
            if tps.get(target) is not None and tps.get(base):  # a base with 0 tps: no ratio
                entry[f"{target}_vs_{base}"] = round(tps[target] / tps[base], 3)
        bouncer_cpu = medians["pgbouncer"].get("cpu_us")
        for proxy in PROXIES:
            if bouncer_cpu and medians[proxy].get("cpu_us"):
                entry[f"cpu_{proxy}_vs_pgbouncer"] = round(medians[proxy]["cpu_us"] / bouncer_cpu, 3)
        if name == "latency":
            for target in POOLERS:
                entry[f"{target}_added_p50_us"] = medians[target]["p50_us"] - medians["direct"]["p50_us"]
                entry[f"{target}_added_p99_us"] = medians[target]["p99_us"] - medians["direct"]["p99_us"]
        summary[name] = entry
    return summary


def _ratio(entry: dict, key: str) -> str:
    return f"{entry[key]:.2f}" if entry.get(key) is not None else "-"


def tps_rows(summary: dict, labels: dict) -> tuple[list[str], list[list[str]]]:
    """The throughput table: a header and rows of cells, the last cell a free-text note."""
    workers = labels["pgproxy_workers"].split()[-1]
    header = ["scenario", *(labels[t] for t in ORDER), "÷bouncer", "÷direct", f"{workers}÷bouncer", ""]
    rows = []
    for name, entry in summary.items():
        title = SCENARIOS[name][0]
        if name == "memory":
            for row_title, measured, note in ((title, entry, entry["note"]),
                                              ("7t memory per idle client, transaction pooling",
                                               entry.get("transaction"), "no backend connection")):
                if not measured:  # results from before 7t was measured have none
                    continue
                bouncer, proxy = measured["pgbouncer"]["bytes_per_client"], measured["pgproxy"]["bytes_per_client"]
                rows.append([row_title, "-", str(bouncer), str(proxy), "-", f"{proxy / max(1, bouncer):.2f}", "", "",
                             f"bytes per idle client ({entry['clients']} clients, pgproxy 1w; {note})"])
            continue
        if name == "ldap_connect":
            rows.append([title, "-", "-", f"{entry['cache_off']:.0f}", "-", "", "", "",
                         f"every login binds (cache off); {entry['cache_on']:.0f}/s with the 30 s login cache"])
            continue
        if "note" in entry:
            rows.append([title, "", "", "", "", "", "", "", entry["note"]])
            continue
        m = entry["median"]
        rows.append([title, *(f"{m[t]['tps']:.0f}" if "tps" in m[t] else "-" for t in ORDER),
                     _ratio(entry, "pgproxy_vs_pgbouncer"), _ratio(entry, "pgproxy_vs_direct"),
                     _ratio(entry, "pgproxy_workers_vs_pgbouncer"), ""])
        if "guard_on_vs_off" in entry:
            rows.append(["   guard on ÷ guard off", "", "", "", "", "", "", "",
                         f"{entry['guard_on_vs_off']:.3f} (pgproxy 1w, scenario 1)"])
        if name == "latency":
            rows.append(["   p50 / p99 µs", *(f"{m[t]['p50_us']:.0f}/{m[t]['p99_us']:.0f}" for t in ORDER), "", "", "",
                         f"added p50 {entry['pgproxy_added_p50_us']:.0f} µs ({labels['pgproxy_workers']}: "
                         f"{entry['pgproxy_workers_added_p50_us']:.0f}, PgBouncer "
                         f"{entry['pgbouncer_added_p50_us']:.0f})"])
    return header, rows


def cpu_rows(summary: dict, labels: dict) -> tuple[list[str], list[list[str]]]:
    """CPU µs per transaction of each pooler's own processes: user+system=total."""
    workers = labels["pgproxy_workers"].split()[-1]
    header = ["CPU µs per transaction (user+system)", *(labels[t] for t in ORDER), "1w÷bouncer",
              f"{workers}÷bouncer", ""]
    rows = []
    for name, entry in summary.items():
        if "median" not in entry:
            continue
        m = entry["median"]
        cells = [f"{m[t]['cpu_user_us']:.1f}+{m[t]['cpu_system_us']:.1f}={m[t]['cpu_us']:.1f}"
                 if "cpu_us" in m[t] else "-" for t in ORDER]
        rows.append([SCENARIOS[name][0], *cells, _ratio(entry, "cpu_pgproxy_vs_pgbouncer"),
                     _ratio(entry, "cpu_pgproxy_workers_vs_pgbouncer"), ""])
    return header, rows


def render_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    widths[0] = max(widths[0], 42)
    lines = []
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:])]
        lines.append((" ".join(cells) + ("  " + row[-1] if row[-1] else "")).rstrip())
    return "\n".join(lines)


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    header = header[:-1] + ["note"] if any(r[-1] for r in rows) else header[:-1]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r[:len(header)]) + " |" for r in rows]
    return "\n".join(lines)


def table(summary: dict, labels: dict | None = None) -> str:
    labels = labels or target_labels(0)
    return render_text(*tps_rows(summary, labels)) + "\n(tps; connection rate = connections/s; medians over rounds)"


def cpu_table(summary: dict, labels: dict) -> str:
    return (render_text(*cpu_rows(summary, labels))
            + "\n(µs of the pooler's own processes per transaction pgbench reported, PostgreSQL's not counted;"
              " medians over rounds)")


def markdown(report: dict) -> str:
    summary, labels, settings = report["summary"], report["settings"]["target_labels"], report["settings"]
    return "\n".join([
        f"# Benchmark {report['started']}", "",
        f"`{report['command']}` — {settings['rounds']} round(s) × {settings['seconds']:g} s per scenario, "
        f"scale {settings['scale']}, pool {settings['pool_size']} (per pgproxy worker); "
        f"{report['machine']['cpus']} CPUs ({report['machine']['cpu_model']}); "
        f"{report['versions']['pgbouncer']}, PostgreSQL {report['versions']['postgresql']}.", "",
        "## Throughput (medians)", "", render_markdown(*tps_rows(summary, labels)), "",
        "## CPU per transaction (µs, user+system=total, medians)", "",
        "The pooler's own processes (PgBouncer's process; pgproxy's supervisor and workers) over each "
        "pgbench run, divided by the transactions it reported. PostgreSQL's CPU is not counted.", "",
        render_markdown(*cpu_rows(summary, labels)), ""])


def chart(summary: dict, path: Path, labels: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = labels or target_labels(0)
    names = [n for n, e in summary.items() if "median" in e]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(ORDER)
    for i, target in enumerate(ORDER):
        values = [summary[n]["median"][target].get("tps", 0) for n in names]
        ax.bar([x + (i - (len(ORDER) - 1) / 2) * width for x in range(len(names))], values, width,
               label=labels[target])
    ax.set_xticks(range(len(names)), [CHART_LABELS.get(n, n) for n in names], fontsize=9)
    ax.set_ylabel("transactions (or connections) per second")
    ax.set_title("pgproxy vs PgBouncer vs direct PostgreSQL (medians)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
