"""pg_dump through pgproxy: every statement it sends passes the guard (its set_config of
restrict_nonsystem_relation_kind by pg_settings.name included), in both pool modes."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.proxy import ProxyProcess, merge

SET_RESTRICT = ("SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings "
                "WHERE name = 'restrict_nonsystem_relation_kind'")


@pytest.fixture(scope="module", params=["session", "transaction"])
def proxy(request, base_config):
    process = ProxyProcess(merge(base_config, {"backend": {"pool_mode": request.param, "pool_size": 2}}))
    yield process
    assert process.stop() == 0


def test_pg_dump_runs_through_the_guard(proxy, issuer, database):
    database.psql("INSERT INTO items VALUES (7701, 'dumped by pg_dump') ON CONFLICT DO NOTHING", database="demo")
    done = subprocess.run(["pg_dump", "--table=items", "--enable-row-security", proxy.dsn("alice")],
                          capture_output=True, text=True, timeout=120,
                          env=proxy.env(issuer.mint("alice", ["sales_emea"])))
    assert done.returncode == 0, done.stderr
    assert "CREATE TABLE public.items" in done.stdout
    assert "7701\tdumped by pg_dump" in done.stdout
    records = proxy.audit(lambda r: r.get("statement") == SET_RESTRICT and r.get("event") == "statement")
    assert [r["statement"] for r in records if r.get("event") == "denied"] == []
    assert [r for r in records if r.get("event") == "statement" and r.get("statement") == SET_RESTRICT], \
        "pg_dump did not send the statement this test is about (a pg_dump older than 15.8?)"
