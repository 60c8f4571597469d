"""The JWT authenticator against a real (dev) IdP over HTTP: caching, rotation, failing closed."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest

from pgproxy.auth.devissuer import DevIssuer
from pgproxy.auth.jwt import JwtAuthenticator
from pgproxy.config import JwtSection
from pgproxy.errors import PgProxyError


def _authenticator(issuer_url: str, **over) -> JwtAuthenticator:
    return JwtAuthenticator(JwtSection(issuer=issuer_url, audience="pgproxy", **over), None)


def test_validated_tokens_are_cached_until_shortly_before_expiry():
    issuer = DevIssuer().start()
    try:
        auth = _authenticator(issuer.url)
        token = issuer.mint("alice", ["g"])

        async def twice():
            first = await auth.authenticate("alice", token)
            second = await auth.authenticate("alice", token)
            return first, second

        first, second = asyncio.run(twice())
        assert first == second and first.groups == ("g",)
        assert auth.cache_hits == 1
        # A token expiring within the safety margin is verified every time, not cached.
        short = issuer.mint("alice", ttl_s=5)
        asyncio.run(auth.authenticate("alice", short))
        asyncio.run(auth.authenticate("alice", short))
        assert auth.cache_hits == 1
        # The cached claims still must match the connecting user.
        with pytest.raises(PgProxyError) as info:
            asyncio.run(auth.authenticate("bob", token))
        assert info.value.sqlstate == "28P01"
    finally:
        issuer.stop()


def test_unknown_kid_refetch_is_rate_limited():
    issuer = DevIssuer().start()
    try:
        auth = _authenticator(issuer.url, jwks_refresh_min_interval_s=60)
        asyncio.run(auth.authenticate("alice", issuer.mint("alice")))
        assert auth.keys.refreshes == 1
        stranger = jwt.encode({"iss": issuer.url, "aud": "pgproxy", "exp": int(time.time()) + 60,
                               "preferred_username": "alice"}, issuer.signing_key, algorithm="RS256",
                              headers={"kid": "nope"})
        for _ in range(5):
            with pytest.raises(PgProxyError) as info:
                asyncio.run(auth.authenticate("alice", stranger))
            assert info.value.sqlstate == "28P01"
        assert auth.keys.refreshes == 1  # a flood of unknown kids cannot hammer the IdP
    finally:
        issuer.stop()


def test_unreachable_idp_fails_closed():
    issuer = DevIssuer().start()
    token = issuer.mint("alice")
    url = issuer.url
    issuer.stop()
    auth = _authenticator(url, http_timeout_s=1)
    with pytest.raises(PgProxyError) as info:
        asyncio.run(auth.authenticate("alice", token))
    assert info.value.sqlstate == "28000" and info.value.fatal
    assert info.value.message == "authentication service unavailable"
    assert token not in info.value.log_detail


def test_hs256_only_with_a_configured_shared_secret():
    secret = b"a-long-shared-secret-for-hs256-tokens!"
    claims = {"iss": "https://idp", "aud": "pgproxy", "exp": int(time.time()) + 60, "preferred_username": "svc"}
    auth = JwtAuthenticator(JwtSection(issuer="https://idp", audience="pgproxy", algorithms=["HS256"]), secret)
    identity = asyncio.run(auth.authenticate("svc", jwt.encode(claims, secret, algorithm="HS256")))
    assert identity.username == "svc"
    with pytest.raises(PgProxyError):
        asyncio.run(auth.authenticate("svc", jwt.encode(claims, b"another-secret-of-sufficient-len!!", algorithm="HS256")))
    rsa_only = JwtAuthenticator(JwtSection(issuer="https://idp", audience="pgproxy"), None)
    with pytest.raises(PgProxyError) as info:
        asyncio.run(rsa_only.authenticate("svc", jwt.encode(claims, secret, algorithm="HS256")))
    assert "not allowed" in info.value.log_detail
