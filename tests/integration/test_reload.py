"""SIGHUP: a new role mapping applies to new sessions while existing ones continue;
a broken or restart-only change is rejected with the reason and the old one keeps running."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest

from tests.support.proxy import merge, to_toml


def _rewrite(proxy, base_config, **overrides) -> None:
    config = merge(merge(base_config, {"server": {"listen": [f"127.0.0.1:{proxy.port}"]},
                                       "audit": {"file": str(proxy.audit_path)}, "log": {"level": "debug"}}),
                   overrides)
    proxy.config_path.write_text(to_toml(config))


def _hup_and_wait(proxy, needle: str, count_before: int) -> None:
    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proxy.log().count(needle) <= count_before:
        assert time.monotonic() < deadline, f"no {needle!r} after SIGHUP"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_applies_a_new_role_mapping_to_new_sessions_only(make_proxy, base_config, issuer, workers):
    proxy = make_proxy(server={"workers": workers}, backend={"pool_size": 4})
    token = issuer.mint("alice", ["sales_emea"])
    before = psycopg.connect(proxy.dsn("alice"), password=token, autocommit=True)
    assert before.execute("SELECT current_user").fetchone() == ("emea_analyst",)

    _rewrite(proxy, base_config, server={"workers": workers}, backend={"pool_size": 4},
             roles=[{"group": "sales_emea", "role": "amer_analyst"}])
    _hup_and_wait(proxy, "configuration reloaded", proxy.log().count("configuration reloaded") + workers - 1)

    with psycopg.connect(proxy.dsn("alice"), password=token) as after:
        assert after.execute("SELECT current_user").fetchone() == ("amer_analyst",)
    assert before.execute("SELECT current_user").fetchone() == ("emea_analyst",)  # carried on
    before.close()


def test_broken_or_restart_only_configuration_is_rejected_and_the_old_one_runs(make_proxy, base_config, issuer):
    proxy = make_proxy()
    token = issuer.mint("alice", ["sales_emea"])
    proxy.config_path.write_text(proxy.config_path.read_text() + "\n[surprise]\nkey = 1\n")
    _hup_and_wait(proxy, "configuration reload rejected", 0)
    assert "surprise: unknown key" in proxy.log()
    with psycopg.connect(proxy.dsn("alice"), password=token) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("emea_analyst",)

    _rewrite(proxy, base_config, backend={"port": 1}, roles=[{"group": "sales_emea", "role": "amer_analyst"}])
    _hup_and_wait(proxy, "configuration reload rejected", 1)
    assert "needs a restart to change: backend.port" in proxy.log()
    with psycopg.connect(proxy.dsn("alice"), password=token) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("emea_analyst",)
