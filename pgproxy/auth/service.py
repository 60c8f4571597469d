"""Service accounts for batch jobs: a static secret per account, stored only as a salted
scrypt hash, each account bound to its own least-privilege role and audited as
``svc:<name>``.

The accounts file (TOML, read at load and on SIGHUP):

    [[account]]
    name = "etl_nightly"
    role = "etl_writer"
    secret_hash = "scrypt$16384$8$1$<salt>$<hash>"   # from `pgproxy hash-secret`

scrypt is deliberately slow (tens of milliseconds), so it runs in a thread, and a verified
secret is remembered for a minute under an HMAC with a per-process key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
import tomllib
from collections import OrderedDict
from dataclasses import dataclass

from pgproxy.auth import Identity, remember
from pgproxy.errors import auth_failed

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
VERIFIED_TTL_S = 60.0
MAX_SECRET_LENGTH = 1024
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def secret_matches(secret: str, encoded: str) -> bool:
    _scheme, n, r, p, salt, expected = encoded.split("$")
    expected_bytes = base64.b64decode(expected)
    digest = hashlib.scrypt(secret.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                            dklen=len(expected_bytes), maxmem=256 * 1024 * 1024)
    return hmac.compare_digest(digest, expected_bytes)


@dataclass(frozen=True)
class ServiceAccount:
    name: str
    role: str
    secret_hash: str


def load_accounts(path: str) -> tuple[dict[str, ServiceAccount], list[str]]:
    """The accounts in ``path`` and every problem found (problems name the entry)."""
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        return {}, [f"cannot read {path!r}: {exc.strerror}"]
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"{path!r} is not valid TOML: {exc}"]
    accounts, problems = {}, []
    for i, entry in enumerate(table.get("account", [])):
        where = f"account[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "role", "secret_hash"}:
            problems.append(f"{where}: needs exactly name, role and secret_hash")
            continue
        name, role, encoded = entry["name"], entry["role"], entry["secret_hash"]
        if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
            problems.append(f"{where}.name: letters, digits, _ - . only")
        elif name in accounts:
            problems.append(f"{where}.name: {name!r} appears twice")
        if not isinstance(role, str) or not role:
            problems.append(f"{where}.role: must be a role name")
        parts = encoded.split("$") if isinstance(encoded, str) else []
        if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
            problems.append(f"{where}.secret_hash: not a `pgproxy hash-secret` hash")
        if not problems or not problems[-1].startswith(where):
            accounts[name] = ServiceAccount(name, role, encoded)
    if set(table) - {"account"}:
        problems.append(f"unknown keys: {', '.join(sorted(set(table) - {'account'}))}")
    return accounts, problems


class ServiceAccounts:
    method = "service"

    def __init__(self, accounts: dict[str, ServiceAccount]) -> None:
        self._accounts = accounts
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()

    def knows(self, user: str) -> bool:
        return user in self._accounts

    async def authenticate(self, user: str, secret: str) -> Identity:
        account = self._accounts[user]
        if not secret or len(secret) > MAX_SECRET_LENGTH:
            raise auth_failed(user, "empty or oversized service account secret")
        key = hmac.new(self._key, f"{user}\0{account.secret_hash}\0{secret}".encode(), hashlib.sha256).digest()
        if self._verified.get(key, 0) < time.monotonic():
            if not await asyncio.get_running_loop().run_in_executor(None, secret_matches, secret, account.secret_hash):
                raise auth_failed(user, "wrong service account secret")
            remember(self._verified, key, time.monotonic() + VERIFIED_TTL_S, 10_000)
        return Identity(username=f"svc:{user}", subject=user, issuer="service-accounts", groups=(),
                        auth_method=self.method, role=account.role)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
