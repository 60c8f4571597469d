"""The JWT authenticator against a real (dev) IdP over HTTP: caching, rotation, failing closed,
keys withdrawn from the JWKS, the user-name claim as the identity, strict time claims."""

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


def test_the_sessions_of_one_token_share_one_identity_and_a_new_token_gets_its_own():
    issuer = DevIssuer().start()
    try:
        auth = _authenticator(issuer.url)
        token, later = issuer.mint("alice", ["g"]), issuer.mint("alice", ["g", "h"], ttl_s=7200)

        async def logins():
            first = await auth.authenticate("alice", token)
            again = await auth.authenticate("alice", token)
            with pytest.raises(PgProxyError):
                await auth.authenticate("bob", token)  # the shared identity is alice's alone
            with pytest.raises(PgProxyError):
                await auth.authenticate("ALICE", token)  # another spelling: checked, not shared
            renewed = await auth.authenticate("alice", later)
            return first, again, renewed, await auth.authenticate("alice", token)

        first, again, renewed, back = asyncio.run(logins())
        assert again is first and first.username == "alice" and first.groups == ("g",)
        assert renewed is not first and renewed.groups == ("g", "h") and renewed.expires_at > first.expires_at
        assert back == first and back.groups == ("g",)  # the first token again: its own claims, not the later's
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


def _refused(auth: JwtAuthenticator, user: str, token: str) -> PgProxyError:
    with pytest.raises(PgProxyError) as info:
        asyncio.run(auth.authenticate(user, token))
    return info.value


def test_the_identity_is_the_claims_spelling_and_other_spellings_are_refused_by_default():
    issuer = DevIssuer().start()
    try:
        token = issuer.mint("alice", ["g"])
        exact = _authenticator(issuer.url)
        assert asyncio.run(exact.authenticate("alice", token)).username == "alice"
        for user in ("ALICE", "Alice", " alice", "alice ", "alice\u00a0"):
            refused = _refused(exact, user, token)  # the token is in the cache by now: the check still runs
            assert refused.sqlstate == "28P01" and refused.message == f'authentication failed for user "{user}"'
        relaxed = _authenticator(issuer.url, username_case_insensitive=True)
        for user in ("ALICE", "Alice", "alice"):
            assert asyncio.run(relaxed.authenticate(user, token)).username == "alice"  # the claim's spelling
        for user in (" alice", "alice ", "ALICE "):
            assert "whitespace" in _refused(relaxed, user, token).log_detail
        mixed = issuer.mint("Alice.Smith")
        assert asyncio.run(relaxed.authenticate("alice.smith", mixed)).username == "Alice.Smith"
        assert "names another user" in _refused(exact, "alice.smith", mixed).log_detail
    finally:
        issuer.stop()


@pytest.mark.parametrize("claim, value", [
    ("exp", "{now_plus_hour}"), ("exp", True), ("exp", [1]), ("exp", None), ("nbf", "0"), ("nbf", False),
    ("iat", "{now}"), ("iat", {"t": 1}), ("exp", 1e300),
])
def test_time_claims_must_be_json_numbers(claim, value):
    issuer = DevIssuer().start()
    try:
        now = int(time.time())
        if isinstance(value, str):
            value = value.format(now=now, now_plus_hour=now + 3600)
        refused = _refused(_authenticator(issuer.url), "alice", issuer.mint("alice", **{claim: value}))
        assert refused.sqlstate == "28P01", refused.log_detail
        assert claim in refused.log_detail
    finally:
        issuer.stop()


