"""bench.floor's summary: medians over rounds, pgproxy's CPU above the floor, the budget."""

from __future__ import annotations

from bench import floor


def _run(protocol: str, target: str, round_no: int, tps: float, user: float, system: float) -> dict:
    return {"protocol": protocol, "target": target, "round": round_no, "tps": tps, "transactions": int(tps),
            "cpu_user_us": user, "cpu_system_us": system, "cpu_us": user + system}


def test_summary_takes_medians_over_rounds_and_subtracts_the_floor():
    raw = []
    for round_no, spread in enumerate((0.0, 10.0, -10.0)):  # the middle round is the median
        raw += [_run("prepared", "pgbouncer", round_no, 20000, 2, 20 + spread),
                _run("prepared", "floor", round_no, 18000, 4, 22 + spread),
                _run("prepared", "pgproxy", round_no, 10000, 30, 28 + spread),
                _run("prepared", "pgproxy_tx", round_no, 9000, 40, 30 + spread)]
    entry = floor.summarize(raw, ("prepared",))["prepared"]
    assert entry["median"]["floor"]["cpu_us"] == 26.0
    assert entry["pgproxy_above_floor_us"] == {"cpu_user_us": 26.0, "cpu_system_us": 6.0, "cpu_us": 32.0}
    assert entry["pgproxy_tx_above_floor_us"]["cpu_us"] == 44.0
    assert entry["own_budget_us"] == 2 * 22.0 - 26.0
    assert entry["pgproxy_vs_pgbouncer"] == round(58 / 22, 3)
