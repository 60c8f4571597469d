"""The pure parts of authentication hardening: the canonical user name, strict time claims,
the JWKS lifetime from Cache-Control, LDAP template filling and the user-name attribute,
the new options' checks, and the bound on the pre-authentication password message."""

from __future__ import annotations

import pytest

from pgproxy.auth import canonical_username
from pgproxy.auth.jwt import check_time_claims, jwks_lifetime
from pgproxy.auth.ldap import NO_MATCH, entry_username, fill
from pgproxy.config import ConfigError, parse_config
from pgproxy.errors import PgProxyError
from pgproxy.frontend.session import MAX_PASSWORD_MESSAGE
from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import MessageReader

BASE = {"backend": {"user": "pool"}, "audit": {"file": "/tmp/a.jsonl"}}


@pytest.mark.parametrize("startup, canonical, case_insensitive, expected", [
    ("alice", "alice", False, "alice"),
    ("alice", "alice", True, "alice"),
    ("ALICE", "alice", True, "alice"),           # mapped to the authority's spelling
    ("alice", "Alice", True, "Alice"),
    ("STRASSE", "straße", True, "straße"),        # casefold, not lower
    ("ALICE", "alice", False, None),
    ("Alice", "alice", False, None),
    (" alice", "alice", False, None),
    (" alice", "alice", True, None),              # whitespace never matches
    ("alice ", "alice", True, None),
    ("alice\u00a0", "alice", True, None),
    ("alice", " alice", False, None),             # nor in the authority's value
    ("alice", "", True, None),
    ("alice", None, True, None),
    ("alice", ["alice"], True, None),
    ("bob", "alice", True, None),
    ("ａｌｉｃｅ", "alice", True, None),          # full-width letters are another name
])
def test_the_user_name_is_the_authoritys_spelling(startup, canonical, case_insensitive, expected):
    if expected is not None:
        assert canonical_username(startup, canonical, case_insensitive, "claim 'x'") == expected
        return
    with pytest.raises(PgProxyError) as info:
        canonical_username(startup, canonical, case_insensitive, "claim 'x'")
    assert info.value.sqlstate == "28P01" and info.value.message == f'authentication failed for user "{startup}"'
    assert "claim 'x'" in info.value.log_detail or "whitespace" in info.value.log_detail


NOW = 1_800_000_000


@pytest.mark.parametrize("claims, max_lifetime, refused", [
    ({"exp": NOW, "iat": NOW - 60, "nbf": NOW - 60}, 0, None),
    ({"exp": NOW + 0.5}, 0, None),
    ({"exp": str(NOW)}, 0, "exp"),
    ({"exp": True}, 0, "exp"),
    ({"exp": NOW, "nbf": "0"}, 0, "nbf"),
    ({"exp": NOW, "iat": False}, 0, "iat"),
    ({"exp": NOW, "iat": None}, 0, "iat"),
    ({"exp": float("inf")}, 0, "exp"),
    ({"exp": float("nan")}, 0, "exp"),
    ({"exp": 10 ** 400}, 0, "exp"),
    ({"iat": NOW}, 0, "exp"),
    ({"exp": NOW, "iat": NOW - 3600}, 3600, None),
    ({"exp": NOW, "iat": NOW - 3601}, 3600, "max_token_lifetime_s"),
    ({"exp": NOW}, 3600, "iat"),
])
def test_time_claims_are_json_numbers_and_the_lifetime_is_bounded(claims, max_lifetime, refused):
    if refused is None:
        check_time_claims(claims, max_lifetime)
        return
    with pytest.raises(PgProxyError) as info:
        check_time_claims(claims, max_lifetime)
    assert info.value.sqlstate == "28P01" and refused in info.value.log_detail


