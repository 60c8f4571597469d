"""RFC 7662 token introspection, for IdPs that issue opaque (non-JWT) access tokens.

The JWT authenticator (auth/jwt.py) hands a token that is not a JWT here when
``[auth.jwt] introspection_url`` is set; the claims that come back go through the same
identity and role mapping as a JWT's. pgproxy authenticates itself to the endpoint with
HTTP Basic (``introspection_client_id`` and the secret from
``introspection_client_secret_file``) and POSTs ``token=...&token_type_hint=access_token``.

Fail closed, like the JWKS: any answer but HTTP 200 with a JSON object, a timeout, or an
unreachable endpoint refuses the login (28000, "authentication service unavailable").
A token is accepted only when the answer says ``"active": true`` and carries ``exp`` (in the
future, with ``leeway_s``), ``iss`` equal to ``auth.jwt.issuer`` and ``aud`` naming
``auth.jwt.audience`` — an introspection endpoint calls a token active whoever it was
issued for. An active answer is remembered (keyed by the token's SHA-256, never the token)
for ``introspection_cache_s`` at most and never past ``exp``; refusals are not remembered.
The token is never logged and never part of an error.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict

from pgproxy.auth import remember
from pgproxy.errors import auth_failed, auth_unavailable

MAX_TOKEN_LENGTH = 16_384
MAX_ANSWER_BYTES = 1 << 20
CACHE_MARGIN_S = 10.0  # a remembered answer stops counting this long before the token expires
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~+/=")


def check_answer(answer: object, issuer: str, audience: str, leeway_s: float, now: float) -> dict:
    """The claims of an introspection answer that admits the token, or auth_failed (28P01)
    naming why not. Pure, for the unit tests."""
    if not isinstance(answer, dict):
        raise auth_unavailable("the introspection endpoint did not answer with a JSON object")
    if answer.get("active") is not True:
        raise auth_failed("", "the introspection endpoint says the token is not active")
    exp = answer.get("exp")
    if type(exp) not in (int, float) or not 0 < exp < 1e13:
        raise auth_failed("", "the introspection answer has no numeric 'exp'")
    if now > exp + leeway_s:
        raise auth_failed("", "token expired (introspection 'exp')")
    nbf = answer.get("nbf")
    if nbf is not None and (type(nbf) not in (int, float) or nbf > now + leeway_s):
        raise auth_failed("", "token not valid yet, or 'nbf' not a number (introspection)")
    if answer.get("iss") != issuer:
        raise auth_failed("", f"introspection 'iss' {answer.get('iss')!r} is not auth.jwt.issuer")
    aud = answer.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in audiences:
        raise auth_failed("", f"introspection 'aud' {aud!r} does not name auth.jwt.audience")
    return answer


class Introspector:
    """Asks the IdP whether an opaque token is active (see the module header)."""

    def __init__(self, cfg) -> None:
        self._cfg = cfg
        pair = (urllib.parse.quote(cfg.introspection_client_id, safe=""),
                urllib.parse.quote(cfg.introspection_client_secret or "", safe=""))
        self._authorization = "Basic " + base64.b64encode(":".join(pair).encode()).decode()
        self._ssl = ssl.create_default_context(cafile=cfg.ca_file or None)
        self._cache: OrderedDict[bytes, tuple[float, dict]] = OrderedDict()
        self.requests = 0
        self.failures = 0
        self.cache_hits = 0

    async def claims(self, token: str) -> dict:
        cfg = self._cfg
        if not token or len(token) > MAX_TOKEN_LENGTH or not set(token) <= _TOKEN_CHARS:
            raise auth_failed("", "the password is neither a JWT nor an opaque access token (RFC 6750 b64token)")
        digest = hashlib.sha256(token.encode()).digest()
        now = time.time()
        cached = self._cache.get(digest)
        if cached is not None:
            if now < cached[0]:
                self._cache.move_to_end(digest)
                self.cache_hits += 1
                return cached[1]
            del self._cache[digest]
        answer = await asyncio.get_running_loop().run_in_executor(None, self._ask, token)
        claims = check_answer(answer, cfg.issuer, cfg.audience, cfg.leeway_s, time.time())
        if cfg.introspection_cache_s > 0 and cfg.token_cache_size:
            until = min(float(claims["exp"]) - CACHE_MARGIN_S, time.time() + cfg.introspection_cache_s)
            remember(self._cache, digest, (until, claims), cfg.token_cache_size)
        return claims

    def _ask(self, token: str) -> object:
        """One POST to the endpoint (in a worker thread). Errors never carry the token: it is
        only in the request body, which no exception here quotes."""
        cfg = self._cfg
        self.requests += 1
        body = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"}).encode()
        request = urllib.request.Request(cfg.introspection_url, data=body, method="POST", headers={
            "Authorization": self._authorization, "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded"})
        context = self._ssl if cfg.introspection_url.startswith("https://") else None
        try:
            with urllib.request.urlopen(request, timeout=cfg.http_timeout_s, context=context) as response:
                data = response.read(MAX_ANSWER_BYTES + 1)
            if len(data) > MAX_ANSWER_BYTES:
                raise ValueError(f"more than {MAX_ANSWER_BYTES} bytes")
            return json.loads(data)
        except urllib.error.HTTPError as exc:
            self.failures += 1
            raise auth_unavailable(f"the introspection endpoint answered HTTP {exc.code}") from None
        except Exception as exc:  # unreachable, timed out, not JSON: refuse
            self.failures += 1
            raise auth_unavailable(f"cannot ask the introspection endpoint: {type(exc).__name__}: {exc}") from None
