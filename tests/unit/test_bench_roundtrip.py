"""python -m bench.roundtrip: the real hot path over stand-ins, checked by what it did."""

from __future__ import annotations

import json

import pytest

from bench import roundtrip
from pgproxy.audit import AuditLog
from pgproxy.config import AuditSection


@pytest.mark.parametrize("scenario", roundtrip.SCENARIOS)
def test_each_round_trip_is_a_statement_in_the_trail(tmp_path, scenario):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(AuditSection(file=str(path), queue_size=100_000))
    try:
        micros = roundtrip.round_trips(scenario, 300, audit)
    finally:
        audit.close()
    assert 0 < micros < 10_000
    records = [json.loads(line) for line in path.read_text().splitlines()]
    statements = [r for r in records if r["event"] == "statement"]
    assert len(statements) == 2000 + 300  # the warm-up and the measured round trips, each once
    assert {r["user"] for r in statements} == {"alice"} and {r["outcome"] for r in statements} == {"ok"}
    assert statements[-1]["statement"].startswith(roundtrip.SELECT)
    if scenario.startswith("prepared"):
        assert statements[-1]["parameters"] == ["300"]  # the 300th Bind: aid = 300


def test_the_command_prints_every_scenario(capsys):
    assert roundtrip.main(["--rounds", "1", "--number", "200"]) == 0
    out = capsys.readouterr().out
    assert all(f"{s} " in out for s in roundtrip.SCENARIOS) and "µs per round trip" in out
    assert out.startswith("compiled: ")
