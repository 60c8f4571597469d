"""[[access]] conditions at login, tried as a security administrator would: a role that
requires MFA, one limited to a network (a loopback client against a PROXY-protocol
client from inside it), one limited to a time window, TLS, application names, and a
fallback role instead of a refusal. Each refusal is 28000 naming the condition in general
terms, the precise reason in the log, an access_denied audit record and a metric; the
role a session ends up with is checked in the database (current_user)."""

from __future__ import annotations

import datetime
import struct
import subprocess
import time

import psycopg
import pytest

from pgproxy.pgcluster import free_port
from pgproxy.protocol import messages as msg
from pgproxy.protocol.proxy_header import v1_header
from tests.support.ops import scrape, value
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import Wire, error_fields, login_error


def with_access(*rules: dict, **extra) -> dict:
    http = {"http": {"listen": f"127.0.0.1:{free_port()}"}}
    return merge(merge(http, extra), {"access": list(rules)})


def http_port(proxy: ProxyProcess) -> int:
    return int(proxy.config_path.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])


def current_user(proxy: ProxyProcess, user: str, token: str, **params) -> str:
    with psycopg.connect(proxy.dsn(user, **params), password=token) as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


def records(proxy: ProxyProcess, event: str, user: str, count: int = 1) -> list[dict]:
    """The ``event`` records of ``user``, once there are ``count`` of them (or 5 s passed)."""
    deadline = time.monotonic() + 5.0
    while True:
        found = [r for r in proxy.audit() if r.get("event") == event and r.get("user") == user]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def denials(proxy: ProxyProcess, user: str, count: int = 1) -> list[dict]:
    return records(proxy, "access_denied", user, count)


def test_a_role_requiring_mfa_refuses_a_password_sign_in_and_accepts_mfa(base_config, issuer):
    proxy = ProxyProcess(merge(base_config, with_access({"role": "emea_analyst", "require_amr": ["mfa"]})))
    try:
        weak = issuer.mint("alice", ["sales_emea"], amr=["pwd"])
        refused = login_error(proxy.port, "alice", weak)
        assert (refused["S"], refused["C"]) == ("FATAL", "28000")
        assert refused["M"] == 'user "alice" is not allowed to connect: this role requires multi-factor sign-in'
        assert "mfa" not in refused.get("D", "") and "access[0]" not in refused["M"]  # the rule stays in the log
        assert current_user(proxy, "alice", issuer.mint("alice", ["sales_emea"], amr=["pwd", "mfa"])) == "emea_analyst"
        assert current_user(proxy, "bob", issuer.mint("bob", ["sales_amer"], amr=["pwd"])) == "amer_analyst"  # unguarded

        assert "the sign-in's amr ['pwd'] contains none of ['mfa']" in proxy.log()
        [record] = denials(proxy, "alice")
        assert (record["role"], record["result"], record["conditions"]) == ("emea_analyst", "refused", ["amr"])
        assert "contains none of ['mfa']" in record["reason"]
        assert not [r for r in proxy.audit() if r.get("event") == "auth_failure"]  # a refusal, not a failed sign-in
        samples = scrape(http_port(proxy))
        assert value(samples, "pgproxy_access_denials_total", condition="amr", result="refused") == 1
        assert weak not in proxy.log() and weak not in proxy.audit_path.read_text()
    finally:
        assert proxy.stop() == 0


def login_through_balancer(port: int, client: tuple[str, int], user: str, token: str) -> tuple[Wire, list]:
    """A client behind a TCP balancer: the balancer's PROXY v1 header, then the client's startup."""
    wire = Wire(port)
    wire.send(v1_header(client, ("127.0.0.1", port)) + msg.startup_message({"user": user, "database": "demo"}))
    first = wire.read_message()
    if first is None or first[0] == "E":
        return wire, [first]
    assert first == ("R", struct.pack("!i", 3)), first
    wire.send(msg.password_message(token.encode() + b"\0"))
    return wire, wire.read_until("ZE")


def test_a_role_limited_to_a_network_refuses_a_loopback_client_and_accepts_one_inside_behind_a_balancer(
        base_config, issuer):
    direct, balanced = free_port(), free_port()
    proxy = ProxyProcess(merge(base_config, with_access(
        {"role": "emea_analyst", "networks": ["10.0.0.0/8"]},
        server={"listen": [f"127.0.0.1:{direct}", f"127.0.0.1:{balanced}"],
                "proxy_protocol_listeners": [str(balanced)], "trusted_proxies": ["127.0.0.1"],
                "plaintext_networks": ["127.0.0.0/8", "10.0.0.0/8", "192.0.2.0/24"]})), port=direct)
    try:
        token = issuer.mint("alice", ["sales_emea"])
        refused = login_error(direct, "alice", token)
        assert (refused["C"], refused["M"]) == ("28000", 'user "alice" is not allowed to connect: this role is not '
                                                         "available from this network")
        assert "client address 127.0.0.1 is in none of 10.0.0.0/8" in proxy.log()

        wire, replies = login_through_balancer(balanced, ("10.1.2.3", 40000), "alice", token)
        assert replies[-1][0] == "Z", replies
        wire.send(msg.query("SELECT current_user, inet_client_addr() IS NOT NULL"))
        rows = [body for kind, body in wire.read_until("Z") if kind == "D"]
        assert b"emea_analyst" in rows[0]
        wire.close()

        _, replies = login_through_balancer(balanced, ("192.0.2.7", 40001), "alice", token)  # outside, via the balancer
        assert error_fields(replies[-1][1])["C"] == "28000"
        refusals = denials(proxy, "alice", count=2)
        assert [r["client"].split(":")[0] for r in refusals] == ["127.0.0.1", "192.0.2.7"]
        starts = records(proxy, "session_start", "alice")
        assert [s["client"] for s in starts] == ["10.1.2.3:40000"]
    finally:
        assert proxy.stop() == 0