def test_max_token_lifetime_is_enforced_and_needs_iat():
    issuer = DevIssuer().start()
    try:
        auth = _authenticator(issuer.url, max_token_lifetime_s=3600)
        assert asyncio.run(auth.authenticate("alice", issuer.mint("alice", ttl_s=3600))).username == "alice"
        long = _refused(auth, "alice", issuer.mint("alice", ttl_s=3601))
        assert long.sqlstate == "28P01" and "exceeds auth.jwt.max_token_lifetime_s" in long.log_detail
        now = int(time.time())
        payload = {"iss": issuer.url, "aud": "pgproxy", "exp": now + 60, "preferred_username": "alice"}
        no_iat = jwt.encode(payload, issuer.signing_key, algorithm="RS256", headers={"kid": issuer._keys[-1][0]})
        assert "has no 'iat'" in _refused(auth, "alice", no_iat).log_detail
        # Without the limit a token without iat is fine, as before.
        assert asyncio.run(_authenticator(issuer.url).authenticate("alice", no_iat)).username == "alice"
    finally:
        issuer.stop()


@pytest.mark.parametrize("interval, cache_control", [
    (1.0, ""),                      # the option bounds the key set's lifetime
    (1.0, "public, max-age=3600"),  # a longer max-age does not extend it
    (60.0, "max-age=1"),            # a shorter max-age shortens it
])
def test_a_key_removed_from_the_jwks_is_refused_within_the_refresh_interval(interval, cache_control):
    issuer = DevIssuer().start()
    issuer.cache_control = cache_control
    try:
        old_kid = issuer._keys[-1][0]
        issuer.rotate()
        doomed = issuer._keys[-1][0]
        auth = _authenticator(issuer.url, jwks_refresh_interval_s=interval, jwks_refresh_min_interval_s=0.5)

        async def scenario():
            cached = issuer.mint("alice")
            uncached = issuer.mint("bob")
            assert (await auth.authenticate("alice", cached)).username == "alice"
            assert (await auth.authenticate("alice", cached)).username == "alice"
            assert auth.cache_hits == 1
            issuer.retire(doomed)  # the IdP withdraws the key both tokens are signed with
            await asyncio.sleep(1.2)  # past the key set's lifetime
            results = []
            for user, token in (("alice", cached), ("bob", uncached)):
                try:
                    await auth.authenticate(user, token)
                    results.append("accepted")
                except PgProxyError as exc:
                    results.append((exc.sqlstate, exc.log_detail))
            return results

        results = asyncio.run(scenario())
        assert [r[0] for r in results] == ["28P01", "28P01"], results
        assert all(f"no signing key for kid='{doomed}'" in r[1] for r in results)
        assert auth.cache_hits == 1 and auth.keys.refreshes == 2
        assert set(auth.keys._keys) == {old_kid}
    finally:
        issuer.stop()


def test_a_failing_refresh_serves_the_old_keys_for_the_grace_period_then_fails_closed():
    issuer = DevIssuer().start()
    auth = _authenticator(issuer.url, jwks_refresh_interval_s=0.5, jwks_refresh_min_interval_s=0.2,
                          jwks_failure_grace_s=1.0, http_timeout_s=1)
    cached, uncached = issuer.mint("alice"), issuer.mint("bob")

    async def scenario():
        assert (await auth.authenticate("alice", cached)).username == "alice"
        issuer.stop()  # the IdP goes away
        await asyncio.sleep(0.7)  # past the lifetime, within the grace period
        within = [(await auth.authenticate(u, t)).username for u, t in (("alice", cached), ("bob", uncached))]
        await asyncio.sleep(1.0)  # past lifetime + grace
        after = []
        for user, token in (("alice", cached), ("bob", uncached)):
            try:
                await auth.authenticate(user, token)
                after.append("accepted")
            except PgProxyError as exc:
                after.append((exc.sqlstate, exc.message, exc.log_detail))
        return within, after, await auth.keys.ensure_loaded()

    within, after, ready = asyncio.run(scenario())
    assert within == ["alice", "bob"]
    assert [a[:2] for a in after] == [("28000", "authentication service unavailable")] * 2, after
    assert "beyond auth.jwt.jwks_failure_grace_s" in after[0][2]
    assert ready is False  # /readyz says so too
    assert auth.keys.refresh_failures >= 2
