"""python -m bench.guard [ROUNDS] — what the statement guard costs, measured fairly.

Scenario 1 (select-only, simple protocol, 16 clients) against pgproxy with the guard on
and the same proxy with ``guard.unsafe_disable``, alternating run by run (the order
flips every round) so drift on a shared machine hits both alike. Prints the medians and
their ratio.
"""

from __future__ import annotations

import statistics
import sys

from bench.__main__ import SCENARIOS, run_pgbench
from bench.targets import Bench


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 6
    bench = Bench(10).start()
    tps: dict[str, list[float]] = {"pgproxy": [], "pgproxy_noguard": []}
    try:
        for round_no in range(rounds):
            order = list(tps) if round_no % 2 == 0 else list(reversed(tps))
            for name in order:
                tps[name].append(run_pgbench(bench.targets[name], SCENARIOS["select_simple"][1], 5)["tps"])
                print(f"   {name:16s} round {round_no}: {tps[name][-1]:.0f} tps", file=sys.stderr, flush=True)
    finally:
        bench.stop()
    on, off = statistics.median(tps["pgproxy"]), statistics.median(tps["pgproxy_noguard"])
    print(f"guard on {on:.0f} tps, guard off {off:.0f} tps (medians of {rounds}); on ÷ off = {on / off:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