def hhmm(moment: datetime.datetime) -> str:
    return moment.strftime("%H:%M")


def test_a_time_window_around_now_admits_and_one_excluding_now_refuses(base_config, issuer):
    now = datetime.datetime.now(datetime.timezone.utc)
    hour = datetime.timedelta(hours=1)
    proxy = ProxyProcess(merge(base_config, with_access(
        {"role": "emea_analyst", "hours": [f"{hhmm(now - hour)}-{hhmm(now + hour)}"], "timezone": "UTC"},
        {"role": "amer_analyst", "hours": [f"{hhmm(now + 2 * hour)}-{hhmm(now + 3 * hour)}"],
         "days": ["mon-sun"], "timezone": "Asia/Tokyo"})))
    try:
        assert current_user(proxy, "alice", issuer.mint("alice", ["sales_emea"])) == "emea_analyst"
        refused = login_error(proxy.port, "bob", issuer.mint("bob", ["sales_amer"]))
        assert (refused["C"], refused["M"]) == ("28000", 'user "bob" is not allowed to connect: this role is not '
                                                         "available at this time")
        assert "Asia/Tokyo is outside its days and hours" in denials(proxy, "bob")[0]["reason"]
        assert value(scrape(http_port(proxy)), "pgproxy_access_denials_total", condition="time",
                     result="refused") == 1
    finally:
        assert proxy.stop() == 0


def test_tls_and_application_conditions(base_config, issuer):
    proxy = ProxyProcess(merge(base_config, with_access(
        {"role": "emea_analyst", "require_tls": True},
        {"role": "amer_analyst", "application_names": ["bi-*"]})))
    try:
        refused = login_error(proxy.port, "alice", issuer.mint("alice", ["sales_emea"]))
        assert refused["M"].endswith("this role requires an encrypted connection (TLS)")
        bob = issuer.mint("bob", ["sales_amer"])
        refused = login_error(proxy.port, "bob", bob, application_name="psql")
        assert refused["M"].endswith("this role is not available to this application")
        assert current_user(proxy, "bob", bob, application_name="bi-dashboards") == "amer_analyst"
    finally:
        assert proxy.stop() == 0


def test_a_fallback_role_lowers_the_session_instead_of_refusing(base_config, issuer):
    proxy = ProxyProcess(merge(base_config, with_access(
        {"role": "emea_analyst", "require_amr": ["mfa"], "fallback_role": "other_role"})))
    try:
        assert current_user(proxy, "alice", issuer.mint("alice", ["sales_emea"], amr=["pwd"])) == "other_role"
        with psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"], amr=["pwd"])) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the weaker role cannot read orders
                conn.execute("SELECT count(*) FROM orders")
        assert current_user(proxy, "alice", issuer.mint("alice", ["sales_emea"], amr=["mfa"])) == "emea_analyst"
        lowered = denials(proxy, "alice", count=2)
        assert len(lowered) == 2 and all((r["role"], r["result"], r["fallback_role"], r["conditions"]) ==
                                         ("emea_analyst", "lowered", "other_role", ["amr"]) for r in lowered)
        starts = records(proxy, "session_start", "alice", count=3)
        assert [s["role"] for s in starts] == ["other_role", "other_role", "emea_analyst"]
        assert value(scrape(http_port(proxy)), "pgproxy_access_denials_total", condition="amr",
                     result="lowered") == 2
    finally:
        assert proxy.stop() == 0


def test_oauthbearer_sign_ins_meet_the_same_conditions(base_config, issuer):
    proxy = ProxyProcess(merge(base_config, with_access(
        {"role": "emea_analyst", "require_amr": ["mfa"]},
        auth={"methods": ["oauthbearer"], "oauth_scope": "openid pgproxy"})))
    try:
        for amr, expected in ((["pwd"], "E"), (["pwd", "mfa"], "Z")):
            wire = Wire(proxy.port)
            wire.send(msg.startup_message({"user": "alice", "database": "demo"}))
            kind, _ = wire.read_message()
            assert kind == "R"
            token = issuer.mint("alice", ["sales_emea"], amr=amr)
            wire.send(msg.sasl_initial_response("OAUTHBEARER", b"n,,\x01auth=Bearer " + token.encode() + b"\x01\x01"))
            last = wire.read_until("ZE")[-1]
            assert last[0] == expected, last
            if expected == "E":
                fields = error_fields(last[1])
                assert (fields["C"], fields["M"]) == ("28000", 'user "alice" is not allowed to connect: this role '
                                                               "requires multi-factor sign-in")
            wire.close()
        assert [r["auth_method"] for r in denials(proxy, "alice")] == ["oauthbearer"]
    finally:
        assert proxy.stop() == 0


def test_check_config_names_a_bad_access_rule(base_config, tmp_path):
    from tests.support.proxy import to_toml
    import sys
    path = tmp_path / "pgproxy.toml"
    path.write_text(to_toml(merge(base_config, {"audit": {"file": str(tmp_path / "a.jsonl")},
                                                "access": [{"role": "emea_analyst", "networks": ["10.0.0.0/33"],
                                                            "hours": ["25:00-26:00"]}]})))
    done = subprocess.run([sys.executable, "-m", "pgproxy", "check-config", "-c", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "access[0].networks[0]: not an address, network or \"unix\": '10.0.0.0/33'" in done.stderr
    assert "access[0].hours[0]: '25:00-26:00' is not HH:MM-HH:MM" in done.stderr
