"""python -m bench.floor runs end to end: the bare relay carries real pgbench sessions
(seconds, not a measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import floor

ROOT = Path(__file__).resolve().parents[2]


def test_floor_runs_every_target_and_reports_pgproxy_above_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.floor", "--rounds", "1", "--seconds", "1", "--scale", "1",
                             "--protocols", "simple", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "floor.json").read_text())
    entry = report["summary"]["simple"]
    medians = entry["median"]
    assert set(medians) == set(floor.TARGETS)
    for name in floor.TARGETS:  # pgbench got through each (PostgreSQL's own SCRAM through the bare relay)
        assert medians[name]["tps"] > 0 and medians[name]["cpu_us"] > 0, (name, medians[name])
    above = entry["pgproxy_above_floor_us"]
    assert above["cpu_us"] == pytest.approx(medians["pgproxy"]["cpu_us"] - medians["floor"]["cpu_us"], abs=0.11)
    assert entry["own_budget_us"] == pytest.approx(2 * medians["pgbouncer"]["cpu_us"] - medians["floor"]["cpu_us"],
                                                   abs=0.11)
    assert "| simple | floor (bare uvloop relay) |" in result.stdout
    assert "2 × PgBouncer leaves" in result.stdout
