"""SASL OAUTHBEARER parsing and answers (auth/oauthbearer.py), protocol 3.2 messages, method
choice and RFC 7662 answer checks — pure, no sockets."""

from __future__ import annotations

import json
import struct
import time

import pytest

from pgproxy.auth import oauthbearer as oauth
from pgproxy.auth.introspection import check_answer
from pgproxy.errors import ClientError, PgProxyError
from pgproxy.protocol import messages as msg

URL = "https://idp.example/realms/x/.well-known/openid-configuration"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"


def initial(data: bytes | None, mechanism: str = "OAUTHBEARER") -> bytes:
    """A SASLInitialResponse body (what follows the 'p' header)."""
    return msg.cstr(mechanism) + (struct.pack("!i", -1) if data is None else struct.pack("!i", len(data)) + data)


def exchange() -> oauth.OAuthBearerExchange:
    return oauth.OAuthBearerExchange(URL, "openid pgproxy")


def violation(fn, *args) -> ClientError:
    with pytest.raises(ClientError) as info:
        fn(*args)
    assert info.value.sqlstate == "08P01" and info.value.fatal
    return info.value


# --- the client's first message --------------------------------------------------------

def test_libpq_token_message_gives_the_auth_value():
    assert oauth.parse_client_response(b"n,,\x01auth=Bearer " + TOKEN.encode() + b"\x01\x01") == "Bearer " + TOKEN


def test_libpq_discovery_message_is_an_empty_auth_value():
    assert oauth.parse_client_response(b"n,,\x01auth=\x01\x01") == ""


def test_y_flag_host_port_and_unknown_keys_are_accepted_as_postgresql_does():
    data = b"y,,\x01host=db.example\x01port=5432\x01auth=Bearer abc\x01xtra=1\x01\x01"
    assert oauth.parse_client_response(data) == "Bearer abc"


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (b"p=tls-unique,,\x01auth=Bearer x\x01\x01", "channel binding"),
    (b"x,,\x01auth=Bearer x\x01\x01", "flag"),
    (b"n;,\x01auth=Bearer x\x01\x01", "comma expected"),
    (b"n,a=alice,\x01auth=Bearer x\x01\x01", "authzid"),
    (b"n,b,\x01auth=Bearer x\x01\x01", "GS2 header"),
    (b"n,,auth=Bearer x\x01\x01", "separator expected"),
    (b"n,,\x01auth=Bearer x\x01", "unterminated"),           # no final separator
    (b"n,,\x01auth=Bearer x,\x01", "unterminated"),           # a comma is no separator
    (b"n,,\x01auth=Bearer x\x02\x02", "unterminated"),       # nor is \x02
    (b"n,,\x01\x01", "no auth value"),                        # missing auth
    (b"n,,\x01host=x\x01\x01", "no auth value"),
    (b"n,,\x01auth=a\x01auth=b\x01\x01", "more than one"),
    (b"n,,\x01auth\x01\x01", "without a value"),
    (b"n,,\x01=x\x01auth=x\x01\x01", "key name"),
    (b"n,,\x01au th=x\x01\x01", "key name"),
    (b"n,,\x01auth=Bearer \xc3\xa9\x01\x01", "invalid character"),
    (b"n,,\x01auth=Bearer x\x01\x01trailing", "after the final separator"),
    (b"n,,\x01auth=Bearer x\0\x01\x01", "NUL"),
    (b"n,,\x01auth=Bearer " + b"a" * oauth.MAX_CLIENT_RESPONSE + b"\x01\x01", "longer than"),
])
def test_malformed_client_messages_are_protocol_violations(data, why):
    err = violation(oauth.parse_client_response, data)
    assert why in err.message
    assert b"Bearer x" not in err.message.encode() and "alice" not in err.message


@pytest.mark.parametrize("auth, token", [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER   abc==", "abc=="),
    ("Bearer a-b.c_d~e+f/g", "a-b.c_d~e+f/g"),
])
def test_bearer_values(auth, token):
    assert oauth.bearer_token(auth) == (token, "")


