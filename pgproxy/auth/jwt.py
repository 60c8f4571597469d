"""JWT (OIDC / OAuth2 access or ID token) as the password.

Validation is fail-closed and strict: only the configured algorithms; asymmetric keys
come only from the IdP's JWKS (never usable as an HMAC secret); HS* only with an
explicitly configured shared secret; exp is required; nbf, iat, iss and aud are
checked with the configured leeway. The client is told only "authentication failed";
the exact reason is returned in the error's log detail. The token itself is never
logged: the cache is keyed by its SHA-256.

Keys are fetched from ``jwks_url`` or via OIDC discovery, cached, and refetched when a
token names an unknown ``kid`` (at most once per ``jwks_refresh_min_interval_s``), so
IdP key rotation needs no restart. HTTP runs in a worker thread so the event loop
never blocks on the IdP.
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

from pgproxy.auth import Identity, remember
from pgproxy.config import HMAC_ALGORITHMS, JwtSection
from pgproxy.errors import PgProxyError, auth_failed, auth_unavailable

log = logging.getLogger("pgproxy.auth.jwt")

MAX_TOKEN_LENGTH = 16_384
MAX_JWKS_BYTES = 1 << 20
CACHE_MARGIN_S = 10.0  # a cached token stops counting this long before it expires
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


def looks_like_jwt(secret: str) -> bool:
    parts = secret.split(".")
    return len(parts) == 3 and all(parts[:2]) and secret[:2] == "ey"


class JwksCache:
    """The IdP's signing keys by kid, refreshed on demand and rate-limited."""

    def __init__(self, cfg: JwtSection) -> None:
        self._cfg = cfg
        # (the JWK as published, the key object) by kid; keys without a kid apart
        self._keys: dict[str, tuple[dict, object]] = {}
        self._anonymous: list[tuple[dict, object]] = []
        self._jwks_url = cfg.jwks_url
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._ssl = ssl.create_default_context(cafile=cfg.ca_file or None)
        self.refreshes = 0
        self.refresh_failures = 0

    @property
    def loaded(self) -> bool:
        return bool(self._keys or self._anonymous)

    async def ensure_loaded(self) -> bool:
        """Fetch the keys if none are loaded (rate-limited like any refetch); report whether any are."""
        if not self.loaded:
            async with self._lock:
                if not self.loaded and time.monotonic() - self._fetched_at >= self._cfg.jwks_refresh_min_interval_s:
                    try:
                        await self._refresh()
                    except PgProxyError as exc:
                        log.warning("cannot load the IdP's signing keys: %s", exc.log_detail)
        return self.loaded

    async def key_for(self, kid: str | None, alg: str) -> object:
        key = self._lookup(kid, alg)
        if key is None:
            async with self._lock:
                key = self._lookup(kid, alg)
                if key is None and time.monotonic() - self._fetched_at >= self._cfg.jwks_refresh_min_interval_s:
                    await self._refresh()
                    key = self._lookup(kid, alg)
        if key is None:
            raise auth_failed("", f"no signing key for kid={kid!r} alg={alg} in the IdP's JWKS")
        return key

    def _lookup(self, kid: str | None, alg: str) -> object | None:
        candidates = [self._keys[kid]] if kid in self._keys else ([] if kid else self._anonymous)
        family = _KTY_FOR_ALG.get(alg[:2])
        for published, key in candidates:
            declared = published.get("alg")
            if published.get("kty") == family and (declared is None or declared == alg):
                return key
        return None

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            if not self._jwks_url:
                discovery = await self._get_json(self._cfg.issuer.rstrip("/") + "/.well-known/openid-configuration")
                url = discovery.get("jwks_uri")
                if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                    raise ValueError("discovery document has no usable jwks_uri")
                self._jwks_url = url
            document = await self._get_json(self._jwks_url)
        except Exception as exc:  # every way the IdP can fail means: refuse
            self.refresh_failures += 1
            raise auth_unavailable(f"cannot fetch the IdP's keys: {exc}") from None
        keys, anonymous = {}, []
        for entry in document.get("keys", []) if isinstance(document, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
                continue  # symmetric keys are never taken from a JWKS
            try:
                key = (entry, pyjwt.PyJWK(entry).key)
            except pyjwt.PyJWTError as exc:
                log.warning("skipping unusable JWKS key kid=%s: %s", entry.get("kid"), exc)
                continue
            if isinstance(entry.get("kid"), str):
                keys[entry["kid"]] = key
            else:
                anonymous.append(key)
        self._keys, self._anonymous = keys, anonymous
        self.refreshes += 1
        log.info("loaded %d signing keys from %s", len(keys) + len(anonymous), self._jwks_url)

    async def _get_json(self, url: str) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_json_blocking, url)

    def _get_json_blocking(self, url: str) -> dict:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        context = self._ssl if url.startswith("https://") else None
        with urllib.request.urlopen(request, timeout=self._cfg.http_timeout_s, context=context) as response:
            body = response.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"{url} answered with more than {MAX_JWKS_BYTES} bytes")
        return json.loads(body)