@pytest.mark.parametrize("header, expected", [
    (None, 300), ("", 300), ("public", 300),
    ("max-age=60", 60), ("public, max-age=60, must-revalidate", 60), ('max-age="120"', 120),
    ("max-age=86400", 300),              # never longer than the option
    ("max-age=5", 30), ("no-cache", 30), ("no-store", 30), ("max-age=0", 30),  # never below the floor
    ("max-age=abc", 300), ("max-age=-5", 30), ("MAX-AGE=90", 90), ("max-age=100, max-age=50", 50),
])
def test_the_jwks_lifetime_honours_a_shorter_max_age_within_bounds(header, expected):
    assert jwks_lifetime(header, 300, 30) == expected


def test_ldap_templates_are_filled_once_and_the_user_name_attribute_is_single_valued():
    # A value containing a placeholder is not substituted again.
    assert fill("(|(member={dn})(memberUid={username}))", dn="cn={username}", username="bob") \
        == "(|(member=cn={username})(memberUid=bob))"
    assert fill("uid={username},ou=people", username="a\\,b") == "uid=a\\,b,ou=people"
    assert fill("(x={other})", username="u") == "(x={other})"
    assert NO_MATCH == "\\00"  # an escaped NUL in the filter, not a raw NUL character
    assert entry_username({"UID": ["alice"]}, "uid", "ALICE") == "alice"
    assert entry_username({"sAMAccountName": [b"Alice"]}, "samaccountname", "alice") == "Alice"
    for entry in ({}, {"uid": []}, {"uid": ["alice", "asmith"]}, {"uid": [b"\xff"]}):
        with pytest.raises(PgProxyError) as info:
            entry_username(entry, "uid", "alice")
        assert info.value.sqlstate == "28P01"


def _problems(auth: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "auth": auth})
    return info.value.problems


def test_the_new_options_are_checked():
    jwt = {"issuer": "https://idp", "audience": "pgproxy"}
    ldap = {"urls": ["ldap://dc1"], "user_dn_template": "uid={username}"}
    cfg = parse_config({**BASE, "auth": {"jwt": jwt, "ldap": ldap}})
    assert (cfg.auth.jwt.jwks_refresh_interval_s, cfg.auth.jwt.jwks_failure_grace_s,
            cfg.auth.jwt.max_token_lifetime_s) == (300, 300, 0)
    assert (cfg.auth.ldap.username_attribute, cfg.auth.ldap.username_case_insensitive) == ("uid", False)
    assert "auth.jwt.jwks_refresh_interval_s: must not be less than jwks_refresh_min_interval_s" in _problems(
        {"jwt": {**jwt, "jwks_refresh_interval_s": 10}})
    assert "auth.jwt.jwks_refresh_interval_s: must be greater than zero and at most 86400" in _problems(
        {"jwt": {**jwt, "jwks_refresh_interval_s": 0, "jwks_refresh_min_interval_s": 0}})
    assert "auth.jwt.jwks_failure_grace_s: must be between 0 and 3600" in _problems(
        {"jwt": {**jwt, "jwks_failure_grace_s": 7200}})
    assert "auth.jwt.max_token_lifetime_s: must not be negative" in _problems(
        {"jwt": {**jwt, "max_token_lifetime_s": -1}})
    assert "auth.ldap.username_attribute: not an attribute name" in _problems(
        {"ldap": {**ldap, "username_attribute": "uid)(x=*"}})
    assert parse_config({**BASE, "auth": {"ldap": {**ldap, "username_attribute": "sAMAccountName"}}})


def test_a_password_message_longer_than_the_bound_is_refused_on_its_header():
    reader = MessageReader(MAX_PASSWORD_MESSAGE)
    token = msg.password_message(b"x" * 16_384 + b"\0")  # the largest token the JWT check takes
    assert reader.feed(token[:7]) == [] and reader.feed(token[7:])[0][0] == ord("p")
    header = b"p" + (40 * 1024 * 1024).to_bytes(4, "big")
    with pytest.raises(PgProxyError) as info:
        reader.feed(header + b"y" * 1000)  # refused on the header: not one byte of the body is kept
    assert info.value.sqlstate == "08P01"
    assert MAX_PASSWORD_MESSAGE == 32 * 1024
