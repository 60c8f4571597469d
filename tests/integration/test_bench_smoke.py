"""The benchmark harness runs end to end (seconds, not a measurement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_runs_all_targets_and_writes_its_report(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--only", "select_simple,latency,ldap_connect",
                             "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    medians = report["summary"]["select_simple"]["median"]
    poolers = ("pgbouncer", "pgproxy", "pgproxy_workers")
    assert all(medians[t]["tps"] > 0 for t in ("direct", *poolers))
    assert report["summary"]["latency"]["pgproxy_added_p50_us"] is not None
    assert {r["target"] for r in report["raw"]} == {"direct", "pgbouncer", "pgproxy", "pgproxy_workers"}
    # pgproxy twice: one worker, and the default (one per CPU) -- a supervisor and that many workers
    assert report["settings"]["pgproxy_workers"] == min(len(os.sched_getaffinity(0)), 64)
    # CPU per transaction of each pooler's own processes; PostgreSQL's (direct) is not measured
    for target in poolers:
        cpu = medians[target]
        assert cpu["cpu_us"] > 0 and cpu["cpu_user_us"] >= 0 and cpu["cpu_system_us"] >= 0, (target, cpu)
        assert cpu["cpu_us"] == pytest.approx(cpu["cpu_user_us"] + cpu["cpu_system_us"], abs=0.02)
        assert cpu["cpu_us"] < 10_000  # µs, not ticks or seconds
    assert "cpu_us" not in medians["direct"]
    ratio = report["summary"]["select_simple"]["cpu_pgproxy_vs_pgbouncer"]
    assert ratio == round(medians["pgproxy"]["cpu_us"] / medians["pgbouncer"]["cpu_us"], 3)
    assert report["summary"]["select_simple"]["cpu_pgproxy_workers_vs_pgbouncer"] > 0
    assert "CPU µs per transaction" in result.stdout and f"{ratio:.2f}" in result.stdout
    markdown = (tmp_path / "latest.md").read_text()
    assert "| 1 select-only, simple protocol, 16 clients |" in markdown and "## CPU per transaction" in markdown
    assert report["machine"]["cpus"] >= 1 and "PgBouncer" in report["versions"]["pgbouncer"]
    assert "1 select-only, simple protocol" in result.stdout and "÷bouncer" in result.stdout
    assert (tmp_path / "latest.png").stat().st_size > 1000
    ldap = report["summary"]["ldap_connect"]  # directory logins per second, cache off and on
    assert ldap["cache_off"] > 0 and ldap["cache_on"] > 0
    assert "8 new LDAP-authenticated connections/s" in result.stdout


def test_bench_ab_compares_a_revision_with_the_working_tree():
    """python -m bench.ab: a revision checked out beside this tree, both served at once."""
    result = subprocess.run([sys.executable, "-m", "bench.ab", "HEAD", "--only", "select_simple", "--rounds", "1",
                             "--seconds", "1", "--pure"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "before: HEAD (pure Python)" in result.stdout and "(pure Python)" in result.stdout.split("after:")[1]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| 1 select-only")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    before_tps, after_tps = (float(x.replace(",", "")) for x in cells[1].split(" → "))
    assert before_tps > 0 and after_tps > 0
    assert cells[2].endswith("%") and cells[4].endswith("%")
    user, system = (float(x) for x in cells[5].split(" → ")[1].split("+"))  # after's split of its CPU
    assert user > 0 and system > 0
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "pgproxy-ab-" not in worktrees  # the temporary checkout is gone