@pytest.mark.parametrize("auth", ["Basic s3cr3t", "Bearer", "Bearer ", "Bearer s3cr3t x", "Bearer ====",
                                  "Bearer s3=cr3t", "Bearer s3\tcr3t", "Bearers3cr3t"])
def test_values_that_are_no_bearer_token_are_refused_without_quoting_them(auth):
    token, why = oauth.bearer_token(auth)
    assert token is None and why and "s3" not in why


# --- the exchange, as libpq runs it ------------------------------------------------------

def test_discovery_round_trip_then_fatal_28000():
    ex = exchange()
    step = ex.receive(initial(b"n,,\x01auth=\x01\x01"))
    assert isinstance(step, oauth.Challenge)
    assert json.loads(step.data) == {"status": "invalid_token", "openid-configuration": URL,
                                     "scope": "openid pgproxy"}
    done = ex.receive(b"\x01")
    assert done == oauth.Refuse(discovery=True, reason="OAuth discovery requested")
    err = oauth.bearer_refused("alice", done.reason)
    assert (err.sqlstate, err.severity) == ("28000", "FATAL")
    assert err.message == 'OAuth bearer authentication failed for user "alice"'


def test_a_token_is_handed_over_for_validation_and_never_shown():
    ex = exchange()
    step = ex.receive(initial(b"n,,\x01auth=Bearer " + TOKEN.encode() + b"\x01\x01"))
    assert step == oauth.Validate(TOKEN) and TOKEN not in repr(step)
    violation(ex.receive, b"\x01")  # nothing may come while the token is checked
    ex2 = exchange()
    ex2.receive(initial(b"n,,\x01auth=Bearer " + TOKEN.encode() + b"\x01\x01"))
    ex2.accepted()
    assert ex2.step is oauth.Step.DONE


def test_a_refused_token_gets_the_error_json_then_the_exchange_fails():
    ex = exchange()
    ex.receive(initial(b"n,,\x01auth=Bearer " + TOKEN.encode() + b"\x01\x01"))
    challenge = ex.refused("token expired")
    assert json.loads(challenge.data)["status"] == "invalid_token"
    assert ex.receive(b"\x01") == oauth.Refuse(discovery=False, reason="token expired")
    violation(ex.receive, b"\x01")  # the exchange is over


def test_a_value_that_is_no_bearer_token_fails_like_a_bad_token():
    ex = exchange()
    step = ex.receive(initial(b"n,,\x01auth=Basic YWxpY2U6cHc=\x01\x01"))
    assert isinstance(step, oauth.Challenge) and ex.step is oauth.Step.AWAIT_ACK and not ex.discovery
    done = ex.receive(b"\x01")
    assert not done.discovery and "YWxpY2U6cHc" not in done.reason


def test_no_initial_response_gets_an_empty_challenge_first():
    ex = exchange()
    assert ex.receive(initial(None)) == oauth.Challenge(b"")
    assert ex.receive(b"n,,\x01auth=Bearer abc\x01\x01") == oauth.Validate("abc")


@pytest.mark.parametrize("ack", [b"", b"\x01\x01", b"x", b"n,,\x01auth=\x01\x01"])
def test_anything_but_a_lone_separator_after_the_error_is_a_violation(ack):
    ex = exchange()
    ex.receive(initial(b"n,,\x01auth=\x01\x01"))
    violation(ex.receive, ack)


@pytest.mark.parametrize("body", [
    initial(b"n,,\x01auth=\x01\x01", mechanism="SCRAM-SHA-256"),     # not the mechanism offered
    msg.cstr("OAUTHBEARER") + struct.pack("!i", 50) + b"short",      # length past the end
    msg.cstr("OAUTHBEARER") + struct.pack("!i", 2) + b"abc",         # bytes after the data
    msg.cstr("OAUTHBEARER") + struct.pack("!i", -7),                 # negative length
    b"OAUTHBEARER",                                                  # unterminated name
])
def test_malformed_initial_responses_are_violations(body):
    violation(exchange().receive, body)


def test_discovery_url_follows_postgresql():
    assert oauth.discovery_url("https://idp.example/realms/x") == "https://idp.example/realms/x/.well-known/openid-configuration"
    assert oauth.discovery_url(URL) == URL


