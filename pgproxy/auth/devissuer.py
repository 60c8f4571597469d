"""A development token issuer, for the demo and the tests only — production uses a real IdP.

Serves OIDC discovery and a JWKS on loopback and mints RS256 tokens with keys made at
start. ``GET /dev/token?user=alice&groups=a,b`` returns a token (loopback clients
only), which is what ``pgproxy dev-token`` asks for. ``rotate()`` adds a new signing
key and publishes it, ``retire(kid)`` withdraws one, to exercise key rotation; a test may
set ``cache_control`` to send that header with the JWKS.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

DEFAULT_AUDIENCE = "pgproxy"


class DevIssuer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, audience: str = DEFAULT_AUDIENCE) -> None:
        self.audience = audience
        self._keys: list[tuple[str, rsa.RSAPrivateKey]] = []
        self.cache_control = ""  # Cache-Control sent with the JWKS; empty: none
        self.rotate()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                issuer._handle(self)

            def log_message(self, *args) -> None:
                pass  # requests carry tokens in replies; keep them out of any log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="dev-issuer", daemon=True)

    def start(self) -> "DevIssuer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def rotate(self) -> str:
        """Make a new signing key, publish it, and sign with it from now on."""
        kid = uuid.uuid4().hex[:12]
        self._keys.append((kid, rsa.generate_private_key(public_exponent=65537, key_size=2048)))
        return kid

    def retire(self, kid: str) -> rsa.RSAPrivateKey:
        """Stop publishing a key (as an IdP does after a compromise); return it, so a test can
        still sign with it."""
        for i, (known, key) in enumerate(self._keys):
            if known == kid:
                del self._keys[i]
                return key
        raise KeyError(kid)

    @property
    def signing_key(self) -> rsa.RSAPrivateKey:
        return self._keys[-1][1]

    def jwks(self) -> dict:
        keys = []
        for kid, key in self._keys:
            entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            entry.update(kid=kid, use="sig", alg="RS256")
            keys.append(entry)
        return {"keys": keys}

    def mint(self, user: str, groups: list[str] | tuple[str, ...] = (), ttl_s: int = 3600, **claims) -> str:
        now = int(time.time())
        payload = {"iss": self.url, "aud": self.audience, "sub": f"dev|{user}", "preferred_username": user,
                   "groups": list(groups), "iat": now, "nbf": now, "exp": now + ttl_s}
        payload.update(claims)
        kid, key = self._keys[-1]
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urlparse(request.path)
        if url.path == "/.well-known/openid-configuration":
            body = {"issuer": self.url, "jwks_uri": f"{self.url}/jwks.json", "token_endpoint": f"{self.url}/dev/token",
                    "id_token_signing_alg_values_supported": ["RS256"], "response_types_supported": ["token"],
                    "subject_types_supported": ["public"]}
            self._reply(request, 200, json.dumps(body), "application/json")
        elif url.path == "/jwks.json":
            self._reply(request, 200, json.dumps(self.jwks()), "application/json", self.cache_control)
        elif url.path == "/dev/token" and request.client_address[0] in ("127.0.0.1", "::1"):
            query = parse_qs(url.query)
            user = query.get("user", [""])[0]
            groups = [g for g in query.get("groups", [""])[0].split(",") if g]
            if not user:
                self._reply(request, 400, "user is required\n", "text/plain")
                return
            ttl = int(query.get("ttl", ["3600"])[0])
            self._reply(request, 200, self.mint(user, groups, ttl), "text/plain")
        else:
            self._reply(request, 404, "not found\n", "text/plain")

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body: str, content_type: str,
               cache_control: str = "") -> None:
        data = body.encode()
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        if cache_control:
            request.send_header("Cache-Control", cache_control)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
