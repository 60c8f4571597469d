"""Identity passthrough: the token decides who you are, the role and the RLS rows follow."""

from __future__ import annotations

import subprocess
import time

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives import serialization

from tests.support.wire import login_error


def psql(proxy, user, token, sql, **env):
    return subprocess.run(["psql", "-X", "-A", "-t", "-c", sql, proxy.dsn(user)], capture_output=True, text=True,
                          env=proxy.env(token, **env), timeout=30)


def test_two_groups_see_different_rows_of_one_table(proxy, issuer):
    alice = psql(proxy, "alice", issuer.mint("alice", ["sales_emea"]), "SELECT customer FROM orders ORDER BY id")
    bob = psql(proxy, "bob", issuer.mint("bob", ["sales_amer"]), "SELECT customer FROM orders ORDER BY id")
    assert alice.returncode == 0, alice.stderr
    assert alice.stdout.split() == ["Bosch", "Siemens", "Nokia"]
    assert bob.stdout.split() == ["Walmart", "Target"]


def test_session_runs_as_mapped_role_with_identity_settings(proxy, issuer):
    token = issuer.mint("alice", ["sales_emea", "staff"])
    with psycopg.connect(proxy.dsn("alice", application_name="report"), password=token) as conn:
        row = conn.execute("SELECT current_user, current_setting('pgproxy.user'), current_setting('pgproxy.groups'),"
                           " current_setting('pgproxy.auth_method'), current_setting('application_name')").fetchone()
        assert row == ("emea_analyst", "alice", '{"sales_emea","staff"}', "jwt", "alice via report")
        # RLS policies can read the person, not just the role:
        conn.execute("INSERT INTO notes (body) VALUES ('from alice')")
        assert conn.execute("SELECT author, body FROM notes").fetchall() == [("alice", "from alice")]
    bob = issuer.mint("bob", ["sales_amer"])
    with psycopg.connect(proxy.dsn("bob"), password=bob) as conn:
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (0,)


def test_identity_with_no_matching_rule_is_refused(proxy, issuer):
    error = login_error(proxy.port, "mallory", issuer.mint("mallory", ["contractors"]))
    assert error["C"] == "28000" and error["S"] == "FATAL"
    assert "no [[roles]] rule matches" in proxy.log()


def _refused(proxy, user: str, token: str) -> None:
    error = login_error(proxy.port, user, token)
    assert error["C"] == "28P01" and error["S"] == "FATAL", error
    assert error["M"] == f'authentication failed for user "{user}"'  # vague on purpose


def _claims(issuer, **over):
    now = int(time.time())
    claims = {"iss": issuer.url, "aud": "pgproxy", "sub": "dev|eve", "preferred_username": "eve",
              "groups": ["sales_emea"], "iat": now, "nbf": now, "exp": now + 600}
    claims.update(over)
    return claims


def _rsa_token(claims, key, kid):
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


@pytest.mark.parametrize("case, expected_log", [
    ("expired", "ExpiredSignatureError"),
    ("not_yet_valid", "ImmatureSignatureError"),
    ("other_audience", "InvalidAudienceError"),
    ("other_issuer", "InvalidIssuerError"),
    ("unknown_key", "no signing key for kid='stranger'"),
    ("forged_signature", "InvalidSignatureError"),
    ("alg_none", "token algorithm 'none' is not allowed"),
    ("hs256_with_public_key", "token algorithm 'HS256' is not allowed"),
    ("no_exp", "MissingRequiredClaimError"),
    ("other_user", "names another user"),
])
def test_bad_tokens_are_refused_and_the_log_says_why(proxy, issuer, case, expected_log):
    kid, key = issuer._keys[-1]
    now = int(time.time())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if case == "expired":
        token = _rsa_token(_claims(issuer, iat=now - 7200, nbf=now - 7200, exp=now - 3600), key, kid)
    elif case == "not_yet_valid":
        token = _rsa_token(_claims(issuer, nbf=now + 3600, exp=now + 7200), key, kid)
    elif case == "other_audience":
        token = _rsa_token(_claims(issuer, aud="another-app"), key, kid)
    elif case == "other_issuer":
        token = _rsa_token(_claims(issuer, iss="https://evil.example"), key, kid)
    elif case == "unknown_key":
        token = _rsa_token(_claims(issuer), stranger, "stranger")
    elif case == "forged_signature":
        token = _rsa_token(_claims(issuer), stranger, kid)  # a known kid, the wrong key
    elif case == "alg_none":
        token = jwt.encode(_claims(issuer), None, algorithm="none")
    elif case == "hs256_with_public_key":
        public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        import base64, hashlib, hmac, json
        header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode()).rstrip(b"=")
        body = base64.urlsafe_b64encode(json.dumps(_claims(issuer)).encode()).rstrip(b"=")
        sig = base64.urlsafe_b64encode(hmac.new(public_pem, header + b"." + body, hashlib.sha256).digest()).rstrip(b"=")
        token = (header + b"." + body + b"." + sig).decode()
    elif case == "no_exp":
        claims = _claims(issuer)
        del claims["exp"]
        token = _rsa_token(claims, key, kid)
    else:  # other_user: a valid token for eve, presented as alice
        token = _rsa_token(_claims(issuer), key, kid)
    user = "alice" if case == "other_user" else "eve"
    _refused(proxy, user, token)
    log = proxy.log()
    assert expected_log in log
    assert token not in log
    def is_this_failure(r):
        return r["event"] == "auth_failure" and expected_log in r["reason"]

    records = proxy.audit(is_this_failure)
    assert all(token not in str(r) for r in records)
    failures = [r for r in records if is_this_failure(r)]
    assert failures and failures[-1]["user"] == user