# --- which method a connection gets ------------------------------------------------------

def test_method_choice():
    choose = oauth.choose_method
    both = ["oauthbearer", "password"]
    assert choose(["password"], {}, {}, "6432", "demo", True) == "password"
    assert choose(both, {}, {}, "6432", "demo", True) == "oauthbearer"
    assert choose(both, {}, {}, "6432", "demo", False) == "password"       # the IdP does not serve it
    assert choose(both, {"6433": "password"}, {}, "6433", "demo", True) == "password"
    assert choose(both, {}, {"legacy": "password"}, "6432", "legacy", True) == "password"
    assert choose(["password", "oauthbearer"], {"unix": "oauthbearer"}, {"demo": "password"}, "unix", "demo",
                  True) == "oauthbearer"                                    # the listener wins
    with pytest.raises(PgProxyError) as info:
        choose(both, {}, {"hr": "oauthbearer"}, "6432", "hr", False, "alice")
    assert info.value.sqlstate == "28000"


# --- protocol 3.2 messages --------------------------------------------------------------

def test_negotiate_protocol_version_carries_the_full_version_number():
    out = msg.negotiate_protocol_version(2, ["_pq_.a", "_pq_.b"])
    assert out[:1] == b"v"
    assert struct.unpack_from("!ii", out, 5) == (196608 + 2, 2)
    assert out[13:] == b"_pq_.a\0_pq_.b\0"


def test_backend_key_data_takes_short_and_long_keys():
    assert msg.backend_key_data(7, 0xDEADBEEF) == b"K" + struct.pack("!IiI", 12, 7, 0xDEADBEEF)
    key = bytes(range(32))
    assert msg.backend_key_data(7, key) == b"K" + struct.pack("!Ii", 40, 7) + key


@pytest.mark.parametrize("size", [4, 32, 256])
def test_cancel_requests_of_any_allowed_length(size):
    assert msg.parse_cancel_request(struct.pack("!i", 42) + b"k" * size) == (42, b"k" * size)


@pytest.mark.parametrize("size", [0, 3, 257])
def test_cancel_requests_with_bad_key_lengths_are_violations(size):
    violation(msg.parse_cancel_request, struct.pack("!i", 42) + b"k" * size)


def test_auth_sasl_lists_the_mechanisms():
    assert msg.auth_sasl(["OAUTHBEARER"]) == b"R" + struct.pack("!Ii", 4 + 4 + 12 + 1, 10) + b"OAUTHBEARER\0\0"
    assert msg.auth_sasl_continue(b"{}") == b"R" + struct.pack("!Ii", 10, 11) + b"{}"


# --- RFC 7662 answers ---------------------------------------------------------------------

ISS, AUD = "https://idp.example", "pgproxy"


def answer(**over):
    now = time.time()
    return {"active": True, "exp": now + 300, "iat": now, "iss": ISS, "aud": [AUD, "other"], "sub": "u1",
            "username": "alice", **over}


def test_an_active_answer_for_us_is_accepted():
    assert check_answer(answer(), ISS, AUD, 30, time.time())["username"] == "alice"
    assert check_answer(answer(aud=AUD), ISS, AUD, 30, time.time())


@pytest.mark.parametrize("over", [  # times as offsets from now: collection may be minutes before the test
    {"active": False}, {"active": "true"}, {"exp": None}, {"exp": "9999999999"}, {"exp": -100},
    {"nbf": 300}, {"iss": "https://evil.example"}, {"iss": None}, {"aud": "someone-else"},
    {"aud": None}, {"aud": ["a", "b"]},
])
def test_answers_that_do_not_admit_the_token(over):
    now = time.time()
    over = {k: now + v if k in ("exp", "nbf") and isinstance(v, int) else v for k, v in over.items()}
    with pytest.raises(PgProxyError) as info:
        check_answer(answer(**over), ISS, AUD, 30, now)
    assert info.value.sqlstate == "28P01"


def test_an_answer_that_is_no_object_is_the_service_failing():
    with pytest.raises(PgProxyError) as info:
        check_answer(["active"], ISS, AUD, 30, time.time())
    assert info.value.sqlstate == "28000"
