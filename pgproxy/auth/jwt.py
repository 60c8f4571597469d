"""JWT (OIDC / OAuth2 access or ID token) as the password.

Validation is fail-closed and strict: only the configured algorithms; asymmetric keys
come only from the IdP's JWKS (never usable as an HMAC secret); HS* only with an
explicitly configured shared secret; exp is required; exp, nbf and iat must be JSON
numbers and are checked with the configured leeway; iss and aud must match; optionally
exp - iat is bounded (``max_token_lifetime_s``). The identity's user name is the
username claim's value (see ``pgproxy.auth.canonical_username``). The client is told
only "authentication failed"; the exact reason is returned in the error's log detail.
The token itself is never logged: the cache is keyed by its SHA-256.

Keys come from ``jwks_url`` or via OIDC discovery. A fetched key set is trusted for
``jwks_refresh_interval_s`` (shorter if the JWKS answer's Cache-Control max-age says
so, never below ``jwks_refresh_min_interval_s``); the first login after that refetches
it, under the lock, so a key the IdP removed is refused within that interval. A token
naming an unknown ``kid`` refetches early (at most once per ``jwks_refresh_min_interval_s``),
so rotation needs no restart. A validated token is remembered with the fingerprint of
the key that verified it and counts only while that key is still published. If
refetching fails, the old keys serve for ``jwks_failure_grace_s`` more, then every JWT
login is refused (28000) until the IdP answers again: fail closed. HTTP runs in a worker
thread so the event loop never blocks on the IdP.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
import time
import urllib.request
from collections import OrderedDict

import jwt as pyjwt

from pgproxy.auth import Identity, canonical_username, remember
from pgproxy.auth.introspection import Introspector
from pgproxy.config import HMAC_ALGORITHMS, JwtSection
from pgproxy.errors import PgProxyError, auth_failed, auth_unavailable

log = logging.getLogger("pgproxy.auth.jwt")

MAX_TOKEN_LENGTH = 16_384
MAX_JWKS_BYTES = 1 << 20
CACHE_MARGIN_S = 10.0  # a cached token stops counting this long before it expires
TIME_CLAIMS = ("exp", "nbf", "iat")
MAX_TIMESTAMP = 1e13  # seconds since 1970; far beyond any real token, small enough for a float
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


def looks_like_jwt(secret: str) -> bool:
    parts = secret.split(".")
    return len(parts) == 3 and all(parts[:2]) and secret[:2] == "ey"


def check_time_claims(claims: dict, max_lifetime_s: float) -> None:
    """exp, nbf, iat are JSON numbers (RFC 7519 NumericDate) — PyJWT alone takes "1700000000"
    and true — and, with ``max_lifetime_s``, exp - iat is at most that."""
    for name in TIME_CLAIMS:
        if name in claims:
            value = claims[name]
            # type(), not isinstance: bool is an int; the range check also refuses NaN and infinities
            if type(value) not in (int, float) or not -MAX_TIMESTAMP < value < MAX_TIMESTAMP:
                raise auth_failed("", f"claim {name!r} is not a JSON number of seconds ({type(value).__name__})")
    if "exp" not in claims:
        raise auth_failed("", "token has no 'exp'")
    if max_lifetime_s:
        if "iat" not in claims:
            raise auth_failed("", "token has no 'iat', which auth.jwt.max_token_lifetime_s requires")
        lifetime = claims["exp"] - claims["iat"]
        if lifetime > max_lifetime_s:
            raise auth_failed("", f"token lifetime {lifetime:.0f} s exceeds auth.jwt.max_token_lifetime_s "
                                  f"({max_lifetime_s:.0f} s)")


def jwks_lifetime(cache_control: str | None, interval: float, floor: float) -> float:
    """How long a fetched JWKS is trusted: ``interval``, or the answer's Cache-Control max-age
    when shorter (no-cache / no-store count as 0), but never less than ``floor``."""
    max_age = None
    for directive in (cache_control or "").split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-cache", "no-store"):
            max_age = 0.0
        elif name == "max-age":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                continue  # a malformed directive is ignored, as caches do
            if seconds == seconds:  # not NaN
                max_age = max(0.0, seconds) if max_age is None else min(max_age, max(0.0, seconds))
    if max_age is None:
        return interval
    return min(interval, max(floor, max_age))


def _fingerprint(entry: dict) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JwksCache:
    """The IdP's signing keys by kid: refreshed when their lifetime ends or an unknown kid
    appears (rate-limited), refused once stale past the grace period."""

    def __init__(self, cfg: JwtSection) -> None:
        self._cfg = cfg
        # (the JWK as published, the key object, its fingerprint) by kid; keys without a kid apart
        self._keys: dict[str, tuple[dict, object, str]] = {}
        self._anonymous: list[tuple[dict, object, str]] = []
        self._trusted: frozenset[str] = frozenset()  # fingerprints of the keys now published
        self._jwks_url = cfg.jwks_url
        self._fetched_at = float("-inf")   # the last attempt (monotonic)
        self._loaded_at = float("-inf")    # the last success
        self._lifetime = cfg.jwks_refresh_interval_s
        self._last_error = ""
        self._lock = asyncio.Lock()
        self._ssl = ssl.create_default_context(cafile=cfg.ca_file or None)
        self.refreshes = 0
        self.refresh_failures = 0

    @property
    def loaded(self) -> bool:
        return bool(self._keys or self._anonymous)

    def trusts(self, fingerprint: str) -> bool:
        """Whether the key with this fingerprint is in the key set now published."""
        return fingerprint in self._trusted

    async def ensure_loaded(self) -> bool:
        """Fetch the keys if none are loaded or their lifetime is over (rate-limited like any
        refetch); report whether usable keys are held (for /readyz and the start-up warm-up)."""
        try:
            await self.ensure_fresh()
        except PgProxyError:
            return False  # the reason was logged when the fetch failed
        return self.loaded

    async def ensure_fresh(self) -> None:
        """Refetch a key set past its lifetime; raise auth_unavailable if no key set can be
        trusted: none was ever fetched, or refetching has failed past the grace period."""
        cfg = self._cfg
        if time.monotonic() < self._loaded_at + self._lifetime:
            return
        async with self._lock:
            now = time.monotonic()
            if now >= self._loaded_at + self._lifetime and now - self._fetched_at >= cfg.jwks_refresh_min_interval_s:
                try:
                    await self._refresh()
                except PgProxyError as exc:
                    log.warning("cannot refresh the IdP's signing keys: %s", exc.log_detail)
        now = time.monotonic()
        if now < self._loaded_at + self._lifetime:
            return
        if not self.loaded:
            raise auth_unavailable(f"cannot fetch the IdP's keys: {self._last_error or 'not fetched yet'}")
        stale_for = now - self._loaded_at - self._lifetime
        if stale_for >= cfg.jwks_failure_grace_s:
            raise auth_unavailable(f"the IdP's keys are {stale_for:.0f} s past their lifetime, beyond "
                                   f"auth.jwt.jwks_failure_grace_s, and cannot be refetched: {self._last_error}")
        # Within the grace period: the old keys still serve (logged when the refetch failed).

    async def key_for(self, kid: str | None, alg: str) -> tuple[object, str]:
        """The key to verify a token with, and its fingerprint."""
        await self.ensure_fresh()
        found = self._lookup(kid, alg)
        if found is None:
            async with self._lock:
                found = self._lookup(kid, alg)
                if found is None and time.monotonic() - self._fetched_at >= self._cfg.jwks_refresh_min_interval_s:
                    await self._refresh()
                    found = self._lookup(kid, alg)
        if found is None:
            raise auth_failed("", f"no signing key for kid={kid!r} alg={alg} in the IdP's JWKS")
        return found

    def _lookup(self, kid: str | None, alg: str) -> tuple[object, str] | None:
        candidates = [self._keys[kid]] if kid in self._keys else ([] if kid else self._anonymous)
        family = _KTY_FOR_ALG.get(alg[:2])
        for published, key, fingerprint in candidates:
            declared = published.get("alg")
            if published.get("kty") == family and (declared is None or declared == alg):
                return key, fingerprint
        return None

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            if not self._jwks_url:
                discovery, _ = await self._get_json(self._cfg.issuer.rstrip("/") + "/.well-known/openid-configuration")
                url = discovery.get("jwks_uri") if isinstance(discovery, dict) else None
                if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                    raise ValueError("discovery document has no usable jwks_uri")
                self._jwks_url = url
            document, cache_control = await self._get_json(self._jwks_url)
        except Exception as exc:  # every way the IdP can fail means: refuse
            self.refresh_failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise auth_unavailable(f"cannot fetch the IdP's keys: {exc}") from None
        keys, anonymous = {}, []
        for entry in document.get("keys", []) if isinstance(document, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
                continue  # symmetric keys are never taken from a JWKS
            try:
                key = (entry, pyjwt.PyJWK(entry).key, _fingerprint(entry))
            except pyjwt.PyJWTError as exc:
                log.warning("skipping unusable JWKS key kid=%s: %s", entry.get("kid"), exc)
                continue
            if isinstance(entry.get("kid"), str):
                keys[entry["kid"]] = key
            else:
                anonymous.append(key)
        gone = sorted(kid for kid in self._keys if kid not in keys)
        self._keys, self._anonymous = keys, anonymous
        self._trusted = frozenset(k[2] for k in (*keys.values(), *anonymous))
        self._loaded_at = time.monotonic()
        cfg = self._cfg
        self._lifetime = jwks_lifetime(cache_control, cfg.jwks_refresh_interval_s, cfg.jwks_refresh_min_interval_s)
        self._last_error = ""
        self.refreshes += 1
        log.info("loaded %d signing keys from %s, trusted for %.0f s", len(keys) + len(anonymous), self._jwks_url,
                 self._lifetime)
        if gone:
            log.info("signing keys no longer published, now refused: kid=%s", ",".join(gone))

    async def _get_json(self, url: str) -> tuple[object, str | None]:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_json_blocking, url)

    def _get_json_blocking(self, url: str) -> tuple[object, str | None]:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        context = self._ssl if url.startswith("https://") else None
        with urllib.request.urlopen(request, timeout=self._cfg.http_timeout_s, context=context) as response:
            body = response.read(MAX_JWKS_BYTES + 1)
            cache_control = response.headers.get("Cache-Control")
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"{url} answered with more than {MAX_JWKS_BYTES} bytes")
        return json.loads(body), cache_control


class JwtAuthenticator:
    method = "jwt"

    def __init__(self, cfg: JwtSection, shared_secret: bytes | None) -> None:
        self._cfg = cfg
        self._secret = shared_secret
        self.keys = JwksCache(cfg)
        # Opaque access tokens, when the IdP issues them (auth/introspection.py)
        self.introspection = Introspector(cfg) if cfg.introspection_url else None
        # token digest -> (counts until, claims, fingerprint of the verifying JWKS key or None for HMAC)
        self._cache: OrderedDict[bytes, tuple[float, dict, str | None]] = OrderedDict()
        self.cache_hits = 0
        # startup user -> (the cached claims it was made from, the Identity): the sessions one
        # token opens (a tool's connection pool) share one frozen Identity, not one each (memory
        # per idle client). Only the very claims object the token cache returned again matches.
        self._identities: OrderedDict[str, tuple[dict, Identity]] = OrderedDict()

    async def authenticate(self, user: str, token: str) -> Identity:
        try:
            claims = await self._verified_claims(token)
        except PgProxyError as exc:
            if exc.sqlstate == "28P01":
                raise auth_failed(user, exc.log_detail) from None
            raise
        known = self._identities.get(user)
        if known is not None and known[0] is claims:
            return known[1]
        identity = self._identity(user, claims)
        if self._cfg.token_cache_size:
            remember(self._identities, user, (claims, identity), self._cfg.token_cache_size)
        return identity

    async def _verified_claims(self, token: str) -> dict:
        if self.introspection is not None and not looks_like_jwt(token):
            return await self.introspection.claims(token)
        if len(token) > MAX_TOKEN_LENGTH or not looks_like_jwt(token):
            raise auth_failed("", "password is not a JWT")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached and time.time() < cached[0]:
            fingerprint = cached[2]
            if fingerprint is not None:
                await self.keys.ensure_fresh()  # a cached token is no better than its key
            if fingerprint is None or self.keys.trusts(fingerprint):
                self._cache.move_to_end(digest)
                self.cache_hits += 1
                return cached[1]
            del self._cache[digest]  # its key was withdrawn: verify again, which refuses it
        cfg = self._cfg
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError as exc:
            raise auth_failed("", f"malformed token header: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            raise auth_failed("", f"token algorithm {alg!r} is not allowed")
        fingerprint = None
        if alg in HMAC_ALGORITHMS:
            key = self._secret
            if not key:
                raise auth_failed("", "HMAC token but no shared secret is configured")
        else:
            kid = header.get("kid")
            key, fingerprint = await self.keys.key_for(kid if isinstance(kid, str) else None, alg)
        try:
            claims = pyjwt.decode(token, key, algorithms=[alg], audience=cfg.audience, issuer=cfg.issuer,
                                  leeway=cfg.leeway_s, options={"require": ["exp", "iss", "aud"]})
        except pyjwt.PyJWTError as exc:
            raise auth_failed("", f"token rejected: {type(exc).__name__}: {exc}") from None
        check_time_claims(claims, cfg.max_token_lifetime_s)
        if cfg.token_cache_size:
            remember(self._cache, digest, (float(claims["exp"]) - CACHE_MARGIN_S, claims, fingerprint),
                     cfg.token_cache_size)
        return claims

    def _identity(self, user: str, claims: dict) -> Identity:
        cfg = self._cfg
        username = canonical_username(user, claims.get(cfg.username_claim), cfg.username_case_insensitive,
                                      f"claim {cfg.username_claim!r}")
        raw_groups = claims.get(cfg.groups_claim, [])
        if isinstance(raw_groups, str):
            raw_groups = [raw_groups]
        groups = tuple(g for g in raw_groups if isinstance(g, str)) if isinstance(raw_groups, list) else ()
        client_id = claims.get("azp") or claims.get("client_id") or ""
        amr, acr, auth_time = sign_in_strength(claims)
        return Identity(username=username, subject=str(claims.get("sub", "")), issuer=str(claims.get("iss", "")),
                        groups=groups, auth_method=self.method, expires_at=float(claims["exp"]),
                        client_id=client_id if isinstance(client_id, str) else "", actors=_actors(claims.get("act")),
                        amr=amr, acr=acr, auth_time=auth_time, token_id=_token_id(claims.get("jti")))


MAX_AMR_VALUES = 16
MAX_CLAIM_TEXT = 256


def sign_in_strength(claims: dict) -> tuple[tuple[str, ...], str, float | None]:
    """The token's 'amr' (a list of method names, RFC 8176), 'acr' (a string) and
    'auth_time' (a NumericDate), for [[access]] conditions. A claim of the wrong shape
    counts as absent, so a condition that needs it is not met (fail closed); values are
    bounded so a token cannot make the identity large."""
    raw_amr = claims.get("amr")
    amr = tuple(v for v in raw_amr[:MAX_AMR_VALUES] if isinstance(v, str) and len(v) <= MAX_CLAIM_TEXT) \
        if isinstance(raw_amr, list) else ()
    acr = claims.get("acr")
    acr = acr if isinstance(acr, str) and len(acr) <= MAX_CLAIM_TEXT else ""
    auth_time = claims.get("auth_time")
    # type(), not isinstance: true is no time; the range also refuses NaN and infinities
    auth_time = float(auth_time) if type(auth_time) in (int, float) and 0 <= auth_time < MAX_TIMESTAMP else None
    return amr, acr, auth_time


def _token_id(jti) -> str:
    """'jti' as text when it is a usable one (a string of at most 512 characters), else ''."""
    return jti if isinstance(jti, str) and len(jti) <= 512 else ""


def _actors(act, depth: int = 0) -> tuple[str, ...]:
    """RFC 8693 'act': {"sub": "agent", "act": {"sub": "…"}} — the acting subjects, outermost
    first (bounded: a token is at most 16 KiB, the chain at most 8 deep here)."""
    if not isinstance(act, dict) or depth >= 8:
        return ()
    subject = act.get("sub") or act.get("client_id")
    here = (str(subject)[:256],) if subject else ()
    return here + _actors(act.get("act"), depth + 1)
