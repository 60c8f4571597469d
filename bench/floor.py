"""python -m bench.floor — how much of pgproxy's CPU per transaction is pgproxy's own work.

The floor is a bare byte relay on pgproxy's own runtime (this Python, asyncio, uvloop):
each client gets a connection of its own to PostgreSQL and the bytes are copied both
ways unread. It authenticates no one (PostgreSQL does, through it), parses nothing,
audits nothing. What it costs per transaction is what any proxy written on this loop
pays for the kernel (a read and a write each way, the wake-ups) and for the loop's
callbacks; whatever pgproxy spends above it is pgproxy's own work, which is what a
change to its code can cut. PgBouncer is measured beside both, in the same rounds.

    python -m bench.floor                       # 3 alternating rounds of 8 s, simple and prepared
    python -m bench.floor --rounds 5 --seconds 10 --protocols simple

Targets alternate within each round (PgBouncer, the floor, pgproxy with session pooling,
pgproxy with transaction pooling; one worker each), select-only, 16 clients, and the CPU is
measured as in ``python -m bench`` (bench/cpu.py: the process's user and system time from
/proc over the pgbench run, divided by the transactions it reported). Medians are printed
and written to ``<out>/floor.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.__main__ import run_pgbench
from bench.targets import BENCH_LOGIN, BENCH_PASSWORD, Bench, Target
from pgproxy.pgcluster import free_port
from tests.support.proxy import wait_for_port

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOLS = ("simple", "prepared")
TARGETS = ("pgbouncer", "floor", "pgproxy", "pgproxy_tx")
LABELS = {"pgbouncer": "PgBouncer", "floor": "floor (bare uvloop relay)", "pgproxy": "pgproxy, session pooling",
          "pgproxy_tx": "pgproxy, transaction pooling"}
KEYS = ("tps", "cpu_user_us", "cpu_system_us", "cpu_us")


# --- the relay -------------------------------------------------------------------------

class _ServerSide(asyncio.Protocol):
    def __init__(self, client: "_ClientSide") -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.client.transport.close()


class _ClientSide(asyncio.Protocol):
    """One client: bytes that come before the server connection is up wait in a list."""

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.server = None
        self.early: list[bytes] | None = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            server, _ = await asyncio.get_running_loop().create_connection(lambda: _ServerSide(self), *self.backend)
        except OSError:
            self.transport.close()
            return
        self.server = server
        early, self.early = self.early, None
        server.write(b"".join(early))

    def data_received(self, data: bytes) -> None:
        if self.server is None:
            self.early.append(data)
        else:
            self.server.write(data)

    def connection_lost(self, exc) -> None:
        if self.server is not None:
            self.server.close()


async def _serve(port: int, backend: tuple[str, int]) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _ClientSide(backend), "127.0.0.1", port)
    await server.serve_forever()


def relay(port: int, backend_port: int) -> None:
    import uvloop  # pgproxy's loop: the floor is of the runtime pgproxy runs on
    uvloop.install()
    asyncio.run(_serve(port, ("127.0.0.1", backend_port)))


# --- the measurement -------------------------------------------------------------------

def measure(rounds: int, seconds: float, protocols: tuple[str, ...], scale: int) -> dict:
    bench = Bench(scale).start()
    floor = None
    raw: list[dict] = []
    try:
        port = free_port()
        floor = subprocess.Popen([sys.executable, "-m", "bench.floor", "--relay", str(port),
                                  "--backend-port", str(bench.cluster.port)])
        wait_for_port(port, floor)
        bench.targets["floor"] = Target("floor", port, BENCH_LOGIN, BENCH_PASSWORD, pid=floor.pid)
        for protocol in protocols:
            args = ["-S", "-M", protocol, "-c", "16", "-j", "2"]
            for round_no in range(rounds):
                for name in TARGETS:
                    result = run_pgbench(bench.targets[name], args, seconds)
                    raw.append({"protocol": protocol, "target": name, "round": round_no, **result})
                    print(f"   {protocol:8} {name:10} round {round_no}: {result}", file=sys.stderr, flush=True)
    finally:
        if floor is not None:
            floor.terminate()
            floor.wait(10)
        bench.stop()
    return summarize(raw, protocols)


def summarize(raw: list[dict], protocols: tuple[str, ...]) -> dict:
    """Medians per protocol and target, and pgproxy's CPU above the floor."""
    summary: dict = {}
    for protocol in protocols:
        medians = {}
        for name in TARGETS:
            runs = [r for r in raw if r["protocol"] == protocol and r["target"] == name]
            medians[name] = {key: round(statistics.median(r[key] for r in runs), 1) for key in KEYS}
        floor, bouncer = medians["floor"], medians["pgbouncer"]
        entry = {"median": medians, "raw": [r for r in raw if r["protocol"] == protocol],
                 "floor_vs_pgbouncer": round(floor["cpu_us"] / bouncer["cpu_us"], 3),
                 # what the 2 x PgBouncer leaves for pgproxy's own work
                 "own_budget_us": round(2 * bouncer["cpu_us"] - floor["cpu_us"], 1)}
        for name in ("pgproxy", "pgproxy_tx"):
            entry[f"{name}_above_floor_us"] = {
                key: round(medians[name][key] - floor[key], 1) for key in ("cpu_user_us", "cpu_system_us", "cpu_us")}
            entry[f"{name}_vs_pgbouncer"] = round(medians[name]["cpu_us"] / bouncer["cpu_us"], 3)
        summary[protocol] = entry
    return summary


def report(summary: dict) -> str:
    lines = ["| protocol | target | TPS | CPU µs per txn (user+system=total) | ÷ PgBouncer | above the floor |",
             "|---|---|---|---|---|---|"]
    for protocol, entry in summary.items():
        medians = entry["median"]
        bouncer = medians["pgbouncer"]["cpu_us"]
        for name in TARGETS:
            m = medians[name]
            above = entry.get(f"{name}_above_floor_us")
            lines.append(f"| {protocol} | {LABELS[name]} | {m['tps']:,.0f} | "
                         f"{m['cpu_user_us']:.1f}+{m['cpu_system_us']:.1f}={m['cpu_us']:.1f} | "
                         f"{m['cpu_us'] / bouncer:.2f} | "
                         + (f"{above['cpu_user_us']:+.1f}{above['cpu_system_us']:+.1f}={above['cpu_us']:+.1f} |"
                            if above else "|"))
    lines.append("")
    for protocol, entry in summary.items():
        lines.append(f"{protocol}: 2 × PgBouncer leaves {entry['own_budget_us']:.1f} µs per transaction above the "
                     f"floor; pgproxy spends {entry['pgproxy_above_floor_us']['cpu_us']:.1f} (session pooling) and "
                     f"{entry['pgproxy_tx_above_floor_us']['cpu_us']:.1f} (transaction pooling)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="simple, prepared or both")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    parser.add_argument("--out", default=str(RESULTS), help="directory for floor.json")
    parser.add_argument("--relay", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the floor's own process
    parser.add_argument("--backend-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.relay:
        relay(args.relay, args.backend_port)
        return 0
    protocols = tuple(p for p in args.protocols.split(",") if p)
    if not protocols or set(protocols) - set(PROTOCOLS):
        parser.error(f"--protocols: {', '.join(PROTOCOLS)}")
    started = time.time()
    summary = measure(args.rounds, args.seconds, protocols, args.scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "floor.json").write_text(json.dumps({
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": "python -m bench.floor " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"rounds": args.rounds, "seconds": args.seconds, "clients": 16, "scale": args.scale},
        "summary": summary}, indent=2) + "\n")
    print(report(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