def test_password_that_is_not_a_token_is_refused(proxy):
    _refused(proxy, "alice", "hunter2")
    assert "hunter2" not in proxy.log()


def test_rotated_signing_key_is_picked_up_without_restart(proxy, issuer):
    new_kid = issuer.rotate()
    token = issuer.mint("alice", ["sales_emea"])
    assert jwt.get_unverified_header(token)["kid"] == new_kid
    time.sleep(0.6)  # past jwks_refresh_min_interval_s, as after a real rotation
    with psycopg.connect(proxy.dsn("alice"), password=token) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("emea_analyst",)


@pytest.mark.parametrize("how", [
    {"options": "-c role=other_role"},
    {"options": "-c ROLE=other_role"},
    {"options": "--role=other_role"},
    {"options": "-crole=other_role"},
    {"options": r"-c geqo=off -c session_authorization=postgres"},
    {"options": "-c pgproxy.user=bob"},
    {"options": "-c PgProxy.User=bob"},
])
def test_options_naming_a_role_or_identity_setting_are_refused(proxy, issuer, how):
    error = login_error(proxy.port, "alice", issuer.mint("alice", ["sales_emea"]), **how)
    assert error["C"] == "42501"
    assert "may not be set through pgproxy" in error["M"]


def test_pgoptions_role_with_psql_does_not_change_role(proxy, issuer):
    result = psql(proxy, "alice", issuer.mint("alice", ["sales_emea"]), "SELECT current_user",
                  PGOPTIONS="-c role=other_role")
    assert result.returncode != 0
    assert "may not be set through pgproxy" in result.stderr
    assert "other_role" not in result.stdout


@pytest.mark.parametrize("param", ["role", "session_authorization", "pgproxy.user", "replication"])
def test_startup_parameters_naming_identity_are_refused(proxy, issuer, param):
    import asyncpg, asyncio

    async def connect():
        return await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="alice", database="demo",
                                     password=issuer.mint("alice", ["sales_emea"]),
                                     server_settings={param: "other_role"})

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(connect())
    assert info.value.sqlstate == "42501"


def test_one_sessions_reported_settings_never_show_in_another(proxy, issuer):
    """Connections with the same ParameterStatus values share one read-only copy of them (memory
    per idle client); what one session changes must reach its own client only — and what the
    next client is told at login must be what its connection really has."""
    alice, bob = issuer.mint("alice", ["sales_emea"]), issuer.mint("bob", ["sales_amer"])
    with psycopg.connect(proxy.dsn("alice"), password=alice) as plain:
        default = plain.info.parameter_status("DateStyle")
    changed = "SQL, DMY" if default != "SQL, DMY" else "German, DMY"
    with psycopg.connect(proxy.dsn("alice"), password=alice, autocommit=True) as a:
        a.execute(f"SET DateStyle = '{changed}'")
        assert a.info.parameter_status("DateStyle") == changed
        for user, token in (("alice", alice), ("bob", bob)):
            with psycopg.connect(proxy.dsn(user), password=token) as other:
                assert other.info.parameter_status("DateStyle") == default
                assert other.execute("SHOW DateStyle").fetchone() == (default,)
        assert a.execute("SHOW DateStyle").fetchone() == (changed,)
        assert a.info.parameter_status("DateStyle") == changed
    for _ in range(3):  # a's connection, reset, is in the pool again: whoever gets it is told the truth
        with psycopg.connect(proxy.dsn("alice"), password=alice) as after:
            shown = after.execute("SHOW DateStyle").fetchone()[0]
            assert after.info.parameter_status("DateStyle") == shown == default


def test_ordinary_startup_settings_pass_through(proxy, issuer):
    token = issuer.mint("alice", ["sales_emea"])
    with psycopg.connect(proxy.dsn("alice"), password=token, options="-c search_path=pg_catalog,public -c geqo=off",
                         ) as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("pg_catalog,public",)
        assert conn.execute("SHOW geqo").fetchone() == ("off",)
        assert conn.info.parameter_status("application_name").startswith("alice via")
