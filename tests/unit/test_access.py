"""[[access]] conditions, evaluated purely: an identity, a connection context and a clock
in, unmet conditions (or a lowered role) out; and their validation at load."""

from __future__ import annotations

import datetime

import pytest

from pgproxy.auth import Identity
from pgproxy.auth.jwt import sign_in_strength
from pgproxy.config import AccessRule, ConfigError, parse_config
from pgproxy.policy.access import (MESSAGES, Context, access_refused, check_rules, evaluate, in_window, parse_days,
                                   parse_hours, token_expired)
from pgproxy.roles import admit_role

UTC = datetime.timezone.utc
# Monday 7 December 2026, 10:30 UTC (11:30 in Berlin)
MONDAY_1030 = datetime.datetime(2026, 12, 7, 10, 30, tzinfo=UTC).timestamp()
LOOPBACK = Context(peer_ip="127.0.0.1")
MINIMAL = {"backend": {"user": "pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "pgproxy"}},
           "audit": {"file": "/tmp/audit.jsonl"}}


def person(amr=(), acr="", auth_time=None, groups=("dbas",), client_id="", method="jwt") -> Identity:
    return Identity(username="alice", subject="dev|alice", issuer="https://idp", groups=tuple(groups),
                    auth_method=method, expires_at=MONDAY_1030 + 600, client_id=client_id, amr=tuple(amr), acr=acr,
                    auth_time=auth_time)


def unmet(rule: AccessRule, identity: Identity, context: Context = LOOPBACK, now: float = MONDAY_1030,
          role: str = "dba") -> list[str]:
    return [u.condition for u in evaluate([rule], identity, role, context, now)[0]]


def test_a_role_requiring_mfa_refuses_a_password_sign_in_and_accepts_one_with_mfa():
    rule = AccessRule(role="dba", require_amr=["mfa"])
    assert unmet(rule, person(amr=["pwd"])) == ["amr"]
    assert unmet(rule, person(amr=["pwd", "mfa"])) == []
    assert unmet(rule, person(method="ldap")) == ["amr"]  # a directory login carries no amr: fail closed
    assert unmet(rule, person(amr=["pwd"]), role="analyst") == []  # another role is not guarded
    refusal = access_refused("alice", evaluate([rule], person(amr=["pwd"]), "dba", LOOPBACK, MONDAY_1030)[0])
    assert (refusal.sqlstate, refusal.severity) == ("28000", "FATAL")
    assert refusal.message == 'user "alice" is not allowed to connect: this role requires multi-factor sign-in'
    assert "['pwd'] contains none of ['mfa']" in refusal.log_detail and "access[0] (role 'dba')" in refusal.log_detail


def test_acr_and_the_age_of_the_sign_in():
    rule = AccessRule(role="dba", require_acr=["gold", "platinum"], max_auth_age_s=900)
    fresh = MONDAY_1030 - 60
    assert unmet(rule, person(acr="gold", auth_time=fresh)) == []
    assert unmet(rule, person(acr="silver", auth_time=fresh)) == ["acr"]
    assert unmet(rule, person(acr="gold", auth_time=MONDAY_1030 - 901)) == ["auth_age"]
    assert unmet(rule, person(acr="gold")) == ["auth_age"]  # no auth_time: not met


def test_source_networks_by_client_address():
    rule = AccessRule(role="dba", networks=["10.0.0.0/8", "2001:db8::/32"])
    assert unmet(rule, person(), Context("127.0.0.1")) == ["network"]
    assert unmet(rule, person(), Context("10.20.30.40")) == []
    assert unmet(rule, person(), Context("::ffff:10.1.1.1")) == []  # IPv4-mapped counts as IPv4
    assert unmet(rule, person(), Context("2001:db8::5")) == []
    assert unmet(rule, person(), Context("unix")) == ["network"]
    assert unmet(AccessRule(role="dba", networks=["unix"]), person(), Context("unix")) == []
    assert unmet(rule, person(), Context("not-an-address")) == ["network"]
    detail = evaluate([rule], person(), "dba", Context("127.0.0.1"), MONDAY_1030)[0][0].detail
    assert "client address 127.0.0.1 is in none of 10.0.0.0/8, 2001:db8::/32" in detail


def test_tls_and_client_certificates():
    assert unmet(AccessRule(role="dba", require_tls=True), person()) == ["tls"]
    assert unmet(AccessRule(role="dba", require_tls=True), person(), Context("127.0.0.1", tls=True)) == []
    cert = AccessRule(role="dba", require_client_certificate=True)
    assert unmet(cert, person()) == ["tls", "client_certificate"]  # a certificate implies TLS
    assert unmet(cert, person(), Context("127.0.0.1", tls=True)) == ["client_certificate"]
    assert unmet(cert, person(), Context("127.0.0.1", tls=True, client_certificate=True)) == []


def test_time_windows_with_days_hours_and_a_time_zone():
    assert datetime.datetime.fromtimestamp(MONDAY_1030, UTC).weekday() == 0
    office = AccessRule(role="dba", days=["mon-fri"], hours=["08:00-18:00"], timezone="Europe/Berlin")
    assert unmet(office, person()) == []
    assert unmet(office, person(), now=MONDAY_1030 + 8 * 3600) == ["time"]     # 19:30 in Berlin
    assert unmet(office, person(), now=MONDAY_1030 - 2 * 86400) == ["time"]    # Saturday
    night = AccessRule(role="dba", hours=["22:00-06:00"])                      # passes midnight, UTC
    assert unmet(night, person()) == ["time"]
    assert unmet(night, person(), now=MONDAY_1030 + 12 * 3600) == []           # 22:30
    assert unmet(night, person(), now=MONDAY_1030 - 5 * 3600) == []            # 05:30
    assert unmet(AccessRule(role="dba", days=["sat", "sun"]), person()) == ["time"]
    assert unmet(AccessRule(role="dba", days=["fri-mon"]), person()) == []     # wraps the week
    assert unmet(AccessRule(role="dba", hours=["10:30-10:31"]), person()) == []  # start inclusive
    assert unmet(AccessRule(role="dba", hours=["10:00-10:30"]), person()) == ["time"]  # end exclusive
    assert unmet(AccessRule(role="dba", hours=["00:00-24:00"]), person()) == []
    detail = evaluate([office], person(), "dba", LOOPBACK, MONDAY_1030 + 8 * 3600)[0][0].detail
    assert "Mon 2026-12-07 19:30 Europe/Berlin is outside its days and hours" in detail


def test_application_and_client_patterns():
    rule = AccessRule(role="bi", application_names=["tableau*", "PowerBI"], client_ids=["bi-service"])
    bi = person(client_id="bi-service")
    assert unmet(rule, bi, Context("127.0.0.1", application_name="tableau 2026.1"), role="bi") == []
    assert unmet(rule, bi, Context("127.0.0.1", application_name="psql"), role="bi") == ["application"]
    assert unmet(rule, bi, Context("127.0.0.1", application_name="powerbi"), role="bi") == ["application"]  # case
    assert unmet(rule, person(client_id="laptop"), Context("127.0.0.1", application_name="PowerBI"),
                 role="bi") == ["client_id"]


def test_group_rules_follow_the_person_and_every_applicable_rule_must_hold():
    contractors = AccessRule(group="contractors", networks=["10.0.0.0/8"])
    both = AccessRule(role="dba", group="oncall", hours=["10:00-11:00"])
    rules = [contractors, both, AccessRule(role="dba", require_amr=["mfa"])]
    outsider = person(groups=["contractors", "oncall"], amr=["pwd"])
    found = evaluate(rules, outsider, "dba", LOOPBACK, MONDAY_1030)[0]
    assert [u.condition for u in found] == ["network", "amr"]  # fixed order, the client hears the first
    assert found[0].message == MESSAGES["network"]
    assert [u.condition for u in evaluate(rules, person(amr=["mfa"]), "dba", LOOPBACK, MONDAY_1030)[0]] == []
    templated = AccessRule(role="{username}_admin", require_amr=["mfa"])
    assert unmet(templated, person(), role="alice_admin") == ["amr"]


def test_a_fallback_role_lowers_the_session_instead_of_refusing():
    rules = [AccessRule(role="dba", require_amr=["mfa"], fallback_role="dba_readonly"),
             AccessRule(role="dba_readonly", networks=["127.0.0.0/8"], fallback_role="viewer"),
             AccessRule(role="viewer", hours=["09:00-17:00"])]
    strong = admit_role(person(amr=["mfa"]), "dba", rules, LOOPBACK, MONDAY_1030)
    assert strong.role == "dba" and strong.lowered == ()
    weak = admit_role(person(amr=["pwd"]), "dba", rules, LOOPBACK, MONDAY_1030)
    assert weak.role == "dba_readonly"
    assert [(a, [u.condition for u in unmet], b) for a, unmet, b in weak.lowered] == [("dba", ["amr"], "dba_readonly")]
    remote = admit_role(person(amr=["pwd"]), "dba", rules, Context("192.0.2.1"), MONDAY_1030)
    assert remote.role == "viewer" and [b for _, _, b in remote.lowered] == ["dba_readonly", "viewer"]
    late = admit_role(person(amr=["pwd"]), "dba", rules, Context("192.0.2.1"), MONDAY_1030 + 8 * 3600)
    assert late.role is None and [u.condition for u in late.unmet] == ["time"]  # the last role tried failed
    assert admit_role(person(), "analyst", rules, LOOPBACK, MONDAY_1030).role == "analyst"


def test_rules_are_validated_when_the_configuration_loads():
    problems: list[str] = []
    check_rules([AccessRule(),
                 AccessRule(role="a", networks=["10.0.0.0/33", "unix"], days=["monday"], hours=["9-17", "08:00-08:00",
                            "18:00-24:00"], timezone="Mars/Olympus", max_auth_age_s=-1, require_amr=[""]),
                 AccessRule(group="g", fallback_role="x"),
                 AccessRule(role="b", fallback_role="b"),
                 AccessRule(role="c", fallback_role="pool"),
                 AccessRule(role="d", fallback_role="e"), AccessRule(role="e", fallback_role="d")],
                "pool", problems)
    assert problems == [
        "access[0]: give role, group or both",
        "access[1].networks[0]: not an address, network or \"unix\": '10.0.0.0/33'",
        "access[1].days: 'monday' is not a day (mon ... sun) or a range of days (mon-fri)",
        "access[1].hours[0]: '9-17' is not HH:MM-HH:MM",
        "access[1].hours[1]: '08:00-08:00' is an empty window",
        "access[1].timezone: unknown time zone 'Mars/Olympus'",
        "access[1].max_auth_age_s: must not be negative",
        "access[1].require_amr: empty entries match nothing useful; remove them",
        "access[2].fallback_role: needs role (a group's conditions follow the person to any role)",
        "access[3].fallback_role: is the rule's own role",
        "access[4].fallback_role: is the pool role itself",
        "access: fallback roles form a cycle (d -> e -> d)",
    ]
    assert parse_days(["sat-mon", "wed"]) == {5, 6, 0, 2}
    assert parse_hours("18:00-24:00") == (1080, 1440)
    with pytest.raises(ValueError):
        parse_hours("25:00-26:00")


def test_the_configuration_takes_access_rules_and_the_expiry_options():
    cfg = parse_config({**MINIMAL, "access": [{"role": "dba", "require_amr": ["mfa"], "networks": ["10.0.0.0/8"],
                                                "days": ["mon-fri"], "hours": ["08:00-18:00"],
                                                "timezone": "Europe/Berlin", "fallback_role": "dba_readonly"}]})
    assert cfg.access[0].require_amr == ["mfa"] and cfg.auth.on_token_expiry == "end"
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "auth": {**MINIMAL["auth"], "on_token_expiry": "never"},
                      "access": [{"role": "dba", "networks": ["nowhere"], "require_mfa": True}]})
    assert info.value.problems == ["access[0].require_mfa: unknown key",
                                   "access[0].networks[0]: not an address, network or \"unix\": 'nowhere'",
                                   "auth.on_token_expiry: must be end or end_after_transaction"]
    ldap = {"urls": ["ldap://dir"], "user_dn_template": "uid={username},dc=x", "revalidate_s": 60.0}
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "auth": {"ldap": ldap}})
    assert "auth.ldap.revalidate_s: needs bind_dn" in info.value.problems[0]
    cfg = parse_config({**MINIMAL, "auth": {"ldap": {**ldap, "bind_dn": "cn=svc", "bind_password_env": "X"}}})
    assert cfg.auth.ldap.revalidate_s == 60.0  # simple bind, with a service account for the re-checks only
    with pytest.raises(ConfigError):  # without revalidate_s, bind_dn still means search-then-bind
        parse_config({**MINIMAL, "auth": {"ldap": {**ldap, "revalidate_s": 0.0, "bind_dn": "cn=svc",
                                                   "bind_password_env": "X"}}})