class JwtAuthenticator:
    method = "jwt"

    def __init__(self, cfg: JwtSection, shared_secret: bytes | None) -> None:
        self._cfg = cfg
        self._secret = shared_secret
        self.keys = JwksCache(cfg)
        self._cache: OrderedDict[bytes, tuple[float, dict]] = OrderedDict()
        self.cache_hits = 0

    async def authenticate(self, user: str, token: str) -> Identity:
        try:
            claims = await self._verified_claims(token)
        except PgProxyError as exc:
            if exc.sqlstate == "28P01":
                raise auth_failed(user, exc.log_detail) from None
            raise
        return self._identity(user, claims)

    async def _verified_claims(self, token: str) -> dict:
        if len(token) > MAX_TOKEN_LENGTH or not looks_like_jwt(token):
            raise auth_failed("", "password is not a JWT")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        now = time.time()
        if cached and now < cached[0]:
            self._cache.move_to_end(digest)
            self.cache_hits += 1
            return cached[1]
        cfg = self._cfg
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError as exc:
            raise auth_failed("", f"malformed token header: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            raise auth_failed("", f"token algorithm {alg!r} is not allowed")
        if alg in HMAC_ALGORITHMS:
            key = self._secret
            if not key:
                raise auth_failed("", "HMAC token but no shared secret is configured")
        else:
            kid = header.get("kid")
            key = await self.keys.key_for(kid if isinstance(kid, str) else None, alg)
        try:
            claims = pyjwt.decode(token, key, algorithms=[alg], audience=cfg.audience, issuer=cfg.issuer,
                                  leeway=cfg.leeway_s, options={"require": ["exp", "iss", "aud"]})
        except pyjwt.PyJWTError as exc:
            raise auth_failed("", f"token rejected: {type(exc).__name__}: {exc}") from None
        if cfg.token_cache_size:
            remember(self._cache, digest, (float(claims["exp"]) - CACHE_MARGIN_S, claims), cfg.token_cache_size)
        return claims

    def _identity(self, user: str, claims: dict) -> Identity:
        cfg = self._cfg
        claimed = claims.get(cfg.username_claim)
        if not isinstance(claimed, str) or not claimed:
            raise auth_failed(user, f"token has no string claim {cfg.username_claim!r}")
        same = claimed.casefold() == user.casefold() if cfg.username_case_insensitive else claimed == user
        if not same:
            raise auth_failed(user, f"claim {cfg.username_claim!r} names another user ({claimed!r})")
        raw_groups = claims.get(cfg.groups_claim, [])
        if isinstance(raw_groups, str):
            raw_groups = [raw_groups]
        groups = tuple(g for g in raw_groups if isinstance(g, str)) if isinstance(raw_groups, list) else ()
        return Identity(username=user, subject=str(claims.get("sub", "")), issuer=str(claims.get("iss", "")),
                        groups=groups, auth_method=self.method, expires_at=float(claims["exp"]))
