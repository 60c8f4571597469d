"""The benchmark harness runs end to end (seconds, not a measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_runs_all_three_targets_and_writes_its_report(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--only", "select_simple,latency,ldap_connect",
                             "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    medians = report["summary"]["select_simple"]["median"]
    assert all(medians[t]["tps"] > 0 for t in ("direct", "pgbouncer", "pgproxy"))
    assert report["summary"]["latency"]["pgproxy_added_p50_us"] is not None
    assert {r["target"] for r in report["raw"]} == {"direct", "pgbouncer", "pgproxy"}
    assert report["machine"]["cpus"] >= 1 and "PgBouncer" in report["versions"]["pgbouncer"]
    assert "1 select-only, simple protocol" in result.stdout and "÷bouncer" in result.stdout
    assert (tmp_path / "latest.png").stat().st_size > 1000
    ldap = report["summary"]["ldap_connect"]  # directory logins per second, cache off and on
    assert ldap["cache_off"] > 0 and ldap["cache_on"] > 0
    assert "8 new LDAP-authenticated connections/s" in result.stdout