def test_sign_in_strength_claims_of_the_wrong_shape_count_as_absent():
    assert sign_in_strength({"amr": ["pwd", "mfa"], "acr": "gold", "auth_time": 1_700_000_000}) == \
        (("pwd", "mfa"), "gold", 1_700_000_000.0)
    assert sign_in_strength({"amr": "mfa", "acr": ["gold"], "auth_time": "1700000000"}) == ((), "", None)
    assert sign_in_strength({"amr": ["mfa", 7, None], "auth_time": True}) == (("mfa",), "", None)
    assert sign_in_strength({"amr": ["x"] * 100})[0] == ("x",) * 16  # bounded
    assert sign_in_strength({"auth_time": float("nan")})[2] is None


def test_in_window_and_the_expiry_error():
    from zoneinfo import ZoneInfo
    assert in_window(MONDAY_1030, frozenset({0}), ((600, 660),), ZoneInfo("UTC"))
    assert not in_window(MONDAY_1030, frozenset({1}), (), ZoneInfo("UTC"))
    exc = token_expired("token expired: exp 2026-12-07T10:40:00Z")
    assert (exc.message, exc.sqlstate, exc.severity) == ("token expired, sign in again", "28000", "FATAL")


def test_the_metric_labels_name_every_condition():
    from pgproxy.metrics import ACCESS_CONDITIONS
    assert ACCESS_CONDITIONS == tuple(MESSAGES)
